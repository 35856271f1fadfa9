// The annotation page: talks to /api/ with the token in the X-Annotator-Token header.
"use strict";

const FLAG_KEYS = ["KeyQ", "KeyW", "KeyE", "KeyR", "KeyT", "KeyY", "KeyU", "KeyI", "KeyO"];
const state = { token: sessionStorage.getItem("token") || "", task: "instances",
  inst: null, choice: null, showHQ: false, cmp: null, busy: false, zoom: 1 };
const ZOOMS = [1, 2, 4];
const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const options = { headers: { "X-Annotator-Token": state.token } };
  if (body !== undefined) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  if (response.status === 401) { logout("Unknown token."); throw new Error("401"); }
  if (!response.ok) {
    const text = await response.text();
    throw new Error(`${response.status}: ${text}`);
  }
  return response;
}

async function imageInto(img, path) {
  const blob = await (await api(path)).blob();
  if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
  img.dataset.url = URL.createObjectURL(blob);
  img.src = img.dataset.url;
  await img.decode().catch(() => {});
}

function logout(message) {
  sessionStorage.removeItem("token");
  state.token = "";
  $("login").hidden = false;
  $("tabs").hidden = true;
  $("instances").hidden = true;
  $("compare").hidden = true;
  $("login-error").textContent = message || "";
}

async function login(token) {
  state.token = token;
  const me = await (await api("/api/me")).json();
  sessionStorage.setItem("token", token);
  $("login").hidden = true;
  $("tabs").hidden = false;
  $("who").textContent = `annotator: ${me.annotator}` + (me.compare ? ` · round ${me.round}` : "");
  $("tab-compare").hidden = !me.compare;
  await show(location.hash === "#compare" && me.compare ? "compare" : "instances");
}

async function show(task) {
  state.task = task;
  $("instances").hidden = task !== "instances";
  $("compare").hidden = task !== "compare";
  $("tab-instances").classList.toggle("active", task === "instances");
  $("tab-compare").classList.toggle("active", task === "compare");
  location.hash = task;
  if (task === "instances") await nextInstance(); else await nextCompare();
}

// ------------------------------------------------------------------ instances

function progressText(p) { return `${p.done} / ${p.total} done`; }

async function nextInstance() {
  const data = await (await api("/api/instances/next")).json();
  $("inst-progress").textContent = progressText(data.progress);
  state.inst = data.task;
  state.choice = { best: null, worst: null, flagged: new Set() };
  $("inst-description").value = "";
  $("inst-done").hidden = !data.done;
  $("inst-grid").hidden = data.done;
  document.querySelector("#instances .feedback").hidden = data.done;
  if (data.done) { $("inst-title").textContent = ""; document.body.dataset.ready = "instances:done"; return; }
  const task = data.task;
  $("inst-title").textContent = `image ${task.image_id}, instance ${task.instance_id}`;
  const grid = $("inst-grid");
  grid.innerHTML = "";
  const reference = card("LQ", "lq", null);
  reference.classList.add("reference");
  grid.appendChild(reference);
  task.slots.forEach((letter, i) => grid.appendChild(card(`${letter} (${i + 1})`, String(i), i)));
  const hq = card("HQ", "hq", null);
  hq.classList.add("reference");
  hq.id = "inst-hq-card";
  hq.hidden = !state.showHQ;
  grid.appendChild(hq);
  await Promise.all([...grid.querySelectorAll("img")].map(
    (img) => imageInto(img, `/api/images/instance/${task.n}/${img.dataset.view}`)));
  renderChoice();
  $("inst-status").textContent = "";
  document.body.dataset.ready = `instances:${task.n}`;  // shown and taking keys
}

function card(label, view, index) {
  const div = document.createElement("div");
  div.className = "card";
  const img = document.createElement("img");
  img.dataset.view = view;
  img.alt = label;
  const frame = document.createElement("div");
  frame.className = "zoom";
  frame.appendChild(img);
  div.appendChild(frame);
  const name = document.createElement("div");
  name.className = "label";
  name.textContent = label;
  div.appendChild(name);
  if (index !== null) {
    div.dataset.index = index;
    const choices = document.createElement("div");
    choices.className = "choices";
    for (const [kind, text] of [["best", "Best"], ["worst", "Worst"], ["flag", "Hallucinates"]]) {
      const button = document.createElement("button");
      button.className = `pick-${kind}`;
      button.textContent = text;
      button.addEventListener("click", () => pick(kind, index));
      choices.appendChild(button);
    }
    div.appendChild(choices);
  }
  return div;
}

function pick(kind, index) {
  if (!state.inst || index >= state.inst.slots.length) return;
  const c = state.choice;
  if (kind === "best") { c.best = index; if (c.worst === index) c.worst = null; }
  if (kind === "worst") { c.worst = index; if (c.best === index) c.best = null; }
  if (kind === "flag") { if (c.flagged.has(index)) c.flagged.delete(index); else c.flagged.add(index); }
  renderChoice();
}

function renderChoice() {
  const c = state.choice;
  for (const div of document.querySelectorAll("#inst-grid .card[data-index]")) {
    const i = Number(div.dataset.index);
    div.classList.toggle("best", c.best === i);
    div.classList.toggle("worst", c.worst === i);
    div.classList.toggle("flagged", c.flagged.has(i));
  }
  $("inst-submit").disabled = c.best === null || c.worst === null;
}

