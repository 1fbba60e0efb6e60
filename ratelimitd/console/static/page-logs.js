// Logs: the project's request log, filtered by model, key and outcome.

import { call } from "./api.js";
import { field, h, select, table } from "./dom.js";
import { count, durationMs, when } from "./format.js";
import { keyNames } from "./page-usage.js";

const filters = { model: "", apiKeyId: "", outcome: "OUTCOME_UNSPECIFIED" };
const LOG_PAGE = 200; // the newest page of matches

export async function logsPage(ctx) {
  if (!ctx.project) return h("p", {}, "Choose or create a project first.");
  const [reply, keys] = await Promise.all([
    call("UsageService", "ListRequestLogs", { organizationId: ctx.org, projectId: ctx.project, pageSize: LOG_PAGE, ...filters }),
    keyNames(ctx)]);
  const entries = reply.entries || [];
  const [modelField, model] = field("Model", { value: filters.model, name: "model" });
  const [keyField, key] = select("API key", [["", "Any key"], ...keys.entries()], filters.apiKeyId);
  const [outcomeField, outcome] = select("Outcome",
    [["OUTCOME_UNSPECIFIED", "Any"], ["OUTCOME_ALLOWED", "Admitted"], ["OUTCOME_REFUSED", "Refused"]], filters.outcome);
  const form = h("form", { class: "inline-form", "aria-label": "Filter the request log" },
    modelField, keyField, outcomeField, h("button", { type: "submit" }, "Filter"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    Object.assign(filters, { model: model.value.trim(), apiKeyId: key.value.trim(), outcome: outcome.value });
    window.dispatchEvent(new HashChangeEvent("hashchange"));
  });
  const rows = entries.map((e) => [
    when(e.requestTime), h("code", {}, e.model), keys.get(e.apiKeyId) || h("code", {}, e.apiKeyId || "—"),
    e.allowed ? h("span", { class: "badge ok" }, "admitted") : h("span", { class: "badge bad" }, (e.reason || "refused").replace("REASON_", "").toLowerCase()),
    `${count(e.inputTokens)} / ${count(e.outputTokens)}`,
    Number(e.statusCode) ? String(e.statusCode) : "—", Number(e.statusCode) ? `${count(durationMs(e.latency))} ms` : "—",
    h("code", { class: "muted" }, e.requestId || "—"),
  ]);
  return [form, table("Request log, newest first",
    ["Time", "Model", "Key", "Outcome", "Input / output tokens", "Status", "Latency", "Request id"],
    rows, "No requests match.")];
}
