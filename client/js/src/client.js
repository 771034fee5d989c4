/**
 * `HooklabClient`: the hooklab HTTP API with TransformerLens's operations and argument names.
 *
 * Request options keep the wire's (and TransformerLens's) snake_case names — `max_new_tokens`,
 * `return_type`, `prepend_bos` — and pass through to the server, which refuses unknown fields;
 * results keep the server's field names too. Only client-side options are camelCase (`apiKey`,
 * `timeoutMs`, `signal`).
 */

import { TruncatedStreamError, serverError } from "./errors.js";
import { HookSpec } from "./hooks.js";
import { joinTopK, lastAxisSize } from "./sparse.js";
import { Tensor, wireTensor } from "./tensor.js";
import { Transport } from "./transport.js";

const OUTPUT_PREFIX = "output.";

export class HooklabClient {
  /**
   * @param {string} baseUrl the server, e.g. "http://gpu-box:8000"
   * @param {object} [options]
   * @param {string | null} [options.apiKey] sent as `Authorization: Bearer <key>` (default: the
   *   HOOKLAB_API_KEY environment variable)
   * @param {string} [options.model] which served model requests go to (default: the server's)
   * @param {number | null} [options.timeoutMs] give up when the server sends nothing for this
   *   long (default 60000; null: never)
   * @param {typeof fetch} [options.fetch] a fetch implementation (default: the global one)
   * @param {number} [options.maxFrameBytes] refuse frames larger than this
   */
  constructor(baseUrl, options = {}) {
    this.transport = new Transport(baseUrl, options);
    this.model = options.model ?? null;
    this.hookNames = null; // memoised: the hook points that fire by default
    this.info = null; // memoised GET /v1/model, for the shapes of top-k entries
  }

  // --- the model ------------------------------------------------------------------------

  /** `GET /v1/model`: the config (`cfg`), hook points, tokenizer and the server's limits. */
  modelInfo({ signal } = {}) {
    return this.transport.json("GET", "/v1/model", { query: { model: this.model }, signal });
  }

  /** `GET /v1/models`: every served model, the default first. */
  models({ signal } = {}) {
    return this.transport.json("GET", "/v1/models", { signal });
  }

  /** `GET /v1/capabilities`: whether keys are needed, limits, operations, dtypes. */
  capabilities({ signal } = {}) {
    return this.transport.json("GET", "/v1/capabilities", { signal });
  }

  /** `GET /v1/usage`: this key's usage and quotas. */
  usage({ signal } = {}) {
    return this.transport.json("GET", "/v1/usage", { signal });
  }

