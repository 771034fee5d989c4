import type { HookSpec } from "./hooks.js";
import type { Metric } from "./metrics.js";
import type { TopK } from "./sparse.js";
import type { Tensor, TensorLike } from "./tensor.js";

export interface ClientOptions {
  /** Sent as `Authorization: Bearer <key>` (default: the HOOKLAB_API_KEY environment variable). */
  apiKey?: string | null;
  /** Which served model requests go to (default: the server's). */
  model?: string;
  /** Give up when the server sends nothing for this long (default 60000; null: never). */
  timeoutMs?: number | null;
  /** A fetch implementation (default: the global one). */
  fetch?: typeof fetch;
  /** Extra headers on every request. */
  headers?: Record<string, string>;
  /** Refuse frames larger than this. */
  maxFrameBytes?: number;
}

export interface CallOptions {
  /** Cancels the request (and the work on the server). */
  signal?: AbortSignal;
}

/** Text, texts, token ids [pos] or [batch][pos], or a token Tensor (I64/I32). */
export type Input = string | string[] | number[] | number[][] | Tensor | TensorLike;

/** Where a hook spec applies: a hook name (or glob), or a predicate over the hook points that fire. */
export type HookSelector = string | ((name: string) => boolean);
export type HookPair = [HookSelector, HookSpec];

export interface ForwardOptions extends CallOptions {
  return_type?: "logits" | "loss" | "both" | null;
  loss_per_token?: boolean;
  prepend_bos?: boolean | null;
  padding_side?: "left" | "right" | null;
  start_at_layer?: number | null;
  stop_at_layer?: number | null;
  tokens?: number[][] | TensorLike;
  attention_mask?: number[][] | TensorLike;
  /** Hook specs active during this call. */
  fwd_hooks?: HookPair[];
  /** Hook specs on the gradients (a backward pass runs). */
  bwd_hooks?: HookPair[];
  /** Hook entries already in wire form. */
  hooks?: Record<string, unknown>[];
  /** The scalar a backward pass starts from. */
  objective?: Metric;
  /** Floating-point tensors travel as this (half the bytes; widened back to Float32Array here). */
  wire_dtype?: "float16" | "bfloat16" | null;
  /** Seconds the request may run on the server. */
  timeout_s?: number | null;
  /** Any other field of the request body, passed through. */
  [field: string]: unknown;
}

export interface CacheOptions extends ForwardOptions {
  /** What to cache: a name, names, or a predicate run here over the hook points that fire. */
  names_filter?: string | string[] | ((name: string) => boolean) | null;
  /** Hook names or globs to cache, as sent (instead of names_filter). */
  names?: string[] | null;
  remove_batch_dim?: boolean;
  /** Keep the cache on the server; its id comes back in `meta.cache_id`. */
  store?: boolean;
  return_cache?: boolean;
  lazy?: boolean;
  incl_bwd?: boolean;
  /** Send these cached points as their top k along the last axis (in `RunResult.topK`):
   * k, or `{k, names}` (default names: every cached SAE hook_sae_acts_pre/post). */
  sparse_top_k?: number | { k: number; names?: string[] | null } | null;
}

/** A forward's answer. */
export interface RunResult {
  /** output.logits, when returned. */
  logits?: Tensor;
  /** output.loss, when returned. */
  loss?: Tensor;
  /** output.residual (stop_at_layer). */
  residual?: Tensor;
  /** output.value (a logits graph's result). */
  value?: Tensor;
  /** output.objective (the scalar a backward pass started from). */
  objective?: Tensor;
  /** Every output.* tensor by its full name. */
  outputs: Record<string, Tensor>;
  /** The activations (and `{name}_grad` gradients) by hook name. */
  cache: Record<string, Tensor>;
  /** The activations sent in the sparse top-k form (`sparse_top_k`), by hook name. */
  topK: Record<string, TopK>;
  /** The begin frame's fields with the end frame's merged over them (cache_id, entries, stats, …). */
  meta: Record<string, any>;
}

export interface GenerateOptions extends CallOptions {
  max_new_tokens?: number;
  stop_at_eos?: boolean;
  eos_token_id?: number | number[] | null;
  do_sample?: boolean;
  top_k?: number | null;
  top_p?: number | null;
  temperature?: number;
  freq_penalty?: number;
  use_past_kv_cache?: boolean;
  prepend_bos?: boolean | null;
  padding_side?: "left" | "right" | null;
  return_type?: "input" | "str" | "tokens" | "embeds";
  seed?: number | null;
  fwd_hooks?: HookPair[];
  hooks?: Record<string, unknown>[];
  timeout_s?: number | null;
  [field: string]: unknown;
}

/** One generation step: the new token of each batch row. */
export interface GenerateStep {
  step: number;
  tokens: number[];
  text: string[];
}

export interface GenerateResponse {
  /** Prompt and new tokens, [batch][pos]. */
  tokens: number[][];
  text: string[] | null;
  /** What TransformerLens's generate returns for return_type. */
  output: string | string[] | number[][] | number[][][];
  stats: { new_tokens: number; seconds: number; tokens_per_s: number; queued_s: number; units_waited: number };
}

