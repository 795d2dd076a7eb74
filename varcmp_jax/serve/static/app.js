// The search page: one query -> /api/search -> one card per hit (keyframes, scores, curves, key segments).
// Plain DOM code, no dependencies; every text from the index goes in through textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const STRIP_FRAMES = 8;
// The relevance chart's horizontal geometry (SVG viewBox units): the plot between the margins, which hold the
// y scales (relevance left, prior right). The keyframe strip under it spans the same width, so a time has the same
// x in both: chartX(t) / CHART.width of the shared width.
const CHART = { width: 640, left: 46, right: 30 };
const chartX = (t, duration) => CHART.left + (t / duration) * (CHART.width - CHART.left - CHART.right);
let info = null;

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const child of children) node.append(child);
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

// Seconds as the page shows them: up to two decimals (snippet edges often fall on quarter seconds).
const sec = (x) => `${+x.toFixed(2)}`;

function keyframeUrl(hit, slot) {
  return `/api/keyframe/${hit.index}/${slot}`;
}

// A keyframe in a box of its own size: the image, or, where there is none (records without frames and no
// --videos, a video that cannot be decoded), the empty box marked .no-keyframe, never a broken image or its alt
// text. Without any keyframes in the index (info.keyframes false) the image is not even asked for.
function keyframeBox(className, hit, slot, loading = "eager") {
  const box = el("div", { className });
  if (!info.keyframes) {
    box.classList.add("no-keyframe");
    return box;
  }
  const img = el("img", { alt: "", loading });
  img.addEventListener("error", () => box.classList.add("no-keyframe"));
  img.addEventListener("load", () => box.classList.remove("no-keyframe"));
  img.src = keyframeUrl(hit, slot);
  box.append(img);
  return box;
}

const NO_KEYFRAMES = "no keyframes: the records hold no frames; start varcmp serve with --videos DIR to show them";

function videoUrl(name) {
  return "/videos/" + name.split("/").map(encodeURIComponent).join("/");
}

// --- the player -----------------------------------------------------------------------------------

function play(hit, seconds) {
  if (!info.player) return;
  const video = $("video");
  const url = videoUrl(hit.video);
  $("player").hidden = false;
  $("now-playing").textContent = `#${hit.rank} ${hit.video} from ${sec(seconds)} s`;
  const start = () => {
    video.currentTime = seconds;
    video.play().catch(() => {});
  };
  if (video.dataset.src === url && video.readyState >= 1) {
    start();
  } else {
    video.dataset.src = url;
    video.addEventListener("loadedmetadata", start, { once: true });
    video.src = url;
  }
  $("player").scrollIntoView({ block: "nearest" });
}

$("close-player").addEventListener("click", () => {
  $("video").pause();
  $("player").hidden = true;
});
$("video").addEventListener("error", () => {
  $("now-playing").textContent = "cannot play this video (not found under --videos, or a format this browser lacks)";
});

// --- one hit ----------------------------------------------------------------------------------------

function niceStep(duration) {
  for (const step of [0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600]) {
    if (duration / step <= 8) return step;
  }
  return 7200;
}

// The relevance axis: ticks at multiples of a 1-2-5 step from 0 to the first tick at or above the largest
// relevance of all hits (one scale for all hits), 2 to 4 intervals; at least 0..0.001 (all relevance <= 0).
function relevanceScale(largest) {
  const maxRel = Math.max(largest, 1e-3), raw = maxRel / 3, magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw * (1 - 1e-9));
  const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
  const count = Math.max(1, Math.ceil(maxRel / step - 1e-9));
  const ticks = Array.from({ length: count + 1 },
                           (_, i) => ({ value: i * step, label: `${+(i * step).toFixed(decimals)}` }));
  return { top: count * step, ticks };
}

