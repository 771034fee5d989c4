// The client against a live server with SAEs attached (HOOKLAB_TEST_URL; run by
// tests/js/test_js_client.py, not with the unit tests): the sparse top-k form decoded equals
// torch.topk of the dense SAE activations the Python client got from the same server, and the
// feature specs move the logits as the Python client's do (HOOKLAB_TEST_REFERENCE).
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, test } from "node:test";

import { HooklabClient, InvalidRequestError, TopK, hooks } from "../src/index.js";

const URL_ = process.env.HOOKLAB_TEST_URL;
const REF = URL_ ? JSON.parse(readFileSync(process.env.HOOKLAB_TEST_REFERENCE, "utf8")) : null;

function assertClose(actual, expected, what, atol = 1e-5) {
  assert.deepEqual(actual.shape, expected.shape, `${what}: shape`);
  expected.data.forEach((value, i) => {
    assert.ok(Math.abs(actual.data[i] - value) <= atol, `${what}[${i}]: ${actual.data[i]} vs ${value}`);
  });
}

describe("SAEs on a live server", { skip: URL_ ? false : "HOOKLAB_TEST_URL is not set" }, () => {
  const client = new HooklabClient(URL_ ?? "http://unused");

  test("model info names the SAE feature axis", async () => {
    const info = await client.modelInfo();
    assert.deepEqual(info.cfg.sae_widths, REF.sae_widths);
    const point = info.hook_points.find((p) => p.name === REF.acts);
    assert.deepEqual(point.shape, ["batch", "pos", `d_sae[${REF.hook}]`]);
  });

  test("sparse top-k: torch.topk of the dense activations, in far fewer bytes", async () => {
    const result = await client.runWithCache(REF.tokens, {
      names_filter: [REF.hook, REF.acts], sparse_top_k: REF.k, return_type: null,
    });
    assert.deepEqual(Object.keys(result.cache), [REF.hook]); // the host point stays dense
    const top = result.topK[REF.acts];
    assert.ok(top instanceof TopK);
    assert.equal(top.indices.dtype, "I32");
    assert.equal(top.width, REF.d_sae);
    assert.deepEqual(top.shape, REF.dense.shape);
    assertClose(top.values, REF.top_values, "values", 0);
    // Each index holds its value in the dense form (ties may order their indices either way).
    const dense = REF.dense.data;
    for (let i = 0; i < top.indices.size; i++) {
      const row = Math.floor(i / REF.k);
      assert.equal(dense[row * REF.d_sae + top.indices.data[i]], top.values.data[i], `index ${i}`);
    }
    // With k covering every active feature the dense form comes back whole.
    const every = await client.runWithCache(REF.tokens, {
      names_filter: [REF.acts], sparse_top_k: { k: REF.active, names: [REF.acts] }, return_type: null,
    });
    assertClose(every.topK[REF.acts].toDense(), REF.dense, "toDense", 0);
    // A cache kept on the server (dense there) read in the same form.
    const stored = await client.runWithCache(REF.tokens, { names_filter: [REF.acts], store: true, return_cache: false });
    const read = await client.getCacheTopK(stored.meta.cache_id, REF.k, { names: [REF.acts] });
    assertClose(read[REF.acts].values, REF.top_values, "stored values", 0);
    assert.deepEqual(read[REF.acts].shape, REF.dense.shape);
    await client.deleteCache(stored.meta.cache_id);
  });

  test("a k beyond d_sae is refused", async () => {
    await assert.rejects(
      client.runWithCache(REF.tokens, { names_filter: [REF.acts], sparse_top_k: REF.d_sae + 1 }),
      (error) => error instanceof InvalidRequestError && error.code === "validation_error"
        && /more than the last axis/.test(error.message),
    );
  });

  test("feature specs: the Python client's wire forms and logits", async () => {
    for (const { name, args, kwargs, wire } of REF.feature_calls) {
      assert.deepEqual(hooks[name](...args, kwargs).at(REF.hook), wire, `hooks.${name}`);
    }
    const { feature, coeff } = REF.steer;
    const steered = await client.runWithHooks(REF.tokens, {
      fwd_hooks: [[REF.hook, hooks.feature_steer(feature, coeff)]],
    });
    assertClose(steered.logits, REF.steer.logits, "steered logits", 1e-4);
    const clamped = await client.runWithHooks(REF.tokens, {
      fwd_hooks: [[REF.hook, hooks.featureClamp(feature, 3.0, { pos: -1 })]],
    });
    assertClose(clamped.logits, REF.clamp_logits, "clamped logits", 1e-4);
  });
});
