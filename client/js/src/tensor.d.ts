/** A wire dtype code (safetensors'). */
export type DtypeCode =
  | "F64" | "F32" | "F16" | "BF16" | "F8_E4M3" | "F8_E5M2"
  | "I64" | "I32" | "I16" | "I8" | "U64" | "U32" | "U16" | "U8" | "BOOL";

/** The typed array each dtype decodes to (16- and 8-bit floats widened to Float32Array). */
export interface ArrayOfDtype {
  F64: Float64Array;
  F32: Float32Array;
  F16: Float32Array;
  BF16: Float32Array;
  F8_E4M3: Float32Array;
  F8_E5M2: Float32Array;
  I64: BigInt64Array;
  I32: Int32Array;
  I16: Int16Array;
  I8: Int8Array;
  U64: BigUint64Array;
  U32: Uint32Array;
  U16: Uint16Array;
  U8: Uint8Array;
  BOOL: Uint8Array;
}

export type TypedArray = ArrayOfDtype[DtypeCode];

export const DTYPES: Readonly<Record<DtypeCode, { bytes: number; wire: unknown; array: unknown }>>;

/** A tensor: `data` holds the elements in C (row-major) order. */
export class Tensor<D extends DtypeCode = DtypeCode> {
  constructor(dtype: D, shape: number[], data: ArrayOfDtype[D], name?: string);
  /** The code it travelled as (a widened F16 keeps "F16"; its data is a Float32Array). */
  readonly dtype: D;
  readonly shape: number[];
  readonly data: ArrayOfDtype[D];
  /** What it is, e.g. "blocks.0.hook_resid_pre". */
  readonly name: string;
  /** The number of elements. */
  readonly size: number;
  /** The element at `index` (one integer per axis; negative counts from the end). */
  at(...index: number[]): number | bigint;
  /** The elements as nested arrays (a bare value for a scalar; BOOL as booleans). */
  toArray(): any;
}

/** A tensor from nested arrays of numbers (default F32), or a typed array (1-D). */
export function tensor(values: TypedArray | readonly unknown[], dtype?: DtypeCode): Tensor;

/** What request fields accept as a tensor: a Tensor, a typed array (1-D), `{dtype?, shape, data}`. */
export type TensorLike =
  | Tensor
  | TypedArray
  | { dtype?: DtypeCode; shape: readonly number[]; data: TypedArray | readonly number[]; name?: string };

/** A tensor value for a request body: a tensor map (msgpack), or `{ref}` for a stored tensor id. */
export function wireTensor(value: TensorLike | string): Record<string, unknown>;
