// Usage (requests, tokens and refusals over time, by model and by key) and Metrics
// (latency percentiles and status codes per model, from the request log).

import { call } from "./api.js";
import { stackedBars } from "./chart.js";
import { h, select, table } from "./dom.js";
import { clockTime, count, dayOf, money, zone } from "./format.js";

const RANGES = {
  hour: { title: "Last hour", span: 3_600_000, step: 60_000, granularity: "GRANULARITY_MINUTE", label: clockTime },
  day: { title: "Last day", span: 86_400_000, step: 3_600_000, granularity: "GRANULARITY_HOUR", label: clockTime },
  month: { title: "Last 30 days", span: 30 * 86_400_000, step: 86_400_000, granularity: "GRANULARITY_DAY", label: dayOf },
};

// key id -> "name (prefix…)", so a chart's reader recognises the key
export async function keyNames(ctx) {
  const keys = (await call("ProjectService", "ListApiKeys", { organizationId: ctx.org, projectId: ctx.project })).keys || [];
  return new Map(keys.map((k) => [k.id, `${k.name} (${k.prefix}…)`]));
}

const refused = (r) => Object.values(r.refusals || {}).reduce((a, b) => a + Number(b), 0);

function rangePicker() {
  const current = localStorage.getItem("rl.range") || "hour";
  const [wrap, el] = select("Time range", Object.entries(RANGES).map(([k, r]) => [k, r.title]), current);
  el.addEventListener("change", () => {
    localStorage.setItem("rl.range", el.value);
    window.dispatchEvent(new HashChangeEvent("hashchange"));
  });
  return [wrap, RANGES[current] || RANGES.hour];
}

async function usage(ctx, range, groupBy) {
  const end = Date.now() + range.step;
  return (await call("UsageService", "GetUsage", {
    organizationId: ctx.org, projectId: ctx.project, startMs: String(end - range.span - range.step),
    endMs: String(end), granularity: range.granularity, groupBy,
  })).rows || [];
}

function buckets(rows, range, valuesOf) {
  const byStart = new Map();
  for (const r of rows) byStart.set(Number(r.bucketStartMs), valuesOf(r));
  const first = Math.floor((Date.now() - range.span) / range.step) * range.step;
  const all = [];
  for (let t = first; t <= Date.now(); t += range.step) {
    // usage buckets start on whole UTC minutes, hours and days; find the one covering t
    const hit = [...byStart.keys()].find((s) => s <= t && t < s + range.step);
    all.push({ start: t, values: hit !== undefined ? byStart.get(hit) : {} });
  }
  return all;
}

function totalsBy(rows, keyOf) {
  const totals = new Map();
  for (const r of rows) {
    const t = totals.get(keyOf(r)) || { requests: 0, refused: 0, input: 0, output: 0, cached: 0, spend: 0 };
    t.requests += Number(r.requests); t.refused += refused(r);
    t.input += Number(r.inputTokens); t.output += Number(r.outputTokens); t.cached += Number(r.cachedTokens);
    t.spend += Number(r.spendUsd);
    totals.set(keyOf(r), t);
  }
  return [...totals.entries()].map(([k, t]) => [k, count(t.requests), count(t.refused), count(t.input),
    count(t.output), count(t.cached), money(t.spend)]);
}

export async function usagePage(ctx) {
  if (!ctx.project) return h("p", {}, "Choose or create a project first.");
  const [picker, range] = rangePicker();
  const [overall, byModel, byKey, keys] = await Promise.all([
    usage(ctx, range, []), usage(ctx, range, ["GROUP_BY_MODEL"]), usage(ctx, range, ["GROUP_BY_API_KEY"]),
    keyNames(ctx)]);
  const reasons = {};
  for (const r of overall) for (const [k, v] of Object.entries(r.refusals || {})) reasons[k] = (reasons[k] || 0) + Number(v);
  const heads = ["Requests", "Refused", "Input tokens", "Output tokens", "Cached tokens", "Spend"];
  return [
    h("div", { class: "toolbar" }, picker, h("p", { class: "muted" }, `Project ${ctx.projectName(ctx.project)}; times in ${zone()}.`)),
    stackedBars({
      id: "requests-chart", title: "Requests", label: range.label,
      series: [{ name: "admitted", cls: "s-ok" }, { name: "refused", cls: "s-bad" }],
      buckets: buckets(overall, range, (r) => ({ admitted: Number(r.requests), refused: refused(r) })),
    }),
    stackedBars({
      id: "tokens-chart", title: "Tokens", label: range.label,
      series: [{ name: "input", cls: "s-a" }, { name: "output", cls: "s-b" }, { name: "cached", cls: "s-c" }],
      buckets: buckets(overall, range, (r) => ({
        input: Number(r.inputTokens), output: Number(r.outputTokens), cached: Number(r.cachedTokens) })),
    }),
    table("Refusals by reason", ["Reason", "Refused"],
      Object.entries(reasons).map(([k, v]) => [h("code", {}, k.replace("REASON_", "").toLowerCase()), count(v)]),
      "No refusals in this range."),
    table("By model", ["Model", ...heads], totalsBy(byModel, (r) => r.model), "No traffic in this range."),
    table("By API key", ["Key", ...heads], totalsBy(byKey, (r) => keys.get(r.apiKeyId) || r.apiKeyId), "No traffic in this range."),
  ];
}

function percentile(sorted, p) {
  if (!sorted.length) return 0;
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}

export async function metricsPage(ctx) {
  if (!ctx.project) return h("p", {}, "Choose or create a project first.");
  const entries = (await call("UsageService", "ListRequestLogs", {
    organizationId: ctx.org, projectId: ctx.project, limit: 1000 })).entries || [];
  const byModel = new Map();
  for (const e of entries) {
    if (!Number(e.statusCode)) continue; // not reported yet: no latency or status to show
    const m = byModel.get(e.model) || { latencies: [], statuses: {} };
    m.latencies.push(Number(e.latencyMs));
    m.statuses[e.statusCode] = (m.statuses[e.statusCode] || 0) + 1;
    byModel.set(e.model, m);
  }
  const rows = [...byModel.entries()].map(([model, m]) => {
    const s = m.latencies.sort((a, b) => a - b);
    return [h("code", {}, model), count(s.length), `${percentile(s, 50)} ms`, `${percentile(s, 95)} ms`,
      `${percentile(s, 99)} ms`,
      Object.entries(m.statuses).map(([code, n]) => `${code}: ${count(n)}`).join(", ")];
  });
  return [
    h("p", { class: "muted" }, "From the latest 1,000 reported requests of the request log (ReportUsage)."),
    table("Latency and status codes per model", ["Model", "Reported", "p50", "p95", "p99", "Status codes"], rows,
      "No reported requests yet: ReportUsage records latency and status codes."),
  ];
}