async function submitInstance(skip) {
  if (!state.inst || state.busy) return;
  const c = state.choice;
  if (!skip && (c.best === null || c.worst === null)) {
    $("inst-status").textContent = "Pick a best and a worst candidate first.";
    $("inst-status").className = "status error";
    return;
  }
  const body = skip ? { skip: true } : { best: c.best, worst: c.worst,
    flagged: [...c.flagged].sort(), description: $("inst-description").value };
  state.busy = true;
  try {
    await api(`/api/instances/${state.inst.n}`, body);
    $("inst-status").className = "status";
    await nextInstance();
    $("inst-status").textContent = skip ? "Skipped." : "Saved.";
  } catch (error) {
    $("inst-status").className = "status error";
    $("inst-status").textContent = `Not saved: ${error.message}`;
  } finally { state.busy = false; }
}

function toggleHQ() {
  state.showHQ = !state.showHQ;
  const hq = $("inst-hq-card");
  if (hq) hq.hidden = !state.showHQ;
}

// ------------------------------------------------------------------ compare

async function nextCompare() {
  const data = await (await api("/api/compare/next")).json();
  $("cmp-progress").textContent = progressText(data.progress);
  state.cmp = data.task;
  $("cmp-done").hidden = !data.done;
  $("cmp-row").hidden = data.done;
  document.querySelector("#compare .answers").hidden = data.done;
  if (data.done) { document.body.dataset.ready = "compare:done"; return; }
  const n = data.task.n;
  await Promise.all([["cmp-left", "left"], ["cmp-lq", "lq"], ["cmp-right", "right"]].map(
    ([id, side]) => imageInto($(id), `/api/images/compare/${n}/${side}`)));
  document.body.dataset.ready = `compare:${n}`;
}

async function answer(value) {
  if (!state.cmp || state.busy) return;
  state.busy = true;
  try {
    await api(`/api/compare/${state.cmp.n}`, { answer: value });
    await nextCompare();
    $("cmp-status").className = "status";
    $("cmp-status").textContent = "Saved.";
  } catch (error) {
    $("cmp-status").className = "status error";
    $("cmp-status").textContent = `Not saved: ${error.message}`;
  } finally { state.busy = false; }
}

// ------------------------------------------------------------------ synchronised zoom

function cycleZoom() {
  state.zoom = ZOOMS[(ZOOMS.indexOf(state.zoom) + 1) % ZOOMS.length];
  document.body.dataset.zoom = state.zoom;
  for (const label of document.querySelectorAll(".zoom-level")) {
    label.textContent = `Zoom ${state.zoom}× (z)`;
  }
}

// the pointer's place in the image it is over becomes every image's magnified spot
function followPointer(e) {
  const frame = e.target.closest(".zoom");
  if (!frame) return;
  const box = frame.getBoundingClientRect();
  const share = (offset, size) => Math.min(1, Math.max(0, offset / size)) * 100;
  document.body.style.setProperty("--zoom-x", `${share(e.clientX - box.left, box.width)}%`);
  document.body.style.setProperty("--zoom-y", `${share(e.clientY - box.top, box.height)}%`);
}

// ------------------------------------------------------------------ keys and wiring

document.addEventListener("keydown", (e) => {
  if ($("login").hidden === false) return;
  const typing = e.target.tagName === "INPUT";
  if (e.key === "z" && !typing && !e.ctrlKey && !e.metaKey && !e.altKey) { cycleZoom(); return; }
  if (state.task === "instances" && state.inst) {
    if (e.key === "Enter") { e.preventDefault(); submitInstance(false); return; }
    if (typing) { if (e.key === "Escape") e.target.blur(); return; }
    const digit = e.code.startsWith("Digit") ? Number(e.code.slice(5)) : 0;
    if (digit >= 1) { pick(e.shiftKey ? "worst" : "best", digit - 1); e.preventDefault(); return; }
    const flag = FLAG_KEYS.indexOf(e.code);
    if (flag >= 0) { pick("flag", flag); return; }
    if (e.key === "/") { e.preventDefault(); $("inst-description").focus(); return; }
    if (e.key === "s") { submitInstance(true); return; }
    if (e.key === "h") { toggleHQ(); return; }
  }
  if (state.task === "compare" && state.cmp && !typing) {
    const keys = { "1": "left", ArrowLeft: "left", "2": "right", ArrowRight: "right",
      "3": "tie", t: "tie", "4": "both_bad", b: "both_bad" };
    if (keys[e.key]) { e.preventDefault(); answer(keys[e.key]); }
  }
});

document.addEventListener("pointermove", followPointer);
$("login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  login($("token").value.trim()).catch(() => {});
});
$("inst-submit").addEventListener("click", () => submitInstance(false));
$("inst-skip").addEventListener("click", () => submitInstance(true));
$("inst-hq").addEventListener("click", toggleHQ);
$("tab-instances").addEventListener("click", () => show("instances"));
$("tab-compare").addEventListener("click", () => show("compare"));
for (const button of document.querySelectorAll("[data-answer]")) {
  button.addEventListener("click", () => answer(button.dataset.answer));
}
if (state.token) login(state.token).catch(() => {});
