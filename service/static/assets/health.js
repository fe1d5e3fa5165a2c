// The webhook health panel: webhooks per minute, signature failures, duplicates, p95 time
// to acknowledge, and jobs stuck past the reconciler's threshold.

import { api } from "./api.js";
import { badge, bytes, duration, h, replace, settingName, shortId, svg } from "./dom.js";

const WINDOW_KEY = "dashboard.healthWindow";
const WINDOW_NAMES = { 15: "15 min", 60: "1 hour", 360: "6 hours", 1440: "24 hours" };

const ACK_TIP = "How long the service took to acknowledge a webhook, measured as recorded_at "
  + "(when the database stored the event) minus metadata.received_at (when the request "
  + "reached the handler). A proxy: it leaves out reading the request and sending the answer, "
  + "and the two clocks (service and database) may differ slightly.";

export function healthPanel(config) {
  const windows = config.health_windows || [15, 60, 360, 1440];
  let minutes = Number(localStorage.getItem(WINDOW_KEY)) || 60;
  if (!windows.includes(minutes)) minutes = 60;
  const select = h("select", { id: "health-window" },
    windows.map((m) => h("option", { value: m, selected: m === minutes }, WINDOW_NAMES[m] || `${m} min`)));
  const body = h("div", { class: "health-body" }, h("p", { class: "muted" }, "Loading…"));
  const section = h("section", { class: "panel health", "aria-labelledby": "health-title" },
    h("div", { class: "panel-head" },
      h("h2", { id: "health-title" }, "Webhook health"),
      h("div", { class: "inline-field" }, h("label", { for: "health-window" }, "Window"), select)),
    body);
  const panel = {
    element: section,
    async refresh(signal) {
      const report = await api.health(minutes, signal);
      render(body, report, config);
      return report;
    },
  };
  select.addEventListener("change", () => {
    minutes = Number(select.value);
    localStorage.setItem(WINDOW_KEY, String(minutes));
    panel.refresh().catch(() => {});
  });
  return panel;
}

function stat(label, value, detail, { tone = "", tip = null, id } = {}) {
  return h("div", { class: `stat ${tone}`, dataset: { stat: id } },
    h("dt", { title: tip || undefined }, label, tip ? tipButton(id, tip) : null),
    h("dd", { class: "stat-value" }, value),
    detail ? h("dd", { class: "stat-detail" }, detail) : null);
}

function tipButton(id, text) {
  return h("details", { class: "tip" },
    h("summary", { "aria-label": "What this measures" }, "?"),
    h("p", { id: `${id}-tip` }, text));
}

// The store: its size, the delivery log's oldest day, and when retention last ran.
function storeStats(store) {
  const kept = store.retention_days
    ? [`kept ${store.retention_days} days (`, settingName("EVENTS_RAW_RETENTION_DAYS"), ")"]
    : "kept forever";
  const pruned = store.pruned_at
    ? `${new Date(store.pruned_at).toLocaleString()}, freed ${bytes(store.pruned_bytes)}`
    : "never (the worker runs it daily)";
  return [
    stat("Store size", bytes(store.database_bytes),
      `events ${bytes(store.events_bytes)} in ${store.event_partitions} partitions; delivery log ${bytes(store.deliveries_bytes)}`,
      { id: "store-size" }),
    stat("Delivery log since", store.deliveries_oldest ? store.deliveries_oldest.slice(0, 10) : "–",
      ["whole webhook bodies, ", kept], { id: "deliveries-oldest" }),
    stat("Retention last ran", store.pruned_at ? store.pruned_at.slice(0, 10) : "never", pruned,
      { id: "retention" }),
  ];
}

function render(body, report, config) {
  const w = report.webhooks;
  const window = WINDOW_NAMES[report.window_minutes] || `${report.window_minutes} min`;
  const ack = report.ack_ms.p95 === null ? "–" : duration(report.ack_ms.p95 / 1000);
  const stuck = report.stuck;
  const others = Object.entries(report.unrecorded)
    .filter(([name]) => !["bad_signature", "duplicate"].includes(name))
    .map(([name, n]) => `${n} ${name.replace(/_/g, " ")}`);
  const stats = h("dl", { class: "stats" },
    stat("Webhooks / min", String(w.per_minute), `${w.recorded} recorded in ${window}`, { id: "rate" }),
    stat("Signature failures", String(report.signature_failures),
      others.length ? `other refusals: ${others.join(", ")}` : "refused with 401, never stored",
      { tone: report.signature_failures ? "warn" : "", id: "signature" }),
    stat("Duplicates", String(report.duplicates), "same webhook-id delivered again; acknowledged, not stored",
      { id: "duplicates" }),
    stat("p95 time to acknowledge", ack,
      report.ack_ms.samples ? `p50 ${duration(report.ack_ms.p50 / 1000)} over ${report.ack_ms.samples}` : "no webhooks",
      { tip: ACK_TIP, id: "ack" }),
    stat("Stuck jobs", String(stuck.count),
      [`no event for over ${duration(stuck.threshold_seconds)} (`, settingName("RECONCILE_AFTER_SECONDS"), ")"],
      { tone: stuck.count ? "warn" : "", id: "stuck" }),
    ...storeStats(report.store));
  const stuckList = stuck.jobs.length ? h("ul", { class: "stuck-list", "aria-label": "Stuck jobs" },
    stuck.jobs.map((job) => h("li", {},
      h("a", { href: `#/jobs/${job.id}`, "aria-label": `Job ${job.id}` }, h("code", {}, shortId(job.id))),
      " ", badge(job.status), " ", job.model || ""))) : null;
  replace(body, stats, stuckList, chart(w, window));
}

function chart(webhooks, window) {
  const series = webhooks.series;
  const peak = Math.max(1, ...series.map((b) => b.recorded + b.unrecorded));
  const width = 300;
  const height = 48;
  const step = width / series.length;
  const bars = [];
  series.forEach((bucket, i) => {
    const x = i * step + 1;
    const recorded = (bucket.recorded / peak) * height;
    const refused = (bucket.unrecorded / peak) * height;
    const title = `${new Date(bucket.start).toLocaleTimeString()}: ${bucket.recorded} recorded, ${bucket.unrecorded} not recorded`;
    bars.push(svg("g", {}, svg("title", {}, document.createTextNode(title)),
      svg("rect", { x, y: height - recorded, width: step - 2, height: recorded, class: "bar-recorded" }),
      svg("rect", { x, y: height - recorded - refused, width: step - 2, height: refused, class: "bar-unrecorded" })));
  });
  const minutes = webhooks.bucket_seconds / 60;
  const label = `Webhooks per ${minutes >= 1 ? `${minutes} min` : `${webhooks.bucket_seconds} s`} over the last ${window}: `
    + `recorded (blue) and not recorded (orange); peak ${peak}.`;
  return h("figure", { class: "chart" },
    svg("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", role: "img", "aria-label": label }, ...bars),
    h("figcaption", {}, label));
}
