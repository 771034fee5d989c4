// The prompt's activation cache, kept on the server (run_with_cache with "lazy": true): only
// its id and index travel; attribution runs on it where it is (POST /v1/analysis) and the
// attention views read one layer's pattern at a time (GET /v1/caches/{id}?names=…). One cache
// at a time: the previous one is deleted, so a student's stored-bytes quota is not used up.

import * as api from "./api.js";
import * as models from "./model.js";
import { tensorOf, view } from "./tensors.js";

let current = null; // {id, model}

/** The hook points attribution and attention need, those the model has. */
export function cachedNames(cfg) {
  const names = ["hook_embed", "hook_pos_embed"];
  for (let l = 0; l < cfg.n_layers; l++) {
    names.push(`blocks.${l}.hook_attn_out`, `blocks.${l}.hook_mlp_out`);
    names.push(`blocks.${l}.attn.hook_z`, `blocks.${l}.attn.hook_pattern`);
  }
  names.push("ln_final.hook_scale");
  return names.filter(models.hasHook);
}

export async function release() {
  const old = current;
  current = null;
  if (old) await api.remove(`/v1/caches/${old.id}`).catch(() => {}); // expired already: fine
}

/** Runs the prompt once, keeping its cache on the server; resolves to the answer. */
export async function cachePrompt(ids) {
  await release();
  const answer = await api.post("/v1/run_with_cache", {
    model: models.name(),
    input: [ids],
    prepend_bos: false,
    names: cachedNames(models.cfg()),
    lazy: true,
  });
  current = { id: answer.cache_id, model: models.name() };
  return answer;
}

export function cacheId() {
  return current?.id ?? null;
}

/** An analysis method on the cache's one row; resolves to {result: view, labels, answer}. */
export async function analyse(method, args) {
  const answer = await api.post("/v1/analysis", {
    model: current.model,
    cache: current.id,
    method,
    args,
    rows: 0,
  });
  return { result: tensorOf(answer, "analysis.result"), labels: answer.labels ?? null, answer };
}

/** Attention pattern of one layer, [head, query, key], from the cache. */
export async function pattern(layer) {
  const name = `blocks.${layer}.attn.hook_pattern`;
  const answer = await api.get(`/v1/caches/${current.id}?names=${encodeURIComponent(name)}`);
  const tensor = view(tensorOf(answer, name));
  const [, heads, queries, keys] = tensor.shape;
  return { heads, queries, keys, at: (head, q, k) => tensor.at(0, head, q, k), answer };
}
