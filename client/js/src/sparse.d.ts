import type { Tensor } from "./tensor.js";

export const TOP_K_INDICES_SUFFIX: ".top_k_indices";
export const TOP_K_VALUES_SUFFIX: ".top_k_values";

/** The size of each named axis of /v1/model's hook shapes, SAE features as `d_sae[HOOK]`. */
export function axisSizes(cfg: Record<string, any>, batch: number, pos: number, keyPos?: number | null): Record<string, number>;

/** The k largest entries per position of an activation's last axis (torch.topk's order). */
export class TopK {
  constructor(values: Tensor, indices: Tensor, width: number, name?: string);
  /** [..., k], largest first: the dense activation's own elements. */
  readonly values: Tensor;
  /** [..., k], I32: where each value sits in the last axis. */
  readonly indices: Tensor<"I32">;
  /** The dense last axis's size (d_sae for an SAE's features). */
  readonly width: number;
  readonly name: string;
  readonly k: number;
  /** The dense tensor's shape. */
  readonly shape: number[];
  /** The dense tensor: the kept values at their indices, 0 elsewhere. */
  toDense(): Tensor;
}

/** A response's tensors split into the dense ones and the TopKs joined from their pairs. */
export function joinTopK(
  tensors: Record<string, Tensor>,
  widthOf: (name: string, values: Tensor) => number,
): { dense: Record<string, Tensor>; topK: Record<string, TopK> };

/** The dense last-axis size of a hook point whose top-k values arrived (from /v1/model). */
export function lastAxisSize(info: { cfg: Record<string, any>; hook_points: { name: string; shape: (string | number)[] }[] }, name: string, values: Tensor): number;
