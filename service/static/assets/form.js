// The create-job form. The API validates; its 422 answer names the fields at fault
// ({"fields": {"model": [...], "postprocess.mode": [...]}}) and each message is shown
// next to its field, with a summary at the top that links to them.

import { api } from "./api.js";
import { announce, h, replace } from "./dom.js";

const RATIOS = ["1:1", "3:4", "9:16"];
const MODE_HINTS = {
  auto: "upscale square outputs, crop and resize the others to the aspect ratio",
  upscale: "upscale every output", resize: "crop and resize to the aspect ratio", none: "keep outputs as made",
};

function newKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function field(id, label, control, hint) {
  control.setAttribute("aria-describedby", [hint ? `${id}-hint` : null, `${id}-error`].filter(Boolean).join(" "));
  return h("div", { class: "field", dataset: { field: id } },
    h("label", { for: id }, label), hint ? h("p", { class: "hint", id: `${id}-hint` }, hint) : null,
    control, h("p", { class: "field-error", id: `${id}-error`, hidden: true }));
}

export function mountForm(main, target, ctx) {
  let idempotencyKey = newKey();   // a new one whenever the form changes; a resend reuses it
  const kind = (value, label) => h("label", { class: "choice" },
    h("input", { type: "radio", name: "target-kind", value, checked: value === "model" }), label);
  const targetInput = h("input", { id: "target", name: "target", autocomplete: "off", spellcheck: "false",
                                   placeholder: "black-forest-labs/flux-schnell" });
  const prompt = h("textarea", { id: "prompt", name: "prompt", rows: 3 });
  const input = h("textarea", { id: "input", name: "input", rows: 4, spellcheck: "false", class: "mono" }, "{}");
  const ratioChoices = [...RATIOS, "custom"].map((r) => h("label", { class: "choice" },
    h("input", { type: "radio", name: "ratio", value: r, checked: r === "1:1" }), r === "custom" ? "Custom" : r));
  const custom = h("input", { id: "custom-ratio", name: "custom-ratio", placeholder: "W:H, e.g. 16:9",
                              autocomplete: "off", disabled: true });
  const count = h("input", { id: "count", name: "count", type: "number", min: 1, max: 50, value: 1, inputmode: "numeric" });
  const mode = h("select", { id: "mode", name: "mode" }, ctx.config.postprocess_modes.map(
    (m) => h("option", { value: m }, `${m} — ${MODE_HINTS[m] || ""}`)));
  const summary = h("div", { class: "error-summary", role: "alert", tabindex: -1, hidden: true });
  const submit = h("button", { type: "submit", class: "primary" }, "Create job");

  const form = h("form", { id: "create-form", novalidate: true },
    summary,
    h("fieldset", { class: "field", dataset: { field: "target" } },
      h("legend", {}, "What to run"),
      h("div", { class: "choices" }, kind("model", "Model"), kind("version", "Version")),
      h("label", { for: "target", id: "target-label" }, "Model (owner/name)"),
      h("p", { class: "hint", id: "target-hint" }, "An official model such as black-forest-labs/flux-schnell."),
      targetInput, h("p", { class: "field-error", id: "target-error", hidden: true })),
    field("prompt", "Prompt", prompt, "Sent as input.prompt."),
    field("input", "Other input (JSON object)", input,
      'Merged with the prompt, e.g. {"num_outputs": 1, "seed": 42}; the Prompt field wins over input.prompt.'),
    h("fieldset", { class: "field", dataset: { field: "ratio" }, "aria-describedby": "ratio-error" },
      h("legend", {}, "Aspect ratio"),
      h("div", { class: "choices" }, ratioChoices),
      h("label", { for: "custom-ratio" }, "Custom ratio"), custom,
      h("p", { class: "field-error", id: "ratio-error", hidden: true })),
    field("count", "Count (predictions to run, 1–50)", count),
    field("mode", "Post-processing", mode),
    h("div", { class: "actions" }, submit, h("a", { href: "#/" }, "Cancel")));
  targetInput.setAttribute("aria-describedby", "target-hint target-error");
  custom.setAttribute("aria-describedby", "ratio-error");

  form.addEventListener("input", () => { idempotencyKey = newKey(); });
  form.addEventListener("change", (event) => {
    if (event.target.name === "ratio") custom.disabled = event.target.value !== "custom";
    if (event.target.name === "target-kind") {
      const version = event.target.value === "version";
      replace(document.getElementById("target-label"), version ? "Version id" : "Model (owner/name)");
      replace(document.getElementById("target-hint"), version
        ? "The 64-character version id, or owner/name:<version id>." : "An official model such as black-forest-labs/flux-schnell.");
      targetInput.placeholder = version ? "owner/name:5599ed30…" : "black-forest-labs/flux-schnell";
    }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form, summary);
    const built = build(form, { targetInput, prompt, input, custom, count, mode });
    if (built.errors) return showErrors(form, summary, built.errors);
    submit.disabled = true;
    try {
      const job = await api.create(built.body, idempotencyKey);
      announce("Job created");
      ctx.navigate(`#/jobs/${job.id}`);
    } catch (error) {
      const fields = error.status === 422 ? error.fields : { form: [error.message] };
      showErrors(form, summary, fields);
    } finally {
      submit.disabled = false;
    }
  });

  main.append(h("section", { class: "panel narrow", "aria-labelledby": "new-title" },
    h("h1", { id: "new-title" }, "New job"), form));
  targetInput.focus();
  return { refresh: async () => {}, changed: async () => false, dispose() {} };
}

