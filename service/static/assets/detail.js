// One job: status, progress and success rate, its predictions with timings and errors,
// original and processed images side by side with their sizes, and the event timeline
// with retries, redeliveries and polls marked and each event's raw JSON one click away.

import { api } from "./api.js";
import {
  badge, between, bytes, duration, h, isFinished, progressBar, replace, time,
} from "./dom.js";

export function mountDetail(main, target, ctx) {
  const abort = new AbortController();
  const openRaw = new Set();      // positions whose raw JSON is shown
  const rawCache = new Map();     // position -> event, fetched once
  const figures = new Map();      // image url -> element, kept so a refresh does not reload images
  const head = h("section", { class: "panel", "aria-label": "Job" }, h("p", { class: "muted" }, "Loading…"));
  const progress = h("section", { class: "panel", "aria-labelledby": "progress-title" });
  const predictions = h("section", { class: "panel", "aria-labelledby": "predictions-title" });
  const images = h("section", { class: "panel", "aria-labelledby": "images-title" });
  const timeline = h("section", { class: "panel", "aria-labelledby": "timeline-title" });
  main.append(h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("a", { href: "#/" }, "← All jobs")),
    head, progress, predictions, images, timeline);

  async function refresh() {
    let job;
    let events;
    let outputs;
    try {
      [job, events, outputs] = await Promise.all([
        api.job(target.id, abort.signal), api.timeline(target.id, abort.signal), api.outputs(target.id, abort.signal)]);
    } catch (error) {
      if (error.status === 404) {
        replace(head, h("h1", {}, "No such job"), h("p", { class: "callout" }, `There is no job ${target.id}.`));
        return;
      }
      throw error;
    }
    renderHead(head, job, ctx, refresh);
    renderProgress(progress, job);
    renderPredictions(predictions, job, target.params.get("prediction"));
    renderImages(images, outputs.outputs, figures, twoSteps(job) ? job.steps : null);
    renderTimeline(timeline, events, openRaw, rawCache, abort.signal);
  }

  return {
    refresh,
    async changed(ids) {
      if (!ids.includes("*") && !ids.includes(target.id)) return false;
      await refresh();
      return true;
    },
    dispose() { abort.abort(); },
  };
}

function fact(name, value) {
  return h("div", {}, h("dt", {}, name), h("dd", {}, value));
}

function renderHead(el, job, ctx, refresh) {
  const target = job.model || job.deployment || job.version;
  const pp = job.postprocess || {};
  const sizes = ["width", "height", "long_side"].filter((k) => pp[k]).map((k) => `${k} ${pp[k]}`);
  const cancel = isFinished(job.status) ? null : h("button", { type: "button", class: "danger", onclick: async (e) => {
    e.target.disabled = true;
    try {
      await api.cancel(job.id);
      await refresh();
      ctx.loaded();
    } catch (error) {
      e.target.disabled = false;
      e.target.after(h("span", { class: "field-error" }, ` ${error.message}`));
    }
  } }, "Cancel job");
  const retryable = ["failed", "completed"].includes(job.status) && job.progress.failed > 0;
  const retry = retryable ? h("button", { type: "button", onclick: async (e) => {
    e.target.disabled = true;
    try {
      await api.retry(job.id);
      await refresh();
      ctx.loaded();
    } catch (error) {
      e.target.disabled = false;
      e.target.after(h("span", { class: "field-error" }, ` ${error.message}`));
    }
  } }, "Retry failed predictions") : null;
  const cost = job.cost || {};
  replace(el,
    h("div", { class: "job-title" }, h("h1", {}, "Job ", h("code", { class: "job-id" }, job.id)), badge(job.status),
      cancel, retry),
    job.error ? h("p", { class: "callout callout-error" }, h("strong", {}, "Error: "), job.error) : null,
    h("dl", { class: "facts" },
      fact(job.model ? "Model" : job.deployment ? "Deployment" : "Version", h("code", {}, target || "–")),
      fact("Aspect ratio", job.aspect_ratio),
      fact("Post-processing", [pp.mode || "auto", ...sizes].join(", ")),
      fact("Created", time(job.created_at)),
      fact("Started", time(job.started_at)),
      fact("Completed", time(job.completed_at)),
      fact("Took", duration(between(job.created_at, job.completed_at))),
      job.deadline ? fact("Deadline", time(job.deadline)) : null,
      job.retries ? fact("Retries", String(job.retries)) : null,
      fact("Compute", cost.compute_seconds == null ? "–" : `${cost.compute_seconds.toFixed(1)} s`
        + (cost.predict_time_anomalies ? ` (${cost.predict_time_anomalies} bad predict_time left out)` : "")),
      fact("Estimated cost", cost.estimated_dollars == null ? "no price set (REPLICATE_PRICES)"
        : `$${cost.estimated_dollars.toFixed(4)}` + (cost.unpriced_predictions ? ` + ${cost.unpriced_predictions} unpriced` : ""))));
}

