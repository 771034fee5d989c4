// The sparse top-k form decoded (TopK, its dense form, the axis sizes of SAE features) and
// the feature spec builders' wire forms, without a server.
import assert from "node:assert/strict";
import { test } from "node:test";

import { HookSpec, Tensor, TopK, axisSizes, hooks } from "../src/index.js";
import { joinTopK, lastAxisSize } from "../src/sparse.js";

const HOOK = "blocks.1.hook_resid_pre";
const ACTS = `${HOOK}.hook_sae_acts_post`;
const CFG = { n_heads: 4, d_head: 16, d_model: 64, d_mlp: 256, d_vocab: 100, sae_widths: { [HOOK]: 6 } };
const INFO = {
  cfg: CFG,
  hook_points: [
    { name: ACTS, shape: ["batch", "pos", `d_sae[${HOOK}]`] },
    { name: "blocks.0.attn.hook_pattern", shape: ["batch", "head", "pos", "key_pos"] },
  ],
};

test("axis sizes name an attached SAE's features d_sae[HOOK]", () => {
  const sizes = axisSizes(CFG, 2, 5);
  assert.equal(sizes[`d_sae[${HOOK}]`], 6);
  assert.equal(sizes.d_model, 64);
  assert.equal(sizes.key_pos, 5);
  assert.equal(sizes.q_width, 64);
});

test("an indices/values pair joins into one TopK whose dense form puts the values back", () => {
  const values = new Tensor("F32", [1, 2, 2], new Float32Array([3, 1, 5, 2]));
  const indices = new Tensor("I32", [1, 2, 2], new Int32Array([4, 0, 1, 5]));
  const other = new Tensor("F32", [1], new Float32Array([7]));
  const tensors = { [`${ACTS}.top_k_indices`]: indices, [`${ACTS}.top_k_values`]: values, [HOOK]: other };
  const { dense, topK } = joinTopK(tensors, (name, v) => lastAxisSize(INFO, name, v));
  assert.deepEqual(Object.keys(dense), [HOOK]);
  const top = topK[ACTS];
  assert.ok(top instanceof TopK);
  assert.equal(top.k, 2);
  assert.equal(top.width, 6);
  assert.deepEqual(top.shape, [1, 2, 6]);
  assert.deepEqual(top.toDense().toArray(), [[[1, 0, 0, 0, 3, 0], [0, 5, 0, 0, 0, 2]]]);
});

test("the width of a point without its batch axis, and of an attention pattern's key axis", () => {
  const noBatch = new Tensor("F32", [3, 2], new Float32Array(6));
  assert.equal(lastAxisSize(INFO, ACTS, noBatch), 6);
  const pattern = new Tensor("F32", [1, 4, 7, 2], new Float32Array(56));
  assert.equal(lastAxisSize(INFO, "blocks.0.attn.hook_pattern", pattern), 7);
  assert.throws(() => lastAxisSize(INFO, "nope", noBatch), /no hook point/);
});

test("feature specs: the wire forms of the Python client's hooks.feature_*", () => {
  assert.ok(hooks.feature_steer(3) instanceof HookSpec);
  assert.deepEqual(hooks.feature_steer(3).at(HOOK), { hook: HOOK, op: "feature_steer", feature: 3, coeff: 1 });
  assert.deepEqual(hooks.featureSteer([1, 2], 4, { pos: -1 }).at(HOOK), {
    hook: HOOK, op: "feature_steer", feature: [1, 2], coeff: 4, pos: -1,
  });
  assert.deepEqual(hooks.feature_ablate(5, { batch: [0] }).at(HOOK), {
    hook: HOOK, op: "feature_ablate", feature: 5, batch: [0],
  });
  assert.deepEqual(hooks.feature_clamp(2, 0.5).at(HOOK), { hook: HOOK, op: "feature_clamp", feature: 2, value: 0.5 });
  assert.throws(() => hooks.feature_ablate(1, { head: 0 }), /unknown option\(s\) head of hooks.feature_ablate/);
});