function curves(hit, scale) {
  // Relevance as bars over each snippet's interval on the left scale (the same for all hits), the prior as a line
  // on the right scale (0..1), key segments shaded.
  const { width, left, right } = CHART;
  const height = 112, top = 9, plotHeight = 84;   // top: room for half of the top scale label
  const y = (share) => top + plotHeight - share * plotHeight;
  const duration = Math.max(hit.duration, 1e-6);
  const x = (t) => chartX(t, duration);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "curves", role: "img",
                            "aria-label": `relevance and prior of ${hit.video} over time` });
  for (const segment of hit.segments) {
    const rect = svg("rect", { class: "segment", x: x(segment.start), y: top,
                               width: Math.max(2, x(segment.end) - x(segment.start)), height: plotHeight });
    rect.append(svg("title"));
    rect.lastChild.textContent = `key segment ${sec(segment.start)}-${sec(segment.end)} s: click to play`;
    rect.addEventListener("click", (event) => { event.stopPropagation(); play(hit, segment.start); });
    root.append(rect);
  }
  if (hit.event) {
    root.append(svg("rect", { class: "event", x: x(hit.event[0]), y: top + 0.5,
                              width: Math.max(1, x(hit.event[1]) - x(hit.event[0])), height: plotHeight - 1 }));
  }
  for (const tick of scale.ticks) {   // the y scales: grid lines at the relevance ticks, labels on both sides
    const at = y(tick.value / scale.top);
    if (tick.value > 0) root.append(svg("line", { class: "grid", x1: left, x2: width - right, y1: at, y2: at }));
    const label = svg("text", { class: "tick relevance-tick", x: left - 4, y: at, "text-anchor": "end",
                                "dominant-baseline": "middle" });
    label.textContent = tick.label;
    root.append(label);
  }
  for (const value of [0, 0.5, 1]) {
    const label = svg("text", { class: "tick prior-tick", x: width - right + 4, y: y(value),
                                "dominant-baseline": "middle" });
    label.textContent = `${value}`;
    root.append(label);
  }
  hit.snippet_times.forEach(([t0, t1], i) => {
    const h = (Math.max(hit.relevance[i], 0) / scale.top) * plotHeight;
    const w = Math.max(1, x(t1) - x(t0) - 1);
    root.append(svg("rect", { class: "bar", x: x(t0) + 0.5, y: y(0) - h, width: w, height: h }));
  });
  const points = hit.snippet_times.map(([t0, t1], i) => `${x((t0 + t1) / 2).toFixed(1)},${y(hit.prior[i]).toFixed(1)}`);
  root.append(svg("polyline", { class: "prior", points: points.join(" ") }));
  root.append(svg("line", { class: "axis", x1: left, x2: width - right, y1: y(0), y2: y(0) }));
  const step = niceStep(duration);
  for (let t = 0; t <= duration + 1e-9; t += step) {
    const anchor = t === 0 ? "start" : x(t) > width - 24 ? "end" : "middle";
    const label = svg("text", { x: x(t), y: height - 4, "text-anchor": anchor });
    label.textContent = `${sec(t)} s`;
    root.append(label);
  }
  if (info.player) {
    root.style.cursor = "pointer";
    root.addEventListener("click", (event) => {
      const box = root.getBoundingClientRect();
      const t = ((event.clientX - box.left) / box.width * width - left) / (width - left - right) * duration;
      play(hit, Math.min(Math.max(t, 0), duration));
    });
  }
  return root;
}

function strip(hit) {
  // One thumbnail per run of consecutive snippets, the runs in time order: it spans the run's times on the chart's
  // scale (as a share of the width both have) and shows the keyframe of the run's middle snippet. None at all
  // when the index has no keyframes.
  if (!info.keyframes) return "";
  const duration = Math.max(hit.duration, 1e-6);
  const share = (t) => (100 * chartX(t, duration)) / CHART.width;
  const n = hit.snippet_times.length;
  const count = Math.min(STRIP_FRAMES, n);
  const row = el("div", { className: "strip" });
  for (let j = 0; j < count; j++) {
    const first = Math.floor((j * n) / count), last = Math.floor(((j + 1) * n) / count) - 1;
    const slot = Math.floor((first + last) / 2);
    const start = hit.snippet_times[first][0], end = hit.snippet_times[last][1];
    const figure = el("figure", { title: `${sec(start)}–${sec(end)} s (keyframe of snippet ${slot})` }, [
      keyframeBox("frame", hit, slot, "lazy"), el("figcaption", { textContent: `${sec(start)} s` })]);
    figure.dataset.slot = slot;
    figure.style.left = `${share(start)}%`;
    figure.style.width = `${share(end) - share(start)}%`;
    figure.addEventListener("click", () => play(hit, start));
    row.append(figure);
  }
  return row;
}

