// Frame streams built here: error frames, merged fields, refusals; tensors and hook specs.
import assert from "node:assert/strict";
import { test } from "node:test";

import { encode } from "@msgpack/msgpack";

import {
  BadShapeError, ServerError, Tensor, TruncatedStreamError, UnknownHookError, WireFormatError,
  collectFrames, decodeTensor, hooks, metrics, readFrames, tensor, toWire, wireTensor,
} from "../src/index.js";
import { SPEC, chunked, concat, frame, vectorBytes } from "./helpers.js";

const F32 = SPEC.tensors.find((t) => t.dtype === "F32");
const tensorFrame = () => frame(vectorBytes(F32.file));

test("an error frame after tensors throws the typed error with its hint and request id", async () => {
  const body = concat(
    frame({ kind: "begin", expected_bytes: 24 }),
    tensorFrame(),
    frame({ kind: "error", code: "unknown_hook", message: "unknown hook point 'x'", hint: "look", request_id: "r1" }),
  );
  for (const size of [1, 5, 1000]) {
    const error = await collectFrames(chunked(body, size)).catch((e) => e);
    assert.ok(error instanceof UnknownHookError, String(error));
    assert.equal(error.code, "unknown_hook");
    assert.equal(error.message, "unknown hook point 'x'");
    assert.equal(error.hint, "look");
    assert.equal(error.requestId, "r1");
  }
});

test("an error code the client does not know is a plain ServerError", async () => {
  const body = concat(frame({ kind: "begin" }), frame({ kind: "error", code: "new_code", message: "m" }));
  const error = await collectFrames([body]).catch((e) => e);
  assert.equal(error.constructor, ServerError);
  assert.equal(error.code, "new_code");
});

test("the end frame's fields are merged over the begin frame's", async () => {
  const body = concat(
    frame({ kind: "begin", expected_bytes: 24, cache_id: "c_1", stats: { a: 1 } }),
    tensorFrame(),
    frame({ kind: "end", stats: { tensor_bytes: 24 }, scheduler: { units: 1 } }),
  );
  const { meta, tensors } = await collectFrames(chunked(body, 3));
  assert.deepEqual(meta, { expected_bytes: 24, cache_id: "c_1", stats: { tensor_bytes: 24 }, scheduler: { units: 1 } });
  assert.deepEqual(tensors[F32.name].toArray(), F32.values);
});

