// The page's only door to the server: hooklab's public JSON API over fetch, the way any other
// language calls it. Every request sends `Authorization: Bearer <key>` when a key is stored, JSON
// bodies, and asks for JSON answers; an error answer becomes an ApiError carrying the server's
// envelope ({"error": {"code", "message", "hint", "request_id"}}) and Retry-After.

import { getKey } from "./auth.js";

export class ApiError extends Error {
  constructor({ status, code, message, hint = null, requestId = null, retryAfter = null }) {
    super(message);
    this.name = "ApiError";
    this.status = status; // HTTP status (0: no answer at all)
    this.code = code; // the envelope's code: quota, validation_error, unauthorized, …
    this.hint = hint;
    this.requestId = requestId;
    this.retryAfter = retryAfter; // seconds, when waiting helps
  }
}

function headers(hasBody) {
  const result = { accept: "application/json" };
  if (hasBody) result["content-type"] = "application/json";
  const key = getKey();
  if (key) result.authorization = `Bearer ${key}`;
  return result;
}

async function errorOf(response) {
  let envelope = {};
  try {
    envelope = (await response.json()).error ?? {};
  } catch {
    // not JSON (a proxy's page): the status says enough
  }
  const retry = response.headers.get("retry-after");
  return new ApiError({
    status: response.status,
    code: envelope.code ?? `http_${response.status}`,
    message: envelope.message ?? (response.statusText || `HTTP ${response.status}`),
    hint: envelope.hint ?? null,
    requestId: envelope.request_id ?? response.headers.get("x-request-id"),
    retryAfter: retry === null ? null : Number(retry),
  });
}

/** fetch, with a failure to connect turned into an ApiError (status 0). */
async function send(method, path, body, signal) {
  try {
    return await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError({
      status: 0,
      code: "network",
      message: "the server did not answer",
      hint: "is hooklab-server still running, and reachable from this browser?",
    });
  }
}

/** One JSON request; resolves to the parsed answer (null for 204). */
export async function request(method, path, body, { signal } = {}) {
  const response = await send(method, path, body, signal);
  if (!response.ok) throw await errorOf(response);
  return response.status === 204 ? null : response.json();
}

export const get = (path, options) => request("GET", path, undefined, options);
export const post = (path, body, options) => request("POST", path, body, options);
export const remove = (path, options) => request("DELETE", path, undefined, options);

/**
 * Server-sent events of a POST (`/v1/generate` with "stream": true), read from the response
 * body as it arrives: yields {event, data} with data parsed from JSON. Aborting `signal` closes
 * the connection, which stops the generation on the server at its next step.
 */
export async function* events(path, body, { signal } = {}) {
  const response = await send("POST", path, body, signal);
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replaceAll("\r\n", "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const parsed = parseEvent(block);
        if (parsed) yield parsed;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  return data.length ? { event, data: JSON.parse(data.join("\n")) } : null;
}
