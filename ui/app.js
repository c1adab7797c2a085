// The web page of the histopathology service: no build step, no dependencies.
// Talks to the same origin: POST /explain (prediction + Grad-CAM), GET /model (card), and for whole
// slides POST /slides, POST /slides/{id}/analysis, GET /slides/{id}/progress, GET /slides/{id}/...
"use strict";

const api = new URL("..", window.location.href); // the page lives at /ui/
const $ = (id) => document.getElementById(id);
const state = { preview: null, overlay: null, card: null };
const slide = { id: null, summary: null, tile: null, heatMap: null, urls: [] };
const POLL_MS = 1000;
// The analysis states GET /slides/{id}/progress answers (slides/store.py names them; a test checks these).
const STATE = { uploaded: "uploaded", queued: "queued", running: "running", done: "done", failed: "failed" };

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
    magnification: `It looks scanned at about ${result.magnification}x the magnification of the training tiles ` +
      "(structures that much larger). Give the tile's pixel size to have it resampled to the model's.",
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

// The scale the model saw: what was done with the pixel size given, or the magnification it estimated.
function scaleText(result) {
  const r = result.rescaling;
  if (r && r.rescaled) {
    return `Resampled from ${r.mpp} to the model's ${r.model_mpp} µm per pixel (scale ${r.scale}).`;
  }
  if (r) return `Not rescaled: this model declares no pixel size, so the tile was resized whole (${r.mpp} µm/px given).`;
  if (result.magnification !== null && result.magnification !== undefined) {
    return `No pixel size given; estimated magnification ${result.magnification}x the training tiles'.`;
  }
  return "";
}

function showPrediction(result) {
  $("predicted-class").textContent = result.predicted_class;
  $("scale").textContent = scaleText(result);
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
  const mpp = $("mpp").value.trim();
  if (mpp) form.append("mpp", mpp);
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
  const mpp = card.dataset.microns_per_pixel;
  $("mpp").placeholder = mpp ? `unknown (the model's: ${mpp})` : "unknown (the model declares none)";
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

// With a token the link cannot send it, so the report is fetched here and shown from a blob: the
// HTML page (figures inline, so it needs nothing more) or the Markdown as text. Without a token the
// plain link opens it.
async function openReport(event, path, type) {
  if (!authHeaders().Authorization) return;
  event.preventDefault();
  const response = await fetch(new URL(path, api), { headers: authHeaders() });
  if (!response.ok) {
    $("card-error").textContent = await problemMessage(response);
    $("card-error").hidden = false;
    return;
  }
  const text = await response.text();
  window.open(URL.createObjectURL(new Blob([text], { type })), "_blank", "noopener");
}

// ---- Whole slides: upload, analyse on the slide engine, show the map ----

function slideError(message) {
  $("slide-error").textContent = message;
  $("slide-error").hidden = !message;
}

function slideStatus(text, done, total) {
  $("slide-status").textContent = text;
  const bar = $("slide-progress");
  if (total) { bar.max = total; bar.value = done; } else { bar.removeAttribute("value"); }
}

// A blob URL for a resource that may need the token (an <img src> or a download link cannot send it).
async function blobUrl(path) {
  const response = await fetch(new URL(path, api), { headers: authHeaders() });
  if (!response.ok) throw new Error(await problemMessage(response));
  const url = URL.createObjectURL(await response.blob());
  slide.urls.push(url);
  return url;
}

// XMLHttpRequest, not fetch: only it reports upload progress, which a gigabyte slide needs.
function uploadSlide(file) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", new URL("slides", api));
    for (const [name, value] of Object.entries(authHeaders())) request.setRequestHeader(name, value);
    request.upload.onprogress = (event) => {
      if (event.lengthComputable) {
        slideStatus(`Uploading ${file.name}: ${percent(event.loaded / event.total)}`, event.loaded, event.total);
      }
    };
    request.onload = () => {
      const response = new Response(request.responseText, { status: request.status, statusText: request.statusText });
      if (request.status === 201) resolve(JSON.parse(request.responseText).slide_id);
      else problemMessage(response).then((message) => reject(new Error(message)));
    };
    request.onerror = () => reject(new Error("The service could not be reached."));
    const form = new FormData();
    form.append("file", file, file.name);
    request.send(form);
  });
}

