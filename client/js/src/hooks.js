/**
 * Hook specs: what to do at a hook point, built here and run on the server. The builders
 * mirror the Python client's `hooklab.hooks` (same names, arguments, defaults and wire form).
 *
 *     client.runWithHooks(tokens, { fwd_hooks: [["blocks.5.hook_resid_post", ablate()]] });
 *     client.runWithHooks(tokens, { fwd_hooks: [[(n) => n.endsWith("hook_z"), ablate("mean", { head: [7] })]] });
 *
 * Selectors (the last, options argument of every builder): `batch`, `pos` (the query position
 * for attention patterns), `head` and `neuron` (the last axis), each an integer or a list of
 * integers; omitted means all. Tensors are Tensor objects, typed arrays (1-D), or the ids of
 * tensors stored with `client.storeTensor`.
 */

/** One operation with its selectors; the hook name is given where it is used. */
export class HookSpec {
  /** @param {string} op @param {Record<string, any>} [fields] */
  constructor(op, fields = {}) {
    this.op = op;
    this.fields = fields;
  }

  /** The wire form of this spec applied at hook point (or glob pattern) `hook`. */
  at(hook) {
    return { hook, op: this.op, ...this.fields };
  }
}

const SELECTORS = ["batch", "pos", "head", "neuron"];

function spec(op, selectors, fields, allowed = SELECTORS) {
  const wire = {};
  for (const [key, value] of Object.entries(fields)) if (value !== undefined && value !== null) wire[key] = value;
  for (const key of allowed) {
    const value = selectors?.[key];
    if (value !== undefined && value !== null) wire[key] = value;
  }
  const unknown = Object.keys(selectors ?? {}).filter((key) => !allowed.includes(key));
  if (unknown.length) throw new TypeError(`unknown option(s) ${unknown.join(", ")} of hooks.${op}`);
  return new HookSpec(op, wire);
}

/** A stored tensor's id as a reference; anything else (a tensor) as it is. */
function tensorValue(value) {
  return typeof value === "string" ? { ref: value } : value;
}

/**
 * Zero the selection, set it to its mean (over the batch or positions), or resample it from
 * other batch rows (`source_batch[i]` replaces row i; default: the next row).
 * @param {"zero" | "mean" | "resample"} [mode]
 */
export function ablate(mode = "zero", { mean_over = "batch", source_batch, ...selectors } = {}) {
  return spec("ablate", selectors, { mode, mean_over, source_batch });
}

/**
 * Overwrite the selection with: the same hook's activation from a stored cache (`source` a
 * cache id), an inline tensor (shaped like the activation or the selection), or another prompt
 * of the same batch (`source_row`, with `source` null).
 */
export function patch(source, { source_row, ...selectors } = {}) {
  const hasSource = source !== undefined && source !== null;
  const hasRow = source_row !== undefined && source_row !== null;
  if (hasSource === hasRow) throw new TypeError("patch takes either a source (cache id or tensor) or source_row");
  let origin;
  if (hasRow) origin = { batch: source_row };
  else if (typeof source === "string") origin = { cache: source };
  else origin = { tensor: source };
  return spec("patch", selectors, { source: origin });
}

/** Add `coeff * vector` (the activation's last axis, or the selection's shape). */
export function steer(vector, coeff = 1.0, selectors = {}) {
  return spec("steer", selectors, { vector: tensorValue(vector), coeff });
}

/** Multiply the selection by `factor`. */
export function scale(factor, selectors = {}) {
  return spec("scale", selectors, { factor });
}

/** Clamp the selection to [min, max] (either may be null). */
export function clamp(min = null, max = null, selectors = {}) {
  return spec("clamp", selectors, { min, max });
}

/** Set the selection to a number or a tensor broadcastable to it. */
export function set(value, selectors = {}) {
  return spec("set", selectors, { value: typeof value === "number" ? value : tensorValue(value) });
}

/** Directional ablation: remove the component along `direction` (last axis). */
export function project_out(direction, selectors = {}) {
  return spec("project_out", selectors, { direction: tensorValue(direction) });
}

/** `project_out` in JavaScript's spelling. */
export const projectOut = project_out;

// --- sparse autoencoder features: used at the hook point an SAE reads ----------------------
// (`cfg.sae_widths` of GET /v1/model lists them), e.g.
// ["blocks.3.hook_resid_post", hooks.feature_steer(12, 4.0)]. Selectors: `batch` and `pos`.

const FEATURE_SELECTORS = ["batch", "pos"];

/** Add `coeff * W_dec[feature]` (each feature's decoder row) at the SAE's hook point. */
export function feature_steer(feature, coeff = 1.0, selectors = {}) {
  return spec("feature_steer", selectors, { feature, coeff }, FEATURE_SELECTORS);
}

/** Zero the features' activations (the SAE's error term kept). */
export function feature_ablate(feature, selectors = {}) {
  return spec("feature_ablate", selectors, { feature }, FEATURE_SELECTORS);
}

/** Set the features' activations to `value`. */
export function feature_clamp(feature, value, selectors = {}) {
  return spec("feature_clamp", selectors, { feature, value }, FEATURE_SELECTORS);
}

/** The feature builders in JavaScript's spelling. */
export const featureSteer = feature_steer;
export const featureAblate = feature_ablate;
export const featureClamp = feature_clamp;
