// The chat page: conversation and completion views, streaming with stop, parameters, model picker, API key.
import { getJSON, streamJSON } from "./api.js";
import { renderText } from "./render.js";

const KEY_STORE = "goose.apiKey";
const PREFS_STORE = "goose.prefs";
const PARAMS = { temperature: Number, top_p: Number, max_tokens: Math.trunc, seed: Math.trunc };
const PLACEHOLDER = {
  chat: "Message (Enter sends, Shift+Enter: new line)",
  complete: "Prompt to continue (Enter sends, Shift+Enter: new line)",
};

const $ = (id) => document.getElementById(id);
const ui = {
  input: $("input"), model: $("model"), system: $("system"), transcript: $("transcript"), runs: $("runs"),
  send: $("send"), stop: $("stop"), regenerate: $("regenerate"), status: $("status"), apiKey: $("api-key"),
  keyPrompt: $("key-prompt"), keyReason: $("key-reason"), keyInput: $("key-input"),
};
const state = {
  mode: "chat",
  messages: [], // {role: "user" | "assistant", text, model?, stats?, error?, stopped?, pending?}
  runs: [], // {prompt, text, model?, stats?, error?, stopped?, pending?}
  controller: null, // the AbortController of the request in flight
  retry: 0,
};

// ---------------------------------------------------------------------------------------------- storage

const storage = {
  get(name, fallback) {
    try {
      const value = localStorage.getItem(name);
      return value === null ? fallback : value;
    } catch {
      return fallback; // storage disabled: the page still works, it just forgets
    }
  },
  set(name, value) {
    try {
      if (value) localStorage.setItem(name, value);
      else localStorage.removeItem(name);
    } catch {
      // as above
    }
  },
};

const apiKey = () => storage.get(KEY_STORE, "");

function setKey(key) {
  storage.set(KEY_STORE, key.trim());
  ui.apiKey.value = key.trim();
  loadModels();
}

function readPrefs() {
  try {
    const prefs = JSON.parse(storage.get(PREFS_STORE, "{}"));
    return prefs && typeof prefs === "object" ? prefs : {};
  } catch {
    return {};
  }
}

function savePrefs() {
  // the model list may not be loaded yet (key missing, model loading): keep the remembered choice then
  const prefs = { mode: state.mode, model: ui.model.value || readPrefs().model, system: ui.system.value };
  for (const name of Object.keys(PARAMS)) prefs[name] = $(name).value;
  storage.set(PREFS_STORE, JSON.stringify(prefs));
}

function applyPrefs(prefs) {
  for (const name of ["system", ...Object.keys(PARAMS)]) {
    if (typeof prefs[name] === "string") $(name).value = prefs[name];
  }
}

// ---------------------------------------------------------------------------------------------- small DOM helpers

