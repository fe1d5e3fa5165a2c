// The dashboard: a hash router over three views (job list, job detail, new job), the
// Refresh button with "updated N s ago", and the auto-refresh toggle that turns on live
// updates (the service's event stream, else polling).

import { api, setApiKey } from "./api.js";
import { announce, h, replace } from "./dom.js";
import { mountDetail } from "./detail.js";
import { mountForm } from "./form.js";
import { mountList } from "./list.js";
import { startLive } from "./live.js";

const AUTO_KEY = "dashboard.autoRefresh";
const state = { config: null, view: null, updatedAt: null, stopLive: null, pending: new Set(), timer: null };

const main = document.getElementById("main");
const refreshButton = document.getElementById("refresh");
const updated = document.getElementById("updated");
const auto = document.getElementById("auto");
const liveStatus = document.getElementById("live-status");

function route() {
  const hash = location.hash || "#/";
  if (!hash.startsWith("#/")) return null;  // an in-page link such as the skip link
  const [path, query] = hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  const job = path.match(/^\/jobs\/([0-9a-fA-F-]{36})$/);
  if (job) return { name: "detail", id: job[1].toLowerCase(), params };
  if (path === "/new") return { name: "new", params };
  return { name: "list", params };
}

function navigate(hash) {
  if (location.hash === hash) render();
  else location.hash = hash;
}

function render() {
  const target = route();
  if (!target) return;
  if (state.view) state.view.dispose?.();
  for (const link of document.querySelectorAll("[data-nav]")) {
    const current = link.dataset.nav === (target.name === "new" ? "new" : "jobs");
    if (current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const ctx = { config: state.config, navigate, loaded };
  const mount = { list: mountList, detail: mountDetail, new: mountForm }[target.name];
  replace(main);
  state.view = mount(main, target, ctx);
  refresh();
}

async function refresh() {
  if (!state.view?.refresh) return;
  refreshButton.disabled = true;
  refreshButton.setAttribute("aria-busy", "true");
  try {
    await state.view.refresh();
    loaded();
  } catch (error) {
    if (error.name !== "AbortError") updated.textContent = `Refresh failed: ${error.message}`;
  } finally {
    refreshButton.disabled = false;
    refreshButton.removeAttribute("aria-busy");
  }
}

function loaded() {
  state.updatedAt = Date.now();
  tick();
}

function tick() {
  if (!state.updatedAt) return;
  const seconds = Math.round((Date.now() - state.updatedAt) / 1000);
  updated.textContent = seconds < 2 ? "Updated just now" : `Updated ${seconds} s ago`;
}

// Live updates name the jobs that changed; a burst of them becomes one refetch.
function changed(ids) {
  for (const id of ids) state.pending.add(id);
  clearTimeout(state.timer);
  state.timer = setTimeout(async () => {
    const batch = [...state.pending];
    state.pending.clear();
    if (state.view?.changed && (await state.view.changed(batch))) loaded();
  }, 300);
}

function setAuto(on) {
  localStorage.setItem(AUTO_KEY, on ? "on" : "off");
  if (state.stopLive) state.stopLive();
  state.stopLive = null;
  if (!on) {
    liveStatus.textContent = "Off: press Refresh";
    return;
  }
  state.stopLive = startLive(state.config, {
    changed,
    status: (text) => { liveStatus.textContent = text; },
  });
}

function askForKey(message) {
  if (state.view) state.view.dispose?.();
  state.view = null;
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off", required: true });
  const remember = h("input", { id: "remember-key", type: "checkbox" });
  const form = h("form", { class: "panel key-form", onsubmit: (event) => {
    event.preventDefault();
    if (!input.value.trim()) return;
    setApiKey(input.value.trim(), remember.checked);
    render();
  } },
  h("h1", {}, "API key"),
  h("p", {}, message),
  h("label", { for: "api-key" }, "API key (one of the service's API_KEYS)"), input,
  h("div", { class: "check" }, remember, h("label", { for: "remember-key" }, "Remember on this device")),
  h("button", { type: "submit", class: "primary" }, "Use this key"));
  replace(main, form);
  input.focus();
}

async function start() {
  try {
    state.config = await api.config();
  } catch (error) {
    replace(main, h("p", { class: "callout callout-error" }, `The service could not be reached: ${error.message}`));
    return;
  }
  refreshButton.addEventListener("click", () => { refresh(); announce("Refreshed"); });
  auto.checked = localStorage.getItem(AUTO_KEY) === "on";
  auto.addEventListener("change", () => setAuto(auto.checked));
  window.addEventListener("hashchange", render);
  window.addEventListener("api-unauthorized", () => askForKey(
    "The service needs an API key for this, or refused the one given."));
  setInterval(tick, 1000);
  setAuto(auto.checked);
  render();
}

start();