async function postJson(path, body) {
  const response = await fetch(new URL(path, api), {
    method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json", ...authHeaders() },
  });
  if (!response.ok) throw new Error(await problemMessage(response));
  return response.json();
}

async function getJson(path) {
  const response = await fetch(new URL(path, api), { headers: authHeaders() });
  if (!response.ok) throw new Error(await problemMessage(response));
  return response.json();
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

// Poll the slide's progress until its analysis ends; any replica of the service answers.
async function waitForAnalysis() {
  for (;;) {
    const progress = await getJson(`slides/${slide.id}/progress`);
    if (progress.state === STATE.done) return getJson(`slides/${slide.id}/summary.json`);
    if (progress.state === STATE.failed) throw new Error(`The analysis failed: ${progress.reason}`);
    if (progress.state === STATE.running && progress.tiles_total) {
      slideStatus(`Analysing: ${progress.tiles_done} of ${progress.tiles_total} tissue tiles`,
        progress.tiles_done, progress.tiles_total);
    } else {
      slideStatus(progress.state === STATE.running ? "Finding the tissue…" : "Waiting for the analysis to start…");
    }
    await sleep(POLL_MS);
  }
}

async function analyseSlide(file) {
  slideError("");
  slide.urls.forEach((url) => URL.revokeObjectURL(url));
  Object.assign(slide, { id: null, summary: null, tile: null, heatMap: null, urls: [] });
  $("slide-result").hidden = true;
  $("slide-tile-figure").hidden = true;
  $("slide-busy").hidden = false;
  try {
    slide.id = await uploadSlide(file);
    slideStatus("Uploaded; starting the analysis…");
    await postJson(`slides/${slide.id}/analysis`, {});
    slide.summary = await waitForAnalysis();
    await showSlide(file.name);
  } catch (error) {
    slideError(error.message);
  } finally {
    $("slide-busy").hidden = true;
  }
}

function rgb(colour) { return `rgb(${colour.join(",")})`; }

async function showSlide(name) {
  const s = slide.summary;
  $("slide-overlay").src = await blobUrl(`slides/${slide.id}/overlay.png`);
  const geojson = $("slide-geojson");
  geojson.href = await blobUrl(`slides/${slide.id}/analysis.geojson`);
  geojson.download = `${name.replace(/\.[^.]+$/, "")}.geojson`;
  $("slide-legend").replaceChildren(...Object.entries(s.colours).map(([label, colour]) => {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = rgb(colour);
    item.append(swatch, label);
    return item;
  }));
  $("slide-counts").textContent = `${s.slide.width.toLocaleString()} × ${s.slide.height.toLocaleString()} px; ` +
    `tissue ${percent(s.tissue_share_of_slide)} of the slide; ${s.tiles_analysed} tiles of ${s.grid.tile_size} px ` +
    `analysed, ${s.tiles_uncertain} uncertain (no class given: refer to a pathologist)` +
    (Object.keys(s.tiles_flagged).length
      ? `; flagged: ${Object.entries(s.tiles_flagged).map(([why, n]) => `${n} ${why.replaceAll("_", " ")}`).join(", ")}.`
      : ".");
  $("slide-coverage").textContent = coverageText(s);
  $("slide-scale").textContent = scaleNote(s);
  $("slide-scale").hidden = !$("slide-scale").textContent;
  fillTable($("slide-fractions"), ["class", "tiles", "of answered tiles", "of tissue area"],
    Object.entries(s.tiles_per_class).map(([label, count]) => [label, String(count),
      percent(s.share_of_answered[label]), percent(s.tissue_area_fraction[label])]));
  $("slide-suspicious").replaceChildren(...s.most_suspicious.map((tile) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = `${tile.uncertain ? "uncertain" : tile.class}, cancer ${percent(tile.cancer_probability)} ` +
      `at (${tile.x.toLocaleString()}, ${tile.y.toLocaleString()})`;
    button.addEventListener("click", () => showSlideTile(tile));
    item.append(button);
    return item;
  }));
  $("slide-result").hidden = false;
}