  /**
   * `POST /v1/tokenize`: `{tokens, attention_mask, str_tokens}`, each [batch][pos].
   * @param {string | string[]} input
   * @param {{prepend_bos?: boolean, padding_side?: "left" | "right", signal?: AbortSignal}} [options]
   */
  tokenize(input, options = {}) {
    const { signal, ...fields } = options;
    return this.transport.json("POST", "/v1/tokenize", { body: this.#body({ input, ...fields }), signal });
  }

  /** `POST /v1/detokenize`: the text of token ids (a string, or one per row). */
  async detokenize(tokens, { signal } = {}) {
    const answer = await this.transport.json("POST", "/v1/detokenize", { body: this.#body({ tokens }), signal });
    return answer.text;
  }

  /** A parameter by TransformerLens name (`W_E`, `blocks.0.attn.W_Q`, `W_U`, …). */
  async weight(name, { signal } = {}) {
    const path = `/v1/weights/${name.split("/").map(encodeURIComponent).join("/")}`;
    const { tensors } = await this.transport.frames("GET", path, { query: { model: this.model }, signal });
    return Object.values(tensors)[0];
  }

  // --- forward passes -------------------------------------------------------------------

  /**
   * TransformerLens's `forward`: `{logits}` (or `loss`, both, `residual` with
   * `stop_at_layer`), under any `fwd_hooks`.
   * @param {Input} input text, texts, token ids [pos] or [batch][pos], or a token Tensor
   * @param {object} [options] ForwardRequest fields (`return_type`, `prepend_bos`,
   *   `stop_at_layer`, …), `fwd_hooks`, `signal`
   */
  forward(input, options = {}) {
    return this.#run("/v1/forward", input, options);
  }

  /**
   * TransformerLens's `run_with_cache`: the outputs and `cache`, the activations by hook name.
   * `names_filter` (a name, a list, or a predicate evaluated here over the hook points that
   * fire) picks what is cached; `store: true` keeps the cache on the server (`cache_id`).
   * `sparse_top_k` (k, or `{k, names}`; default names: every cached SAE `hook_sae_acts_pre` /
   * `hook_sae_acts_post`) sends those points as their top k along the last axis: they come
   * back in `topK` (name -> TopK: `values`, `indices` [..., k], `toDense()`), not in `cache`.
   */
  runWithCache(input, options = {}) {
    return this.#run("/v1/run_with_cache", input, options);
  }

  /**
   * TransformerLens's `run_with_hooks`: a forward under `fwd_hooks`, a list of
   * `[hookName | predicate, HookSpec]` pairs (see `hooks`); with `names_filter` it also
   * caches those activations.
   */
  runWithHooks(input, options = {}) {
    return this.#run("/v1/run_with_hooks", input, options);
  }

  async #run(path, input, options) {
    const { signal, names_filter, ...fields } = options;
    if (typeof fields.sparse_top_k === "number") fields.sparse_top_k = { k: fields.sparse_top_k };
    const body = await this.#hookFields(fields, signal);
    // As TransformerLens: with start_at_layer the input is the residual stream to start from.
    body[fields.start_at_layer === undefined || fields.start_at_layer === null ? "input" : "residual"] = input;
    if (names_filter !== undefined) {
      if (path === "/v1/forward") throw new TypeError("forward caches nothing: use runWithCache for names_filter");
      if (body.names !== undefined) throw new TypeError("give names_filter or names, not both");
      body.names = await this.#names(names_filter, signal);
    }
    const { meta, tensors } = await this.transport.frames("POST", path, { body: this.#body(body), signal });
    if (body.sparse_top_k === undefined || body.sparse_top_k === null) return resultOf(meta, tensors);
    const info = this.info ?? (this.info = await this.modelInfo({ signal }));
    const { dense, topK } = joinTopK(tensors, (name, values) => lastAxisSize(info, name, values));
    return Object.assign(resultOf(meta, dense), { topK });
  }

  // --- generation -----------------------------------------------------------------------

  /**
   * TransformerLens's `generate` on the server: the whole answer once done
   * (`{tokens, text, output, stats}`; `output` is what TransformerLens returns for
   * `return_type`). `fwd_hooks` stay active at every step (steering).
   * @param {Input} input
   * @param {object} [options] GenerateRequest fields (`max_new_tokens`, `temperature`,
   *   `do_sample`, `seed`, `stop_at_eos`, …), `fwd_hooks`, `signal`
   */
  async generate(input, options = {}) {
    const { signal, ...fields } = options;
    const body = await this.#hookFields({ input, ...fields, stream: false }, signal);
    return this.transport.json("POST", "/v1/generate", { body: this.#body(body), signal });
  }

  /**
   * The generation as it happens: an async iterable of steps `{step, tokens, text}` (the new
   * token of each batch row), streamed as server-sent events. Leaving the loop, `abort()` or
   * the `signal` option stops the generation on the server; `result` holds the final answer
   * once the stream is done.
   * @returns {GenerationStream}
   */
  generateStream(input, options = {}) {
    const { signal, ...fields } = options;
    return new GenerationStream(async (streamSignal) => {
      const body = await this.#hookFields({ input, ...fields, stream: true }, streamSignal);
      return this.transport.events("/v1/generate", { body: this.#body(body), signal: streamSignal });
    }, signal);
  }

  // --- patching and analysis ------------------------------------------------------------

  /**
   * `POST /v1/patching`, one TransformerLens `generic_activation_patch` sweep, batched on the
   * server: `metric` (the metric per index row, shaped by the server as the sweep, `meta.shape`:
   * e.g. [layer, pos], or [rows] for explicit index rows) or `logits` (metric kind "logits").
   * @param {object} request PatchingRequest fields: `corrupted`, one of `clean` /
   *   `clean_cache` / `clean_activations`, `activation`, `axes`, `metric` (see `metrics`), …
   */
  async patching(request) {
    const { signal, ...fields } = request;
    const { meta, tensors } = await this.transport.frames("POST", "/v1/patching", { body: this.#body(fields), signal });
    return { metric: tensors["patching.metric"], logits: tensors["patching.logits"], meta, tensors };
  }

  /**
   * `POST /v1/analysis`: one of ActivationCache's analysis methods run on a stored cache
   * where it is (`cache`, `method`, `args`, `rows`); `{result, labels, meta}`.
   */
  async analysis(request) {
    const { signal, ...fields } = request;
    const { meta, tensors } = await this.transport.frames("POST", "/v1/analysis", { body: this.#body(fields), signal });
    return { result: tensors["analysis.result"], labels: meta.labels, meta };
  }

  /**
   * Any route that answers tensors (e.g. `/v1/integrated_gradients`): `{meta, tensors}`.
   * @param {string} path
   * @param {object} body the request's fields (tensors may be Tensor objects)
   */
  async tensors(path, body, { signal } = {}) {
    return this.transport.frames("POST", path, { body: toWire(body), signal });
  }

  // --- stored tensors and caches --------------------------------------------------------

  /** Keep a tensor on the server (e.g. a steering vector); answers its StoredObject (`id`). */
  storeTensor(tensor, { ttl_s, signal } = {}) {
    return this.transport.json("POST", "/v1/tensors", { body: { tensor: wireTensor(tensor), ttl_s }, signal });
  }

  /** A stored tensor. */
  async getTensor(id, { signal } = {}) {
    const { tensors } = await this.transport.frames("GET", `/v1/tensors/${encodeURIComponent(id)}`, { signal });
    return Object.values(tensors)[0];
  }

  /** A stored cache's activations by hook name: all, or only `names`. */
  async getCache(id, { names, wire_dtype, signal } = {}) {
    const path = `/v1/caches/${encodeURIComponent(id)}`;
    const { tensors } = await this.transport.frames("GET", path, { query: { names, wire_dtype }, signal });
    return tensors;
  }

  /** A stored cache's entries (all, or `names`) as their top `k` along the last axis, read
   * sparsely (`GET /v1/caches/{id}?top_k=k`): name -> TopK. */
  async getCacheTopK(id, k, { names, wire_dtype, signal } = {}) {
    const path = `/v1/caches/${encodeURIComponent(id)}`;
    const query = { names, wire_dtype, top_k: String(k) };
    const { tensors } = await this.transport.frames("GET", path, { query, signal });
    const info = this.info ?? (this.info = await this.modelInfo({ signal }));
    return joinTopK(tensors, (name, values) => lastAxisSize(info, name, values)).topK;
  }

  /** This key's stored tensors (an admin's: everyone's), as StoredObjects. */
  async listTensors({ signal } = {}) {
    return (await this.transport.json("GET", "/v1/tensors", { signal })).objects;
  }

  /** This key's stored caches (an admin's: everyone's), as StoredObjects. */
  async listCaches({ signal } = {}) {
    return (await this.transport.json("GET", "/v1/caches", { signal })).objects;
  }

  async deleteTensor(id, { signal } = {}) {
    await this.transport.json("DELETE", `/v1/tensors/${encodeURIComponent(id)}`, { signal });
  }

  async deleteCache(id, { signal } = {}) {
    await this.transport.json("DELETE", `/v1/caches/${encodeURIComponent(id)}`, { signal });
  }

  // --- helpers --------------------------------------------------------------------------

  /** A body for a route that runs on a model: tensors in wire form, the chosen model named. */
  #body(fields) {
    const body = toWire(fields);
    if (this.model !== null && body.model === undefined) body.model = this.model;
    return body;
  }

  /** `fwd_hooks` and `bwd_hooks` ([selector, HookSpec] pairs) as the wire's hook entries,
   * after any given as `hooks` / `bwd_hooks` entries already. */
  async #hookFields(fields, signal) {
    const { fwd_hooks, bwd_hooks, ...body } = fields;
    if (fwd_hooks?.length) body.hooks = [...(body.hooks ?? []), ...(await this.#entries(fwd_hooks, signal))];
    if (bwd_hooks?.length) body.bwd_hooks = await this.#entries(bwd_hooks, signal);
    return body;
  }

  async #entries(pairs, signal) {
    const entries = [];
    for (const pair of pairs) {
      if (!Array.isArray(pair) || pair.length !== 2 || !(pair[1] instanceof HookSpec)) {
        throw new TypeError("a hook is a [hook name or predicate, HookSpec] pair, e.g. [\"blocks.0.hook_resid_post\", hooks.ablate()]");
      }
      const [selector, spec] = pair;
      const names = typeof selector === "function" ? (await this.#firing(signal)).filter(selector) : [selector];
      for (const name of names) entries.push(spec.at(name));
    }
    return entries;
  }

  /** What `names_filter` selects: undefined/null is the server's default (every hook point
   * that fires); a predicate runs here over those points, and only the names travel. */
  async #names(filter, signal) {
    if (filter === undefined || filter === null) return undefined;
    if (typeof filter === "string") return [filter];
    if (typeof filter === "function") return (await this.#firing(signal)).filter(filter);
    return Array.from(filter);
  }

  async #firing(signal) {
    if (this.hookNames === null) {
      const info = await this.modelInfo({ signal });
      this.hookNames = info.hook_points.filter((point) => point.fires_by_default).map((point) => point.name);
    }
    return this.hookNames;
  }
}

/** A forward result: every `output.*` tensor by its short name (`logits`, `loss`, …) and in
 * `outputs`, the activations in `cache`, and the begin and end frames' fields in `meta`. */
function resultOf(meta, tensors) {
  const result = { outputs: {}, cache: {}, topK: {}, meta };
  for (const [name, tensor] of Object.entries(tensors)) {
    if (name.startsWith(OUTPUT_PREFIX)) {
      result.outputs[name] = tensor;
      result[name.slice(OUTPUT_PREFIX.length)] = tensor;
    } else {
      Object.defineProperty(result.cache, name, { value: tensor, enumerable: true, writable: true, configurable: true });
    }
  }
  return result;
}

/**
 * A request body with every Tensor (and typed array) inside it as a msgpack tensor map;
 * everything else as it is.
 */
export function toWire(value) {
  if (value instanceof Tensor || ArrayBuffer.isView(value)) return wireTensor(value);
  if (Array.isArray(value)) return value.map(toWire);
  if (value !== null && typeof value === "object") {
    const out = {};
    for (const [key, item] of Object.entries(value)) out[key] = toWire(item);
    return out;
  }
  return value;
}

/**
 * A generation streaming from the server: iterate it (once) for the steps.
 */
export class GenerationStream {
  #start;
  #controller = new AbortController();
  #signal;
  #started = false;

  /** @param {(signal: AbortSignal) => Promise<AsyncIterable<{event: string, data: string}>>} start */
  constructor(start, signal) {
    this.#start = start;
    this.#signal = signal ? AbortSignal.any([signal, this.#controller.signal]) : this.#controller.signal;
    /** The final answer (`{tokens, text, output, stats}`), once the stream is done. */
    this.result = null;
  }

  /** Stop the generation (the iteration throws `reason`, default an AbortError). */
  abort(reason) {
    this.#controller.abort(reason);
  }

  async *[Symbol.asyncIterator]() {
    if (this.#started) throw new TypeError("a GenerationStream is iterated once");
    this.#started = true;
    for await (const { event, data } of await this.#start(this.#signal)) {
      const payload = JSON.parse(data);
      if (event === "token") {
        yield payload;
      } else if (event === "done") {
        this.result = payload;
      } else if (event === "error") {
        const { code, message, hint, request_id: requestId } = payload.error ?? {};
        throw serverError(code ?? "internal", message ?? data, { hint, requestId });
      }
    }
    if (this.result === null) throw new TruncatedStreamError("the generation stream ended without a result");
  }
}