function renderProgress(el, job) {
  const p = job.progress;
  const finished = p.succeeded + p.failed;
  const rate = finished ? `${Math.round((100 * p.succeeded) / finished)}%` : "–";
  replace(el, h("h2", { id: "progress-title" }, "Progress"),
    progressBar(p.succeeded, p.failed, p.total, `${p.succeeded} of ${p.total} predictions succeeded`),
    h("dl", { class: "facts compact" },
      fact("Predictions", `${p.succeeded} succeeded, ${p.failed} failed, ${p.total} in all`),
      fact("Success rate", h("span", { dataset: { successRate: "" } }, rate)),
      fact("Outputs processed", String(p.processed))),
    twoSteps(job) ? h("ol", { class: "steps" }, job.steps.map(renderStep)) : null);
}

const twoSteps = (job) => (job.steps || []).length > 1;

// One step of a two-step job: what it runs and how far it got, apart from the other step.
function renderStep(s) {
  return h("li", { class: "step", dataset: { step: s.step } },
    h("strong", {}, `Step ${s.step}`), " ", h("code", {}, s.target || "–"), " ",
    progressBar(s.succeeded, s.failed, s.total, `Step ${s.step}: ${s.succeeded} of ${s.total} predictions succeeded`),
    h("span", { class: "step-text" },
      `${s.succeeded}/${s.total} predictions${s.failed ? `, ${s.failed} failed` : ""}, `
      + `${s.processed} output${s.processed === 1 ? "" : "s"} processed`));
}

function renderPredictions(el, job, highlight) {
  const rows = job.predictions.map((p) => {
    const predict = p.metrics && typeof p.metrics.predict_time === "number" ? p.metrics.predict_time : null;
    return h("tr", { class: p.id === highlight ? "highlight" : null },
      h("td", { "data-label": "Prediction" }, h("code", {}, p.id)),
      h("td", { "data-label": "Step" }, p.step ?? "–"),
      h("td", { "data-label": "Status" }, badge(p.status),
        p.superseded ? h("span", { class: "muted", title: "a retry submitted it again" }, " retried") : null),
      h("td", { "data-label": "Waited" }, duration(between(p.created_at, p.started_at))),
      h("td", { "data-label": "Ran" }, duration(between(p.started_at, p.completed_at))),
      h("td", { "data-label": "Predict time" }, duration(predict)),
      p.error ? h("td", { "data-label": "Error", class: "error-cell" }, p.error) : h("td", { class: "no-error" }));
  });
  replace(el, h("h2", { id: "predictions-title" }, `Predictions (${job.predictions.length})`),
    rows.length ? h("table", { class: "predictions" },
      h("thead", {}, h("tr", {}, ["Prediction", "Step", "Status", "Waited", "Ran", "Predict time", "Error"].map(
        (n) => h("th", { scope: "col" }, n)))),
      h("tbody", {}, rows)) : h("p", { class: "muted" }, "None submitted yet."));
}

function image(url, alt, label, recorded, figures) {
  const key = `${label}:${url}`;
  if (figures.has(key)) return figures.get(key);
  const dims = h("span", { class: "dims" }, recorded ? `${recorded[0]} × ${recorded[1]} px` : "measuring…");
  const img = h("img", { src: url, alt, loading: "lazy", decoding: "async", dataset: { kind: label } });
  img.addEventListener("load", () => {
    const loaded = `${img.naturalWidth} × ${img.naturalHeight} px`;
    dims.textContent = recorded && (recorded[0] !== img.naturalWidth || recorded[1] !== img.naturalHeight)
      ? `${recorded[0]} × ${recorded[1]} px recorded, ${loaded} loaded` : loaded;
  });
  img.addEventListener("error", () => {
    dims.textContent = "could not be loaded (Replicate deletes its copy an hour after the prediction)";
  });
  const figure = h("figure", { class: "shot" },
    h("a", { href: url, target: "_blank", rel: "noopener" }, img),
    h("figcaption", {}, h("strong", {}, label), " ", dims));
  figures.set(key, figure);
  return figure;
}

// The outputs, under a heading per step when the job has two.
function renderImages(el, outputs, figures, steps) {
  const pairs = (list, heading) => h("ul", { class: "pairs" }, list.map((o) => pair(o, figures, heading)));
  const body = !outputs.length ? h("p", { class: "muted" }, "No outputs processed yet.")
    : !steps ? pairs(outputs)
      : steps.map((s) => {
        const own = outputs.filter((o) => (o.step || 1) === s.step);
        return h("section", { class: "step-images", dataset: { step: s.step } },
          h("h3", {}, `Step ${s.step} `, h("code", {}, s.target || "–")),
          own.length ? pairs(own, "h4") : h("p", { class: "muted" }, "No outputs processed yet."));
      });
  replace(el, h("h2", { id: "images-title" }, "Images"), body);
}

