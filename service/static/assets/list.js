// The job list: health panel, filters (status, model), search by job or prediction id,
// the jobs newest first with status, model, aspect ratio, progress and age, and paging.

import { api } from "./api.js";
import { age, badge, h, progressBar, replace, shortId } from "./dom.js";
import { healthPanel } from "./health.js";

const PAGE_SIZE = 20;

export function mountList(main, target, ctx) {
  const abort = new AbortController();
  const filters = { status: target.params.get("status") || "", model: target.params.get("model") || "" };
  const pages = [null];  // cursors of the pages seen so far; the first page has none
  let page = 0;
  let nextCursor = null;

  const health = healthPanel(ctx.config);
  const status = h("select", { id: "filter-status", name: "status" },
    h("option", { value: "" }, "All statuses"),
    ctx.config.statuses.map((s) => h("option", { value: s, selected: s === filters.status }, s)));
  const model = h("select", { id: "filter-model", name: "model" },
    h("option", { value: "" }, "All models"),
    filters.model ? h("option", { value: filters.model, selected: true }, filters.model) : null);
  const query = h("input", { id: "search", name: "q", type: "search", autocomplete: "off", spellcheck: "false",
                             placeholder: "job id, its last 8 characters, or a prediction id" });
  const found = h("div", { class: "search-results", "aria-live": "polite" });
  const rows = h("tbody", {}, h("tr", {}, h("td", { colspan: 6, class: "muted" }, "Loading…")));
  const pageLabel = h("span", { class: "page-label", "aria-live": "polite" }, "Page 1");
  const newer = h("button", { type: "button", disabled: true, onclick: () => turn(-1) }, "← Newer");
  const older = h("button", { type: "button", disabled: true, onclick: () => turn(1) }, "Older →");

  const applyFilters = () => {
    const params = new URLSearchParams();
    if (status.value) params.set("status", status.value);
    if (model.value) params.set("model", model.value);
    ctx.navigate(`#/${params.toString() ? `?${params}` : ""}`);
  };
  status.addEventListener("change", applyFilters);
  model.addEventListener("change", applyFilters);

  const searchForm = h("form", { class: "search", role: "search", onsubmit: (e) => { e.preventDefault(); search(); } },
    h("label", { for: "search" }, "Find a job or prediction by id"),
    h("div", { class: "search-row" }, query, h("button", { type: "submit" }, "Find")));

  main.append(
    health.element,
    h("section", { class: "panel", "aria-labelledby": "jobs-title" },
      h("div", { class: "panel-head" }, h("h1", { id: "jobs-title" }, "Jobs"),
        h("a", { class: "button primary", href: "#/new" }, "New job")),
      h("div", { class: "toolbar" },
        h("form", { class: "filters", onsubmit: (e) => e.preventDefault() },
          h("div", { class: "inline-field" }, h("label", { for: "filter-status" }, "Status"), status),
          h("div", { class: "inline-field" }, h("label", { for: "filter-model" }, "Model"), model)),
        searchForm),
      found,
      h("table", { class: "jobs" },
        h("caption", { class: "visually-hidden" }, "Jobs, newest first"),
        h("thead", {}, h("tr", {}, ["Job", "Status", "Model", "Aspect", "Progress", "Age"].map(
          (name) => h("th", { scope: "col" }, name)))),
        rows),
      h("nav", { class: "pager", "aria-label": "Pages of jobs" }, newer, pageLabel, older)));

  async function loadJobs() {
    const params = { limit: PAGE_SIZE };
    if (filters.status) params.status = filters.status;
    if (filters.model) params.model = filters.model;
    if (pages[page]) params.cursor = pages[page];
    const list = await api.jobs(params, abort.signal);
    nextCursor = list.next_cursor;
    replace(rows, list.jobs.length ? list.jobs.map(row) : h("tr", {}, h("td", { colspan: 6, class: "empty" },
      filters.status || filters.model ? "No jobs match these filters." : "No jobs yet. Create one with New job.")));
    newer.disabled = page === 0;
    older.disabled = !nextCursor;
    pageLabel.textContent = `Page ${page + 1}`;
  }

  async function loadModels() {
    const { models } = await api.models(abort.signal);
    const chosen = model.value;
    replace(model, h("option", { value: "" }, "All models"),
      [...new Set([...models, ...(chosen ? [chosen] : [])])].sort().map(
        (m) => h("option", { value: m, selected: m === chosen }, m)));
  }

  function countStatuses(counts) {
    for (const option of status.options) {
      if (option.value) option.textContent = `${option.value} (${counts[option.value] || 0})`;
    }
  }

  async function turn(delta) {
    if (delta > 0 && nextCursor) {
      pages[page + 1] = nextCursor;
      page += 1;
    } else if (delta < 0 && page > 0) {
      page -= 1;
    }
    await loadJobs();
    ctx.loaded();
    rows.closest("section").querySelector("h1").scrollIntoView({ block: "start" });
  }

  async function search() {
    const q = query.value.trim();
    if (!q) return;
    replace(found, h("p", { class: "muted" }, "Searching…"));
    const result = await api.search(q, abort.signal).catch((error) => ({ error }));
    if (result.error) return replace(found, h("p", { class: "callout callout-error" }, result.error.message));
    const jobIds = new Set(result.jobs.map((j) => j.id));
    const owned = result.predictions.filter((p) => p.job_id);
    owned.forEach((p) => jobIds.add(p.job_id));
    if (jobIds.size === 1 && result.predictions.every((p) => p.job_id)) {
      return ctx.navigate(`#/jobs/${[...jobIds][0]}`);
    }
    if (!result.jobs.length && !result.predictions.length) {
      return replace(found, h("p", { class: "callout" }, `No job or prediction has the id “${q}”.`));
    }
    replace(found, h("ul", { class: "found" },
      result.jobs.map((j) => h("li", {}, h("a", { href: `#/jobs/${j.id}` }, h("code", {}, j.id)), " ",
        badge(j.status), " ", j.model || j.version || j.deployment || "")),
      result.predictions.map((p) => h("li", {}, "Prediction ", h("code", {}, p.id), " ", badge(p.status), " ",
        p.job_id ? h("a", { href: `#/jobs/${p.job_id}` }, `in job ${shortId(p.job_id)}`)
          : "belongs to no job (an orphan: its webhook named no job this service knows)"))));
  }

  return {
    async refresh() {
      const [report] = await Promise.all([health.refresh(abort.signal), loadJobs(), loadModels()]);
      countStatuses(report.status_counts);
    },
    async changed() {
      await this.refresh();
      return true;
    },
    dispose() {
      abort.abort();
    },
  };
}

function row(job) {
  const target = job.model || job.deployment || (job.version ? `version ${job.version.slice(-64, -56)}…` : "");
  const p = job.progress;
  const summary = `${p.succeeded}/${p.total} predictions${p.failed ? `, ${p.failed} failed` : ""}`
    + (p.processed ? ` · ${p.processed} processed` : "");
  return h("tr", { dataset: { job: job.id, status: job.status } },
    h("td", { "data-label": "Job" },
      h("a", { href: `#/jobs/${job.id}`, "aria-label": `Job ${job.id}` }, h("code", {}, shortId(job.id)))),
    h("td", { "data-label": "Status" }, badge(job.status)),
    h("td", { "data-label": "Model", class: "model" }, target),
    h("td", { "data-label": "Aspect" }, job.aspect_ratio),
    h("td", { "data-label": "Progress", class: "progress-cell" }, h("div", {},
      progressBar(p.succeeded, p.failed, p.total, `Job ${shortId(job.id)}: ${summary}`),
      h("span", { class: "progress-text" }, summary))),
    h("td", { "data-label": "Age" }, h("time", { datetime: job.created_at, title: new Date(job.created_at).toLocaleString() },
      age(job.created_at))));
}
