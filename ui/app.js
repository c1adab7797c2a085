// The web page of the histopathology service: no build step, no dependencies.
// Talks to the same origin: POST /explain (prediction + Grad-CAM), GET /model (card).
"use strict";

const api = new URL("..", window.location.href); // the page lives at /ui/
const $ = (id) => document.getElementById(id);
const state = { preview: null, overlay: null, card: null };

const percent = (value) => `${(100 * value).toFixed(1)}%`;

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// A rejected request's explanation, from its problem+json body when there is one.
async function problemMessage(response) {
  try {
    const body = await response.json();
    if (body && body.detail) return `${body.title || response.statusText} (${response.status}): ${body.detail}`;
  } catch (_) { /* not JSON */ }
  return `The service answered ${response.status} ${response.statusText}.`;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// Why a tile is out of scope, in words, from the prediction's `reasons` and the gate's measures.
function reasonText(reason, result) {
  const q = result.quality || {};
  const texts = {
    out_of_distribution: `Its features are far from every class the model learned (score ${result.ood_score} ` +
      `above the threshold ${result.ood_threshold}).`,
    background: `It is mostly empty glass (${percent(q.background_fraction)} background).`,
    stain: q.stain_distance === null
      ? "It has no stained tissue at all."
      : `Its colours are not the stains the model was trained on (${percent(q.stain_fraction)} of the tissue ` +
        `pixels match; colour distance ${q.stain_distance}).`,
    saturation: `Its colour saturation (${q.saturation}) is outside the training tiles' range: grey-scale, or ` +
      "more vivid than stained tissue.",
    blur: `It has too little detail: out of focus or flat (focus ${q.focus}).`,
    noise: `It has more fine detail than any training tile: noise or an artefact (focus ${q.focus}).`,
  };
  return texts[reason];
}

function showOutOfScope(result) {
  const reasons = (result.reasons || []).map((reason) => reasonText(reason, result)).filter(Boolean);
  const list = $("out-of-scope-reasons");
  list.replaceChildren(...reasons.map((text) => {
    const item = document.createElement("li");
    item.textContent = text;
    return item;
  }));
  const outOfScope = reasons.length > 0;
  $("out-of-scope").hidden = !outOfScope;
  $("verdict").hidden = outOfScope;
  $("bars").hidden = outOfScope;
  return outOfScope;
}

function showPrediction(result) {
  $("predicted-class").textContent = result.predicted_class;
  $("confidence").textContent = percent(result.confidence);
  const outOfScope = showOutOfScope(result);
  $("uncertain").hidden = outOfScope || !result.uncertain;
  $("model-tag").textContent = result.model;
  const bars = $("bars");
  bars.replaceChildren();
  const sorted = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]);
  for (const [name, probability] of sorted) {
    const item = document.createElement("li");
    item.dataset.class = name;
    const label = document.createElement("span");
    label.textContent = name;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = percent(probability);
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = percent(probability);
    item.append(label, bar, value);
    bars.append(item);
  }
  // Out of scope, the heat map is still there to look at, but it names no class.
  $("explained-class").textContent = outOfScope ? "no class" : result.explained_class;
  $("result").hidden = false;
  $("no-result").hidden = true;
}

function showImage() {
  const useOverlay = $("heatmap-toggle").checked && state.overlay;
  $("preview").src = useOverlay ? state.overlay : state.preview;
  $("preview").alt = useOverlay ? "the tile with the Grad-CAM heat map over it" : "the uploaded tile";
}

async function classify(file) {
  showError("");
  $("result").hidden = true;
  $("no-result").hidden = true;
  $("heatmap-toggle").checked = false;
  $("heatmap-toggle").disabled = true;
  if (state.preview) URL.revokeObjectURL(state.preview);
  state.preview = URL.createObjectURL(file);
  state.overlay = null;
  $("figure").hidden = false;
  showImage();
  $("busy").hidden = false;
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const response = await fetch(new URL("explain", api), { method: "POST", body: form, headers: authHeaders() });
    if (!response.ok) {
      // A refused file is usually not a picture at all: show the reason, not a broken image.
      showError(await problemMessage(response));
      $("figure").hidden = true;
      $("explained-class").textContent = "-";
      $("no-result").hidden = false;
      return;
    }
    const result = await response.json();
    state.overlay = `data:image/png;base64,${result.overlay_png}`;
    $("heatmap-toggle").disabled = false;
    showPrediction(result);
    if (!state.card) loadCard();
  } catch (error) {
    showError(`The service could not be reached: ${error.message}`);
  } finally {
    $("busy").hidden = true;
  }
}

