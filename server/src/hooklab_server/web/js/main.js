// The teaching page: wires the form, the tabs and the views to the modules that call the
// server. State lives here; each module computes one view.

import { ablationResult, headButtons, runAblation } from "./ablation.js";
import * as api from "./api.js";
import { headGrid, patternView } from "./attention.js";
import { askForKey, getKey } from "./auth.js";
import * as cache from "./cache.js";
import { h } from "./charts.js";
import { dlaViews, runAttribution } from "./dla.js";
import { lensDiffBars, lensHeatmap, lensTexts, runLens, topList } from "./lens.js";
import * as models from "./model.js";
import * as status from "./status.js";
import { generate, steerSpec, steeringVector } from "./steering.js";

const $ = (id) => document.getElementById(id);
const MODEL_STORAGE = "hooklab.model";

const state = {
  ids: null, // the prompt's token ids (BOS included when the model prepends one)
  strTokens: null,
  pair: null, // {answer: {id, text}, wrong: {id, text}}
  lens: null,
  texts: null,
  patterns: new Map(), // layer -> pattern of the cached prompt
  ablated: new Set(), // "layer.head"
  ablationRun: null, // the ablation request in flight (one at a time)
  ablationAgain: false,
  steer: null, // the steering vector made, with what it was made from
  generation: null, // the AbortController of the generations streaming
};

// ---- errors and the key ----------------------------------------------------------------------

/** Shows an error in words; a refused or missing key opens the key dialog. */
async function handle(error, where) {
  if (error?.name === "AbortError") return;
  status.showError(error, where);
  if (error?.code === "unauthorized") {
    const reason = getKey()
      ? `The server refused the stored key: ${error.message}. Enter another one.`
      : "This server needs an API key. Your teacher (or the server's operator) gives you one.";
    if (await askForKey(reason)) await connect();
  }
}

// ---- models ----------------------------------------------------------------------------------

async function connect() {
  let list;
  try {
    list = await status.track("Loading the models", models.loadModels());
  } catch (error) {
    await handle(error, "Loading the models");
    return;
  }
  status.clearError();
  const select = $("model");
  select.replaceChildren(
    ...list.map((m) =>
      h("option", {
        value: m.model_name,
        text: `${m.model_name}${m.workers ? "" : " (no workers)"}`,
      }),
    ),
  );
  const wanted = localStorage.getItem(MODEL_STORAGE);
  select.value = list.some((m) => m.model_name === wanted) ? wanted : list[0]?.model_name;
  select.disabled = list.length < 2;
  modelChanged();
  $("run").disabled = false;
  $("gen-start").disabled = false;
  showUsage();
}

function modelChanged() {
  const model = models.pick($("model").value);
  localStorage.setItem(MODEL_STORAGE, model.model_name);
  const cfg = model.cfg;
  $("model-info").textContent =
    `${cfg.n_layers} layers · ${cfg.n_heads} heads · d_model ${cfg.d_model} · ${cfg.d_vocab} tokens`;
  const layers = [...Array(cfg.n_layers).keys()];
  for (const id of ["attn-layer", "steer-layer"]) {
    $(id).replaceChildren(...layers.map((l) => h("option", { value: l, text: String(l) })));
  }
  $("steer-layer").value = String(Math.floor(cfg.n_layers / 2));
  $("attn-head").replaceChildren(
    ...[...Array(cfg.n_heads).keys()].map((head) =>
      h("option", { value: head, text: String(head) }),
    ),
  );
  cache.release();
  Object.assign(state, { ids: null, strTokens: null, pair: null, lens: null, steer: null });
  state.patterns.clear();
  state.ablated.clear();
  for (const id of [
    "tokens",
    "topk",
    "pair",
    "lens-diff",
    "attn-grid",
    "ablation-result",
    "steer-info",
  ]) {
    $(id).replaceChildren();
  }
  placeholder("lens-heatmap", "Run a prompt to see the logit lens.");
  placeholder("attn-pattern", "Run a prompt to see its attention.");
  placeholder("dla", "Run a prompt to see its attribution.");
  placeholder("ablation-heads", "Run a prompt first.");
}

function placeholder(id, text) {
  $(id).classList.add("placeholder");
  $(id).textContent = text;
}

function show(id, ...children) {
  $(id).classList.remove("placeholder");
  $(id).replaceChildren(...children);
}

