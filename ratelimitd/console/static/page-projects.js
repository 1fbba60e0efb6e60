// Projects: list with a day's usage at a glance; create, rename, delete (after confirmation).

import { call } from "./api.js";
import { confirmDialog, errorBox, field, h, table } from "./dom.js";
import { count, money, stampOf, usdOf, when } from "./format.js";

const DAY_MS = 86_400_000;

async function usageByProject(org) {
  const now = Date.now();
  const rows = (await call("UsageService", "GetUsage", {
    organizationId: org, startTime: stampOf(now - DAY_MS), endTime: stampOf(now + 60_000),
    granularity: "GRANULARITY_HOUR", groupBy: ["GROUP_BY_PROJECT"],
  })).rows || [];
  const totals = {};
  for (const r of rows) {
    const t = (totals[r.projectId] ||= { requests: 0, refused: 0, tokens: 0, spend: 0 });
    t.requests += Number(r.requests);
    t.refused += Object.values(r.refusals || {}).reduce((a, b) => a + Number(b), 0);
    t.tokens += Number(r.inputTokens) + Number(r.outputTokens);
    t.spend += usdOf(r.spendUsdMicros);
  }
  return totals;
}

function createForm(ctx, status) {
  const [nameField, nameInput] = field("New project name", { name: "project-name", required: true, maxlength: 64 });
  const form = h("form", { class: "inline-form", "aria-label": "Create a project" },
    nameField, h("button", { type: "submit" }, "Create project"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const p = await call("ProjectService", "CreateProject", { organizationId: ctx.org, name: nameInput.value });
      await ctx.chooseProject(p.id);
      window.dispatchEvent(new HashChangeEvent("hashchange"));
    } catch (e) {
      status.replaceChildren(errorBox(e));
    }
  });
  return form;
}

function renameControl(ctx, project, status) {
  return h("button", {
    type: "button", class: "secondary", "aria-label": `Rename ${project.name}`,
    onclick: async () => {
      const name = prompt(`New name for ${project.name}`, project.name);
      if (!name || name === project.name) return;
      try {
        await call("ProjectService", "UpdateProject", {
          project: { organizationId: ctx.org, id: project.id, name }, updateMask: "name" });
        await ctx.reloadProjects();
        window.dispatchEvent(new HashChangeEvent("hashchange"));
      } catch (e) { status.replaceChildren(errorBox(e)); }
    },
  }, "Rename");
}

function deleteControl(ctx, project, status) {
  return h("button", {
    type: "button", class: "danger", "aria-label": `Delete ${project.name}`,
    onclick: async () => {
      const sure = await confirmDialog(
        `Delete project ${project.name}? Its API keys stop working at once. This cannot be undone.`,
        `Delete ${project.name}`);
      if (!sure) return;
      try {
        await call("ProjectService", "DeleteProject", { organizationId: ctx.org, projectId: project.id });
        await ctx.reloadProjects();
        window.dispatchEvent(new HashChangeEvent("hashchange"));
      } catch (e) { status.replaceChildren(errorBox(e)); }
    },
  }, "Delete");
}

export async function projectsPage(ctx) {
  if (!ctx.org) return h("p", {}, "No organization is visible to this credential.");
  const status = h("div", { "aria-live": "polite" });
  const usage = await usageByProject(ctx.org);
  const headers = ["Project", "Created", "Requests (24 h)", "Refused (24 h)", "Tokens (24 h)", "Spend (24 h)"];
  if (ctx.canWrite) headers.push("Actions");
  const rows = ctx.projects.map((p) => {
    const u = usage[p.id] || { requests: 0, refused: 0, tokens: 0, spend: 0 };
    const cells = [
      h("span", {}, h("strong", {}, p.name), h("br"), h("code", { class: "muted" }, p.id)),
      when(p.createTime), count(u.requests), count(u.refused), count(u.tokens), money(u.spend),
    ];
    if (ctx.canWrite) cells.push(h("span", { class: "actions" }, renameControl(ctx, p, status), deleteControl(ctx, p, status)));
    return cells;
  });
  return [
    ctx.canWrite ? createForm(ctx, status) : null,
    status,
    table("Projects of this organization", headers, rows, "No projects yet."),
  ];
}
