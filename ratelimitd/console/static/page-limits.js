// Limits: per model, metric and window, the project's own value, the organization's ceiling
// and what binds, side by side. A value above the ceiling is refused by the server; its
// message, which names both numbers, is shown in the row.

import { call } from "./api.js";
import { errorBox, h, table } from "./dom.js";
import { count } from "./format.js";

function limitEditor(ctx, row, status) {
  const label = `${row.model} ${row.metric} per ${row.window}`;
  const input = h("input", {
    type: "number", min: 0, step: 1, inputmode: "numeric", value: row.custom ?? "",
    "aria-label": `Project limit for ${label}`, class: "limit-input", placeholder: "inherit",
  });
  const problem = h("div", { class: "row-error", "aria-live": "polite" });
  const save = async (change) => {
    problem.replaceChildren();
    try {
      await call("ProjectService", "SetProjectLimits", { organizationId: ctx.org, projectId: ctx.project, ...change });
      window.dispatchEvent(new HashChangeEvent("hashchange"));
    } catch (e) {
      problem.replaceChildren(errorBox(e));
    }
  };
  const key = { model: row.model, metric: row.metric, window: row.window };
  const form = h("form", { class: "limit-form", "aria-label": `Set ${label}` },
    input,
    h("button", { type: "submit" }, "Save"),
    row.custom !== undefined
      ? h("button", { type: "button", class: "secondary", onclick: () => save({ clear: [key] }) }, "Inherit")
      : null,
    problem);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (input.value === "") return save({ clear: [key] });
    save({ set: [{ ...key, limit: String(input.value) }] });
  });
  return form;
}

export async function limitsPage(ctx) {
  if (!ctx.project) return h("p", {}, "Choose or create a project first.");
  const reply = await call("ProjectService", "GetProjectLimits", { organizationId: ctx.org, projectId: ctx.project });
  const status = h("div", { "aria-live": "polite" });
  const rows = (reply.effective || []).map((row) => [
    h("code", {}, row.model), row.metric, `per ${row.window}`,
    ctx.canWrite ? limitEditor(ctx, row, status) : (row.custom !== undefined ? count(row.custom) : "inherits"),
    row.organization !== undefined ? count(row.organization) : "none",
    h("strong", {}, count(row.effective)),
  ]);
  return [
    h("p", { class: "muted" },
      `Limits of ${ctx.projectName(ctx.project)}. A project's value may not exceed the organization's; `,
      "the organization's limit is a ceiling shared by all its projects."),
    status,
    table("Per-model limits", ["Model", "Metric", "Window", "Project value", "Organization ceiling", "Effective"],
      rows, "The organization has no limits yet."),
  ];
}
