// The served models (GET /v1/models) and the one picked: its config, hook points, tokenizer and
// limits; and token ids turned into text (POST /v1/detokenize), remembered per model.

import * as api from "./api.js";

let models = [];
let current = null;
const texts = new Map(); // `${model}\u0000${id}` -> text

export async function loadModels() {
  const answer = await api.get("/v1/models");
  models = answer.models;
  return models;
}

export function pick(name) {
  current = models.find((m) => m.model_name === name) ?? models[0] ?? null;
  return current;
}

export function model() {
  return current;
}

export function name() {
  return current.model_name;
}

export function cfg() {
  return current.cfg;
}

export function hasHook(hook) {
  return current.hook_points.some((point) => point.name === hook);
}

/** Decoded text of each token id (one request for the ids not seen before). */
export async function tokenTexts(ids) {
  const key = (id) => `${current.model_name}\u0000${id}`;
  const missing = [...new Set(ids)].filter((id) => !texts.has(key(id)));
  if (missing.length) {
    const answer = await api.post("/v1/detokenize", {
      model: current.model_name,
      tokens: missing.map((id) => [id]),
    });
    const decoded = Array.isArray(answer.text) ? answer.text : [answer.text];
    missing.forEach((id, i) => texts.set(key(id), decoded[i]));
  }
  return ids.map((id) => texts.get(key(id)));
}

/** A token's text with its whitespace visible: a leading space matters to a tokenizer. */
export function shown(text) {
  return text.replaceAll(" ", "·").replaceAll("\n", "⏎").replaceAll("\t", "⇥") || "∅";
}