test("refusals: a zero or oversize frame length, bytes after the end, an unknown kind", async () => {
  const begin = frame({ kind: "begin" });
  const end = frame({ kind: "end" });
  const zero = new Uint8Array(4);
  await assert.rejects(collectFrames([concat(begin, zero)]), /frame length 0 is zero/);
  await assert.rejects(collectFrames([concat(begin, tensorFrame(), end)], { maxFrameBytes: 100 }), /above the limit of 100/);
  await assert.rejects(collectFrames([concat(begin, end, begin)]), /after the stream's last/);
  await assert.rejects(collectFrames([concat(begin, frame({ kind: "nope" }))]), /unknown frame kind "nope"/);
  await assert.rejects(collectFrames([concat(begin, frame([1, 2]))]), /must be a msgpack map/);
  const ext = concat(encode({ kind: "end" }).subarray(0, 1), encode("kind"), encode("end"), encode("x"), new Uint8Array([0xd4, 1, 0]));
  ext[0] = 0x82; // a map of 2: kind, then x holding an ext type
  await assert.rejects(collectFrames([concat(begin, frame(ext))]), /extension types are not allowed/);
  await assert.rejects(collectFrames([begin]), TruncatedStreamError);
});

test("refusals of malformed tensor maps", () => {
  const map = { kind: "tensor", v: 1, name: "t", dtype: "F32", shape: [2], pad: new Uint8Array(0), data: new Uint8Array(8) };
  assert.equal(decodeTensor(encode(map)).size, 2);
  const bad = (changes, pattern) => assert.throws(() => decodeTensor(encode({ ...map, ...changes })), pattern);
  bad({ v: 2 }, /version 2/);
  bad({ dtype: "F12" }, /unknown dtype "F12"/);
  bad({ shape: [3] }, /needs 12 bytes, got 8/);
  bad({ shape: [-2] }, /not a list of sizes/);
  bad({ dtype: "BOOL", data: new Uint8Array([0, 2]) }, /other than 0 or 1/);
  const { data, ...rest } = map;
  assert.throws(() => decodeTensor(encode({ ...rest, data, extra: 1 })), /last value/);
  assert.throws(() => decodeTensor(encode(rest)), /must be msgpack bin/);
});

test("float16, bfloat16 and float8 widen to Float32Array", () => {
  const widen = (dtype, bytes) => {
    const map = { kind: "tensor", v: 1, name: "", dtype, shape: [bytes.length / (dtype.startsWith("F8") ? 1 : 2)], pad: new Uint8Array(0), data: new Uint8Array(bytes) };
    return Array.from(decodeTensor(encode(map)).data);
  };
  // f16: 1.0, -2.0, 65504, smallest subnormal, inf, nan
  const f16 = widen("F16", [0x00, 0x3c, 0x00, 0xc0, 0xff, 0x7b, 0x01, 0x00, 0x00, 0x7c, 0x01, 0x7e]);
  assert.deepEqual(f16.slice(0, 5), [1, -2, 65504, 2 ** -24, Infinity]);
  assert.ok(Number.isNaN(f16[5]));
  assert.deepEqual(widen("BF16", [0x80, 0x3f, 0xc0, 0xbf]), [1, -1.5]);
  // e4m3fn: 1.0 (0x38), 448 (0x7e, the largest), NaN (0x7f); e5m2: 1.0 (0x3c), inf (0x7c)
  const e4m3 = widen("F8_E4M3", [0x38, 0x7e, 0x7f]);
  assert.deepEqual(e4m3.slice(0, 2), [1, 448]);
  assert.ok(Number.isNaN(e4m3[2]));
  assert.deepEqual(widen("F8_E5M2", [0x3c, 0x7c, 0x01]), [1, Infinity, 2 ** -16]);
});

test("tensors in request bodies: maps of their bytes, stored ids as refs", () => {
  const t = tensor([[1, 2, 3], [4, 5, 6]]);
  assert.equal(t.dtype, "F32");
  assert.deepEqual(t.shape, [2, 3]);
  assert.equal(t.at(1, -1), 6);
  const wire = wireTensor(t);
  assert.deepEqual({ ...wire, data: undefined, pad: undefined }, { kind: "tensor", v: 1, name: "", dtype: "F32", shape: [2, 3], data: undefined, pad: undefined });
  assert.equal(wire.data.buffer, t.data.buffer, "not copied");
  assert.deepEqual(decodeTensor(encode(wire)).toArray(), [[1, 2, 3], [4, 5, 6]]);
  assert.deepEqual(wireTensor("t_1"), { ref: "t_1" });
  assert.equal(wireTensor(new BigInt64Array([1n, 2n])).dtype, "I64");
  const body = toWire({ input: new Tensor("I32", [1, 2], new Int32Array([5, 6])), keep: [1, "x", null] });
  assert.equal(body.input.dtype, "I32");
  assert.deepEqual(body.keep, [1, "x", null]);
});

test("hook spec builders: defaults and wire forms as Python's hooklab.hooks", () => {
  assert.deepEqual(hooks.ablate().at("h"), { hook: "h", op: "ablate", mode: "zero", mean_over: "batch" });
  assert.deepEqual(hooks.ablate("mean", { head: [7], pos: 2, mean_over: "pos" }).at("h"), { hook: "h", op: "ablate", mode: "mean", mean_over: "pos", head: [7], pos: 2 });
  assert.deepEqual(hooks.patch("c_1", { pos: [3] }).at("h"), { hook: "h", op: "patch", source: { cache: "c_1" }, pos: [3] });
  assert.deepEqual(hooks.patch(null, { source_row: 1 }).at("h"), { hook: "h", op: "patch", source: { batch: 1 } });
  assert.throws(() => hooks.patch("c_1", { source_row: 1 }), /either a source/);
  assert.throws(() => hooks.ablate("zero", { heads: [1] }), /unknown option\(s\) heads/);
  assert.deepEqual(hooks.steer("t_1").at("h"), { hook: "h", op: "steer", vector: { ref: "t_1" }, coeff: 1 });
  assert.deepEqual(hooks.clamp(null, 2).at("h"), { hook: "h", op: "clamp", max: 2 });
  assert.deepEqual(hooks.set(0, { neuron: [1, 2] }).at("h"), { hook: "h", op: "set", value: 0, neuron: [1, 2] });
  assert.equal(hooks.projectOut, hooks.project_out);
  assert.deepEqual(metrics.logit_diff(5, 6), { kind: "logit_diff", pos: -1, reduce: "mean", answer: 5, wrong: 6 });
  assert.deepEqual(metrics.loss({ normalize: true }), { kind: "loss", pos: -1, reduce: "mean", normalize: true });
  assert.ok(BadShapeError.prototype instanceof ServerError);
});
