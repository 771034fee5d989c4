// Every golden vector of proto/vectors/ decodes to what vectors.json says.
import assert from "node:assert/strict";
import { test } from "node:test";

import { TruncatedStreamError, collectFrames, decodeTensor, readFrames } from "../src/index.js";
import { SPEC, chunked, expectedValues, vectorBytes } from "./helpers.js";

const ARRAYS = {
  F64: Float64Array, F32: Float32Array, F16: Float32Array, BF16: Float32Array,
  I64: BigInt64Array, U8: Uint8Array, BOOL: Uint8Array,
};

for (const entry of SPEC.tensors) {
  test(`golden tensor ${entry.file}`, () => {
    const bytes = vectorBytes(entry.file);
    const tensor = decodeTensor(bytes);
    assert.equal(tensor.name, entry.name);
    assert.equal(tensor.dtype, entry.dtype);
    assert.deepEqual(tensor.shape, entry.shape);
    assert.ok(tensor.data instanceof ARRAYS[entry.dtype], `${entry.dtype} as ${ARRAYS[entry.dtype].name}`);
    const values = tensor.toArray();
    if (entry.dtype === "BOOL") assert.deepEqual(values, entry.values);
    else assert.deepEqual(values, expectedValues(entry)); // deepEqual: NaN equals NaN
    if (tensor.data.buffer === bytes.buffer) {
      // A view, not a copy: the payload sits at data_offset in the map, as vectors.json says.
      assert.equal(tensor.data.byteOffset, entry.data_offset);
      assert.equal(tensor.data.byteOffset % 64, 0);
    } else {
      assert.ok(["F16", "BF16"].includes(entry.dtype), "only widened floats are copies");
    }
  });
}

test("a golden tensor read at an odd offset is copied to an aligned array", () => {
  const entry = SPEC.tensors.find((t) => t.dtype === "F32");
  const inner = vectorBytes(entry.file);
  const padded = new Uint8Array(inner.byteLength + 1);
  padded.set(inner, 1);
  const tensor = decodeTensor(padded.subarray(1));
  assert.deepEqual(tensor.toArray(), entry.values);
});

const STREAM = SPEC.stream;

function checkStream(frames) {
  assert.equal(frames.length, STREAM.frames.length);
  STREAM.frames.forEach((expected, i) => {
    const got = frames[i];
    assert.equal(got.kind, expected.kind);
    if (expected.kind === "tensor") {
      const entry = SPEC.tensors.find((t) => t.file === expected.file);
      assert.equal(got.tensor.name, entry.name);
      assert.deepEqual(got.tensor.shape, entry.shape);
      assert.deepEqual(got.tensor.toArray(), expectedValues(entry));
      assert.equal(got.tensor.data.byteOffset % 64, 0, "payload aligned in its frame buffer");
    } else {
      const { kind, ...fields } = expected;
      assert.deepEqual(got.fields, fields);
    }
  });
}

async function all(iterable) {
  const out = [];
  for await (const item of iterable) out.push(item);
  return out;
}

test("the golden stream, whole and in chunks of every size from 1 to 70 bytes", async () => {
  const bytes = vectorBytes(STREAM.file);
  checkStream(await all(readFrames([bytes])));
  for (let size = 1; size <= 70; size++) checkStream(await all(readFrames(chunked(bytes, size))));
});

test("the golden stream collected: begin and end fields merged, tensors by name", async () => {
  const { meta, tensors } = await collectFrames([vectorBytes(STREAM.file)]);
  assert.deepEqual(meta, { request_id: "golden", n_frames: 2, stats: { frames: 2 } });
  assert.deepEqual(Object.keys(tensors), ["blocks.0.hook_resid_pre", "tokens"]);
  assert.deepEqual(tensors.tokens.toArray(), [-1n, 0n, 1099511627776n]);
});

test("every strict prefix of the golden stream is truncated", async () => {
  const bytes = vectorBytes(STREAM.file);
  for (let length = 0; length < bytes.byteLength; length++) {
    await assert.rejects(all(readFrames(chunked(bytes.subarray(0, length), 7))), TruncatedStreamError, `prefix ${length}`);
  }
});