/** A generation streaming from the server; iterate it once for the steps. */
export class GenerationStream implements AsyncIterable<GenerateStep> {
  /** The final answer, once the stream is done. */
  readonly result: GenerateResponse | null;
  /** Stop the generation; the iteration throws `reason` (default an AbortError). */
  abort(reason?: unknown): void;
  [Symbol.asyncIterator](): AsyncIterator<GenerateStep>;
}

export interface PatchingRequest extends CallOptions {
  corrupted: Input;
  clean?: Input;
  clean_cache?: string;
  clean_activations?: Record<string, TensorLike | string>;
  prepend_bos?: boolean | null;
  /** TransformerLens short name: resid_pre, attn_out, z, q, k, v, pattern, … */
  activation: string;
  /** Index axes; the first is "layer". */
  axes: Array<"layer" | "pos" | "head_index" | "head" | "src_pos" | "dest_pos">;
  index?: number[][] | null;
  metric: Metric;
  method?: "activation" | "attribution";
  patches_per_forward?: number | null;
  timeout_s?: number | null;
  [field: string]: unknown;
}

export interface PatchingResult {
  /** The metric per index row, shaped as the sweep (`meta.shape`: [layer, pos, …], or [rows]). */
  metric?: Tensor;
  /** [rows, batch, positions, d_vocab] for the metric kind "logits". */
  logits?: Tensor;
  meta: Record<string, any>;
  tensors: Record<string, Tensor>;
}

export interface StoredObject {
  id: string;
  kind: "tensor" | "cache";
  nbytes: number;
  /** Unix time after which the object is gone. */
  expires_at: number;
  dtype: string | null;
  shape: number[] | null;
  names: string[] | null;
  owner: string;
}

export interface HookPointInfo {
  name: string;
  shape: Array<string | number>;
  fires_by_default: boolean;
}

export interface ModelInfo {
  model_name: string;
  cfg: Record<string, any>;
  hook_points: HookPointInfo[];
  tokenizer: Record<string, any> | null;
  limits: Record<string, number>;
}

export interface TokenizeResponse {
  tokens: number[][];
  attention_mask: number[][];
  str_tokens: string[][];
}

export class HooklabClient {
  constructor(baseUrl: string, options?: ClientOptions);
  /** The served model requests go to (null: the server's default). */
  readonly model: string | null;

  modelInfo(options?: CallOptions): Promise<ModelInfo>;
  models(options?: CallOptions): Promise<{ models: Array<ModelInfo & { workers: number }> }>;
  capabilities(options?: CallOptions): Promise<Record<string, any>>;
  usage(options?: CallOptions): Promise<Record<string, any>>;
  tokenize(
    input: string | string[],
    options?: CallOptions & { prepend_bos?: boolean | null; padding_side?: "left" | "right" | null },
  ): Promise<TokenizeResponse>;
  detokenize(tokens: number[] | number[][], options?: CallOptions): Promise<string | string[]>;
  /** A parameter by TransformerLens name (W_E, blocks.0.attn.W_Q, W_U, …). */
  weight(name: string, options?: CallOptions): Promise<Tensor>;

  forward(input: Input, options?: ForwardOptions): Promise<RunResult>;
  runWithCache(input: Input, options?: CacheOptions): Promise<RunResult>;
  runWithHooks(input: Input, options?: CacheOptions): Promise<RunResult>;

  generate(input: Input, options?: GenerateOptions): Promise<GenerateResponse>;
  generateStream(input: Input, options?: GenerateOptions): GenerationStream;

  patching(request: PatchingRequest): Promise<PatchingResult>;
  analysis(
    request: CallOptions & { cache: string; method: string; args?: Record<string, unknown>; rows?: number | number[] | null; [field: string]: unknown },
  ): Promise<{ result: Tensor; labels?: string[]; meta: Record<string, any> }>;
  /** Any route that answers tensors, e.g. /v1/integrated_gradients. */
  tensors(path: string, body: Record<string, unknown>, options?: CallOptions): Promise<{ meta: Record<string, any>; tensors: Record<string, Tensor> }>;

  storeTensor(tensor: TensorLike, options?: CallOptions & { ttl_s?: number }): Promise<StoredObject>;
  getTensor(id: string, options?: CallOptions): Promise<Tensor>;
  getCache(id: string, options?: CallOptions & { names?: string[]; wire_dtype?: "float16" | "bfloat16" }): Promise<Record<string, Tensor>>;
  /** A stored cache's entries (all, or `names`) read as their top k along the last axis. */
  getCacheTopK(id: string, k: number, options?: CallOptions & { names?: string[]; wire_dtype?: "float16" | "bfloat16" }): Promise<Record<string, TopK>>;
  listTensors(options?: CallOptions): Promise<StoredObject[]>;
  listCaches(options?: CallOptions): Promise<StoredObject[]>;
  deleteTensor(id: string, options?: CallOptions): Promise<void>;
  deleteCache(id: string, options?: CallOptions): Promise<void>;
}

/** A request body with every Tensor (and typed array) in it as a msgpack tensor map. */
export function toWire(value: unknown): unknown;
