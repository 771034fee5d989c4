/**
 * The sparse top-k form of cached activations (`runWithCache(input, { sparse_top_k: { k } })`,
 * proto/README.md "Sparse top-k form"): the server sends such a point as
 * `{name}.top_k_indices` (I32) and `{name}.top_k_values`, [..., k] in torch.topk's order
 * (largest first); here they become one `TopK` in `result.topK[name]`.
 */

import { Tensor, numel } from "./tensor.js";

export const TOP_K_INDICES_SUFFIX = ".top_k_indices";
export const TOP_K_VALUES_SUFFIX = ".top_k_values";

/** The size of each named axis of `/v1/model`'s hook shapes (proto/_axes.py's rule), with an
 * attached SAE's features as `d_sae[HOOK]` (`cfg.sae_widths`). */
export function axisSizes(cfg, batch, pos, keyPos = null) {
  const heads = cfg.n_heads;
  const kvHeads = cfg.n_key_value_heads ?? heads;
  const sizes = {
    batch, pos, key_pos: keyPos ?? pos, head: heads, kv_head: kvHeads, d_head: cfg.d_head,
    d_model: cfg.d_model, d_mlp: cfg.d_mlp ?? 0, d_vocab: cfg.d_vocab_out ?? cfg.d_vocab, one: 1,
    head_row: batch * pos * heads, kv_head_row: batch * pos * kvHeads,
    q_width: heads * cfg.d_head, kv_width: kvHeads * cfg.d_head,
  };
  for (const [hook, width] of Object.entries(cfg.sae_widths ?? {})) sizes[`d_sae[${hook}]`] = width;
  return sizes;
}

/** The k largest entries per position of an activation's last axis: `values` and `indices`
 * (Tensors [..., k]) and `width`, the dense last axis's size. */
export class TopK {
  /** @param {Tensor} values @param {Tensor} indices @param {number} width @param {string} [name] */
  constructor(values, indices, width, name = "") {
    this.values = values;
    this.indices = indices;
    this.width = width;
    this.name = name;
  }

  /** Entries per position. */
  get k() {
    return this.values.shape.at(-1);
  }

  /** The dense tensor's shape. */
  get shape() {
    return [...this.values.shape.slice(0, -1), this.width];
  }

  /** The dense tensor: the kept values at their indices, 0 elsewhere (Float32 data, or the
   * values' own array type). */
  toDense() {
    const { values, indices, width, k } = this;
    const data = new values.data.constructor(numel(this.shape));
    for (let row = 0; row < values.size / k; row++) {
      for (let j = 0; j < k; j++) data[row * width + indices.data[row * k + j]] = values.data[row * k + j];
    }
    return new Tensor(values.dtype, this.shape, data, this.name);
  }
}

/**
 * `tensors` (name -> Tensor, as a response's frames arrived) split into the dense ones and
 * `TopK`s joined from each indices/values pair; `widthOf(name, values)` gives a name's dense
 * last-axis size.
 * @param {Record<string, Tensor>} tensors
 * @param {(name: string, values: Tensor) => number} widthOf
 */
export function joinTopK(tensors, widthOf) {
  const dense = {};
  const topK = {};
  for (const [name, tensor] of Object.entries(tensors)) {
    if (name.endsWith(TOP_K_VALUES_SUFFIX)) continue; // joined with its indices
    if (!name.endsWith(TOP_K_INDICES_SUFFIX)) {
      dense[name] = tensor;
      continue;
    }
    const hook = name.slice(0, -TOP_K_INDICES_SUFFIX.length);
    const values = tensors[hook + TOP_K_VALUES_SUFFIX];
    topK[hook] = new TopK(values, tensor, widthOf(hook, values), hook);
  }
  return { dense, topK };
}

/**
 * The dense last-axis size of hook point `name` whose top-k `values` arrived, from its symbolic
 * shape in `/v1/model` (`info`): batch and positions are read off the values' leading axes
 * (`remove_batch_dim` drops the batch axis).
 */
export function lastAxisSize(info, name, values) {
  const point = info.hook_points.find((p) => p.name === name);
  if (!point) throw new RangeError(`no hook point ${JSON.stringify(name)} in /v1/model`);
  const axes = point.shape.length === values.shape.length ? point.shape : point.shape.slice(1);
  // An axis's size read off the values (never the last axis: it holds k).
  const at = (axis, fallback) => {
    const i = axes.indexOf(axis);
    return i >= 0 && i < axes.length - 1 ? values.shape[i] : fallback;
  };
  const batch = point.shape.length === values.shape.length ? at("batch", 1) : 1;
  const pos = at("pos", at("key_pos", 1));
  const last = axes.at(-1);
  if (typeof last === "number") return last;
  const size = axisSizes(info.cfg, batch, pos)[last];
  if (size === undefined) throw new RangeError(`unknown axis ${JSON.stringify(last)} of ${name}`);
  return size;
}
