/**
 * Metrics the server computes on each patched run (`client.patching`) or starts a backward pass
 * from (`objective`). The builders mirror the Python client's `hooklab.metrics` and return the
 * wire form (`PatchMetric`, proto/README.md §9).
 */

function metric(kind, { answer, wrong, pos = -1, reduce = "mean", normalize = false, baselines } = {}) {
  const wire = { kind, pos, reduce };
  if (answer !== undefined && answer !== null) wire.answer = answer;
  if (wrong !== undefined && wrong !== null) wire.wrong = wrong;
  if (baselines !== undefined && baselines !== null) wire.baselines = baselines;
  if (normalize) wire.normalize = true;
  return wire;
}

/**
 * `logits[b, pos_b, answer_b] - logits[b, pos_b, wrong_b]`, averaged over the batch.
 * `normalize: true` maps it to `(m - corrupted) / (clean - corrupted)`; the server measures
 * both baselines unless `baselines: [clean, corrupted]` is given.
 */
export function logit_diff(answer, wrong, pos = -1, options = {}) {
  return metric("logit_diff", { ...options, answer, wrong, pos });
}

/** The logit of `answer` at `pos`, averaged over the batch. */
export function logit(answer, pos = -1, options = {}) {
  return metric("logit", { ...options, answer, pos });
}

/** The probability of `answer` at `pos`, averaged over the batch. */
export function prob(answer, pos = -1, options = {}) {
  return metric("prob", { ...options, answer, pos });
}

/** The log-probability of `answer` at `pos`, averaged over the batch. */
export function logprob(answer, pos = -1, options = {}) {
  return metric("logprob", { ...options, answer, pos });
}

/** TransformerLens's mean next-token loss of the (corrupted) tokens. */
export function loss(options = {}) {
  return metric("loss", { normalize: options.normalize, baselines: options.baselines });
}

/** `logit_diff` in JavaScript's spelling. */
export const logitDiff = logit_diff;
