/**
 * HTTP at the client's edge: msgpack request bodies, an explicit Accept on every request,
 * streamed response bodies, typed errors, the API key, an idle timeout and cancellation.
 */

import { Encoder } from "@msgpack/msgpack";

import {
  ConnectionFailedError,
  HooklabError,
  RequestTimeoutError,
  WireFormatError,
  serverError,
} from "./errors.js";
import { FRAMES_MEDIA_TYPE, collectFrames } from "./frames.js";
import { readEvents } from "./sse.js";

export const JSON_MEDIA_TYPE = "application/json";
export const MSGPACK_MEDIA_TYPE = "application/msgpack";
export const EVENTS_MEDIA_TYPE = "text/event-stream";

// undefined fields are left out (the server's default applies); bigint token ids travel as ints.
const encoder = new Encoder({ ignoreUndefined: true, useBigInt64: true });

export class Transport {
  /**
   * @param {string} baseUrl e.g. "http://gpu-box:8000"
   * @param {{apiKey?: string | null, timeoutMs?: number | null, fetch?: typeof fetch,
   *          headers?: Record<string, string>, maxFrameBytes?: number}} [options]
   */
  constructor(baseUrl, options = {}) {
    this.baseUrl = String(baseUrl).replace(/\/+$/, "");
    const apiKey = options.apiKey === undefined ? globalThis.process?.env?.HOOKLAB_API_KEY : options.apiKey;
    this.headers = { ...options.headers };
    if (apiKey) this.headers.authorization = `Bearer ${apiKey}`;
    this.timeoutMs = options.timeoutMs === undefined ? 60_000 : options.timeoutMs;
    this.fetch = options.fetch ?? globalThis.fetch;
    this.maxFrameBytes = options.maxFrameBytes;
  }

  /**
   * A request whose answer is JSON (`null` for 204 No Content).
   * @param {string} method
   * @param {string} path
   * @param {{body?: object, query?: Record<string, any>, signal?: AbortSignal}} [options]
   */
  async json(method, path, options = {}) {
    const { response, chunks } = await this.#send(method, path, JSON_MEDIA_TYPE, options);
    const text = await collectText(chunks);
    if (response.status === 204 || text === "") return null;
    try {
      return JSON.parse(text);
    } catch {
      throw new WireFormatError(`${method} ${path} answered ${response.status} with a body that is not JSON`);
    }
  }

  /**
   * A request whose answer is a frame stream, decoded as it arrives.
   * @returns {Promise<{meta: Record<string, any>, tensors: Record<string, import("./tensor.js").Tensor>}>}
   */
  async frames(method, path, options = {}) {
    const { response, chunks, discard } = await this.#send(method, path, FRAMES_MEDIA_TYPE, options);
    const type = response.headers.get("content-type") ?? "";
    if (!type.startsWith(FRAMES_MEDIA_TYPE)) {
      await discard();
      throw new WireFormatError(`${method} ${path} answered ${type || "no content type"}, not ${FRAMES_MEDIA_TYPE}`);
    }
    return collectFrames(chunks, { maxFrameBytes: this.maxFrameBytes, status: response.status });
  }

  /**
   * POST and yield the server-sent events of the answer as `{event, data}`. Leaving the loop
   * early closes the connection, which stops the work on the server.
   */
  async *events(path, options = {}) {
    const { chunks } = await this.#send("POST", path, EVENTS_MEDIA_TYPE, options);
    yield* readEvents(chunks);
  }

  /**
   * Send a request; answer its response and its body as chunks once the status is a success
   * (and `discard`, to drop a body that will not be read).
   * The idle timer restarts at every chunk, so a long stream that keeps arriving never times
   * out; a cancelled `signal` throws its reason.
   */
  async #send(method, path, accept, { body, query, signal } = {}) {
    const url = new URL(this.baseUrl + path);
    for (const [key, value] of Object.entries(query ?? {})) {
      for (const item of Array.isArray(value) ? value : [value]) {
        if (item !== undefined && item !== null) url.searchParams.append(key, String(item));
      }
    }
    const headers = { ...this.headers, accept };
    let payload;
    if (body !== undefined) {
      headers["content-type"] = MSGPACK_MEDIA_TYPE;
      payload = encoder.encode(body);
    }
    signal?.throwIfAborted();
    const timeout = new AbortController();
    const signals = signal ? AbortSignal.any([signal, timeout.signal]) : timeout.signal;
    let timer = null;
    if (this.timeoutMs) {
      const error = new RequestTimeoutError(
        `the hooklab server at ${this.baseUrl} sent nothing for ${this.timeoutMs} ms (${method} ${path}); pass a larger timeoutMs`,
      );
      timer = setTimeout(() => timeout.abort(error), this.timeoutMs);
      timer.unref?.();
    }
    const failure = (error) => {
      clearTimeout(timer);
      if (signal?.aborted) return signal.reason;
      if (timeout.signal.aborted) return timeout.signal.reason;
      if (error instanceof HooklabError) return error;
      const cause = error?.cause?.message ?? error?.message ?? String(error);
      return new ConnectionFailedError(`the request to ${this.baseUrl} (${method} ${path}) failed: ${cause}`, { cause: error });
    };
    let response;
    try {
      response = await this.fetch(url, { method, headers, body: payload, signal: signals });
      timer?.refresh();
      if (!response.ok) throw await errorOf(response);
    } catch (error) {
      throw failure(error);
    }
    async function* read() {
      try {
        if (!response.body) return;
        for await (const chunk of response.body) {
          timer?.refresh();
          yield chunk;
        }
      } catch (error) {
        throw failure(error);
      } finally {
        clearTimeout(timer);
      }
    }
    /** Drops a body that will not be read (read()'s cleanup runs only once it has started). */
    const discard = async () => {
      clearTimeout(timer);
      await response.body?.cancel().catch(() => {});
    };
    return { response, chunks: read(), discard };
  }
}

/** The typed ServerError of a 4xx/5xx response (its JSON error body, when it has one). */
async function errorOf(response) {
  const text = await response.text();
  let error = null;
  try {
    error = JSON.parse(text)?.error ?? null;
  } catch {
    // not hooklab's error body (a proxy's page?): said below with the status
  }
  const retry = response.headers.get("retry-after") ?? "";
  const details = {
    status: response.status,
    hint: error?.hint ?? null,
    requestId: error?.request_id ?? response.headers.get("x-request-id"),
    retryAfter: /^\d+$/.test(retry) ? Number(retry) : null, // seconds (HTTP also allows a date)
  };
  if (typeof error?.code !== "string" || typeof error?.message !== "string") {
    return serverError("internal", `HTTP ${response.status}: ${text.slice(0, 200)}`, details);
  }
  return serverError(error.code, error.message, details);
}

async function collectText(chunks) {
  const decoder = new TextDecoder();
  let text = "";
  for await (const chunk of chunks) text += decoder.decode(chunk, { stream: true });
  return text + decoder.decode();
}
