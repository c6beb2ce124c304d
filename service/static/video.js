// The video page: POST a video to /v1/superres/video on this origin, show progress in
// frames as the fragments of the answer arrive (X-IMDN-Frames gives the total), then
// play the result. Plain script, no build step; kept apart from the image page (app.js).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "imdn.apiKey"; // sessionStorage, shared with the image page
const VIDEO_TRACK = 1; // the server adds the video stream first

let controller = null;
let resultUrl = null;

async function loadConfig() {
  try {
    const r = await fetch("/ui/config", { headers: { Accept: "application/json" } });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const c = await r.json();
    $("server-info").textContent = `models ${c.models.join(", ")} · scales up to ${c.max_scale}`;
    $("scale").max = String(c.max_scale);
    if (c.api_key_required) {
      $("key-panel").hidden = false;
      $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
    }
  } catch (err) {
    $("server-info").textContent = `could not read the server's settings (${err.message})`;
  }
}

// Frames of a fragmented MP4 as its bytes arrive: the sample counts of each `trun` of
// the video track's `traf` in every complete `moof` (service/video/cli.py does the same).
class FragmentCounter {
  constructor() {
    this.buffer = new Uint8Array(0);
    this.skip = 0;
    this.frames = 0;
  }
  feed(chunk) {
    let data = chunk;
    if (this.skip) {
      const n = Math.min(this.skip, data.length);
      this.skip -= n;
      data = data.subarray(n);
    }
    const joined = new Uint8Array(this.buffer.length + data.length);
    joined.set(this.buffer);
    joined.set(data, this.buffer.length);
    let at = 0;
    while (joined.length - at >= 8) {
      const view = new DataView(joined.buffer, joined.byteOffset + at);
      const size = view.getUint32(0);
      const kind = String.fromCharCode(...joined.subarray(at + 4, at + 8));
      if (size < 8) { at = joined.length; break; }
      if (kind !== "moof") {
        const n = Math.min(size, joined.length - at);
        at += n;
        this.skip = size - n;
        if (this.skip) break;
        continue;
      }
      if (joined.length - at < size) break;
      this.frames += samples(joined.subarray(at + 8, at + size));
      at += size;
    }
    this.buffer = joined.slice(at);
    return this.frames;
  }
}

function boxes(bytes) {
  const out = [];
  let at = 0;
  while (at + 8 <= bytes.length) {
    const size = new DataView(bytes.buffer, bytes.byteOffset + at).getUint32(0);
    if (size < 8) break;
    out.push([String.fromCharCode(...bytes.subarray(at + 4, at + 8)), bytes.subarray(at + 8, at + size)]);
    at += size;
  }
  return out;
}

function samples(moof) {
  let count = 0;
  for (const [kind, traf] of boxes(moof)) {
    if (kind !== "traf") continue;
    const children = boxes(traf);
    const u32 = (b) => new DataView(b.buffer, b.byteOffset + 4).getUint32(0);
    const tfhd = children.find(([k]) => k === "tfhd");
    if (!tfhd || u32(tfhd[1]) !== VIDEO_TRACK) continue;
    for (const [k, b] of children) if (k === "trun") count += u32(b);
  }
  return count;
}

function setBusy(busy) {
  $("main").setAttribute("aria-busy", String(busy));
  $("run").disabled = busy || !$("file").files.length;
  $("cancel").hidden = !busy;
  $("progress-box").hidden = !busy;
}

function progress(text, fraction) {
  $("progress-text").textContent = text;
  if (fraction === null) $("progress").removeAttribute("value");
  else $("progress").value = fraction;
}

function showProblem(title, detail) {
  $("error-title").textContent = title;
  $("error-detail").textContent = detail;
  $("error").hidden = false;
}

async function run() {
  const file = $("file").files[0];
  if (!file) return;
  $("error").hidden = true;
  $("result").hidden = true;
  controller = new AbortController();
  setBusy(true);
  progress("uploading and checking the video…", null);
  const headers = { "Content-Type": file.type || "application/octet-stream" };
  const key = $("key-panel").hidden ? "" : $("api-key").value.trim();
  if (key) {
    headers.Authorization = `Bearer ${key}`;
    sessionStorage.setItem(KEY_STORE, key);
  }
  const codec = $("codec").value;
  const url = `/v1/superres/video?scale=${encodeURIComponent($("scale").value)}&codec=${codec}`;
  // the rate counts from the upload's start: a short clip's fragments can all arrive in one
  // read, and a rate from the first byte would read thousands of frames a second
  const sent = performance.now();
  try {
    const r = await fetch(url, { method: "POST", body: file, headers, signal: controller.signal });
    if (!r.ok) {
      let body = {};
      try { body = await r.json(); } catch { /* not a problem document */ }
      showProblem(body.title || `HTTP ${r.status}`, body.detail ? String(body.detail) : "");
      return;
    }
    const total = Number(r.headers.get("X-IMDN-Frames")) || 0;
    const size = r.headers.get("X-IMDN-Output-Size") || "";
    const type = r.headers.get("Content-Type") || "video/mp4";
    const counter = new FragmentCounter();
    const reader = r.body.getReader();
    const chunks = [];
    let bytes = 0;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks.push(value);
      bytes += value.length;
      const frames = type.includes("mp4") ? counter.feed(value) : 0;
      const seconds = (performance.now() - sent) / 1000;
      const rate = frames / Math.max(seconds, 1e-3);
      const left = rate > 0 && total ? ` · ~${Math.ceil((total - frames) / rate)} s left` : "";
      progress(
        frames
          ? `${frames} / ${total} frames · ${rate.toFixed(1)} frames/s${left}`
          : `${(bytes / 1024).toFixed(0)} KiB received of ${total} frames`,
        total && frames ? frames / total : null,
      );
    }
    if (resultUrl) URL.revokeObjectURL(resultUrl);
    resultUrl = URL.createObjectURL(new Blob(chunks, { type }));
    $("player").src = resultUrl;
    const ext = type.includes("webm") ? "webm" : "mp4";
    const stem = file.name.replace(/\.[^.]*$/, "");
    $("download").href = resultUrl;
    $("download").download = `${stem}_x${$("scale").value}.${ext}`;
    $("fact").textContent = `${total} frames, ${size.replace("x", " × ")} px, ${codec}`;
    $("result").hidden = false;
  } catch (err) {
    if (err.name === "AbortError") showProblem("Cancelled", "the server stops the work");
    else showProblem("The video stopped", `${err.message}: the answer is incomplete`);
  } finally {
    controller = null;
    setBusy(false);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  loadConfig();
  $("file").addEventListener("change", () => { $("run").disabled = !$("file").files.length; });
  $("run").addEventListener("click", run);
  $("cancel").addEventListener("click", () => controller && controller.abort());
});
