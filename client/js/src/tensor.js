/**
 * Tensors in JavaScript: a dtype code, a shape and a flat typed array in C (row-major) order.
 *
 * Element types are the wire's (safetensors') codes, proto/README.md §2. Each decodes to the
 * typed array in `DTYPES`; the 16- and 8-bit floats are widened to Float32Array (JavaScript has
 * no narrower float arrays in Node 20) and keep their code in `dtype`, so the precision they
 * travelled with stays visible.
 */

import { WireFormatError } from "./errors.js";

if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
  throw new Error("hooklab needs a little-endian host (typed arrays view wire bytes in place)");
}

/**
 * Each dtype code: its size on the wire, the array it is read as (`wire`) and the array users
 * get (`array`; differs for widened floats).
 * @type {Record<string, {bytes: number, wire: any, array: any}>}
 */
export const DTYPES = {
  F64: { bytes: 8, wire: Float64Array, array: Float64Array },
  F32: { bytes: 4, wire: Float32Array, array: Float32Array },
  F16: { bytes: 2, wire: Uint16Array, array: Float32Array },
  BF16: { bytes: 2, wire: Uint16Array, array: Float32Array },
  F8_E4M3: { bytes: 1, wire: Uint8Array, array: Float32Array },
  F8_E5M2: { bytes: 1, wire: Uint8Array, array: Float32Array },
  I64: { bytes: 8, wire: BigInt64Array, array: BigInt64Array },
  I32: { bytes: 4, wire: Int32Array, array: Int32Array },
  I16: { bytes: 2, wire: Int16Array, array: Int16Array },
  I8: { bytes: 1, wire: Int8Array, array: Int8Array },
  U64: { bytes: 8, wire: BigUint64Array, array: BigUint64Array },
  U32: { bytes: 4, wire: Uint32Array, array: Uint32Array },
  U16: { bytes: 2, wire: Uint16Array, array: Uint16Array },
  U8: { bytes: 1, wire: Uint8Array, array: Uint8Array },
  BOOL: { bytes: 1, wire: Uint8Array, array: Uint8Array },
};

/** The dtype code a typed array is sent as (the inverse of `DTYPES[code].array`). */
const ARRAY_DTYPES = new Map([
  [Float64Array, "F64"], [Float32Array, "F32"], [BigInt64Array, "I64"], [Int32Array, "I32"],
  [Int16Array, "I16"], [Int8Array, "I8"], [BigUint64Array, "U64"], [Uint32Array, "U32"],
  [Uint16Array, "U16"], [Uint8Array, "U8"],
]);

/** The number of elements of `shape` (1 for a scalar `[]`). */
export function numel(shape) {
  return shape.reduce((total, size) => total * size, 1);
}

/** A tensor: `data` holds `numel(shape)` elements in C order. */
export class Tensor {
  /**
   * @param {string} dtype wire dtype code (`DTYPES`)
   * @param {number[]} shape sizes in C order; `[]` is a scalar
   * @param {ArrayLike<number | bigint>} data flat elements, a typed array
   * @param {string} [name] what the tensor is, e.g. "blocks.0.hook_resid_pre"
   */
  constructor(dtype, shape, data, name = "") {
    if (!Object.hasOwn(DTYPES, dtype)) throw new WireFormatError(unknownDtype(dtype));
    if (data.length !== numel(shape)) {
      throw new WireFormatError(`shape [${shape}] needs ${numel(shape)} elements, got ${data.length}`);
    }
    this.dtype = dtype;
    this.shape = shape;
    this.data = data;
    this.name = name;
  }

  /** The number of elements. */
  get size() {
    return this.data.length;
  }

  /** The element at `index` (one integer per axis; negative counts from the end). */
  at(...index) {
    if (index.length !== this.shape.length) {
      throw new RangeError(`index of ${index.length} axes into a tensor of shape [${this.shape}]`);
    }
    let flat = 0;
    for (let axis = 0; axis < index.length; axis++) {
      const size = this.shape[axis];
      const i = index[axis] < 0 ? index[axis] + size : index[axis];
      if (!Number.isInteger(i) || i < 0 || i >= size) {
        throw new RangeError(`index ${index[axis]} is out of range for axis ${axis} of size ${size}`);
      }
      flat = flat * size + i;
    }
    return this.data[flat];
  }

  /** The elements as nested arrays (a bare value for a scalar); BOOL as booleans. */
  toArray() {
    const bool = this.dtype === "BOOL";
    const nest = (axis, offset) => {
      if (axis === this.shape.length) return bool ? this.data[offset] === 1 : this.data[offset];
      const stride = numel(this.shape.slice(axis + 1));
      return Array.from({ length: this.shape[axis] }, (_, i) => nest(axis + 1, offset + i * stride));
    };
    return nest(0, 0);
  }
}

/**
 * A tensor from nested arrays of numbers (or a typed array, 1-D), like `torch.tensor`.
 * @param {any} values nested arrays, all rows the same length
 * @param {string} [dtype] default "F32" (a typed array: its own type)
 */
export function tensor(values, dtype) {
  if (ArrayBuffer.isView(values)) {
    const code = dtype ?? ARRAY_DTYPES.get(values.constructor);
    return new Tensor(code, [values.length], values);
  }
  const shape = [];
  for (let level = values; Array.isArray(level); level = level[0]) shape.push(level.length);
  const code = dtype ?? "F32";
  const flat = Array.isArray(values) ? values.flat(Infinity) : [values]; // a scalar: shape []
  if (flat.length !== numel(shape)) throw new RangeError("rows of unequal length");
  const Array_ = DTYPES[code]?.array;
  if (!Array_) throw new WireFormatError(unknownDtype(code));
  const data = Array_ === BigInt64Array || Array_ === BigUint64Array
    ? Array_.from(flat, (v) => BigInt(v))
    : Array_.from(flat, (v) => (typeof v === "boolean" ? Number(v) : v));
  return new Tensor(code, shape, data);
}

