import type { TensorLike } from "./tensor.js";

/** Indices on one axis: an integer or a list of them; omitted means all. */
export type Indices = number | number[] | null;

export interface Selectors {
  batch?: Indices;
  /** Positions (the query position for attention patterns). */
  pos?: Indices;
  head?: Indices;
  /** The last axis: MLP neurons, residual dimensions, … */
  neuron?: Indices;
}

/** One operation with its selectors; the hook name is given where it is used. */
export class HookSpec {
  constructor(op: string, fields?: Record<string, unknown>);
  readonly op: string;
  readonly fields: Record<string, unknown>;
  /** The wire form of this spec at hook point (or glob pattern) `hook`. */
  at(hook: string): Record<string, unknown>;
}

/** A tensor, or the id of one stored with `client.storeTensor`. */
export type TensorOrId = TensorLike | string;

export function ablate(
  mode?: "zero" | "mean" | "resample",
  options?: Selectors & { mean_over?: "batch" | "pos"; source_batch?: number[] | null },
): HookSpec;
export function patch(source: string | TensorLike | null, options?: Selectors & { source_row?: number | null }): HookSpec;
export function steer(vector: TensorOrId, coeff?: number, selectors?: Selectors): HookSpec;
export function scale(factor: number, selectors?: Selectors): HookSpec;
export function clamp(min?: number | null, max?: number | null, selectors?: Selectors): HookSpec;
export function set(value: number | TensorOrId, selectors?: Selectors): HookSpec;
export function project_out(direction: TensorOrId, selectors?: Selectors): HookSpec;
export const projectOut: typeof project_out;

/** Selectors of the feature specs: batch rows and positions. */
export interface FeatureSelectors {
  batch?: Indices;
  pos?: Indices;
}

/** Add `coeff * W_dec[feature]` (each feature's decoder row) at the SAE's hook point. */
export function feature_steer(feature: number | number[], coeff?: number, selectors?: FeatureSelectors): HookSpec;
/** Zero the features' activations (the SAE's error term kept). */
export function feature_ablate(feature: number | number[], selectors?: FeatureSelectors): HookSpec;
/** Set the features' activations to `value`. */
export function feature_clamp(feature: number | number[], value: number, selectors?: FeatureSelectors): HookSpec;
export const featureSteer: typeof feature_steer;
export const featureAblate: typeof feature_ablate;
export const featureClamp: typeof feature_clamp;