function h(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function showStatus(text) {
  ui.status.textContent = text;
  ui.status.hidden = !text;
}

function askForKey() {
  ui.keyReason.textContent = apiKey()
    ? "The server refused the key this page sent (401 Unauthorized). Enter the right one:"
    : "Every /v1 call needs one (the server answered 401 Unauthorized). Enter it to chat:";
  ui.keyPrompt.hidden = false;
  ui.keyInput.focus();
}

// ---------------------------------------------------------------------------------------------- models

async function loadModels() {
  clearTimeout(state.retry);
  try {
    const list = await getJSON("v1/models", apiKey());
    const ids = (list.data || []).map((m) => m.id);
    const want = ui.model.value || readPrefs().model;
    ui.model.replaceChildren(...ids.map((id) => new Option(id, id)));
    if (ids.includes(want)) ui.model.value = want;
    ui.keyPrompt.hidden = true;
    showStatus(ids.length ? "" : "The server lists no models.");
  } catch (err) {
    if (err.status === 401) askForKey();
    else if (err.status === 503) {
      showStatus(`${err.message}; trying again…`);
      state.retry = setTimeout(loadModels, 2000);
    } else showStatus(`Could not list the models: ${err.message}`);
  }
}

// ---------------------------------------------------------------------------------------------- rendering

function statsEl(s) {
  const el = h("div", "stats");
  const add = (cls, text) => el.append(h("span", cls, text));
  if (s.stopped) add("stopped", "stopped");
  if (s.ttft === null) add("ttft", "no tokens");
  else add("ttft", `first token ${s.ttft < 1000 ? `${Math.round(s.ttft)} ms` : `${(s.ttft / 1000).toFixed(2)} s`}`);
  if (s.tps !== null) add("tps", `${s.tps.toFixed(1)} tok/s`);
  add("tokens", s.exact ? `${s.tokens} tokens` : `~${s.tokens} tokens`);
  if (s.prompt !== null) add("cached", `${s.cached} of ${s.prompt} prompt tokens cached`);
  if (s.finish === "length") add("finish", "cut at max tokens");
  el.dataset.ttftMs = s.ttft === null ? "" : Math.round(s.ttft);
  el.dataset.tps = s.tps === null ? "" : s.tps.toFixed(1);
  el.dataset.cached = s.cached;
  return el;
}

function entryEl(entry, kind) {
  const el = h("article", `entry ${kind}`);
  const body = h("div", "body");
  if (kind === "run") {
    body.append(h("span", "prompt", entry.prompt), h("span", "continuation", entry.text));
  } else {
    el.append(h("div", "who", kind === "user" ? "You" : entry.model || "Assistant"));
    renderText(body, entry.text);
  }
  el.append(body);
  if (entry.pending) {
    el.classList.add("pending");
    el.setAttribute("aria-busy", "true"); // screen readers announce the answer once, not every frame
  }
  if (entry.error) el.append(h("p", "error", entry.error.message));
  if (entry.stats) el.append(statsEl(entry.stats));
  entry.body = body;
  return el;
}

function nearBottom(view) {
  return view.scrollHeight - view.scrollTop - view.clientHeight < 48;
}

function render() {
  const stick = nearBottom(ui.transcript) && nearBottom(ui.runs);
  ui.transcript.replaceChildren(...state.messages.map((m) => entryEl(m, m.role)));
  ui.runs.replaceChildren(...state.runs.map((r) => entryEl(r, "run")));
  if (stick) for (const view of [ui.transcript, ui.runs]) view.scrollTop = view.scrollHeight;
  ui.regenerate.disabled = Boolean(state.controller) ||
    (state.mode === "chat" ? !state.messages.some((m) => m.role === "user") : !state.runs.length);
}

/** Repaint only the streaming entry (called once per animation frame at most). */
function paint(entry) {
  const view = state.mode === "chat" ? ui.transcript : ui.runs;
  const stick = nearBottom(view);
  if (entry.prompt !== undefined) entry.body.lastChild.textContent = entry.text;
  else renderText(entry.body, entry.text);
  if (stick) view.scrollTop = view.scrollHeight;
}

function setBusy(controller) {
  state.controller = controller;
  ui.send.hidden = Boolean(controller);
  ui.stop.hidden = !controller;
  if (!controller && document.activeElement === ui.stop) ui.input.focus();
}

// ---------------------------------------------------------------------------------------------- streaming

function params() {
  const body = { stream: true, stream_options: { include_usage: true } };
  if (ui.model.value) body.model = ui.model.value;
  for (const [name, convert] of Object.entries(PARAMS)) {
    const raw = $(name).value.trim();
    const value = raw === "" ? NaN : convert(Number(raw));
    if (Number.isFinite(value)) body[name] = value;
  }
  return body;
}

/** Stream path's answer into entry.text (pick: a choice's new text), then set entry.stats / .error / .stopped. */
async function stream(entry, path, body, pick) {
  const controller = new AbortController();
  setBusy(controller);
  entry.model = body.model;
  entry.pending = true;
  render();
  const t0 = performance.now();
  let first = null;
  let last = null;
  let pieces = 0;
  let usage = null;
  let finish = null;
  let frame = 0;
  try {
    for await (const event of streamJSON(path, body, apiKey(), controller.signal)) {
      if (event.usage) usage = event.usage;
      const choice = (event.choices || [])[0];
      if (!choice) continue;
      finish = choice.finish_reason || finish;
      const piece = pick(choice);
      if (!piece) continue;
      last = performance.now();
      first = first === null ? last : first;
      pieces += 1;
      entry.text += piece;
      frame = frame || requestAnimationFrame(() => { frame = 0; paint(entry); });
    }
  } catch (err) {
    if (err.name === "AbortError") entry.stopped = true;
    else entry.error = err;
  } finally {
    cancelAnimationFrame(frame);
    entry.pending = false;
    setBusy(null);
  }
  if (!entry.error) entry.stats = figures({ t0, first, last, pieces, usage, finish, stopped: entry.stopped });
}

/** Time to first token, decode speed and cache use of one answer (usage comes with the last chunk). */
function figures({ t0, first, last, pieces, usage, finish, stopped }) {
  const tokens = usage ? usage.completion_tokens : pieces;
  const details = (usage && usage.prompt_tokens_details) || {};
  return {
    stopped: Boolean(stopped), finish, tokens, exact: Boolean(usage),
    ttft: first === null ? null : first - t0,
    tps: tokens > 1 && last > first ? ((tokens - 1) * 1000) / (last - first) : null,
    prompt: usage ? usage.prompt_tokens : null,
    cached: details.cached_tokens || 0,
  };
}

// ---------------------------------------------------------------------------------------------- actions

/** Answer the conversation as it stands; on 401 undo (restore) and ask for the key. */
async function answer(undo) {
  const system = ui.system.value.trim();
  const history = state.messages.filter((m) => !m.error || m.text).map((m) => ({ role: m.role, content: m.text }));
  const messages = system ? [{ role: "system", content: system }, ...history] : history;
  const entry = { role: "assistant", text: "" };
  state.messages.push(entry);
  await stream(entry, "v1/chat/completions", { ...params(), messages }, (c) => c.delta && c.delta.content);
  if (entry.error && entry.error.status === 401) {
    state.messages.pop();
    undo();
    askForKey();
  }
  render();
}

async function complete(prompt, replaced) {
  const entry = { prompt, text: "" };
  state.runs.push(entry);
  await stream(entry, "v1/completions", { ...params(), prompt }, (c) => c.text);
  if (entry.error && entry.error.status === 401) {
    state.runs.pop();
    if (replaced) state.runs.push(replaced);
    askForKey();
  }
  render();
}

function send() {
  const text = ui.input.value;
  if (state.controller || !text.trim()) return;
  if (state.mode === "complete") {
    complete(text, null);
    return;
  }
  const before = state.messages.length;
  state.messages.push({ role: "user", text });
  ui.input.value = "";
  answer(() => {
    state.messages.length = before;
    ui.input.value = ui.input.value || text;
  });
}

function regenerate() {
  if (state.controller) return;
  if (state.mode === "complete") {
    const replaced = state.runs.pop();
    if (replaced) complete(replaced.prompt, replaced);
    return;
  }
  const lastUser = state.messages.map((m) => m.role).lastIndexOf("user");
  if (lastUser < 0) return;
  const removed = state.messages.splice(lastUser + 1);
  answer(() => state.messages.push(...removed));
}

function newChat() {
  if (state.controller) state.controller.abort();
  if (state.mode === "chat") state.messages = [];
  else state.runs = [];
  render();
  ui.input.focus();
}

function setMode(mode) {
  state.mode = mode;
  $("mode-chat").setAttribute("aria-pressed", String(mode === "chat"));
  $("mode-complete").setAttribute("aria-pressed", String(mode === "complete"));
  ui.transcript.hidden = mode !== "chat";
  ui.runs.hidden = mode === "chat";
  $("system-field").hidden = mode !== "chat"; // a raw completion has no system prompt
  ui.input.placeholder = PLACEHOLDER[mode];
  ui.input.setAttribute("aria-label", mode === "chat" ? "Message" : "Prompt");
  $("new-chat").textContent = mode === "chat" ? "New chat" : "Clear";
  savePrefs();
  render();
}

// ---------------------------------------------------------------------------------------------- wiring

function wire() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  ui.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    } else if (e.key === "Escape" && state.controller) state.controller.abort();
  });
  ui.stop.addEventListener("click", () => state.controller && state.controller.abort());
  ui.regenerate.addEventListener("click", regenerate);
  $("new-chat").addEventListener("click", newChat);
  $("mode-chat").addEventListener("click", () => setMode("chat"));
  $("mode-complete").addEventListener("click", () => setMode("complete"));
  $("toggle-settings").addEventListener("click", (e) => {
    const open = document.body.classList.toggle("settings-open");
    e.currentTarget.setAttribute("aria-expanded", String(open));
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (!ui.keyInput.value.trim()) return;
    setKey(ui.keyInput.value);
    ui.keyInput.value = "";
    ui.input.focus();
  });
  ui.apiKey.addEventListener("change", () => setKey(ui.apiKey.value));
  $("forget-key").addEventListener("click", () => setKey(""));
  for (const el of [ui.model, ui.system, ...Object.keys(PARAMS).map($)]) el.addEventListener("input", savePrefs);
}

function start() {
  const prefs = readPrefs();
  applyPrefs(prefs);
  ui.apiKey.value = apiKey();
  wire();
  setMode(prefs.mode === "complete" ? "complete" : "chat");
  loadModels();
  if (window.matchMedia("(pointer: fine)").matches) ui.input.focus();
}

start();
