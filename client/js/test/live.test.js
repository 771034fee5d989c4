// The client against a live hooklab server (HOOKLAB_TEST_URL), checked against TransformerLens's
// numbers on the same weights (HOOKLAB_TEST_REFERENCE, a JSON file tests/js/test_js_client.py
// writes). Skipped when HOOKLAB_TEST_URL is not set.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, test } from "node:test";

import {
  HooklabClient, NotFoundError, Tensor, UnknownHookError, hooks, metrics, tensor,
} from "../src/index.js";

const URL_ = process.env.HOOKLAB_TEST_URL;
const REF = URL_ ? JSON.parse(readFileSync(process.env.HOOKLAB_TEST_REFERENCE, "utf8")) : null;
const ATOL = 1e-4;

/** `actual` (a Tensor) equals `expected` ({shape, data}): |a - e| <= atol + rtol * |e|. */
function assertClose(actual, expected, what, { atol = ATOL, rtol = 0 } = {}) {
  assert.ok(actual instanceof Tensor, `${what}: not a Tensor`);
  assert.deepEqual(actual.shape, expected.shape, `${what}: shape`);
  assert.ok(actual.data instanceof Float32Array, `${what}: ${actual.data.constructor.name}`);
  expected.data.forEach((value, i) => {
    const diff = Math.abs(actual.data[i] - value);
    assert.ok(diff <= atol + rtol * Math.abs(value), `${what}[${i}]: ${actual.data[i]} vs ${value}`);
  });
}

/** The largest difference between two references (an intervention must change something). */
function maxDiff(a, b) {
  return a.data.reduce((worst, value, i) => Math.max(worst, Math.abs(value - b.data[i])), 0);
}

