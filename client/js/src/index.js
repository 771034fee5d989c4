/**
 * hooklab: a JavaScript client of a hooklab server (TransformerLens-style interpretability over
 * HTTP). Start with `new HooklabClient(url)`; hook specs are in `hooks`, patching metrics in
 * `metrics`.
 */

import { HooklabClient } from "./client.js";

export { GenerationStream, HooklabClient, toWire } from "./client.js";
export * from "./errors.js";
export { DEFAULT_MAX_FRAME_BYTES, FRAMES_MEDIA_TYPE, collectFrames, decodeFrame, decodeTensor, readFrames } from "./frames.js";
export * as hooks from "./hooks.js";
export { HookSpec } from "./hooks.js";
export * as metrics from "./metrics.js";
export { TOP_K_INDICES_SUFFIX, TOP_K_VALUES_SUFFIX, TopK, axisSizes } from "./sparse.js";
export { DTYPES, Tensor, tensor, wireTensor } from "./tensor.js";

/**
 * A client of the hooklab server at `baseUrl` (`new HooklabClient(baseUrl, options)`).
 * @param {string} baseUrl
 * @param {object} [options] see HooklabClient
 */
export function connect(baseUrl, options) {
  return new HooklabClient(baseUrl, options);
}
