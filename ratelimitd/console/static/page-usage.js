// Usage (requests, tokens and refusals over time, by model and by key) and Metrics
// (latency percentiles and status codes per model, from the request log).

import { call, listAll } from "./api.js";
import { lines, stackedBars } from "./chart.js";
import { h, select, table } from "./dom.js";
import { clockTime, count, dayOf, durationMs, money, msOf, stampOf, usdOf, zone } from "./format.js";

const RANGES = {
  hour: { title: "Last hour", span: 3_600_000, step: 60_000, granularity: "GRANULARITY_MINUTE", label: clockTime },
  day: { title: "Last day", span: 86_400_000, step: 3_600_000, granularity: "GRANULARITY_HOUR", label: clockTime },
  month: { title: "Last 30 days", span: 30 * 86_400_000, step: 86_400_000, granularity: "GRANULARITY_DAY", label: dayOf },
};

// key id -> "name (prefix…)", so a chart's reader recognises the key
export async function keyNames(ctx) {
  const keys = await listAll("ProjectService", "ListApiKeys", { organizationId: ctx.org, projectId: ctx.project }, "keys");
  return new Map(keys.map((k) => [k.id, `${k.name} (${k.prefix}…)`]));
}

const REASON_CLASSES = ["s-bad", "s-b", "s-c", "s-a"];
const reasonName = (reason) => reason.replace("REASON_", "").toLowerCase();

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
    organizationId: ctx.org, projectId: ctx.project, startTime: stampOf(end - range.span - range.step),
    endTime: stampOf(end), granularity: range.granularity, groupBy,
  })).rows || [];
}

function buckets(rows, range, valuesOf) {
  const byStart = new Map();
  for (const r of rows) byStart.set(msOf(r.bucketStartTime), valuesOf(r));
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
    t.spend += usdOf(r.spendUsdMicros);
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
    Object.keys(reasons).length ? stackedBars({
      id: "refusals-chart", title: "Refusals by reason", label: range.label,
      series: Object.keys(reasons).map((k, i) => ({ name: reasonName(k), cls: REASON_CLASSES[i % REASON_CLASSES.length] })),
      buckets: buckets(overall, range, (r) => Object.fromEntries(
        Object.entries(r.refusals || {}).map(([k, v]) => [reasonName(k), Number(v)]))),
    }) : null,
    table("Refusals by reason", ["Reason", "Refused"],
      Object.entries(reasons).map(([k, v]) => [h("code", {}, reasonName(k)), count(v)]),
      "No refusals in this range."),
    table("By model", ["Model", ...heads], totalsBy(byModel, (r) => r.model), "No traffic in this range."),
    table("By API key", ["Key", ...heads], totalsBy(byKey, (r) => keys.get(r.apiKeyId) || r.apiKeyId), "No traffic in this range."),
  ];
}

function statusClass(code) {
  return `${String(code)[0]}xx`;
}

export async function metricsPage(ctx) {
  if (!ctx.project) return h("p", {}, "Choose or create a project first.");
  const [picker, range] = rangePicker();
  const end = Date.now() + range.step;
  const reply = await call("UsageService", "GetRequestMetrics", {
    organizationId: ctx.org, projectId: ctx.project, startTime: stampOf(end - range.span - range.step),
    endTime: stampOf(end), granularity: range.granularity });
  const rows = reply.rows || [];
  const totals = reply.totals || [];
  const parts = [h("div", { class: "toolbar" }, picker, h("p", { class: "muted" },
    "From the requests ReportUsage recorded in the project's request log (its newest entries)."))];
  for (const t of totals) {
    const mine = rows.filter((r) => r.model === t.model);
    parts.push(lines({
      id: `latency-${t.model}`, title: `Latency of ${t.model}`, unit: "ms", label: range.label,
      series: [{ name: "p50", cls: "s-a" }, { name: "p95", cls: "s-b" }, { name: "p99", cls: "s-c" }],
      points: buckets(mine, range, (r) => ({
        p50: durationMs(r.latencyP50), p95: durationMs(r.latencyP95), p99: durationMs(r.latencyP99) })),
    }));
    parts.push(stackedBars({
      title: `Status codes of ${t.model}`, label: range.label,
      series: [{ name: "2xx", cls: "s-ok" }, { name: "4xx", cls: "s-b" }, { name: "5xx", cls: "s-bad" }],
      buckets: buckets(mine, range, (r) => {
        const v = {};
        for (const [code, n] of Object.entries(r.statusCodes || {})) v[statusClass(code)] = (v[statusClass(code)] || 0) + Number(n);
        return v;
      }),
    }));
  }
  parts.push(table("Latency and status codes per model, whole range",
    ["Model", "Reported", "p50", "p95", "p99", "Status codes"],
    totals.map((t) => [h("code", {}, t.model), count(t.reported), `${count(durationMs(t.latencyP50))} ms`,
      `${count(durationMs(t.latencyP95))} ms`, `${count(durationMs(t.latencyP99))} ms`,
      Object.entries(t.statusCodes || {}).map(([code, n]) => `${code}: ${count(n)}`).join(", ")]),
    "No reported requests in this range: ReportUsage records latency and status codes."));
  return parts;
}
