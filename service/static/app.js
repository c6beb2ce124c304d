// The try-it page: pick an image and a scale, POST it to /v1/superres on this origin,
// show the result beside the input. XMLHttpRequest rather than fetch: it reports upload
// progress. Plain script, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "imdn.apiKey"; // sessionStorage: gone when the tab closes

const state = {
  config: null,
  file: null,
  inputUrl: null,
  inputSize: null, // [width, height] once the browser decoded the preview
  resultUrl: null,
  outSize: null,
  xhr: null,
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
  // 2, 3 and 4 need their own network, even where IMDN_AS takes any other scale
  const unserved = [2, 3, 4].filter((s) => s <= c.max_scale && !c.fixed_scales.includes(s));
  const but = unserved.length ? ` except ${unserved.join(", ")}` : "";
  const scales = c.any_scale
    ? `any value in (1, ${c.max_scale}]${but}`
    : `${c.fixed_scales.join(", ")} only`;
  $("server-info").textContent = `models ${c.models.join(", ")} · scales: ${scales}`;
  $("scale-hint").textContent = scales;
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

// The API key

function showKeyPanel(focus) {
  $("key-panel").hidden = false;
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  if (focus) $("api-key").focus();
}

function apiKey() {
  return $("key-panel").hidden ? "" : $("api-key").value.trim();
}

// Input

function setFile(file) {
  if (!file) return;
  state.file = file;
  if (state.inputUrl) URL.revokeObjectURL(state.inputUrl);
  state.inputUrl = URL.createObjectURL(file);
  state.inputSize = null;
  const thumb = $("input-thumb");
  $("input-meta").textContent = `${file.name} · ${formatBytes(file.size)}`;
  thumb.onload = () => {
    state.inputSize = [thumb.naturalWidth, thumb.naturalHeight];
    $("input-meta").textContent =
      `${file.name} · ${thumb.naturalWidth} × ${thumb.naturalHeight} px · ${formatBytes(file.size)}`;
  };
  thumb.onerror = () => {
    $("input-meta").textContent = `${file.name} · ${formatBytes(file.size)} (no preview in this browser)`;
  };
  thumb.src = state.inputUrl;
  $("input-info").hidden = false;
  $("run").disabled = false;
  hideError();
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

// The request

function run() {
  if (!state.file || state.xhr) return;
  hideError();
  const scale = $("scale").value.trim();
  const xhr = new XMLHttpRequest();
  state.xhr = xhr;
  const started = performance.now();
  let uploaded = null;
  xhr.open("POST", `/v1/superres?scale=${encodeURIComponent(scale)}`);
  xhr.responseType = "blob";
  xhr.setRequestHeader("Content-Type", state.file.type || "application/octet-stream");
  xhr.setRequestHeader("Accept", "image/png, application/problem+json");
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
    progress(null, "running on the server…");
  };
  xhr.onprogress = (e) => {
    if (xhr.status === 200 && e.loaded) progress(null, `receiving ${formatBytes(e.loaded)}`);
  };
  xhr.onload = async () => {
    const trip = performance.now() - started;
    const upload = (uploaded ?? performance.now()) - started;
    const type = xhr.getResponseHeader("Content-Type") || "";
    try {
      if (xhr.status === 200 && type.startsWith("image/")) {
        await showResult(xhr, trip, upload);
      } else {
        await showProblem(xhr, type);
      }
    } finally {
      done();
    }
  };
  xhr.onerror = () => {
    showError("Network error", "the server could not be reached or closed the connection", "");
    done();
  };
  xhr.onabort = () => done();
  busy(true);
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
  state.xhr = null;
  busy(false);
}

function progress(fraction, text) {
  const bar = $("progress");
  if (fraction === null) bar.removeAttribute("value"); // indeterminate
  else bar.value = fraction;
  $("progress-text").textContent = text;
}

// The result

async function showResult(xhr, tripMs, uploadMs) {
  const blob = xhr.response;
  if (state.resultUrl) URL.revokeObjectURL(state.resultUrl);
  state.resultUrl = URL.createObjectURL(blob);
  const after = $("after");
  await new Promise((resolve, reject) => {
    after.onload = resolve;
    after.onerror = () => reject(new Error("the browser could not decode the PNG"));
    after.src = state.resultUrl;
  }).catch((err) => showError("Unreadable result", err.message, ""));
  if (!after.naturalWidth) return;
  state.outSize = [after.naturalWidth, after.naturalHeight];
  $("before").src = state.inputUrl;

  const [w, h] = state.outSize;
  const from = state.inputSize ? ` from ${state.inputSize[0]} × ${state.inputSize[1]}` : "";
  $("fact-size").textContent = `${w} × ${h} px${from} · ${formatBytes(blob.size)} PNG`;
  $("fact-model").textContent = xhr.getResponseHeader("X-IMDN-Model") || "?";
  $("fact-timing").textContent = formatServerTiming(xhr.getResponseHeader("Server-Timing"));
  $("fact-trip").textContent =
    `${formatMs(tripMs)} (upload ${formatMs(uploadMs)}, then the server and the download)`;

  const stem = state.file.name.replace(/\.[^.]*$/, "") || "image";
  const link = $("download");
  link.href = state.resultUrl;
  link.download = `${stem}_x${$("scale").value.trim()}.png`;
  $("result").hidden = false;
  layoutStage();
  setSplit(Number($("slider").value));
}

function layoutStage() {
  if (!state.outSize) return;
  const [w, h] = state.outSize;
  const zoom = $("zoom").value;
  let z = Number(zoom);
  if (zoom === "fit") {
    const width = $("viewport").clientWidth || w;
    z = Math.min(width / w, (0.72 * window.innerHeight) / h);
  }
  const stage = $("stage");
  stage.style.width = `${Math.round(w * z)}px`;
  stage.style.height = `${Math.round(h * z)}px`;
}

function setSplit(percent) {
  $("stage").style.setProperty("--split", `${percent}%`);
}

// Errors: the problem document's title and detail (RFC 9457)

async function showProblem(xhr, type) {
  let problem = null;
  if (type.includes("json") && xhr.response) {
    try {
      problem = JSON.parse(await xhr.response.text());
    } catch {
      problem = null;
    }
  }
  if (xhr.status === 401) showKeyPanel(true);
  if (problem && typeof problem === "object") {
    const meta = [`HTTP ${xhr.status}`, problem.reason].filter(Boolean).join(" · ");
    const retry = xhr.getResponseHeader("Retry-After");
    showError(
      problem.title || `HTTP ${xhr.status}`,
      formatDetail(problem.detail),
      retry ? `${meta} · retry after ${retry} s` : meta,
    );
  } else {
    showError(`HTTP ${xhr.status}`, xhr.statusText || "the server answered with an error", "");
  }
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
  return `${(n / 1024 / 1024).toFixed(2)} MB`;
}

function formatMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
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
  $("run").addEventListener("click", run);
  $("cancel").addEventListener("click", () => state.xhr?.abort());
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
  });
  $("slider").addEventListener("input", (e) => setSplit(Number(e.target.value)));
  $("zoom").addEventListener("change", layoutStage);
  window.addEventListener("resize", layoutStage);
  const stage = $("stage");
  const follow = (e) => {
    const box = stage.getBoundingClientRect();
    const percent = Math.min(100, Math.max(0, (100 * (e.clientX - box.left)) / box.width));
    $("slider").value = String(percent);
    setSplit(percent);
  };
  stage.addEventListener("pointerdown", (e) => {
    stage.setPointerCapture(e.pointerId);
    follow(e);
  });
  stage.addEventListener("pointermove", (e) => {
    if (stage.hasPointerCapture(e.pointerId)) follow(e);
  });
  loadConfig();
}

init();
