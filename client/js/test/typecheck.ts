// Compiled (not run) by types.test.js: the hand-written .d.ts files describe the API as used.
import {
  HooklabClient, ServerError, Tensor, TopK, UnknownHookError, connect, hooks, metrics, readFrames, tensor,
  type GenerateStep, type RunResult,
} from "../src/index.js";

async function example(): Promise<void> {
  const client: HooklabClient = connect("http://127.0.0.1:8000", { apiKey: "k", timeoutMs: null });
  const info = await client.modelInfo();
  const names: string[] = info.hook_points.map((point) => point.name);
  const { tokens } = await client.tokenize("Hello");
  const result: RunResult = await client.runWithCache(tokens, {
    names_filter: (name) => name.includes("resid"),
    fwd_hooks: [
      ["blocks.0.hook_resid_post", hooks.ablate("mean", { head: [1], mean_over: "pos" })],
      [(name) => name.endsWith("hook_z"), hooks.steer(new Float32Array(16), 2, { pos: -1 })],
    ],
    prepend_bos: false,
  });
  const logits: Tensor | undefined = result.logits;
  const first: number | bigint | undefined = logits?.at(0, 0, 0);
  const resid: Float32Array | BigInt64Array | Uint8Array | ArrayLike<number | bigint> | undefined =
    result.cache[names[0]]?.data;
  const controller = new AbortController();
  const stream = client.generateStream("Hello", { max_new_tokens: 3, signal: controller.signal });
  for await (const step of stream) {
    const text: string = step.text[0];
    const s: GenerateStep = step;
    void text, s;
  }
  const done = stream.result?.output;
  const patched = await client.patching({
    corrupted: [[1, 2, 3]], clean: [[1, 2, 4]], activation: "resid_pre", axes: ["layer", "pos"],
    metric: metrics.logit_diff(5, 6, -1, { normalize: true }),
  });
  const stored = await client.storeTensor(tensor([[1, 2], [3, 4]]), { ttl_s: 60 });
  const back: Tensor = await client.getTensor(stored.id);
  for await (const frame of readFrames([new Uint8Array(0)])) {
    if (frame.kind === "tensor") void frame.tensor.shape;
    else if (frame.kind === "error") void frame.fields.code;
  }
  try {
    await client.forward("x", { fwd_hooks: [["nope", hooks.set(0)]] });
  } catch (error) {
    if (error instanceof UnknownHookError) void error.hint;
    if (error instanceof ServerError) void [error.code, error.requestId, error.status, error.retryAfter];
  }
  void [first, resid, done, patched.metric?.shape, back];
}
void example;

async function sparseExample(client: HooklabClient): Promise<void> {
  const acts = "blocks.1.hook_resid_pre.hook_sae_acts_post";
  const result = await client.runWithCache("Hello", { names_filter: [acts], sparse_top_k: 8 });
  const top: TopK | undefined = result.topK[acts];
  const width: number | undefined = top?.width;
  const dense: Tensor | undefined = top?.toDense();
  const index: number | bigint | undefined = top?.indices.at(0, 0, 0);
  await client.runWithCache("Hello", { sparse_top_k: { k: 2, names: ["blocks.*.attn.hook_pattern"] } });
  await client.runWithHooks("Hello", {
    fwd_hooks: [
      ["blocks.1.hook_resid_pre", hooks.feature_steer([1, 2], 4, { pos: -1 })],
      ["blocks.1.hook_resid_pre", hooks.featureAblate(3, { batch: 0 })],
      ["blocks.1.hook_resid_pre", hooks.feature_clamp(5, 2.5)],
    ],
  });
  const stored = await client.getCacheTopK("c_1", 4, { names: [acts] });
  const values: Tensor | undefined = stored[acts]?.values;
  void [width, dense, index, values];
}
void sparseExample;
