// JSON tensors as the server answers them: {"dtype", "shape", "data"}, data nested as shape and
// non-finite floats as the strings "NaN", "Infinity", "-Infinity" (proto/README.md §5).

/** A tensor's elements as one flat Float64Array, C order. */
export function flat(tensor) {
  const data = Array.isArray(tensor.data) ? tensor.data.flat(Infinity) : [tensor.data];
  return Float64Array.from(data, Number);
}

/** A view of a tensor: its shape and `at(...index)` over its flat elements. */
export function view(tensor) {
  const values = flat(tensor);
  const shape = tensor.shape;
  const strides = shape.map((_, axis) => shape.slice(axis + 1).reduce((a, b) => a * b, 1));
  return {
    shape,
    values,
    at: (...index) => values[index.reduce((sum, i, axis) => sum + i * strides[axis], 0)],
  };
}

/** The one tensor of a result by name (or the only one there). */
export function tensorOf(result, name) {
  const tensors = result.tensors ?? {};
  return name === undefined ? Object.values(tensors)[0] : tensors[name];
}

/** A float32 JSON tensor of flat `values` shaped `shape`, for a request body. */
export function jsonTensor(values, shape) {
  return { dtype: "F32", shape, data: Array.from(values) };
}

/** The safetensors dtype code of a model's dtype name (cfg.dtype). */
export function dtypeCode(name) {
  return { float32: "F32", float16: "F16", bfloat16: "BF16", float64: "F64" }[name] ?? "F32";
}