function fillTable(table, header, rows) {
  const head = table.tHead;
  head.replaceChildren();
  const headRow = head.insertRow();
  for (const text of header) {
    const cell = document.createElement("th");
    cell.textContent = text;
    headRow.append(cell);
  }
  const body = table.tBodies[0];
  body.replaceChildren();
  for (const row of rows) {
    const line = body.insertRow();
    row.forEach((text, index) => {
      const cell = index === 0 ? document.createElement("th") : document.createElement("td");
      cell.textContent = text;
      line.append(cell);
    });
  }
}

function showCard(card) {
  const m = card.metrics;
  $("card-task").textContent = card.task;
  $("card-architecture").textContent =
    `${card.architecture}, ${card.parameter_count.toLocaleString()} parameters, ${card.input_size}x${card.input_size} input`;
  $("card-data").textContent = `${card.dataset.source}: ${card.dataset.n_images} images (` +
    Object.entries(card.dataset.class_counts).map(([name, count]) => `${name} ${count}`).join(", ") + ")";
  $("card-split").textContent = card.dataset.split_policy;
  const ci = m.confidence_intervals;
  $("card-accuracy").textContent = `${percent(m.accuracy)} on ${m.n_images} test images` +
    (ci ? ` (${Math.round(ci.level * 100)}% CI ${percent(ci.accuracy.low)} to ${percent(ci.accuracy.high)})` : "");
  $("card-calibration").textContent =
    `temperature ${card.calibration.temperature.toFixed(3)}; test ECE ${card.calibration.test_ece_before.toFixed(3)} → ${card.calibration.test_ece_after.toFixed(3)}`;
  $("card-abstention").textContent =
    `${card.abstention.threshold.toFixed(3)} (answers ${percent(card.abstention.test_coverage)} of test tiles)`;
  $("threshold").textContent = card.abstention.threshold.toFixed(3);
  $("card-created").textContent = new Date(card.created_at).toLocaleString();
  fillTable($("card-classes"), ["class", "recall", "false-negative rate", "precision", "AUC", "test images"],
    card.class_names.map((name) => {
      const c = m.per_class[name];
      return [name, percent(c.recall), percent(c.false_negative_rate), percent(c.precision),
        c.roc_auc === null ? "n/a" : c.roc_auc.toFixed(3), String(c.support)];
    }));
  fillTable($("card-confusion"), ["true \\ predicted", ...card.class_names],
    card.class_names.map((name, row) => [name, ...m.confusion_matrix[row].map(String)]));
  $("card").hidden = false;
  $("card-error").hidden = true;
}

async function loadCard() {
  try {
    const response = await fetch(new URL("model", api), { headers: authHeaders() });
    if (!response.ok) {
      $("card-error").textContent = await problemMessage(response);
      $("card-error").hidden = false;
      return;
    }
    state.card = await response.json();
    showCard(state.card);
  } catch (error) {
    $("card-error").textContent = `The model card could not be loaded: ${error.message}`;
    $("card-error").hidden = false;
  }
}

// The report may need the token too, so it is fetched here and shown from a blob.
async function openReport(event) {
  event.preventDefault();
  const response = await fetch(new URL("model/report", api), { headers: authHeaders() });
  if (!response.ok) {
    $("card-error").textContent = await problemMessage(response);
    $("card-error").hidden = false;
    return;
  }
  const text = await response.text();
  window.open(URL.createObjectURL(new Blob([text], { type: "text/plain; charset=utf-8" })), "_blank", "noopener");
}

function setUp() {
  $("token").value = sessionStorage.getItem("histopathology-token") || "";
  $("token").addEventListener("change", () => {
    sessionStorage.setItem("histopathology-token", $("token").value.trim());
    loadCard();
  });
  $("file").addEventListener("change", () => { if ($("file").files[0]) classify($("file").files[0]); });
  $("heatmap-toggle").addEventListener("change", showImage);
  const zone = $("dropzone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (event.dataTransfer.files[0]) classify(event.dataTransfer.files[0]);
  });
  zone.addEventListener("keydown", (event) => { if (event.key === "Enter") $("file").click(); });
  $("report-link").addEventListener("click", openReport);
  loadCard();
}

setUp();
