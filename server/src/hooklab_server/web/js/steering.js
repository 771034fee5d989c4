// The steering playground. A steering vector at layer L is the difference of the mean residual
// stream (blocks.L.hook_resid_pre) over the "towards" prompts' tokens and over the "away"
// prompts' tokens (padding and a prepended BOS left out); generation then adds coeff × vector
// at every position ({"op": "steer"}), streamed token by token beside the same generation
// without it (POST /v1/generate, "stream": true: server-sent events read from fetch's body).

import * as api from "./api.js";
import * as models from "./model.js";
import { InputError } from "./status.js";
import { jsonTensor, view } from "./tensors.js";

/** Mean residual of each side's prompts, and their difference: {vector, norm, counts}. */
export async function steeringVector(layer, towards, away) {
  const texts = [...towards, ...away];
  const hook = `blocks.${layer}.hook_resid_pre`;
  const body = { model: models.name(), input: texts, padding_side: "right" };
  const tokens = await api.post("/v1/tokenize", body);
  const answer = await api.post("/v1/run_with_cache", {
    ...body,
    names: [hook],
    return_type: null,
  });
  const resid = view(answer.tensors[hook]);
  const [, positions, dModel] = resid.shape;
  const bos = models.model().tokenizer?.bos_token_id;
  const sums = [new Float64Array(dModel), new Float64Array(dModel)];
  const counts = [0, 0];
  texts.forEach((_, b) => {
    const side = b < towards.length ? 0 : 1;
    for (let p = 0; p < positions; p++) {
      if (!tokens.attention_mask[b][p]) continue;
      if (p === 0 && tokens.tokens[b][0] === bos) continue; // the same BOS everywhere
      for (let d = 0; d < dModel; d++) sums[side][d] += resid.at(b, p, d);
      counts[side] += 1;
    }
  });
  if (!counts[0] || !counts[1])
    throw new InputError("each side needs a prompt with at least one token");
  const vector = new Float64Array(dModel);
  for (let d = 0; d < dModel; d++) vector[d] = sums[0][d] / counts[0] - sums[1][d] / counts[1];
  let squares = 0;
  for (const value of vector) squares += value * value;
  const norm = Math.sqrt(squares);
  return { layer, hook, vector, norm, counts, scheduler: answer.scheduler };
}

/** The steering hook spec for `steer` at `coeff`. */
export function steerSpec(steer, coeff) {
  return {
    hook: steer.hook,
    op: "steer",
    vector: jsonTensor(steer.vector, [steer.vector.length]),
    coeff,
  };
}

/**
 * Streams one generation; calls onToken(text, id, step) per token and resolves to the `done`
 * event's result. An `error` event rejects with an ApiError-shaped error.
 */
export async function generate(settings, hooks, signal, onToken) {
  const body = {
    model: models.name(),
    input: settings.prompt,
    max_new_tokens: settings.maxNewTokens,
    do_sample: settings.temperature > 0,
    temperature: settings.temperature > 0 ? settings.temperature : 1.0,
    seed: settings.seed,
    stop_at_eos: settings.stopAtEos,
    stream: true,
    hooks,
  };
  for await (const { event, data } of api.events("/v1/generate", body, { signal })) {
    if (event === "token") onToken(data.text[0], data.tokens[0], data.step);
    else if (event === "done") return data;
    else if (event === "error") {
      const e = data.error ?? {};
      throw new api.ApiError({
        status: 200,
        code: e.code,
        message: e.message,
        hint: e.hint,
        requestId: e.request_id,
      });
    }
  }
  throw new api.ApiError({
    status: 200,
    code: "network",
    message: "the stream ended before its done event",
  });
}
