// Live state: what the project may still use now, per model, metric and window (GetLimitState),
// refreshed every few seconds while the page is open.

import { call } from "./api.js";
import { h, table } from "./dom.js";
import { clockTime, count, msOf, stampOf } from "./format.js";

const REFRESH_MS = 5000;
let timer = 0;

function meter(remaining, limit) {
  if (limit === undefined) return "—";
  const left = Math.floor(Number(remaining));
  const pct = Number(limit) > 0 ? Math.round((left / Number(limit)) * 100) : 0;
  return h("span", { class: "meter-cell" },
    h("meter", { min: 0, max: Number(limit), value: left, low: Number(limit) * 0.2, optimum: Number(limit),
      "aria-label": `${count(left)} of ${count(limit)} left` }),
    ` ${count(left)} / ${count(limit)} (${pct}%)`);
}

async function models(ctx) {
  // the models with limits of their own, and those used in the last day (limited by "*")
  const now = Date.now();
  const [limits, used] = await Promise.all([
    call("ProjectService", "GetProjectLimits", { organizationId: ctx.org, projectId: ctx.project }),
    call("UsageService", "GetUsage", { organizationId: ctx.org, projectId: ctx.project,
      startTime: stampOf(now - 86_400_000), endTime: stampOf(now + 60_000), granularity: "GRANULARITY_HOUR",
      groupBy: ["GROUP_BY_MODEL"] }),
  ]);
  const names = new Set((limits.effective || []).map((e) => e.model).filter((m) => m !== "*"));
  for (const r of used.rows || []) names.add(r.model);
  return [...names].sort().slice(0, 100);
}

async function render(ctx, body, names) {
  const reply = await call("UsageService", "GetLimitState", {
    organizationId: ctx.org, projectId: ctx.project, models: names });
  const rows = (reply.limits || []).filter((s) => s.organizationLimit !== undefined || s.projectLimit !== undefined)
    .map((s) => [h("code", {}, s.model), s.metric, `per ${s.window}`,
      meter(s.projectRemaining, s.projectLimit), meter(s.organizationRemaining, s.organizationLimit),
      h("strong", {}, count(Math.floor(Number(s.remaining))))]);
  body.replaceChildren(
    h("p", { class: "muted", "aria-live": "off" },
      `Read at ${clockTime(msOf(reply.readTime))}; refreshed every ${REFRESH_MS / 1000} s while this page is open.`),
    table(`What ${ctx.projectName(ctx.project)} may still use now`,
      ["Model", "Metric", "Window", "Project bucket left", "Organization bucket left", "Left now"],
      rows, "No limits apply to this project's models."));
}

export async function livePage(ctx) {
  clearInterval(timer);
  if (!ctx.project) return h("p", {}, "Choose or create a project first.");
  const names = await models(ctx);
  const body = h("div", { id: "live" });
  await render(ctx, body, names);
  timer = setInterval(() => {
    if (!body.isConnected) { clearInterval(timer); return; }
    render(ctx, body, names).catch(() => clearInterval(timer));
  }, REFRESH_MS);
  return body;
}
