// The try-it page: pick an image, a scale and an output format, POST it to /v1/superres on
// this origin, show the result beside the input. XMLHttpRequest rather than fetch: it
// reports upload progress. Plain script, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "imdn.apiKey"; // sessionStorage: gone when the tab closes

// What the service reads (service/imaging/decoding.py): by media type, or by name where
// the browser gives no type
const INPUT_TYPES = ["image/png", "image/jpeg", "image/webp", "image/bmp", "image/tiff"];
const INPUT_SUFFIXES = ["png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff"];
const INPUT_NAMES = "PNG, JPEG, WebP, BMP or TIFF";
// The output formats: what to ask for, what the file is called
const OUTPUTS = {
  // JPEG has no alpha: an image with transparency comes back as PNG instead of a 406
  png: { accept: "image/png", name: "PNG" },
  webp: { accept: "image/webp", name: "WebP" },
  jpeg: { accept: "image/jpeg, image/png;q=0.5", name: "JPEG" },
};
const TYPE_INFO = {
  "image/png": { name: "PNG", ext: "png" },
  "image/webp": { name: "WebP", ext: "webp" },
  "image/jpeg": { name: "JPEG", ext: "jpg" },
};

const state = {
  config: null,
  file: null,
  inputUrl: null,
  inputSize: null, // [width, height] once the browser decoded the preview
  resultUrl: null,
  outSize: null,
  xhr: null,
  ticker: null,
};

// Server facts

async function loadConfig() {
  try {
    const r = await fetch("/ui/config", { headers: { Accept: "application/json" } });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    state.config = await r.json();
  } catch (err) {
    $("server-info").textContent = `could not read the server's settings (${err.message})`;
    return;
  }
  const c = state.config;
  $("server-info").textContent =
    `models ${c.models.join(", ")} · scales: ${scalesText()} · files up to ${formatBytes(c.max_upload_bytes)}`;
  $("scale-hint").textContent = scalesText();
  $("scale").max = String(c.max_scale);
  for (const b of document.querySelectorAll(".preset")) {
    b.disabled = !c.fixed_scales.includes(Number(b.dataset.scale));
  }
  if (!c.fixed_scales.includes(Number($("scale").value)) && !c.any_scale) {
    setScale(c.fixed_scales[0]);
  }
  if (c.api_key_required) showKeyPanel(false);
  markPreset();
}

function unservedFixed() {
  // 2, 3 and 4 need their own network, even where IMDN_AS takes any other scale
  const c = state.config;
  return [2, 3, 4].filter((s) => s <= c.max_scale && !c.fixed_scales.includes(s));
}

function scalesText() {
  const c = state.config;
  const unserved = unservedFixed();
  const but = unserved.length ? ` except ${unserved.join(", ")}` : "";
  return c.any_scale ? `any value in (1, ${c.max_scale}]${but}` : `${c.fixed_scales.join(", ")} only`;
}

// The API key

function showKeyPanel(focus) {
  $("key-panel").hidden = false;
  $("api-key").value = $("api-key").value || sessionStorage.getItem(KEY_STORE) || "";
  if (focus) $("api-key").focus();
}

function apiKey() {
  return $("key-panel").hidden ? "" : $("api-key").value.trim();
}

// Input

function isReadable(file) {
  const suffix = (file.name.match(/\.([^.]+)$/) || [])[1]?.toLowerCase() || "";
  return file.type ? INPUT_TYPES.includes(file.type) : INPUT_SUFFIXES.includes(suffix);
}

function setFile(file) {
  if (!file) return;
  hideError();
  clearResult();
  if (state.inputUrl) URL.revokeObjectURL(state.inputUrl);
  state.inputUrl = null;
  state.inputSize = null;
  const thumb = $("input-thumb");
  thumb.hidden = true; // shown once it decoded: never a broken image
  thumb.removeAttribute("src");
  $("input-meta").textContent = `${file.name} · ${formatBytes(file.size)}`;
  $("input-info").hidden = false;
  if (!isReadable(file)) {
    state.file = null;
    $("run").disabled = true;
    showError(
      `${file.name} is not an image this service reads.`,
      `Choose a ${INPUT_NAMES} file.`,
      file.type ? `its type: ${file.type}` : "",
    );
    return;
  }
  state.file = file;
  state.inputUrl = URL.createObjectURL(file);
  thumb.onload = () => {
    thumb.hidden = false;
    state.inputSize = [thumb.naturalWidth, thumb.naturalHeight];
    $("input-meta").textContent =
      `${file.name} · ${thumb.naturalWidth} × ${thumb.naturalHeight} px · ${formatBytes(file.size)}`;
  };
  thumb.onerror = () => {
    $("input-meta").textContent = `${file.name} · ${formatBytes(file.size)} (no preview in this browser)`;
  };
  thumb.src = state.inputUrl;
  $("run").disabled = false;
  const limit = state.config?.max_upload_bytes;
  if (limit && file.size > limit) showError(tooLarge(file.size, limit), "", "");
}