/** A counter's total from /metrics (over every worker's series). */
async function counter(name) {
  const text = await (await fetch(`${URL_}/metrics`)).text();
  return text.split("\n")
    .filter((line) => line.split(/[{ ]/)[0] === `hooklab_${name}_total`)
    .reduce((total, line) => total + Number(line.split(" ").at(-1)), 0);
}

async function waitFor(condition, ms = 10_000) {
  const deadline = Date.now() + ms;
  while (!(await condition()) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  return condition();
}

describe("against a live server", { skip: URL_ ? false : "HOOKLAB_TEST_URL is not set" }, () => {
  const client = new HooklabClient(URL_ ?? "http://unused");

  test("model info and tokenize", async () => {
    const info = await client.modelInfo();
    assert.equal(info.model_name, REF.model_name);
    assert.equal(info.cfg.n_layers, REF.n_layers);
    assert.ok(info.hook_points.some((point) => point.name === "blocks.0.hook_resid_pre"));
    const { tokens, str_tokens } = await client.tokenize(REF.prompt);
    assert.deepEqual(tokens, REF.tokens);
    assert.equal(str_tokens[0].length, REF.tokens[0].length);
    assert.equal(typeof (await client.detokenize(REF.tokens[0])), "string");
  });

  test("forward: logits and loss equal TransformerLens's", async () => {
    const out = await client.forward(REF.prompt, { return_type: "both" });
    assertClose(out.logits, REF.logits, "logits");
    assert.ok(Math.abs(out.loss.at() - REF.loss) < ATOL, `loss ${out.loss.at()} vs ${REF.loss}`);
    assert.deepEqual(Object.keys(out.outputs).sort(), ["output.logits", "output.loss"]);
    const tokens = new Tensor("I64", [1, REF.tokens[0].length], BigInt64Array.from(REF.tokens[0], BigInt));
    assertClose((await client.forward(tokens)).logits, REF.logits, "logits of an I64 token tensor");
  });

  test("runWithCache: a streamed cache equals TransformerLens's activations", async () => {
    const names = Object.keys(REF.cache);
    const out = await client.runWithCache(REF.tokens, { names_filter: (name) => names.includes(name) });
    assert.deepEqual(Object.keys(out.cache).sort(), [...names].sort());
    for (const name of names) assertClose(out.cache[name], REF.cache[name], name);
    assertClose(out.logits, REF.logits, "logits");
    assert.ok(out.meta.stats, "the end frame's fields are in meta");
  });

  test("runWithCache: wire_dtype float16 and bfloat16 widen to Float32Array", async () => {
    const name = "blocks.1.hook_resid_post";
    for (const [wire_dtype, code, rtol] of [["float16", "F16", 2 ** -10], ["bfloat16", "BF16", 2 ** -8]]) {
      const out = await client.runWithCache(REF.tokens, { names_filter: name, wire_dtype });
      assert.equal(out.cache[name].dtype, code);
      assertClose(out.cache[name], REF.cache[name], `${name} as ${code}`, { rtol });
    }
  });

  test("runWithHooks: ablating a head and steering equal the same hooks in TransformerLens", async () => {
    assert.ok(maxDiff(REF.ablated_logits, REF.logits) > 1e-3 && maxDiff(REF.steer.logits, REF.logits) > 1e-3);
    const ablated = await client.runWithHooks(REF.tokens, {
      fwd_hooks: [["blocks.0.attn.hook_z", hooks.ablate("zero", { head: 1 })]],
    });
    assertClose(ablated.logits, REF.ablated_logits, "ablated logits");
    const { hook, coeff, vector } = REF.steer;
    const inline = await client.runWithHooks(REF.tokens, {
      fwd_hooks: [[hook, hooks.steer(new Float32Array(vector), coeff)]],
    });
    assertClose(inline.logits, REF.steer.logits, "steered logits (inline vector)");
    const stored = await client.storeTensor(tensor(vector));
    const byRef = await client.runWithHooks(REF.tokens, {
      fwd_hooks: [[(name) => name === hook, hooks.steer(stored.id, coeff)]],
    });
    assertClose(byRef.logits, REF.steer.logits, "steered logits (stored vector)");
    await client.deleteTensor(stored.id);
  });

  test("hook specs and metrics: the same wire forms as the Python client's", () => {
    // Each call: the same positional args, then Python's keyword args as one options object.
    for (const { name, args, kwargs, wire } of REF.hook_calls) {
      assert.deepEqual(hooks[name](...args, kwargs).at("blocks.0.hook_resid_pre"), wire, `hooks.${name}`);
    }
    for (const { name, args, kwargs, wire } of REF.metric_calls) {
      assert.deepEqual(metrics[name](...args, kwargs), wire, `metrics.${name}`);
    }
  });

  test("generate: greedy tokens equal TransformerLens's; the stream yields the same steps", async () => {
    const options = { max_new_tokens: 6, do_sample: false, stop_at_eos: false };
    const done = await client.generate(REF.tokens, options);
    assert.deepEqual(done.tokens, REF.generated);
    const stream = client.generateStream(REF.tokens, options);
    const steps = [];
    for await (const step of stream) steps.push(step.tokens[0]);
    assert.deepEqual(steps, REF.generated[0].slice(REF.tokens[0].length));
    assert.deepEqual(stream.result.tokens, REF.generated);
  });

  test("generateStream: an AbortController, or leaving the loop, stops the generation", async () => {
    const options = { max_new_tokens: 100, do_sample: false, stop_at_eos: false, use_past_kv_cache: false };
    const before = await counter("generations_cancelled");
    const controller = new AbortController();
    await assert.rejects(
      (async () => {
        for await (const step of client.generateStream([[5, 6, 7]], { ...options, signal: controller.signal })) {
          if (step.step === 1) controller.abort();
        }
      })(),
      { name: "AbortError" },
    );
    assert.ok(await waitFor(async () => (await counter("generations_cancelled")) >= before + 1), "abort");
    for await (const step of client.generateStream([[5, 6, 7]], options)) if (step.step === 1) break;
    assert.ok(await waitFor(async () => (await counter("generations_cancelled")) >= before + 2), "break");
  });

  test("patching: the sweep equals TransformerLens's get_act_patch_resid_pre", async () => {
    const { clean, corrupted, answer, wrong, metric } = REF.patching;
    assert.ok(Math.max(...metric.data) - Math.min(...metric.data) > 1e-3, "the sweep varies");
    const out = await client.patching({
      corrupted, clean, activation: "resid_pre", axes: ["layer", "pos"],
      metric: metrics.logit_diff(answer, wrong),
    });
    assertClose(out.metric, metric, "patching metric");
  });

  test("stored tensors and caches: store, read, list, delete", async () => {
    const values = tensor([[1.5, -2], [0.25, 8]]);
    const stored = await client.storeTensor(values, { ttl_s: 60 });
    assert.deepEqual(stored.shape, [2, 2]);
    assert.deepEqual((await client.getTensor(stored.id)).toArray(), values.toArray());
    assert.ok((await client.listTensors()).some((object) => object.id === stored.id));
    await client.deleteTensor(stored.id);
    await assert.rejects(client.getTensor(stored.id), NotFoundError);

    const name = "blocks.1.hook_resid_post";
    const kept = await client.runWithCache(REF.tokens, { names_filter: [name, "hook_embed"], store: true, return_cache: false });
    const id = kept.meta.cache_id;
    assert.match(id, /^c_/);
    assert.deepEqual(Object.keys(kept.cache), []);
    assertClose(kept.logits, REF.logits, "logits of a stored run");
    const read = await client.getCache(id, { names: [name] });
    assert.deepEqual(Object.keys(read), [name]);
    assertClose(read[name], REF.cache[name], `${name} read from the stored cache`);
    assert.ok((await client.listCaches()).some((object) => object.id === id));
    await client.deleteCache(id);
    await assert.rejects(client.getCache(id), NotFoundError);
  });

  test("errors are typed and carry the server's code, hint, status and request id", async () => {
    const error = await client.forward(REF.prompt, { fwd_hooks: [["blocks.0.hook_nope", hooks.ablate()]] }).catch((e) => e);
    assert.ok(error instanceof UnknownHookError, String(error));
    assert.equal(error.code, "unknown_hook");
    assert.equal(error.status, 422);
    assert.ok(error.hint);
    assert.match(error.requestId, /^\w+$/);
  });
});
