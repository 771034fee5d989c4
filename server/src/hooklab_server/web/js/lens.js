// The logit lens: what the model would predict if it stopped after each layer.
//
// Row r of the lens is the residual stream before block r (row n_layers: after the last
// block), put through the final norm and the unembedding: TransformerLens's
// `cache.accumulated_resid(apply_ln=True)` @ W_U + b_U. The server computes every row in one
// POST /v1/forward: the prompt repeated once per row, with row r's blocks r, r+1, … switched
// off (hook specs zero-ablating their attention and MLP outputs for that row), so its final
// residual is exactly the residual before block r; then a logits graph sends back only each
// cell's top-k probabilities and ids (and an answer pair's logit difference), not the logits.

import * as api from "./api.js";
import { bars, h, heatmap, percent } from "./charts.js";
import { lensGraph } from "./graphs.js";
import * as models from "./model.js";
import { dtypeCode, tensorOf, view } from "./tensors.js";

export const TOP_K = 10;
// Bytes one forward's logits graph may hold (the server's max_graph_bytes is 256 MiB by
// default; half of it leaves room): longer prompts split the rows over several requests.
const GRAPH_BYTES = 128 * 2 ** 20;

export function rowLabels(nLayers) {
  return [...Array(nLayers).keys()].map((l) => `${l}_pre`).concat(["final_post"]);
}

/** Hook specs switching off blocks ≥ r for each row r of rows [first, first + count). */
export function offSwitches(cfg, hooks, first, count) {
  const specs = [];
  for (let layer = 0; layer < cfg.n_layers; layer++) {
    const rows = [];
    for (let i = 0; i < count; i++) if (first + i <= layer) rows.push(i);
    if (!rows.length) continue;
    for (const point of ["hook_attn_out", "hook_mlp_out"]) {
      const hook = `blocks.${layer}.${point}`;
      if (hooks.has(hook)) specs.push({ hook, op: "ablate", mode: "zero", batch: rows });
    }
  }
  return specs;
}

/**
 * Runs the lens on token ids; resolves to {rows, pos, k, prob(r, p, j), id(r, p, j), diff(r, p),
 * scheduler}. `pair` ({answer: {id}, wrong: {id}}) adds the logit difference.
 */
export async function runLens(ids, pair) {
  const model = models.model();
  const cfg = model.cfg;
  const hooks = new Set(model.hook_points.map((point) => point.name));
  const total = cfg.n_layers + 1;
  const pos = ids.length;
  const dtype = dtypeCode(cfg.dtype);
  const perRow = pos * cfg.d_vocab_out * 4 * (dtype === "F32" ? 1 : 2);
  const limits = model.limits;
  const chunk = Math.max(
    1,
    Math.min(
      total,
      limits.max_batch,
      Math.floor(limits.max_tokens / pos),
      Math.floor(GRAPH_BYTES / perRow),
    ),
  );
  const width = 2 * TOP_K + (pair ? 1 : 0);
  const values = new Float64Array(total * pos * width);
  const stats = { queued_s: 0, run_s: 0, units_waited: 0 };
  for (let first = 0; first < total; first += chunk) {
    const count = Math.min(chunk, total - first);
    const answer = await api.post("/v1/forward", {
      model: model.model_name,
      input: Array(count).fill(ids),
      prepend_bos: false,
      hooks: offSwitches(cfg, hooks, first, count),
      logits_graph: lensGraph(dtype, TOP_K, pair),
    });
    values.set(view(tensorOf(answer, "output.value")).values, first * pos * width);
    for (const name of Object.keys(stats)) stats[name] += answer.scheduler?.[name] ?? 0;
  }
  const at = (r, p, j) => values[(r * pos + p) * width + j];
  return {
    rows: total,
    pos,
    k: TOP_K,
    prob: (r, p, j = 0) => at(r, p, j),
    id: (r, p, j = 0) => at(r, p, TOP_K + j),
    diff: pair ? (r, p) => at(r, p, 2 * TOP_K) : null,
    scheduler: stats,
  };
}

/** Decodes every token id the views show (top-1 of each cell, top-k of the last). */
export async function lensTexts(lens) {
  const ids = [];
  for (let r = 0; r < lens.rows; r++) for (let p = 0; p < lens.pos; p++) ids.push(lens.id(r, p));
  for (let j = 0; j < lens.k; j++) ids.push(lens.id(lens.rows - 1, lens.pos - 1, j));
  const texts = await models.tokenTexts(ids);
  return new Map(ids.map((id, i) => [id, texts[i]]));
}

/** The layers × positions heatmap of the top token's probability. */
export function lensHeatmap(lens, strTokens, texts) {
  const labels = rowLabels(lens.rows - 1);
  return heatmap({
    caption:
      "Top next-token prediction after each layer (rows) at each position (columns): the " +
      "token and its probability. Hover a cell for its top 3.",
    corner: "layer \\ position",
    rowLabels: labels,
    columnLabels: strTokens.map((token, p) => `${p}: ${models.shown(token)}`),
    className: "lens",
    cell: (r, p) => {
      const id = lens.id(r, p);
      const prob = lens.prob(r, p);
      const top3 = [0, 1, 2]
        .map(
          (j) =>
            `${models.shown(texts.get(lens.id(r, p, j)) ?? `#${lens.id(r, p, j)}`)} ${percent(lens.prob(r, p, j))}`,
        )
        .join(", ");
      const token = texts.get(id) ?? `#${id}`;
      return {
        text: `${models.shown(token)} ${percent(prob)}`,
        title: `${labels[r]}, position ${p} (${models.shown(strTokens[p])}): ${top3}`,
        amount: prob,
        data: { layer: r, pos: p, tokenId: id, prob: prob },
      };
    },
  });
}

/** The answer pair's logit difference at the last position, per lens row. */
export function lensDiffBars(lens, pair) {
  const labels = rowLabels(lens.rows - 1);
  return bars({
    caption:
      `Logit difference logit(${models.shown(pair.answer.text)}) − logit(${models.shown(pair.wrong.text)}) ` +
      "at the last position, read after each layer",
    items: labels.map((label, r) => ({
      label,
      value: lens.diff(r, lens.pos - 1),
      data: { layer: r, value: lens.diff(r, lens.pos - 1) },
    })),
  });
}

/** The k likeliest next tokens at the last position, with buttons to make them the pair. */
export function topList(lens, texts, onPick) {
  const r = lens.rows - 1;
  const p = lens.pos - 1;
  const list = h("ol", { class: "topk", "aria-label": "likeliest next tokens" });
  for (let j = 0; j < lens.k; j++) {
    const id = lens.id(r, p, j);
    const prob = lens.prob(r, p, j);
    const meter = h("span", { class: "meter" });
    meter.style.setProperty("width", `${(100 * prob).toFixed(2)}%`);
    const item = h(
      "li",
      { "data-token-id": id, "data-prob": prob },
      h("span", { class: "token", text: models.shown(texts.get(id) ?? `#${id}`) }),
      h("span", { class: "meter-track" }, meter),
      h("span", { class: "prob", text: percent(prob) }),
      h("span", { class: "id", text: `id ${id}` }),
      h("button", {
        type: "button",
        class: "small",
        text: "answer",
        onclick: () => onPick("answer", id),
      }),
      h("button", {
        type: "button",
        class: "small",
        text: "vs",
        onclick: () => onPick("wrong", id),
      }),
    );
    list.append(item);
  }
  return list;
}