function setScale(s) {
  $("scale").value = String(s);
  markPreset();
}

function markPreset() {
  const s = Number($("scale").value);
  for (const b of document.querySelectorAll(".preset")) {
    b.setAttribute("aria-pressed", String(Number(b.dataset.scale) === s));
  }
}

function outputChoice() {
  const format = $("format").value;
  const quality = Math.round(Number($("quality").value));
  return { format, quality, ...OUTPUTS[format] };
}

// Checks before sending: what the page knows the server would refuse

function scaleProblem(text) {
  const c = state.config;
  const s = Number(text);
  if (!c) return text && Number.isFinite(s) && s > 1 ? null : "The scale must be a number above 1.";
  if (!text || !Number.isFinite(s) || s <= 1 || s > c.max_scale) {
    return `The scale must be a number above 1 and at most ${c.max_scale} (${scalesText()}).`;
  }
  const fixed = [2, 3, 4].includes(s);
  if (fixed ? !c.fixed_scales.includes(s) : !c.any_scale) {
    return `This server cannot upscale ×${s}: it takes ${scalesText()}.`;
  }
  return null;
}

function qualityProblem(choice) {
  if (choice.format === "png") return null;
  const q = Number($("quality").value);
  return Number.isInteger(q) && q >= 1 && q <= 100 ? null : "The quality must be a whole number from 1 to 100.";
}

function tooLarge(size, limit) {
  return `The file is too large: ${formatBytes(size)}; this server takes up to ${formatBytes(limit)}.`;
}

// The request

function run() {
  if (!state.file || state.xhr) return;
  hideError();
  const scale = $("scale").value.trim();
  const choice = outputChoice();
  const limit = state.config?.max_upload_bytes;
  const refused =
    scaleProblem(scale) ||
    qualityProblem(choice) ||
    (limit && state.file.size > limit ? tooLarge(state.file.size, limit) : null);
  if (refused) {
    clearResult();
    showError(refused, "", "not sent");
    return;
  }
  const xhr = new XMLHttpRequest();
  state.xhr = xhr;
  const started = performance.now();
  let uploaded = null;
  const query = new URLSearchParams({ scale });
  if (choice.format !== "png") query.set("quality", String(choice.quality));
  xhr.open("POST", `/v1/superres?${query}`);
  xhr.responseType = "blob";
  xhr.setRequestHeader("Content-Type", state.file.type || "application/octet-stream");
  xhr.setRequestHeader("Accept", `${choice.accept}, application/problem+json`);
  const key = apiKey();
  if (key) {
    xhr.setRequestHeader("Authorization", `Bearer ${key}`);
    sessionStorage.setItem(KEY_STORE, key);
  }
  xhr.upload.onprogress = (e) => {
    if (e.lengthComputable) {
      progress(e.loaded / e.total, `uploading ${Math.round((100 * e.loaded) / e.total)} %`);
    }
  };
  xhr.upload.onload = () => {
    uploaded = performance.now();
    stage("server");
    progress(null, "running on the server…");
    // the server says nothing until it answers: count the seconds meanwhile
    state.ticker = setInterval(() => {
      progress(null, `running on the server… ${formatMs(performance.now() - uploaded)}`);
    }, 250);
  };
  xhr.onprogress = (e) => {
    if (xhr.status !== 200 || !e.loaded) return;
    stopTicker();
    stage("download");
    if (e.lengthComputable) {
      progress(e.loaded / e.total, `downloading ${Math.round((100 * e.loaded) / e.total)} %`);
    } else {
      progress(null, `downloading ${formatBytes(e.loaded)}`);
    }
  };
  xhr.onload = async () => {
    const trip = performance.now() - started;
    const upload = (uploaded ?? performance.now()) - started;
    const type = xhr.getResponseHeader("Content-Type") || "";
    try {
      if (xhr.status === 200 && type.startsWith("image/")) {
        await showResult(xhr, trip, upload);
      } else {
        await showProblem(xhr, type, key);
      }
    } finally {
      done();
    }
  };
  xhr.onerror = () => {
    clearResult();
    showError(
      "The server could not be reached, or it closed the connection.",
      "Check that it is running, then try again.",
      "",
    );
    done();
  };
  xhr.onabort = () => done();
  clearResult();
  busy(true);
  stage("upload");
  progress(0, "uploading");
  xhr.send(state.file);
}

