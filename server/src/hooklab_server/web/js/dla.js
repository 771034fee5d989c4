// Direct logit attribution: how much each layer's output, and each attention head's, pushes the
// last position's logits towards the answer and away from the wrong token. Run where the cache
// is, as TransformerLens's exploratory-analysis demo does it:
//   cache.logit_attrs(cache.decompose_resid(pos_slice=-1), answer, wrong, pos_slice=-1)
//   cache.logit_attrs(cache.stack_head_results(pos_slice=-1), answer, wrong, pos_slice=-1)
// (logit_attrs applies the final norm's cached scale, then projects on W_U[:, answer] − W_U[:, wrong]).

import { analyse } from "./cache.js";
import { bars, h, heatmap, signed } from "./charts.js";
import * as models from "./model.js";
import { view } from "./tensors.js";

async function attribute(stackMethod, pair) {
  const stack = await analyse(stackMethod, { pos_slice: -1, return_labels: true });
  const attrs = await analyse("logit_attrs", {
    residual_stack: stack.result,
    tokens: pair.answer.id,
    incorrect_tokens: pair.wrong.id,
    pos_slice: -1,
    has_batch_dim: false,
  });
  return { labels: stack.labels, values: view(attrs.result).values, answer: attrs.answer };
}

/** Resolves to {layers: {labels, values}, heads: {labels, values}}. */
export async function runAttribution(pair) {
  const layers = await attribute("decompose_resid", pair);
  const heads = await attribute("stack_head_results", pair);
  return { layers, heads, scheduler: heads.answer.scheduler };
}

export function dlaViews(dla, pair, nHeads, modelDiff) {
  const pairText = `logit(${models.shown(pair.answer.text)}) − logit(${models.shown(pair.wrong.text)})`;
  const total = dla.layers.values.reduce((a, b) => a + b, 0);
  const layerBars = bars({
    caption: `Direct logit attribution to ${pairText} at the last position, per component (decompose_resid)`,
    items: dla.layers.labels.map((label, i) => ({
      label,
      value: dla.layers.values[i],
      data: { component: label, value: dla.layers.values[i] },
    })),
  });
  const nLayers = dla.heads.values.length / nHeads;
  const scale = Math.max(1e-9, ...dla.heads.values.map(Math.abs));
  const headMap = heatmap({
    caption: `Direct logit attribution per head (stack_head_results): layer × head; + pushes towards ${models.shown(pair.answer.text)}`,
    corner: "layer \\ head",
    rowLabels: [...Array(nLayers).keys()].map((l) => `L${l}`),
    columnLabels: [...Array(nHeads).keys()].map((head) => `H${head}`),
    className: "heads",
    cell: (l, head) => {
      const value = dla.heads.values[l * nHeads + head];
      return {
        text: signed(value),
        title: `${dla.heads.labels[l * nHeads + head]}: ${value}`,
        amount: Math.abs(value) / scale,
        sign: Math.sign(value),
        data: { layer: l, head, value },
      };
    },
  });
  const summary = h("p", {
    class: "note",
    text:
      `The components add up to ${signed(total, 3)}; the model's own logit difference is ` +
      `${signed(modelDiff, 3)} (the rest is the unembedding bias and the final norm's ` +
      "centring).",
  });
  return [layerBars, headMap, summary];
}
