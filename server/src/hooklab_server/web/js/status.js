// What the server is doing for this page, in words: the running steps with their time, the
// server's queue while a step waits (from the open Prometheus /metrics), each answer's queue
// and run time, and errors (quota, validation, …) explained.

const running = new Map(); // id -> {label, started}
let nextId = 0;
let ticker = null;
let queueText = "";
let polledAt = 0;

const QUEUE_POLL_AFTER_MS = 700; // a step this slow shows the server's queue
const QUEUE_POLL_EVERY_MS = 1500;

function el(id) {
  return document.getElementById(id);
}

/** Runs `promise` as a step named `label` in the status line; resolves as it does. */
export async function track(label, promise) {
  const id = nextId++;
  running.set(id, { label, started: performance.now() });
  render();
  ticker ??= setInterval(tick, 250);
  try {
    const result = await promise;
    note(label, result);
    return result;
  } finally {
    running.delete(id);
    if (running.size === 0) {
      clearInterval(ticker);
      ticker = null;
      queueText = "";
    }
    render();
  }
}

/** Sets the line under the running steps: what the last answer cost. */
function note(label, result) {
  const stats = result?.scheduler ?? result?.stats;
  if (!stats || typeof stats.queued_s !== "number") return;
  const ran = stats.run_s ?? stats.seconds;
  let text = `${label}: waited ${seconds(stats.queued_s)} in the queue`;
  if (typeof ran === "number") text += `, ran ${seconds(ran)}`;
  if (stats.units_waited) text += ` (${stats.units_waited} units of other requests went first)`;
  el("last-step").textContent = text;
}

export function seconds(s) {
  return s < 0.01 ? `${(s * 1000).toFixed(1)} ms` : `${s.toFixed(2)} s`;
}

function tick() {
  render();
  const oldest = Math.min(...[...running.values()].map((step) => step.started));
  const now = performance.now();
  if (now - oldest > QUEUE_POLL_AFTER_MS && now - polledAt > QUEUE_POLL_EVERY_MS) {
    polledAt = now;
    pollQueue();
  }
}

/** The server's queue depth and running operations, from its (open) metrics. */
async function pollQueue() {
  try {
    const response = await fetch("/metrics", { headers: { accept: "text/plain" } });
    if (!response.ok) return;
    const text = await response.text();
    const waiting = metric(text, "hooklab_queue_depth");
    const busy = metric(text, "hooklab_running_jobs");
    if (waiting === null) return;
    queueText = `server queue: ${waiting} waiting` + (busy === null ? "" : `, ${busy} running`);
    render();
  } catch {
    // the queue line is a courtesy; the step's own answer or error still comes
  }
}

export function metric(text, name) {
  const line = text.split("\n").find((l) => l.startsWith(`${name} `) || l.startsWith(`${name}{`));
  return line === undefined ? null : Math.round(Number(line.split(" ").pop()));
}

function render() {
  const now = performance.now();
  const steps = [...running.values()].map(
    (step) => `${step.label}… ${((now - step.started) / 1000).toFixed(1)} s`,
  );
  const line = el("running");
  line.textContent = steps.length ? [...steps, queueText].filter(Boolean).join(" · ") : "";
  document.body.classList.toggle("busy", steps.length > 0);
}

// ---- errors, in words ------------------------------------------------------------------------

const PLAIN = {
  quota: "Your key is over one of its quotas.",
  queue_full: "The server is too busy to take this now.",
  unauthorized: "The server needs an API key.",
  validation_error: "The server could not accept this request.",
  unknown_hook: "The server does not know that hook point.",
  bad_index: "An index (layer, head or position) is out of range.",
  bad_shape: "A tensor has the wrong shape.",
  too_large: "The request is too large for this server's limits.",
  not_found: "Not found (a stored cache may have expired: run the prompt again).",
  deadline_exceeded: "The work took longer than allowed.",
  unavailable: "The model is not available right now.",
  store_full: "The server's store is full.",
  network: "The server did not answer.",
  internal: "The server failed (a bug): tell whoever runs it, with the request id.",
};

/** A problem with what was typed into the page, said before anything is sent. */
export class InputError extends Error {
  constructor(message) {
    super(message);
    this.name = "InputError";
  }
}

/** The error as {title, detail} for a person: what happened, the server's words, what helps. */
export function describe(error) {
  if (error?.name === "InputError") return { title: "Check the input:", detail: error.message };
  if (error?.name !== "ApiError") {
    return { title: "Something went wrong in this page.", detail: String(error?.message ?? error) };
  }
  const parts = [error.message];
  if (error.hint) parts.push(`Hint: ${error.hint}.`);
  if (
    error.retryAfter !== null &&
    error.retryAfter !== undefined &&
    !Number.isNaN(error.retryAfter)
  ) {
    parts.push(`Try again in ${error.retryAfter} s.`);
  }
  if (error.requestId) parts.push(`(request ${error.requestId})`);
  return {
    title: PLAIN[error.code] ?? `The server refused the request (${error.code}).`,
    detail: parts.join(" "),
  };
}

export function showError(error, where = "") {
  const box = el("error");
  const { title, detail } = describe(error);
  box.replaceChildren();
  const strong = document.createElement("strong");
  strong.textContent = where ? `${where}: ${title}` : title;
  const text = document.createElement("span");
  text.textContent = ` ${detail}`;
  const close = document.createElement("button");
  close.type = "button";
  close.textContent = "Dismiss";
  close.addEventListener("click", clearError);
  box.append(strong, text, close);
  box.dataset.code = error?.code ?? (error?.name === "InputError" ? "input" : "page");
  box.hidden = false;
  if (error?.name !== "ApiError" && error?.name !== "InputError") console.warn(error); // a page bug
}

export function clearError() {
  const box = el("error");
  box.hidden = true;
  box.replaceChildren();
  delete box.dataset.code;
}