function busy(on) {
  $("main").setAttribute("aria-busy", String(on));
  $("run").disabled = on || !state.file;
  $("run").textContent = on ? "Working…" : "Upscale";
  $("cancel").hidden = !on;
  $("progress-box").hidden = !on;
  $("file").disabled = on;
}

function done() {
  stopTicker();
  state.xhr = null;
  busy(false);
}

function stopTicker() {
  if (state.ticker !== null) clearInterval(state.ticker);
  state.ticker = null;
}

function stage(name) {
  let passed = true;
  for (const li of $("stages").children) {
    const current = li.dataset.stage === name;
    if (current) passed = false;
    li.classList.toggle("done", passed);
    if (current) li.setAttribute("aria-current", "step");
    else li.removeAttribute("aria-current");
  }
}

function progress(fraction, text) {
  const bar = $("progress");
  if (fraction === null) bar.removeAttribute("value"); // indeterminate
  else bar.value = fraction;
  $("progress-text").textContent = text;
}

// The result

function clearResult() {
  $("result").hidden = true;
  for (const id of ["before", "after"]) $(id).removeAttribute("src");
  $("download").removeAttribute("href");
  if (state.resultUrl) URL.revokeObjectURL(state.resultUrl);
  state.resultUrl = null;
  state.outSize = null;
}

async function showResult(xhr, tripMs, uploadMs) {
  const blob = xhr.response;
  const info = TYPE_INFO[blob.type] || { name: blob.type, ext: "img" };
  state.resultUrl = URL.createObjectURL(blob);
  const after = $("after");
  const decoded = await new Promise((resolve) => {
    after.onload = () => resolve(true);
    after.onerror = () => resolve(false);
    after.src = state.resultUrl;
  });
  if (!decoded) {
    clearResult();
    showError(`The browser could not show the ${info.name} the server sent.`, "", "");
    return;
  }
  state.outSize = [after.naturalWidth, after.naturalHeight];
  $("before").src = state.inputUrl;

  const [w, h] = state.outSize;
  const from = state.inputSize ? ` from ${state.inputSize[0]} × ${state.inputSize[1]}` : "";
  $("fact-size").textContent = `${w} × ${h} px${from} · ${formatBytes(blob.size)} ${info.name}`;
  $("fact-model").textContent = xhr.getResponseHeader("X-IMDN-Model") || "?";
  $("fact-timing").textContent = formatServerTiming(xhr.getResponseHeader("Server-Timing"));
  $("fact-trip").textContent =
    `${formatMs(tripMs)} (upload ${formatMs(uploadMs)}, then the server and the download)`;

  const stem = state.file.name.replace(/\.[^.]*$/, "") || "image";
  const link = $("download");
  link.href = state.resultUrl;
  link.download = `${stem}_x${$("scale").value.trim()}.${info.ext}`;
  link.textContent = `Download ${info.name}`;
  $("result").hidden = false;
  layoutStage();
  setSplit(Number($("slider").value));
}

function layoutStage() {
  if (!state.outSize) return;
  const [w, h] = state.outSize;
  const zoom = $("zoom").value;
  let z = Number(zoom);
  const viewport = $("viewport");
  if (zoom === "fit") {
    const pad = parseFloat(getComputedStyle(viewport).paddingLeft) * 2;
    const width = viewport.clientWidth - pad || w;
    z = Math.min(width / w, (0.7 * window.innerHeight) / h);
  }
  const compare = $("compare");
  compare.style.width = `${Math.round(w * z)}px`;
  $("stage").style.height = `${Math.round(h * z)}px`;
}

function setSplit(percent) {
  $("stage").style.setProperty("--split", `${percent}%`);
}

// Errors: a plain sentence for what went wrong, the server's own words below it

async function showProblem(xhr, type, keySent) {
  let problem = null;
  if (type.includes("json") && xhr.response) {
    try {
      problem = JSON.parse(await xhr.response.text());
    } catch {
      problem = null;
    }
  }
  if (xhr.status === 401) showKeyPanel(true);
  clearResult();
  if (problem && typeof problem === "object") {
    const meta = [`HTTP ${xhr.status}`, problem.reason].filter(Boolean).join(" · ");
    const retry = xhr.getResponseHeader("Retry-After");
    const detail = formatDetail(problem.detail);
    showError(
      explain(xhr.status, problem, { keySent, retry }),
      detail ? `The server said: ${detail}` : "",
      retry ? `${meta} · retry after ${retry} s` : meta,
    );
  } else {
    showError(`The server answered HTTP ${xhr.status} ${xhr.statusText}.`.replace(" .", "."), "", "");
  }
}

