// Zero-ablating heads: click heads to switch them off and see the answer pair's logit difference
// change. One POST /v1/run_with_hooks with the prompt twice: row 0 untouched, row 1 with
// {"hook": "blocks.L.attn.hook_z", "op": "ablate", "mode": "zero", "head": [...], "batch": [1]}
// per layer; a logits graph sends back only the two logit differences.

import * as api from "./api.js";
import { h, signed } from "./charts.js";
import { logitDiffGraph } from "./graphs.js";
import * as models from "./model.js";
import { dtypeCode, tensorOf, view } from "./tensors.js";

/** The hook specs zero-ablating `heads` (a set of "layer.head") in batch row `row`. */
export function ablationSpecs(heads, row) {
  const byLayer = new Map();
  for (const key of heads) {
    const [layer, head] = key.split(".").map(Number);
    if (!byLayer.has(layer)) byLayer.set(layer, []);
    byLayer.get(layer).push(head);
  }
  return [...byLayer.entries()]
    .sort((a, b) => a[0] - b[0])
    .map(([layer, list]) => ({
      hook: `blocks.${layer}.attn.hook_z`,
      op: "ablate",
      mode: "zero",
      head: list.sort((a, b) => a - b),
      batch: [row],
    }));
}

/** Resolves to {clean, ablated, scheduler}: the logit differences without and with. */
export async function runAblation(ids, pair, heads) {
  const answer = await api.post("/v1/run_with_hooks", {
    model: models.name(),
    input: [ids, ids],
    prepend_bos: false,
    hooks: ablationSpecs(heads, 1),
    logits_graph: logitDiffGraph(dtypeCode(models.cfg().dtype), pair),
  });
  const values = view(tensorOf(answer, "output.value")).values;
  return { clean: values[0], ablated: values[1], scheduler: answer.scheduler };
}

/** The heads as toggle buttons, layer by layer. */
export function headButtons(cfg, heads, onToggle) {
  const grid = h("div", { class: "head-grid", role: "group", "aria-label": "attention heads" });
  for (let layer = 0; layer < cfg.n_layers; layer++) {
    const row = h(
      "div",
      { class: "head-row" },
      h("span", { class: "row-label", text: `L${layer}` }),
    );
    for (let head = 0; head < cfg.n_heads; head++) {
      const key = `${layer}.${head}`;
      const off = heads.has(key);
      row.append(
        h("button", {
          type: "button",
          class: off ? "head off" : "head",
          "aria-pressed": off ? "true" : "false",
          "data-head": key,
          title: off
            ? `L${layer}H${head} is zero-ablated: click to restore`
            : `zero-ablate L${layer}H${head}`,
          text: off ? `✕ H${head}` : `H${head}`,
          onclick: () => onToggle(key),
        }),
      );
    }
    grid.append(row);
  }
  return grid;
}

export function ablationResult(result, pair, heads) {
  const change = result.ablated - result.clean;
  const pairText = `logit(${models.shown(pair.answer.text)}) − logit(${models.shown(pair.wrong.text)})`;
  const list = heads.size
    ? [...heads].map((key) => key.replace(/(\d+)\.(\d+)/, "L$1H$2")).join(", ")
    : "none";
  return h(
    "dl",
    { class: "result" },
    h("dt", { text: `${pairText}, clean` }),
    h("dd", { "data-value": result.clean, id: "clean-diff", text: signed(result.clean, 4) }),
    h("dt", { text: `with ablated heads (${list})` }),
    h("dd", { "data-value": result.ablated, id: "ablated-diff", text: signed(result.ablated, 4) }),
    h("dt", { text: "change" }),
    h("dd", { "data-value": change, id: "diff-change", text: signed(change, 4) }),
  );
}