function build(form, { targetInput, prompt, input, custom, count, mode }) {
  const errors = {};
  let extra = {};
  try {
    extra = JSON.parse(input.value.trim() || "{}");
    if (typeof extra !== "object" || extra === null || Array.isArray(extra)) {
      errors.input = ["must be a JSON object, like {\"seed\": 42}"];
    }
  } catch (error) {
    errors.input = [`is not valid JSON: ${error.message}`];
  }
  const kind = form.elements["target-kind"].value;
  const ratio = form.elements.ratio.value === "custom" ? custom.value.trim() : form.elements.ratio.value;
  if (!ratio) errors.aspect_ratio = ['give the custom ratio as "W:H", like "16:9"'];
  const number = Number(count.value);
  const body = {
    [kind]: targetInput.value.trim() || undefined,
    input: { ...extra, ...(prompt.value.trim() ? { prompt: prompt.value.trim() } : {}) },
    aspect_ratio: ratio || undefined,
    count: count.value.trim() === "" || !Number.isFinite(number) ? count.value : number,
    postprocess: { mode: mode.value },
  };
  return Object.keys(errors).length ? { errors } : { body };
}

// API field names -> the form field that shows the message
function fieldFor(name) {
  const top = name.split(".")[0];
  if (["model", "version", "deployment"].includes(top)) return "target";
  if (top === "input") return name === "input.prompt" ? "prompt" : "input";
  if (top === "aspect_ratio") return "ratio";
  if (top === "postprocess") return "mode";
  if (top === "count") return "count";
  return null;
}

function clearErrors(form, summary) {
  summary.hidden = true;
  replace(summary);
  for (const el of form.querySelectorAll(".field-error")) { el.hidden = true; el.textContent = ""; }
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

function showErrors(form, summary, fields) {
  const links = [];
  for (const [name, messages] of Object.entries(fields)) {
    const id = fieldFor(name);
    const text = messages.join(" ");
    const error = id && form.querySelector(`#${id === "ratio" ? "ratio" : id}-error`);
    if (error) {
      error.hidden = false;
      error.textContent = error.textContent ? `${error.textContent} ${text}` : text;
      const control = id === "ratio" ? form.querySelector("#custom-ratio") : form.querySelector(`#${id}`);
      if (control && !control.disabled) control.setAttribute("aria-invalid", "true");
      links.push(h("li", {}, h("a", { href: `#${id}`, onclick: (e) => { e.preventDefault(); focusField(form, id); } },
        `${label(name)} ${text}`)));
    } else {
      links.push(h("li", {}, name === "form" ? text : `${label(name)} ${text}`));
    }
  }
  replace(summary, h("h2", {}, "The job was not created"), h("ul", {}, links));
  summary.hidden = false;
  summary.focus();
}

function label(name) {
  return name === "body" || name === "form" ? "" : `${name}:`;
}

function focusField(form, id) {
  const control = id === "ratio" ? form.querySelector('input[name="ratio"]:checked') : form.querySelector(`#${id}`);
  if (control) control.focus();
}
