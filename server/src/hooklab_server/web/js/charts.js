// The page's charts, as plain HTML: every number is printed (or in the cell's hover text when
// cells are small), so nothing is read from colour alone; shades only help the eye.

export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") element.className = value;
    else if (name === "text") element.textContent = value;
    else if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  element.append(...children.filter((child) => child !== null && child !== undefined));
  return element;
}

/** A signed number with a real minus sign, `digits` decimals. */
export function signed(value, digits = 2) {
  const text = Math.abs(value).toFixed(digits);
  return value < 0 ? `−${text}` : `+${text}`;
}

export function percent(p) {
  return p >= 0.995 ? `${(p * 100).toFixed(0)}%` : `${(p * 100).toFixed(1)}%`;
}

/** Background shade for a value in [0, 1] (and the text colour that stays readable on it). */
export function shade(element, amount, sign = 1) {
  const a = Math.max(0, Math.min(1, amount));
  const hue = sign < 0 ? "var(--negative-rgb)" : "var(--positive-rgb)";
  element.style.setProperty("background-color", `rgb(${hue} / ${(0.08 + 0.85 * a).toFixed(3)})`);
  if (a > 0.55) element.classList.add("on-dark");
}

/**
 * A table heatmap: rows × columns of cells; cell(r, c) gives {text, title, amount, sign,
 * data} (data: data-* attributes). Row and column headers are text.
 */
export function heatmap({ caption, corner = "", rowLabels, columnLabels, cell, className = "" }) {
  const head = h("tr", {}, h("th", { scope: "col", class: "corner", text: corner }));
  for (const label of columnLabels) head.append(h("th", { scope: "col", text: label }));
  const body = h("tbody");
  rowLabels.forEach((label, r) => {
    const row = h("tr", {}, h("th", { scope: "row", text: label }));
    columnLabels.forEach((_, c) => {
      const spec = cell(r, c);
      const td = h("td", { title: spec.title, text: spec.text ?? "" });
      for (const [name, value] of Object.entries(spec.data ?? {})) td.dataset[name] = value;
      if (spec.amount !== undefined) shade(td, spec.amount, spec.sign);
      row.append(td);
    });
    body.append(row);
  });
  return h(
    "div",
    { class: "scroll" },
    h(
      "table",
      { class: `heatmap ${className}` },
      h("caption", { text: caption }),
      h("thead", {}, head),
      body,
    ),
  );
}

/**
 * Horizontal bars around zero: one row per item {label, value, title, data}; positive bars go
 * right (solid), negative left (hatched), and every value is printed.
 */
export function bars({ caption, items, digits = 2, unit = "" }) {
  const scale = Math.max(1e-9, ...items.map((item) => Math.abs(item.value)));
  const list = h("div", { class: "bars", role: "table", "aria-label": caption });
  for (const item of items) {
    const width = (50 * Math.abs(item.value)) / scale;
    const bar = h("span", { class: item.value < 0 ? "bar negative" : "bar positive" });
    bar.style.setProperty("width", `${width.toFixed(2)}%`);
    bar.style.setProperty(item.value < 0 ? "right" : "left", "50%");
    const row = h(
      "div",
      { class: "bar-row", role: "row", title: item.title ?? `${item.label}: ${item.value}` },
      h("span", { class: "bar-label", role: "rowheader", text: item.label }),
      h("span", { class: "bar-track", role: "cell" }, h("span", { class: "zero" }), bar),
      h("span", { class: "bar-value", role: "cell", text: `${signed(item.value, digits)}${unit}` }),
    );
    for (const [name, value] of Object.entries(item.data ?? {})) row.dataset[name] = value;
    list.append(row);
  }
  return h("figure", { class: "chart" }, h("figcaption", { text: caption }), list);
}