export function unknownDtype(code) {
  return `unknown dtype ${JSON.stringify(code)}; expected one of ${Object.keys(DTYPES).join(", ")}`;
}

// --- decoding payloads --------------------------------------------------------------------

/**
 * `bytes` (a tensor's raw little-endian payload) as the dtype's user array: a view when
 * `bytes` is aligned for the element size, else one copy; widened floats are converted.
 * @param {string} dtype
 * @param {Uint8Array} bytes
 */
export function arrayOf(dtype, bytes) {
  const { bytes: itemsize, wire } = DTYPES[dtype];
  const count = bytes.byteLength / itemsize;
  const aligned = bytes.byteOffset % itemsize === 0 ? bytes : bytes.slice();
  const raw = new wire(aligned.buffer, aligned.byteOffset, count);
  switch (dtype) {
    case "F16":
      return widen(raw, halfTable());
    case "BF16": {
      const out = new Float32Array(count);
      const bits = new Uint32Array(out.buffer);
      for (let i = 0; i < count; i++) bits[i] = raw[i] << 16;
      return out;
    }
    case "F8_E4M3":
      return widen(raw, float8Table(4, 3));
    case "F8_E5M2":
      return widen(raw, float8Table(5, 2));
    case "BOOL":
      if (raw.some((b) => b > 1)) throw new WireFormatError("a BOOL tensor holds a byte other than 0 or 1");
      return raw;
    default:
      return raw;
  }
}

function widen(raw, table) {
  const out = new Float32Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = table[raw[i]];
  return out;
}

let half = null;

/** float16 bit pattern -> float32 value, all 65536 of them (256 KiB, made once). */
function halfTable() {
  if (half) return half;
  half = new Float32Array(65536);
  for (let bits = 0; bits < 65536; bits++) {
    const sign = bits & 0x8000 ? -1 : 1;
    const exponent = (bits >> 10) & 0x1f;
    const fraction = bits & 0x3ff;
    if (exponent === 0) half[bits] = sign * fraction * 2 ** -24;
    else if (exponent === 31) half[bits] = fraction ? NaN : sign * Infinity;
    else half[bits] = sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
  }
  return half;
}

const float8 = new Map();

/** float8 bit pattern -> value, for e4m3fn (no infinities, 0x7f/0xff NaN) and e5m2 (IEEE-like). */
function float8Table(exponentBits, fractionBits) {
  const key = `${exponentBits}${fractionBits}`;
  if (float8.has(key)) return float8.get(key);
  const table = new Float32Array(256);
  const bias = 2 ** (exponentBits - 1) - 1;
  const maxExponent = 2 ** exponentBits - 1;
  for (let bits = 0; bits < 256; bits++) {
    const sign = bits & 0x80 ? -1 : 1;
    const exponent = (bits >> fractionBits) & maxExponent;
    const fraction = bits & ((1 << fractionBits) - 1);
    const scale = 2 ** fractionBits;
    if (exponentBits === 4 && exponent === maxExponent && fraction === (1 << fractionBits) - 1) {
      table[bits] = NaN; // e4m3fn: only S.1111.111 is NaN; the rest of the top exponent is finite
    } else if (exponentBits === 5 && exponent === maxExponent) {
      table[bits] = fraction ? NaN : sign * Infinity;
    } else if (exponent === 0) {
      table[bits] = sign * (fraction / scale) * 2 ** (1 - bias);
    } else {
      table[bits] = sign * (1 + fraction / scale) * 2 ** (exponent - bias);
    }
  }
  float8.set(key, table);
  return table;
}

// --- encoding for request bodies ----------------------------------------------------------

/**
 * A tensor value for a request body: a stored tensor's id (string) becomes `{ref}`; a Tensor,
 * a typed array (1-D) or `{dtype?, shape, data}` becomes a msgpack tensor map (§1) whose data
 * are the array's bytes, not copied. Widened floats go as F32 (what their array holds).
 * @param {any} value
 */
export function wireTensor(value) {
  if (typeof value === "string") return { ref: value };
  if (ArrayBuffer.isView(value)) value = tensor(value);
  if (value === null || typeof value !== "object" || !("data" in value) || !("shape" in value)) {
    throw new TypeError("expected a Tensor, a typed array, {dtype, shape, data} or a stored tensor id");
  }
  let data = value.data;
  if (!ArrayBuffer.isView(data)) data = tensor(Array.from(data), value.dtype ?? "F32").data;
  const dtype = ARRAY_DTYPES.get(data.constructor);
  if (dtype === undefined) throw new TypeError(`cannot send a ${data.constructor.name}`);
  const code = value.dtype === "BOOL" && dtype === "U8" ? "BOOL" : dtype;
  if (data.length !== numel(value.shape)) {
    throw new RangeError(`shape [${value.shape}] needs ${numel(value.shape)} elements, got ${data.length}`);
  }
  return {
    kind: "tensor",
    v: 1,
    name: value.name ?? "",
    dtype: code,
    shape: Array.from(value.shape),
    pad: new Uint8Array(0),
    data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
  };
}