async function showUsage() {
  try {
    const usage = await api.get("/v1/usage");
    const limit = usage.limits?.tokens_per_minute;
    const used = usage.usage?.tokens_last_minute ?? 0;
    $("usage").textContent =
      `key: ${usage.key}` +
      (limit ? ` · ${used.toLocaleString()} of ${limit.toLocaleString()} tokens this minute` : "");
  } catch {
    $("usage").textContent = "";
  }
}

// ---- the prompt and its answer pair ----------------------------------------------------------

/** The token id a pair field names: its picked id, "#id", or the text as one token. */
async function tokenOf(input, label) {
  const text = input.value;
  if (input.dataset.tokenId !== undefined) return Number(input.dataset.tokenId);
  const match = text.trim().match(/^#(\d+)$/);
  if (match) {
    const id = Number(match[1]);
    if (id >= models.cfg().d_vocab)
      throw new status.InputError(`${label}: token id ${id} is not below ${models.cfg().d_vocab}`);
    return id;
  }
  const answer = await api.post("/v1/tokenize", {
    model: models.name(),
    input: text,
    prepend_bos: false,
  });
  const ids = answer.tokens[0];
  if (ids.length !== 1) {
    const parts = answer.str_tokens[0].map(models.shown).join(" | ");
    throw new status.InputError(
      `${label}: “${text}” is ${ids.length} tokens for this model (${parts || "nothing"}); ` +
        "the logit difference needs one token each (pick one from the list of likeliest tokens)",
    );
  }
  return ids[0];
}

/** The answer pair of the fields, or null when both are empty. */
async function readPair() {
  const answer = $("answer");
  const wrong = $("wrong");
  const empty = (input) => !input.value && input.dataset.tokenId === undefined;
  if (empty(answer) && empty(wrong)) return null;
  if (empty(answer) || empty(wrong))
    throw new status.InputError("give both tokens of the answer pair, or neither");
  const ids = [await tokenOf(answer, "Answer"), await tokenOf(wrong, "vs.")];
  if (ids[0] === ids[1]) throw new status.InputError("the answer pair needs two different tokens");
  const texts = await models.tokenTexts(ids);
  return { answer: { id: ids[0], text: texts[0] }, wrong: { id: ids[1], text: texts[1] } };
}

function setPairField(which, id, text) {
  const input = $(which);
  input.value = text;
  input.dataset.tokenId = String(id);
}

function showPair() {
  const { answer, wrong } = state.pair;
  $("pair").textContent =
    `Answer pair: ${models.shown(answer.text)} (id ${answer.id}) vs. ${models.shown(wrong.text)} (id ${wrong.id})`;
}

function showTokens() {
  const chips = state.strTokens.map((token, p) =>
    h(
      "span",
      {
        class: "chip",
        "data-pos": p,
        "data-token-id": state.ids[p],
        title: `position ${p}, id ${state.ids[p]}`,
      },
      h("span", { class: "token", text: models.shown(token) }),
      h("span", { class: "id", text: String(state.ids[p]) }),
    ),
  );
  $("tokens").replaceChildren(
    h("span", { class: "muted", text: `${state.ids.length} tokens: ` }),
    ...chips,
  );
}

async function analyse(event) {
  event?.preventDefault();
  status.clearError();
  $("run").disabled = true;
  try {
    const tokens = await status.track(
      "Tokenizing",
      api.post("/v1/tokenize", { model: models.name(), input: $("prompt").value }),
    );
    state.ids = tokens.tokens[0];
    state.strTokens = tokens.str_tokens[0];
    state.patterns.clear();
    showTokens();
    await status.track("Caching the activations", cache.cachePrompt(state.ids));
    let pair = await readPair();
    let lens = await status.track("Logit lens", runLens(state.ids, pair));
    if (!pair) {
      const last = [lens.rows - 1, lens.pos - 1];
      const ids = [lens.id(...last, 0), lens.id(...last, 1)];
      const texts = await models.tokenTexts(ids);
      setPairField("answer", ids[0], texts[0]);
      setPairField("wrong", ids[1], texts[1]);
      pair = await readPair();
      lens = await status.track("Logit lens", runLens(state.ids, pair));
    }
    await pairChanged(pair, lens);
    await showAttention();
    document.body.dataset.runs = String(Number(document.body.dataset.runs ?? 0) + 1); // done
  } catch (error) {
    await handle(error, "Run");
  } finally {
    $("run").disabled = false;
    showUsage();
  }
}

/** Everything that depends on the answer pair: the lens, attribution, ablation. */
async function pairChanged(pair, lens) {
  state.pair = pair;
  state.lens = lens ?? (await status.track("Logit lens", runLens(state.ids, pair)));
  showPair();
  state.texts = await lensTexts(state.lens);
  show("lens-heatmap", lensHeatmap(state.lens, state.strTokens, state.texts));
  show("lens-diff", lensDiffBars(state.lens, pair));
  $("topk").replaceChildren(
    h("h3", { text: "Likeliest next tokens" }),
    topList(state.lens, state.texts, pickToken),
  );
  const dla = await status.track("Attribution", runAttribution(pair));
  const modelDiff = state.lens.diff(state.lens.rows - 1, state.lens.pos - 1);
  show("dla", ...dlaViews(dla, pair, models.cfg().n_heads, modelDiff));
  showHeads();
  await ablate();
}

async function pickToken(which, id) {
  if (!state.ids) return;
  status.clearError();
  try {
    const [text] = await models.tokenTexts([id]);
    setPairField(which, id, text);
    await pairChanged(await readPair());
  } catch (error) {
    await handle(error, "Answer pair");
  }
}

// ---- attention -------------------------------------------------------------------------------

async function showAttention() {
  if (!state.ids || !cache.cacheId()) return;
  const layer = Number($("attn-layer").value);
  const head = Number($("attn-head").value);
  try {
    if (!state.patterns.has(layer)) {
      state.patterns.set(
        layer,
        await status.track(`Attention of layer ${layer}`, cache.pattern(layer)),
      );
    }
    const pattern = state.patterns.get(layer);
    show("attn-pattern", patternView(pattern, layer, head, state.strTokens));
    $("attn-grid").replaceChildren(
      headGrid(pattern, layer, head, (picked) => {
        $("attn-head").value = String(picked);
        showAttention();
      }),
    );
  } catch (error) {
    await handle(error, "Attention");
  }
}

// ---- ablation --------------------------------------------------------------------------------

function showHeads() {
  show(
    "ablation-heads",
    headButtons(models.cfg(), state.ablated, (key) => {
      if (state.ablated.has(key)) state.ablated.delete(key);
      else state.ablated.add(key);
      showHeads();
      ablate();
    }),
  );
}

/** Runs the ablation for the heads now switched off (again, if they change meanwhile). */
async function ablate() {
  if (!state.ids || !state.pair) return;
  if (state.ablationRun) {
    state.ablationAgain = true;
    return state.ablationRun;
  }
  const heads = new Set(state.ablated);
  $("ablation-result").setAttribute("aria-busy", "true");
  state.ablationRun = status.track("Ablation", runAblation(state.ids, state.pair, heads));
  try {
    const result = await state.ablationRun;
    $("ablation-result").replaceChildren(ablationResult(result, state.pair, heads));
    $("ablation-result").dataset.heads = [...heads].sort().join(",");
  } catch (error) {
    await handle(error, "Ablation");
  } finally {
    state.ablationRun = null;
    $("ablation-result").removeAttribute("aria-busy");
  }
  if (state.ablationAgain) {
    state.ablationAgain = false;
    await ablate();
  }
}

// ---- steering --------------------------------------------------------------------------------

function lines(id) {
  return $(id)
    .value.split("\n")
    .map((line) => line.trim())
    .filter(Boolean);
}

function steeringInputs() {
  return {
    layer: Number($("steer-layer").value),
    towards: lines("steer-towards"),
    away: lines("steer-away"),
  };
}

async function makeVector() {
  const inputs = steeringInputs();
  if (!inputs.towards.length || !inputs.away.length) {
    throw new status.InputError("write at least one prompt on each side of the steering vector");
  }
  const made = await status.track(
    "Steering vector",
    steeringVector(inputs.layer, inputs.towards, inputs.away),
  );
  state.steer = { ...made, inputs: JSON.stringify(inputs) };
  $("steer-info").textContent =
    `vector at blocks.${made.layer}.hook_resid_pre: norm ${made.norm.toFixed(3)} ` +
    `(means over ${made.counts[0]} and ${made.counts[1]} tokens)`;
  $("steer-info").dataset.norm = String(made.norm);
  return state.steer;
}

async function vectorNow() {
  const fresh = state.steer && state.steer.inputs === JSON.stringify(steeringInputs());
  return fresh ? state.steer : makeVector();
}

function generationSettings() {
  return {
    prompt: $("gen-prompt").value,
    maxNewTokens: Number($("gen-tokens").value),
    temperature: Number($("gen-temperature").value),
    seed: Number($("gen-seed").value),
    stopAtEos: $("gen-eos").checked,
  };
}

function streamInto(id, settings, hooks, signal) {
  const out = $(id);
  const progress = $(`${id}-progress`);
  out.replaceChildren(h("span", { class: "prompt-text", text: settings.prompt }));
  out.dataset.state = "streaming";
  out.dataset.tokens = "0";
  progress.textContent = `0 / ${settings.maxNewTokens}`;
  return generate(settings, hooks, signal, (text, id_, step) => {
    out.append(h("span", { class: "new-token", title: `id ${id_}`, text }));
    out.dataset.tokens = String(step + 1);
    progress.textContent = `${step + 1} / ${settings.maxNewTokens}`;
  }).then(
    (done) => {
      out.dataset.state = "done";
      progress.textContent = `${done.stats.new_tokens} tokens, ${done.stats.tokens_per_s.toFixed(1)} tokens/s`;
      return done;
    },
    (error) => {
      out.dataset.state = error?.name === "AbortError" ? "stopped" : "failed";
      if (error?.name === "AbortError") progress.textContent += " (stopped)";
      throw error;
    },
  );
}

async function generateBoth() {
  status.clearError();
  $("gen-start").disabled = true;
  try {
    const steer = await vectorNow();
    const coeff = Number($("steer-coeff").value);
    const settings = generationSettings();
    $("gen-steered-label").textContent = `(${coeff} × vector at layer ${steer.layer})`;
    const controller = new AbortController();
    state.generation = controller;
    $("gen-stop").disabled = false;
    const runs = [
      streamInto("gen-plain", settings, [], controller.signal),
      streamInto("gen-steered", settings, [steerSpec(steer, coeff)], controller.signal),
    ];
    const results = await status.track("Generating", Promise.allSettled(runs));
    const failed = results.find((r) => r.status === "rejected" && r.reason?.name !== "AbortError");
    if (failed) throw failed.reason;
  } catch (error) {
    await handle(error, "Steering");
  } finally {
    state.generation = null;
    $("gen-stop").disabled = true;
    $("gen-start").disabled = false;
    showUsage();
  }
}

function stopGenerating() {
  state.generation?.abort();
}

// ---- tabs and start-up -----------------------------------------------------------------------

function selectTab(tab) {
  for (const other of document.querySelectorAll('[role="tab"]')) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
}

function wire() {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    tab.addEventListener("click", () => selectTab(tab));
  }
  $("prompt-form").addEventListener("submit", analyse);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("prompt-form").requestSubmit();
    }
  });
  for (const id of ["answer", "wrong"]) {
    $(id).addEventListener("input", () => delete $(id).dataset.tokenId);
  }
  $("model").addEventListener("change", modelChanged);
  $("key-button").addEventListener("click", async () => {
    if (await askForKey("Enter the API key for this server.")) await connect();
  });
  $("attn-layer").addEventListener("change", showAttention);
  $("attn-head").addEventListener("change", showAttention);
  $("ablation-clear").addEventListener("click", () => {
    state.ablated.clear();
    if (state.ids) {
      showHeads();
      ablate();
    }
  });
  $("steer-coeff").addEventListener("input", () => {
    $("steer-coeff-value").textContent = $("steer-coeff").value;
  });
  $("steer-make").addEventListener("click", () =>
    makeVector().catch((error) => handle(error, "Steering")),
  );
  $("gen-start").addEventListener("click", generateBoth);
  $("gen-stop").addEventListener("click", stopGenerating);
}

async function start() {
  wire();
  let capabilities;
  try {
    capabilities = await api.get("/v1/capabilities");
  } catch (error) {
    await handle(error, "Connecting");
    return;
  }
  if (capabilities.auth && !getKey()) {
    const saved = await askForKey(
      "This server is shared: it needs your API key. Your teacher (or the server's operator) gives you one.",
    );
    if (!saved) {
      status.showError(
        new api.ApiError({
          status: 401,
          code: "unauthorized",
          message: "no API key was given",
          hint: "use the API key… button",
        }),
        "Connecting",
      );
      return;
    }
  }
  await connect();
}

start();
