// Small DOM and formatting helpers. Everything is built with the DOM API (never
// innerHTML with data), so text from jobs and webhooks can never become markup.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  for (const child of children) el.append(child);
  return el;
}

export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

const FINISHED = new Set(["completed", "failed", "canceled"]);
export const isFinished = (status) => FINISHED.has(status);

export function badge(status) {
  return h("span", { class: `badge badge-${status || "unknown"}` }, status || "unknown");
}

export function progressBar(done, failed, total, label) {
  const safeTotal = Math.max(total || 0, 1);
  const bar = h("div", {
    class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": safeTotal,
    "aria-valuenow": done, "aria-label": label,
  });
  const ok = h("span", { class: "progress-ok" });
  const bad = h("span", { class: "progress-failed" });
  ok.style.width = `${(100 * done) / safeTotal}%`;
  bad.style.width = `${(100 * failed) / safeTotal}%`;
  bar.append(ok, bad);
  return bar;
}

// A job id's last 8 characters: its first ones are its creation time (UUIDv7), shared by
// every job made in the same minute; the tail is random. The search finds a job by it.
export function shortId(id) {
  return id ? id.slice(-8) : "";
}

export function age(iso, now = Date.now()) {
  if (!iso) return "";
  const seconds = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
  return `${Math.floor(seconds / 86400)} d`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "–";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  const rest = Math.round(seconds % 60);
  return rest ? `${Math.floor(seconds / 60)} min ${rest} s` : `${Math.floor(seconds / 60)} min`;
}

export function between(start, end) {
  if (!start || !end) return null;
  const seconds = (Date.parse(end) - Date.parse(start)) / 1000;
  return seconds >= 0 ? seconds : null;
}

export function time(iso, { short = false } = {}) {
  if (!iso) return "–";
  const date = new Date(iso);
  return h("time", { datetime: iso, title: date.toLocaleString() },
    short ? date.toLocaleTimeString() : date.toLocaleString());
}

const BYTE_UNITS = ["B", "KB", "MB", "GB", "TB"];

export function bytes(n) {
  if (n === null || n === undefined) return "";
  let i = 0;
  while (n >= 1024 && i < BYTE_UNITS.length - 1) { n /= 1024; i += 1; }
  return i ? `${n.toFixed(1)} ${BYTE_UNITS[i]}` : `${n} B`;
}

// A setting's name (RECONCILE_AFTER_SECONDS) that a narrow card may wrap only after an
// underscore, never mid-word; copied, it is the name as typed (<wbr> adds no character).
export function settingName(name) {
  return h("code", { class: "setting" },
    name.split("_").flatMap((part, i) => (i ? ["_", h("wbr"), part] : [part])));
}

export function announce(text) {
  const region = document.getElementById("announcer");
  if (region) {
    region.textContent = "";
    setTimeout(() => { region.textContent = text; }, 50);
  }
}