// How much of the tissue found the analysed tiles cover, and how much of it got a class.
function coverageText(s) {
  if (s.tissue_coverage === null) return "No tissue found: nothing analysed.";
  const background = s.tissue_uncertain_background
    ? ` (${percent(s.tissue_uncertain_background)} in mostly-glass tiles the gate declined: tissue edges)` : "";
  return `Tissue looked at: ${percent(s.tissue_coverage)} of the tissue found lies in analysed tiles, ` +
    `${percent(s.tissue_answered)} in tiles given a class${background}.`;
}

// The tile size is a guess when the slide or the model does not say how large a pixel is.
function scaleNote(s) {
  if (!s.scale_declared) {
    return `This slide declares no pixel size: its tiles are ${s.grid.tile_size} px, the model's training ` +
      "tile size in pixels, so their scale is a guess. Check the scan's magnification before relying on the map.";
  }
  if (s.tile_size_basis === "training_tile_size" || s.tile_size_basis === "default") {
    return `The model card declares no pixel size for its training images: tiles are ${s.grid.tile_size} px ` +
      "as trained, not rescaled to this slide's pixel size.";
  }
  return "";
}

function markTile(tile) {
  const marker = $("slide-marker");
  const { width, height } = slide.summary.slide;
  Object.assign(marker.style, {
    left: `${(100 * tile.x) / width}%`, top: `${(100 * tile.y) / height}%`,
    width: `${(100 * tile.size) / width}%`, height: `${(100 * tile.size) / height}%`,
  });
  marker.hidden = false;
}

function showTileImage() {
  const useHeatMap = $("slide-tile-heatmap").checked && slide.heatMap;
  $("slide-tile").src = useHeatMap ? slide.heatMap : slide.tile;
}

async function slideTile(tile, asAnalysed) {
  const path = `slides/${slide.id}/tile?x=${tile.x}&y=${tile.y}&size=${tile.size}&as_analysed=${asAnalysed}`;
  const response = await fetch(new URL(path, api), { headers: authHeaders() });
  if (!response.ok) throw new Error(await problemMessage(response));
  return response.blob();
}

// The tile at full resolution to look at, then the Grad-CAM from /explain of the pixels the analysis gave
// the model (its level, resized to the model input), so the heat map explains the slide's answer.
async function showSlideTile(tile) {
  slideError("");
  markTile(tile);
  $("slide-tile-heatmap").checked = false;
  $("slide-tile-heatmap").disabled = true;
  $("slide-tile-explained").textContent = "-";
  try {
    const pixels = await slideTile(tile, false);
    slide.tile = URL.createObjectURL(pixels);
    slide.urls.push(slide.tile);
    slide.heatMap = null;
    $("slide-tile-caption").textContent = `Tile at (${tile.x}, ${tile.y}), ${tile.size} px at full ` +
      "resolution; the heat map is drawn on the pixels the analysis gave the model";
    $("slide-tile-figure").hidden = false;
    showTileImage();
    const form = new FormData();
    form.append("file", await slideTile(tile, true), "tile.png");
    const explained = await fetch(new URL("explain", api), { method: "POST", body: form, headers: authHeaders() });
    if (!explained.ok) throw new Error(await problemMessage(explained));
    const result = await explained.json();
    slide.heatMap = `data:image/png;base64,${result.overlay_png}`;
    const outOfScope = (result.reasons || []).some((reason) => reason !== "low_confidence");
    $("slide-tile-explained").textContent = outOfScope ? `no class: ${result.reasons.join(", ")}` : result.explained_class;
    $("slide-tile-heatmap").disabled = false;
  } catch (error) {
    slideError(error.message);
  }
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
  $("report-link").addEventListener("click", (event) => openReport(event, "model/report", "text/html; charset=utf-8"));
  $("report-markdown-link").addEventListener("click",
    (event) => openReport(event, "model/report/report.md", "text/plain; charset=utf-8"));
  $("slide-file").addEventListener("change", () => { if ($("slide-file").files[0]) analyseSlide($("slide-file").files[0]); });
  $("slide-tile-heatmap").addEventListener("change", showTileImage);
  loadCard();
}

setUp();
