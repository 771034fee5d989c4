// Attention patterns from the prompt's cache (blocks.L.attn.hook_pattern, [head, query, key]):
// one head's token-to-token pattern, and every head of the layer as small multiples.

import { h, heatmap, percent } from "./charts.js";
import * as models from "./model.js";

const PRINT_UP_TO = 16; // positions up to which every weight is printed in its cell

/** One head's pattern: rows are the attending (query) tokens, columns the attended (key) ones. */
export function patternView(pattern, layer, head, strTokens) {
  const labels = strTokens.map((token, p) => `${p}: ${models.shown(token)}`);
  const printed = pattern.queries <= PRINT_UP_TO;
  return heatmap({
    caption:
      `Layer ${layer}, head ${head}: how much each token (row) attends to each earlier token ` +
      "(column). Rows add up to 100%." +
      (printed ? "" : " Hover a cell for its weight."),
    corner: "query \\ key",
    rowLabels: labels,
    columnLabels: labels,
    className: printed ? "pattern" : "pattern dense",
    cell: (q, k) => {
      if (k > q)
        return { text: "", title: "masked: a token cannot see later tokens", data: { masked: 1 } };
      const weight = pattern.at(head, q, k);
      return {
        text: printed ? percent(weight) : "",
        title: `${labels[q]} → ${labels[k]}: ${percent(weight)} (${weight})`,
        amount: weight,
        data: { query: q, key: k, weight },
      };
    },
  });
}

/** Every head of the layer, small: darker is more attention; click one to see it large. */
export function headGrid(pattern, layer, selected, onPick) {
  const grid = h("div", {
    class: "multiples",
    role: "list",
    "aria-label": `heads of layer ${layer}`,
  });
  for (let head = 0; head < pattern.heads; head++) {
    const canvas = h("canvas", {
      width: pattern.keys,
      height: pattern.queries,
      "aria-hidden": "true",
    });
    draw(canvas, pattern, head);
    const strongest = strongestOffDiagonal(pattern, head);
    const button = h(
      "button",
      {
        type: "button",
        class: head === selected ? "multiple selected" : "multiple",
        "aria-pressed": head === selected ? "true" : "false",
        "data-head": head,
        title: `head ${head}: ${strongest}`,
        onclick: () => onPick(head),
      },
      canvas,
      h("span", { text: `H${head}${head === selected ? " (shown)" : ""}` }),
    );
    grid.append(h("div", { role: "listitem" }, button));
  }
  return h(
    "figure",
    { class: "chart" },
    h("figcaption", {
      text: `All heads of layer ${layer} (rows: query, columns: key; darker is more attention)`,
    }),
    grid,
  );
}

function draw(canvas, pattern, head) {
  const context = canvas.getContext("2d");
  const image = context.createImageData(pattern.keys, pattern.queries);
  for (let q = 0; q < pattern.queries; q++) {
    for (let k = 0; k < pattern.keys; k++) {
      const value = k > q ? 0 : pattern.at(head, q, k);
      const grey = Math.round(255 * (1 - Math.max(0, Math.min(1, value))));
      const at = 4 * (q * pattern.keys + k);
      image.data.set([grey, grey, grey, k > q ? 60 : 255], at);
    }
  }
  context.putImageData(image, 0, 0);
}

/** In words, the head's strongest attention that is not to the token itself or to position 0. */
function strongestOffDiagonal(pattern, head) {
  let best = { weight: -1, q: 0, k: 0 };
  for (let q = 1; q < pattern.queries; q++) {
    for (let k = 1; k < q; k++) {
      const weight = pattern.at(head, q, k);
      if (weight > best.weight) best = { weight, q, k };
    }
  }
  return best.weight < 0
    ? "no earlier tokens to attend to"
    : `strongest from position ${best.q} to ${best.k} (${percent(best.weight)})`;
}
