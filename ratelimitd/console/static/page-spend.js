// Spend: month to date per project and per model, thresholds crossed, spend limits.

import { call } from "./api.js";
import { errorBox, h, table } from "./dom.js";
import { microsOf, money, stampOf, usdOf } from "./format.js";

function limitEditor(ctx, line, status) {
  const input = h("input", {
    type: "number", min: 0, step: "0.01", value: line.limitUsdMicros !== undefined ? usdOf(line.limitUsdMicros) : "", placeholder: "none",
    "aria-label": `Spend limit in USD for ${ctx.projectName(line.projectId)}`, class: "limit-input",
  });
  const form = h("form", { class: "limit-form" }, input, h("button", { type: "submit" }, "Save"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const change = { organizationId: ctx.org, projectId: line.projectId };
    if (input.value !== "") change.limitUsdMicros = microsOf(input.value);
    try {
      await call("UsageService", "SetSpendLimit", change);
      window.dispatchEvent(new HashChangeEvent("hashchange"));
    } catch (e) { status.replaceChildren(errorBox(e)); }
  });
  return form;
}

export async function spendPage(ctx) {
  if (!ctx.org) return h("p", {}, "No organization is visible to this credential.");
  const spend = await call("UsageService", "GetSpend", { organizationId: ctx.org });
  const [year, month] = String(spend.month).split("-").map(Number);
  const start = Date.UTC(year, month - 1, 1);
  const rows = (await call("UsageService", "GetUsage", {
    organizationId: ctx.org, startTime: stampOf(start), endTime: stampOf(Date.now() + 60_000),
    granularity: "GRANULARITY_DAY", groupBy: ["GROUP_BY_PROJECT", "GROUP_BY_MODEL"],
  })).rows || [];
  const perModel = new Map();
  for (const r of rows) {
    const k = `${r.projectId}|${r.model}`;
    perModel.set(k, (perModel.get(k) || 0) + usdOf(r.spendUsdMicros));
  }
  const status = h("div", { "aria-live": "polite" });
  // every project, so an Owner can set a limit before the first dollar is spent
  const spent = new Map((spend.projects || []).map((line) => [line.projectId, line]));
  const lines = [spend.organization || { spendUsdMicros: "0" },
    ...ctx.projects.map((p) => spent.get(p.id) || { projectId: p.id, spendUsdMicros: "0" })];
  const projectRows = lines.map((line) => [
    line.projectId ? ctx.projectName(line.projectId) : h("strong", {}, "Organization"),
    money(usdOf(line.spendUsdMicros)),
    ctx.canGovern && line.projectId ? limitEditor(ctx, line, status) : (line.limitUsdMicros !== undefined ? money(usdOf(line.limitUsdMicros)) : "none"),
    (line.thresholdsCrossed || []).map((t) => `${t}%`).join(", ") || "none",
    line.blocked ? h("span", { class: "badge bad" }, "blocked") : h("span", { class: "badge ok" }, "open"),
  ]);
  const modelRows = [...perModel.entries()].sort((a, b) => b[1] - a[1])
    .map(([k, usd]) => { const [p, m] = k.split("|"); return [ctx.projectName(p), h("code", {}, m), money(usd)]; });
  return [
    h("p", { class: "muted" }, `Month to date: ${spend.month} (UTC).`),
    status,
    table("Spend per project", ["Project", "Spend", "Spend limit", "Thresholds crossed", "State"], projectRows),
    table("Spend per project and model", ["Project", "Model", "Spend"], modelRows, `No spend in ${spend.month} yet.`),
  ];
}