function pair(o, figures, heading = "h3") {
  const name = `output ${o.index + 1} of prediction ${o.prediction_id}${o.step > 1 ? ` (step ${o.step})` : ""}`;
  if (o.status !== "processed") {
    return h("li", { class: "pair failed" }, h("p", {}, h("strong", {}, `${name}: `), "failed — ", o.error || ""));
  }
  const original = o.original_url || o.source_url;
  return h("li", { class: "pair" },
    h(heading, {}, name[0].toUpperCase() + name.slice(1)),
    h("div", { class: "shots" },
      image(original, `Original ${name}, as the model made it`, "Original", null, figures),
      image(o.url, `Processed ${name}, ${o.width} by ${o.height} pixels`, "Processed", [o.width, o.height], figures)),
    h("p", { class: "muted" }, [o.plan ? `${o.plan.action} to ${o.plan.width} × ${o.plan.height}` : null,
      o.format, bytes(o.bytes), o.original_bytes ? `original ${bytes(o.original_bytes)}` : null]
      .filter(Boolean).join(" · ")));
}

const KINDS = {
  "job.created": "created", "job.canceled": "canceled", "prediction.submitted": "submitted",
  "prediction.submit_failed": "submit failed", "replicate.webhook": "webhook", "replicate.polled": "polled",
  "output.processed": "processed", "output.failed": "output failed",
};

function renderTimeline(el, timeline, openRaw, rawCache, signal) {
  const items = timeline.events.map((e) => {
    const flags = [];
    if (e.type === "replicate.polled") flags.push(h("span", { class: "flag flag-polled" }, "polled by the reconciler"));
    if (e.is_repeat) flags.push(h("span", { class: "flag flag-retry" }, `retry: same body as #${e.repeat_of}`));
    if (e.redeliveries) {
      const why = `Replicate delivered this webhook-id ${e.redeliveries} more time${e.redeliveries > 1 ? "s" : ""};`
        + " each was acknowledged and not stored again";
      flags.push(h("span", { class: "flag flag-redelivered", title: why },
        `redelivered ×${e.redeliveries}`, h("span", { class: "visually-hidden" }, `: ${why}`)));
    }
    const raw = h("pre", { class: "raw", id: `raw-${e.position}`, hidden: !openRaw.has(e.position), tabindex: 0 });
    const button = h("button", { type: "button", class: "link", "aria-expanded": String(openRaw.has(e.position)),
                                 "aria-controls": `raw-${e.position}` }, "Raw JSON");
    button.addEventListener("click", () => toggleRaw(e.position, button, raw, openRaw, rawCache, signal));
    if (openRaw.has(e.position) && rawCache.has(e.position)) raw.textContent = rawCache.get(e.position);
    return h("li", { class: `event event-${e.type.replace(".", "-")}${e.is_repeat ? " repeat" : ""}`,
                     dataset: { type: e.type, position: e.position } },
      h("div", { class: "event-when" }, h("span", { class: "seq" }, `#${e.position}`), " ",
        time(e.received_at || e.recorded_at, { short: true }),
        h("span", { class: "elapsed" }, ` +${duration(Number(e.elapsed_seconds))}`)),
      h("div", { class: "event-what" },
        h("span", { class: `kind kind-${(KINDS[e.type] || e.type).replace(/ /g, "-")}` }, KINDS[e.type] || e.type),
        " ", e.summary, flags.length ? h("span", { class: "flags" }, flags) : null),
      h("div", { class: "event-raw" }, button), raw);
  });
  const more = timeline.total > timeline.events.length
    ? h("p", { class: "muted" }, `Showing the first ${timeline.events.length} of ${timeline.total} events.`) : null;
  replace(el, h("h2", { id: "timeline-title" }, `Timeline (${timeline.total} events)`),
    h("p", { class: "muted" }, "Every event in the order it was recorded: webhooks as received, the service's own "
      + "steps, and the reconciler's polls. A retry is a webhook whose body repeats an earlier one."),
    h("ol", { class: "timeline" }, items), more);
}

async function toggleRaw(position, button, raw, openRaw, rawCache, signal) {
  const open = button.getAttribute("aria-expanded") !== "true";
  button.setAttribute("aria-expanded", String(open));
  raw.hidden = !open;
  if (!open) return openRaw.delete(position);
  openRaw.add(position);
  if (!rawCache.has(position)) {
    raw.textContent = "Loading…";
    try {
      const event = await api.event(position, signal);
      rawCache.set(position, JSON.stringify(event, null, 2));
    } catch (error) {
      raw.textContent = `Could not load it: ${error.message}`;
      return;
    }
  }
  raw.textContent = rawCache.get(position);
}