// One sentence a person can act on, for each problem the API answers (its `reason`)
function explain(status, problem, { keySent, retry }) {
  const c = state.config;
  const limit = c ? formatBytes(c.max_upload_bytes) : "its limit";
  const sentences = {
    unauthorized: keySent
      ? "The API key was refused: check it and try again."
      : "This server needs an API key: enter it above.",
    scale_out_of_range: c
      ? `The scale must be a number above 1 and at most ${c.max_scale}.`
      : "The scale is out of the server's range.",
    invalid_request: "The scale or quality is not valid: the scale must be a number above 1, the quality 1 to 100.",
    repeated_scale: "The scale was given twice.",
    model_not_loaded: `This server cannot upscale by this factor${c ? `: it takes ${scalesText()}` : ""}.`,
    body_too_large: `The file is too large: this server takes up to ${limit}.`,
    body_timeout: "The upload stalled; try again.",
    empty: "The file is empty.",
    undecodable: "The file could not be read as an image: it may be damaged or cut short.",
    unsupported_type: `This file type is not supported: choose a ${INPUT_NAMES} file.`,
    animated: "Animated images are not supported: choose a still image.",
    unsupported_mode: "This image's colour format is not supported.",
    too_many_pixels: "The image has too many pixels for this server: choose a smaller one.",
    decompression_bomb: "The image is far larger once unpacked than its file: refused for safety.",
    output_too_large: "The result would be too large for this server: choose a smaller scale or image.",
    too_costly: "This image would take this server too long: choose a smaller scale or image.",
    not_acceptable: "The server cannot send this image in the chosen format: choose PNG or WebP.",
    queue_full: `The server is busy: try again${retry ? ` in ${retry} s` : " shortly"}.`,
    not_ready: "The server is starting or stopping: try again shortly.",
    deadline_exceeded: "The server took too long on this image: try a smaller scale or image.",
    device_out_of_memory: "The server ran out of memory on this image: try a smaller scale or image.",
  };
  return sentences[problem.reason] || `${problem.title || "Error"} (HTTP ${status}).`;
}

function formatDetail(detail) {
  if (Array.isArray(detail)) {
    return detail
      .map((e) => (e && typeof e === "object" ? `${(e.loc || []).join(".")}: ${e.msg}` : String(e)))
      .join("; ");
  }
  return detail == null ? "" : typeof detail === "string" ? detail : JSON.stringify(detail);
}

function showError(title, detail, meta) {
  $("error-title").textContent = title;
  $("error-detail").textContent = detail;
  $("error-detail").hidden = !detail;
  $("error-meta").textContent = meta;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
}

// Formatting

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} kB`;
  return `${(n / 1024 / 1024).toFixed(n < 100 * 1024 * 1024 ? 1 : 0)} MB`;
}

function formatMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

function formatServerTiming(header) {
  if (!header) return "—";
  return header
    .split(",")
    .map((part) => {
      const [name, ...params] = part.trim().split(";");
      const dur = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
      return dur ? `${name} ${formatMs(Number(dur.slice(4)))}` : name;
    })
    .join(" · ");
}

// Wiring

function init() {
  $("file").addEventListener("change", (e) => setFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (!state.xhr) setFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const file = [...(e.clipboardData?.files || [])][0];
    if (file && !state.xhr) setFile(file);
  });
  for (const b of document.querySelectorAll(".preset")) {
    b.addEventListener("click", () => setScale(b.dataset.scale));
  }
  $("scale").addEventListener("input", markPreset);
  $("scale").addEventListener("keydown", (e) => {
    if (e.key === "Enter") run();
  });
  const showQuality = () => {
    $("quality-field").hidden = $("format").value === "png"; // PNG has no quality
  };
  $("format").addEventListener("change", showQuality);
  showQuality(); // a reload may keep the last choice
  $("run").addEventListener("click", run);
  $("cancel").addEventListener("click", () => state.xhr?.abort());
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
  });
  $("slider").addEventListener("input", (e) => setSplit(Number(e.target.value)));
  $("zoom").addEventListener("change", layoutStage);
  window.addEventListener("resize", layoutStage);
  const stageBox = $("stage");
  const follow = (e) => {
    const box = stageBox.getBoundingClientRect();
    const percent = Math.min(100, Math.max(0, (100 * (e.clientX - box.left)) / box.width));
    $("slider").value = String(percent);
    setSplit(percent);
  };
  stageBox.addEventListener("pointerdown", (e) => {
    stageBox.setPointerCapture(e.pointerId);
    follow(e);
  });
  stageBox.addEventListener("pointermove", (e) => {
    if (stageBox.hasPointerCapture(e.pointerId)) follow(e);
  });
  loadConfig();
}

init();
