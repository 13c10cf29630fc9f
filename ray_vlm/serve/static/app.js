// ray-vlm web page: query box -> POST /v1/search -> per-video timelines with moment bars and thumbnails;
// clicking a moment plays it (the file endpoint honours HTTP Range, so the player seeks). Plain JS, no CDN.
// Every string from the server is written with textContent (never innerHTML).
"use strict";

const TOKEN_KEY = "ray_vlm_token";
const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem(TOKEN_KEY) || "", videos: {}, stopAt: null };

// The token is exchanged once for the server's HttpOnly session cookie, which <img> and <video> requests (they
// cannot send a header) carry; fetches send the token as a header. It is never put in a URL.
async function setToken(token) {
  state.token = token || "";
  if (!state.token) return;
  sessionStorage.setItem(TOKEN_KEY, state.token);
  const resp = await fetch("/v1/session", { method: "POST", headers: headers(false) });
  if (!resp.ok) status(await failure(resp), true);
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.token) h["Authorization"] = `Bearer ${state.token}`;
  return h;
}

function status(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.className = isError ? "error" : "";
}

async function failure(resp) {
  if (resp.status === 401) {
    $("token-form").hidden = false;
    $("token").focus();
    return "This service needs a token: enter it above.";
  }
  let detail = resp.statusText;
  try {
    const body = await resp.json();
    detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (e) { /* not JSON */ }
  return `Error ${resp.status}: ${detail}`;
}

async function loadVideos() {
  const resp = await fetch("/v1/videos", { headers: headers(false) });
  if (!resp.ok) throw new Error(await failure(resp));
  const body = await resp.json();
  state.videos = {};
  for (const v of body.videos) state.videos[v.video_id] = v;
}

function fileName(uri) {
  const parts = uri.split("/");
  return parts[parts.length - 1] || uri;
}

function fmt(t) {
  const m = Math.floor(t / 60), s = t - 60 * m;
  return m > 0 ? `${m}:${s.toFixed(1).padStart(4, "0")}` : `${s.toFixed(1)}s`;
}

function render(moments) {
  const box = $("results");
  box.replaceChildren();
  const groups = new Map();  // video_id -> moments, in order of each video's best moment
  for (const m of moments) {
    if (!groups.has(m.video_id)) groups.set(m.video_id, []);
    groups.get(m.video_id).push(m);
  }
  for (const [vid, ms] of groups) {
    const info = state.videos[vid] || {};
    const maxEnd = Math.max(...ms.map((m) => m.end_s));
    const duration = info.duration_s && info.duration_s > 0 ? Math.max(info.duration_s, maxEnd) : maxEnd;
    const sec = document.createElement("section");
    sec.className = "video";
    sec.dataset.videoId = vid;
    const h = document.createElement("h3");
    h.textContent = fileName(ms[0].uri) + " ";
    const small = document.createElement("small");
    small.textContent = `${fmt(duration)} · ${ms.length} moment${ms.length > 1 ? "s" : ""}`;
    h.append(small);
    const line = document.createElement("div");
    line.className = "timeline";
    line.title = "moments on the video's timeline";
    const thumbs = document.createElement("div");
    thumbs.className = "thumbs";
    ms.forEach((m, i) => {
      const bar = document.createElement("div");
      bar.className = "moment-bar";
      bar.style.left = `${(100 * m.start_s) / duration}%`;
      bar.style.width = `${(100 * (m.end_s - m.start_s)) / duration}%`;
      bar.title = `${fmt(m.start_s)}–${fmt(m.end_s)} (score ${m.score.toFixed(2)})`;
      bar.onclick = () => play(m);
      line.append(bar);
      const card = document.createElement("div");
      card.className = "moment";
      card.dataset.start = m.start_s;
      card.dataset.end = m.end_s;
      card.dataset.videoId = vid;
      const img = document.createElement("img");
      img.loading = "lazy";
      img.alt = `${fileName(m.uri)} at ${fmt(m.peak_s)}`;
      img.src = `/v1/videos/${encodeURIComponent(vid)}/thumbnail?t=${m.peak_s.toFixed(2)}&width=320`;
      const label = document.createElement("div");
      label.className = "label";
      label.textContent = `${fmt(m.start_s)}–${fmt(m.end_s)}`;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = m.score.toFixed(2);
      label.append(score);
      if (m.tracks && m.tracks.length) {
        const tracks = document.createElement("span");
        tracks.className = "tracks";
        tracks.textContent = m.tracks.join("+");
        label.append(tracks);
      }
      img.onerror = () => { img.hidden = true; };  // audio-only sources have no picture
      card.append(img, label);
      for (const e of m.evidence || []) {  // the words spoken, the text on screen
        const ev = document.createElement("div");
        ev.className = `evidence ${e.track}`;
        ev.textContent = `${fmt(e.start_s)} [${e.track}] ${e.text}`;
        card.append(ev);
      }
      card.onclick = () => play(m);
      thumbs.append(card);
    });
    sec.append(h, line, thumbs);
    box.append(sec);
  }
}

function play(m) {
  const player = $("player");
  $("player-box").hidden = false;
  $("player-caption").textContent = `${fileName(m.uri)}: ${fmt(m.start_s)}–${fmt(m.end_s)}`;
  state.stopAt = m.end_s;
  const src = `/v1/videos/${encodeURIComponent(m.video_id)}/file`;
  const start = () => { player.currentTime = m.start_s; player.play().catch(() => {}); };
  if (player.dataset.src === src && player.readyState >= 1) {
    start();
  } else {
    player.dataset.src = src;
    player.src = `${src}#t=${m.start_s},${m.end_s}`;
    player.onloadedmetadata = start;
  }
  player.dataset.playing = `${m.video_id}@${m.start_s}`;
  $("player-box").scrollIntoView({ behavior: "smooth", block: "nearest" });
}

async function search(query, topK) {
  status(`Searching for “${query}”…`);
  document.body.dataset.state = "busy";
  try {
    await loadVideos();
    const resp = await fetch("/v1/search", {
      method: "POST", headers: headers(true), body: JSON.stringify({ query: query, top_k: topK }),
    });
    if (!resp.ok) throw new Error(await failure(resp));
    const body = await resp.json();
    render(body.moments);
    const nv = new Set(body.moments.map((m) => m.video_id)).size;
    const plural = (n, w) => `${n} ${w}${n === 1 ? "" : "s"}`;
    status(`${plural(body.moments.length, "moment")} in ${plural(nv, "video")} for “${body.query}” ` +
           `(store version ${body.store_version})`);
    document.body.dataset.state = "done";
    return body.moments;
  } catch (e) {
    status(e.message, true);
    document.body.dataset.state = "error";
    return [];
  }
}

async function ask(question, topK) {
  status(`Asking “${question}”…`);
  $("answer").hidden = false;
  const out = $("answer-text");
  out.textContent = "";
  try {
    await loadVideos();
    const resp = await fetch("/v1/ask", {
      method: "POST", headers: headers(true), body: JSON.stringify({ question: question, top_k: Math.min(topK, 20) }),
    });
    if (!resp.ok) throw new Error(await failure(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const ev = /^event: (.*)$/m.exec(block), data = /^data: (.*)$/m.exec(block);
        if (!ev || !data) continue;
        const payload = JSON.parse(data[1]);
        if (ev[1] === "moments") render(payload.moments);
        else if (ev[1] === "token") out.textContent += payload;
        else if (ev[1] === "error") throw new Error(`Error ${payload.status}: ${payload.detail}`);
        else if (ev[1] === "done") status(`Answered by ${payload.answerer}`);
      }
    }
    document.body.dataset.state = "done";
  } catch (e) {
    status(e.message, true);
    document.body.dataset.state = "error";
  }
}

function topK() {
  const k = parseInt($("top-k").value, 10);
  return Number.isFinite(k) && k > 0 ? Math.min(k, 100) : 8;
}

$("search-form").onsubmit = (ev) => {
  ev.preventDefault();
  const q = $("query").value.trim();
  if (q) search(q, topK());
};
$("ask-button").onclick = () => {
  const q = $("query").value.trim();
  if (q) ask(q, topK());
};
$("token-form").onsubmit = async (ev) => {
  ev.preventDefault();
  await setToken($("token").value);
  $("token").value = "";
  $("token-form").hidden = true;
  const q = $("query").value.trim();
  if (q) search(q, topK());
};
// What the player did, kept on the element for tests and for anyone inspecting the page.
$("player").onerror = () => { $("player").dataset.error = String($("player").error && $("player").error.code); };
$("player").ontimeupdate = () => {
  const p = $("player");
  p.dataset.time = p.currentTime.toFixed(2);
  if (state.stopAt !== null && p.currentTime >= state.stopAt) { p.pause(); state.stopAt = null; }
};

// #token=T (a fragment never reaches a server or its logs; kept in this tab's sessionStorage, then removed
// from the address bar), ?q=... searches at once.
(async function init() {
  const params = new URLSearchParams(location.search);
  // (not URLSearchParams: it would turn a token's "+" into a space)
  const fragment = /^#token=(.*)$/s.exec(location.hash);
  if (fragment) {
    let token = fragment[1];
    try { token = decodeURIComponent(token); } catch (e) { /* not percent-encoded: as typed */ }
    history.replaceState(null, "", location.pathname + location.search);
    await setToken(token);
  } else if (state.token) {
    await setToken(state.token);
  }
  if (params.has("k")) $("top-k").value = params.get("k");
  if (params.has("q")) {
    $("query").value = params.get("q");
    // ?play=N plays the N-th moment once the results are in (what a click does)
    search(params.get("q"), topK()).then((ms) => {
      const i = parseInt(params.get("play"), 10);
      if (Number.isFinite(i) && ms[i]) play(ms[i]);
    });
  } else {
    status("Type what you are looking for, e.g. “a person riding a bicycle”.");
  }
})();