function hitCard(hit, scale) {
  // The main keyframe: the peak of the strongest key segment, else the most relevant snippet.
  const best = hit.segments.length ? hit.segments[0].peak_snippet
                                   : hit.relevance.indexOf(Math.max(...hit.relevance));
  const bestStart = hit.segments.length ? hit.segments[0].start : hit.snippet_times[best][0];
  const thumb = keyframeBox("thumb", hit, best);
  thumb.title = info.keyframes ? "keyframe at the strongest key segment" : NO_KEYFRAMES;
  thumb.addEventListener("click", () => play(hit, bestStart));
  const levels = el("div", { className: "levels" });
  for (const [name, value] of Object.entries(hit.levels)) {
    levels.append(`${name} `, el("b", { textContent: value.toFixed(3) }), "   ");
  }
  const segments = el("div", { className: "segments" }, ["key segments: "]);
  if (!hit.segments.length) segments.append(el("span", { className: "none", textContent: "none (flat relevance)" }));
  for (const segment of [...hit.segments].sort((a, b) => a.start - b.start)) {   // in time order
    const button = el("button", { type: "button", textContent: `▶ ${sec(segment.start)}–${sec(segment.end)} s`,
                                  title: info.player ? "play from here" : "start the server with --videos to play" });
    button.addEventListener("click", () => {
      play(hit, segment.start);
      const img = thumb.querySelector("img");
      if (img) img.src = keyframeUrl(hit, segment.peak_snippet);
    });
    segments.append(button);
  }
  const event = hit.event ? `event ${sec(hit.event[0])}–${sec(hit.event[1])} s · ` : "";
  return el("li", { className: "hit" }, [
    thumb,
    el("div", { className: "body" }, [
      el("div", { className: "title" }, [
        el("span", { className: "rank", textContent: `#${hit.rank}` }),
        el("span", { className: "name", textContent: hit.video }),
        el("span", { className: "score", textContent: hit.score.toFixed(3), title: "combined score S = Σ λ_g S_g" }),
        el("span", { className: "levels", textContent: `${event}${sec(hit.duration)} s long` })]),
      el("div", { className: "caption", textContent: hit.caption || "" }),
      levels,
      curves(hit, scale),
      strip(hit),
      segments])]);
}

// --- searching --------------------------------------------------------------------------------------

// What an audio model takes, for the empty state and the "choose a file" error.
function audioHint() {
  if (info.audio_input === "features") {
    return `choose a .npy of per-snippet audio features, shape (N, ${info.audio_feature_dim}): N rows of ` +
           `${info.audio_clip_seconds} s of audio each, as the model was trained on (e.g. VGGish features)`;
  }
  return "choose an audio file (wav, flac, mp3, m4a) or a video with a sound track";
}

// A failed search: the error, and nothing of an earlier query's hits or player under it.
function fail(text) {
  setStatus(text, true);
  $("hits").replaceChildren();
  $("legend").hidden = true;
  $("video").pause();
  $("player").hidden = true;
}

async function search(event) {
  if (event) event.preventDefault();
  const k = $("k").value;
  let response;
  const started = performance.now();
  if (info.task === "text") {
    const q = $("text").value.trim();
    if (!q) { fail("type what to search for"); return; }
    history.replaceState(null, "", `?q=${encodeURIComponent(q)}&k=${k}`);
    setStatus("searching…");
    response = await fetch(`/api/search?q=${encodeURIComponent(q)}&k=${k}`).catch(() => null);
  } else {
    const file = $("audio").files[0];
    if (!file) {
      fail(audioHint());
      return;
    }
    if (file.size > info.max_upload_bytes) {
      fail(`${file.name} is larger than the server accepts (${+(info.max_upload_bytes / 2 ** 20).toFixed(1)} MiB)`);
      return;
    }
    const body = new FormData();
    body.append("audio", file);
    setStatus("uploading and searching…");
    response = await fetch(`/api/search?k=${k}`, { method: "POST", body }).catch(() => null);
  }
  if (!response) {
    fail("cannot reach the server (is varcmp serve still running?)");
    return;
  }
  const result = await response.json().catch(() => ({ detail: `HTTP ${response.status}` }));
  if (!response.ok) {
    fail(result.detail || `HTTP ${response.status}`);
    return;
  }
  const scale = relevanceScale(Math.max(...result.hits.flatMap((hit) => hit.relevance)));
  $("hits").replaceChildren(...result.hits.map((hit) => hitCard(hit, scale)));
  $("legend").hidden = !result.hits.length;
  const ms = Math.round(performance.now() - started);
  setStatus(`${result.hits.length} hits for “${result.query}” among ${info.videos} videos (${ms} ms)`);
}

async function start() {
  const response = await fetch("/api/info");
  info = await response.json();
  const sources = info.sources.map((s) => `${s.split} split of ${s.records}`).join(", ");
  $("info").textContent = `${info.videos} videos (${sources}) · ${info.task} model, step ${info.run.step}` +
                          (info.player ? " · videos playable" : "");
  if (info.task === "audio") {
    $("text").hidden = true;
    $("audio").hidden = false;
    if (info.audio_input === "features") $("audio").accept = ".npy";
    setStatus(audioHint());
  }
  $("query").addEventListener("submit", search);
  const params = new URLSearchParams(location.search);
  if ([...$("k").options].some((option) => option.value === params.get("k"))) $("k").value = params.get("k");
  if (info.task === "text" && params.get("q")) {
    $("text").value = params.get("q");
    search();
  }
  document.body.dataset.ready = "1";
}

start().catch((error) => setStatus(`cannot reach the server: ${error}`, true));
