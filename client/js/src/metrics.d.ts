/** A metric on the wire (the server's PatchMetric). */
export interface Metric {
  kind: "logit_diff" | "logit" | "prob" | "logprob" | "loss" | "logits" | "graph";
  pos?: number | number[];
  reduce?: "mean" | "sum";
  answer?: number | number[];
  wrong?: number | number[];
  baselines?: [number, number];
  normalize?: boolean;
  positions?: number[];
  [field: string]: unknown;
}

export interface MetricOptions {
  /** Map to `(m - corrupted) / (clean - corrupted)`. */
  normalize?: boolean;
  /** `[clean, corrupted]`; measured by the server when normalize is asked without them. */
  baselines?: [number, number] | null;
  reduce?: "mean" | "sum";
}

type Ids = number | number[];

export function logit_diff(answer: Ids, wrong: Ids, pos?: Ids, options?: MetricOptions): Metric;
export const logitDiff: typeof logit_diff;
export function logit(answer: Ids, pos?: Ids, options?: MetricOptions): Metric;
export function prob(answer: Ids, pos?: Ids, options?: MetricOptions): Metric;
export function logprob(answer: Ids, pos?: Ids, options?: MetricOptions): Metric;
export function loss(options?: Omit<MetricOptions, "reduce">): Metric;
