// The client against a stand-in server (node:http): headers sent, chunked bodies, typed
// errors, cancellation and timeouts, without Python.
import assert from "node:assert/strict";
import { once } from "node:events";
import { createServer } from "node:http";
import { after, before, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

import { decode } from "@msgpack/msgpack";

import {
  ConnectionFailedError, FRAMES_MEDIA_TYPE, HooklabClient, InternalServerError, QuotaError,
  RequestTimeoutError, UnknownHookError, WireFormatError, hooks,
} from "../src/index.js";
import { SPEC, concat, frame, vectorBytes } from "./helpers.js";

const F32 = SPEC.tensors.find((t) => t.dtype === "F32");
let server;
let url;
const seen = []; // {method, url, headers, body} of each request
const closed = []; // paths whose connection the client closed before the answer ended
let handler = null;

before(async () => {
  server = createServer(async (request, response) => {
    const parts = [];
    for await (const part of request) parts.push(part);
    const body = parts.length ? decode(Buffer.concat(parts)) : undefined;
    seen.push({ method: request.method, url: request.url, headers: request.headers, body });
    response.on("close", () => {
      if (!response.writableFinished) closed.push(request.url);
    });
    await handler(request, response, body);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  url = `http://127.0.0.1:${server.address().port}`;
});

after(() => {
  server.closeAllConnections();
  server.close();
});

function frames(response, pieces) {
  response.writeHead(200, { "content-type": FRAMES_MEDIA_TYPE }); // chunked: no length
  return (async () => {
    for (const piece of pieces) {
      response.write(piece);
      await sleep(2);
    }
    response.end();
  })();
}

test("explicit Accept on every request, the API key, msgpack bodies with the model named", async () => {
  handler = (request, response) => {
    if (request.url.startsWith("/v1/model")) {
      response.writeHead(200, { "content-type": "application/json" });
      response.end(JSON.stringify({ hook_points: [{ name: "a.hook_z", fires_by_default: true }, { name: "b", fires_by_default: true }] }));
      return;
    }
    const stream = concat(frame({ kind: "begin", x: 1 }), frame(vectorBytes(F32.file)), frame({ kind: "end", y: 2 }));
    // The stream in pieces of 5 bytes: frames and prefixes split across chunks.
    return frames(response, Array.from({ length: Math.ceil(stream.length / 5) }, (_, i) => stream.subarray(i * 5, i * 5 + 5)));
  };
  seen.length = 0;
  const client = new HooklabClient(`${url}/`, { apiKey: "sekrit", model: "m1" });
  const result = await client.runWithHooks([[1, 2]], {
    fwd_hooks: [[(name) => name.endsWith("hook_z"), hooks.scale(2, { head: 1 })]],
    names_filter: ["x"],
  });
  assert.deepEqual(result.meta, { x: 1, y: 2 });
  assert.deepEqual(result.cache[F32.name].toArray(), F32.values);
  const [info, run] = seen;
  assert.equal(info.url, "/v1/model?model=m1");
  assert.equal(info.headers.accept, "application/json");
  assert.equal(info.headers.authorization, "Bearer sekrit");
  assert.equal(run.url, "/v1/run_with_hooks");
  assert.equal(run.headers.accept, FRAMES_MEDIA_TYPE);
  assert.equal(run.headers["content-type"], "application/msgpack");
  assert.deepEqual(run.body, {
    input: [[1, 2]], model: "m1", names: ["x"],
    hooks: [{ hook: "a.hook_z", op: "scale", factor: 2, head: 1 }],
  });
});

test("an error frame mid-stream over chunked HTTP throws the typed error", async () => {
  handler = (request, response) =>
    frames(response, [
      frame({ kind: "begin" }),
      frame(vectorBytes(F32.file)),
      frame({ kind: "error", code: "unknown_hook", message: "m", hint: "h", request_id: "r9" }),
    ]);
  const error = await new HooklabClient(url).runWithCache("x").catch((e) => e);
  assert.ok(error instanceof UnknownHookError);
  assert.equal(error.requestId, "r9");
});

test("a body cut short is truncated, a JSON answer to a frames request is refused", async () => {
  handler = (request, response) => frames(response, [frame({ kind: "begin" }), frame(vectorBytes(F32.file)).subarray(0, 30)]);
  await assert.rejects(new HooklabClient(url).forward("x"), /truncated/);
  handler = (request, response) => {
    response.writeHead(200, { "content-type": "application/json" });
    response.end("{}");
  };
  await assert.rejects(new HooklabClient(url).forward("x"), WireFormatError);
});

test("HTTP errors: hooklab's error body typed, with status, retry-after and request id", async () => {
  handler = (request, response) => {
    response.writeHead(429, { "content-type": "application/json", "retry-after": "3", "x-request-id": "hdr" });
    response.end(JSON.stringify({ error: { code: "quota", message: "over", hint: "wait", request_id: "rq" } }));
  };
  const error = await new HooklabClient(url).tokenize("x").catch((e) => e);
  assert.ok(error instanceof QuotaError);
  assert.deepEqual([error.status, error.retryAfter, error.requestId, error.hint, error.message], [429, 3, "rq", "wait", "over"]);
  handler = (request, response) => {
    response.writeHead(502, { "content-type": "text/html" });
    response.end("<h1>bad gateway</h1>");
  };
  const proxied = await new HooklabClient(url).tokenize("x").catch((e) => e);
  assert.ok(proxied instanceof InternalServerError);
  assert.match(proxied.message, /HTTP 502: <h1>bad gateway/);
});

function events(response, count) {
  response.writeHead(200, { "content-type": "text/event-stream" });
  return (async () => {
    for (let step = 0; step < count && !response.destroyed; step++) {
      response.write(`event: token\ndata: ${JSON.stringify({ step, tokens: [step], text: [`t${step}`] })}\n\n`);
      await sleep(20);
    }
    if (!response.destroyed) {
      response.write(`event: done\r\ndata: {"tokens": [[0]], "output": "out",\r\ndata: "stats": {}}\r\n\r\n`);
      response.end();
    }
  })();
}

test("generateStream: steps, then the result; Accept is text/event-stream", async () => {
  handler = (request, response) => events(response, 3);
  seen.length = 0;
  const stream = new HooklabClient(url).generateStream("Hi", { max_new_tokens: 3 });
  const steps = [];
  for await (const step of stream) steps.push(step.text[0]);
  assert.deepEqual(steps, ["t0", "t1", "t2"]);
  assert.deepEqual(stream.result, { tokens: [[0]], output: "out", stats: {} });
  assert.equal(seen[0].headers.accept, "text/event-stream");
  assert.deepEqual(seen[0].body, { input: "Hi", max_new_tokens: 3, stream: true });
});

test("generateStream: an AbortController or leaving the loop closes the connection", async () => {
  handler = (request, response) => events(response, 1000);
  closed.length = 0;
  const controller = new AbortController();
  const client = new HooklabClient(url);
  const stream = client.generateStream("Hi", { signal: controller.signal });
  let count = 0;
  await assert.rejects(
    (async () => {
      for await (const _ of stream) if (++count === 2) controller.abort();
    })(),
    { name: "AbortError" },
  );
  for await (const step of client.generateStream("Hi")) if (step.step === 1) break;
  const abortable = client.generateStream("Hi");
  await assert.rejects(
    (async () => {
      for await (const _ of abortable) abortable.abort(new Error("enough"));
    })(),
    /enough/,
  );
  for (let i = 0; i < 100 && closed.length < 3; i++) await sleep(10);
  assert.deepEqual(closed, ["/v1/generate", "/v1/generate", "/v1/generate"]);
});

test("timeoutMs: a server that sends nothing; a port nobody listens on", async () => {
  handler = () => {}; // never answers
  await assert.rejects(new HooklabClient(url, { timeoutMs: 100 }).modelInfo(), RequestTimeoutError);
  const free = createServer();
  free.listen(0, "127.0.0.1");
  await once(free, "listening");
  const port = free.address().port;
  free.close();
  await assert.rejects(new HooklabClient(`http://127.0.0.1:${port}`).modelInfo(), ConnectionFailedError);
});
