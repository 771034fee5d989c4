import type { ClientOptions } from "./client.js";
import { HooklabClient } from "./client.js";

export * from "./client.js";
export * from "./errors.js";
export {
  DEFAULT_MAX_FRAME_BYTES, FRAMES_MEDIA_TYPE, collectFrames, decodeFrame, decodeTensor, readFrames,
} from "./frames.js";
export type { Frame, ReadOptions } from "./frames.js";
export * as hooks from "./hooks.js";
export { HookSpec } from "./hooks.js";
export type { FeatureSelectors, Indices, Selectors } from "./hooks.js";
export * as metrics from "./metrics.js";
export type { Metric, MetricOptions } from "./metrics.js";
export { TOP_K_INDICES_SUFFIX, TOP_K_VALUES_SUFFIX, TopK, axisSizes } from "./sparse.js";
export { DTYPES, Tensor, tensor, wireTensor } from "./tensor.js";
export type { ArrayOfDtype, DtypeCode, TensorLike, TypedArray } from "./tensor.js";

/** A client of the hooklab server at `baseUrl`. */
export function connect(baseUrl: string, options?: ClientOptions): HooklabClient;
