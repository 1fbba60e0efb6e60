// A decision as the HTTP answer an LLM API gives: docs/api.md "Refusal reasons", the server's
// own table (ratelimitd/engine/outcomes.py), so Envoy and this client answer alike.
import type { IncomingMessage, ServerResponse } from "node:http";
import { Reason } from "./gen/ratelimitd/v1/ratelimit_pb.js";
import type { Decision, RateLimitClient } from "./client.js";

const REFUSALS: ReadonlyMap<Reason, [status: number, code: string]> = new Map([
  [Reason.PROJECT_LIMIT, [429, "rate_limit_exceeded"]],
  [Reason.ORGANIZATION_LIMIT, [429, "rate_limit_exceeded"]],
  [Reason.REQUEST_TOO_LARGE, [413, "request_too_large"]],
  [Reason.INVALID_API_KEY, [401, "invalid_api_key"]],
  [Reason.MODEL_NOT_AVAILABLE, [404, "model_not_found"]],
  [Reason.MODEL_BLOCKED, [403, "model_blocked"]],
  [Reason.SPEND_LIMIT, [400, "blocked_api_access"]],
  [Reason.REQUEST_ID_REUSED, [409, "request_id_reused"]],
  [Reason.STORAGE_UNAVAILABLE, [503, "service_unavailable"]],
]);
const METRIC_TYPED = new Set([Reason.PROJECT_LIMIT, Reason.ORGANIZATION_LIMIT, Reason.REQUEST_TOO_LARGE]);

/** status 200 means "serve the request" (with headers). */
export interface HttpAnswer {
  status: number;
  headers: Record<string, string>;
  body: string;
}

function errorAnswer(headers: Record<string, string>, status: number, message: string, type: string, code: string): HttpAnswer {
  const body = JSON.stringify({ error: { message, type, code } });
  return { status, headers: { ...headers, "content-type": "application/json" }, body };
}

/** 200 with the x-ratelimit-* headers when admitted, else the refusal's status, headers (retry-after on 429) and JSON error. */
export function httpAnswer(decision: Decision): HttpAnswer {
  const { response } = decision;
  const headers = { ...response.headers };
  if (decision.allowed) return { status: 200, headers, body: "" };
  if (decision.unreachable) {
    return errorAnswer(headers, 503, "The rate limit service is unavailable.", "server_error", "service_unavailable");
  }
  const [status, code] = REFUSALS.get(response.reason) ?? [503, "service_unavailable"];
  const type = METRIC_TYPED.has(response.reason) ? (response.binding?.metric ?? "") : "invalid_request_error";
  return errorAnswer(headers, status, response.message, type, code);
}

const decisions = new WeakMap<IncomingMessage, Decision>();

/** The decision the middleware made for this request (its requestId is the one to report with). */
export function decisionOf(req: IncomingMessage): Decision | undefined {
  return decisions.get(req);
}

export type Describe = (req: IncomingMessage) => { model: string; tokens?: number };

function bearer(req: IncomingMessage): string {
  const [scheme, token] = (req.headers.authorization ?? "").split(" ", 2);
  return scheme?.toLowerCase() === "bearer" ? (token ?? "").trim() : "";
}

/**
 * An Express-style middleware `(req, res, next)`: asks ratelimitd before `next`. The API key is
 * the `Authorization: Bearer` token. A refusal is answered here (429, 413, 401, 403, ...) and
 * `next` is not called; an admitted request gets the x-ratelimit-* headers and goes on.
 */
export function rateLimit(client: RateLimitClient, describe: Describe) {
  return async (req: IncomingMessage, res: ServerResponse, next: (error?: unknown) => void): Promise<void> => {
    const apiKey = bearer(req);
    if (!apiKey) {
      const message = "No API key provided. Send it in the Authorization header: `Authorization: Bearer YOUR_API_KEY`.";
      send(res, errorAnswer({}, 401, message, "invalid_request_error", "invalid_api_key"));
      return;
    }
    let decision: Decision;
    try {
      const { model, tokens } = describe(req);
      decision = await client.check({ apiKey, model, tokens });
    } catch (error) {
      next(error);
      return;
    }
    const answer = httpAnswer(decision);
    if (answer.status !== 200) {
      send(res, answer);
      return;
    }
    for (const [name, value] of Object.entries(answer.headers)) res.setHeader(name, value);
    decisions.set(req, decision);
    next();
  };
}

function send(res: ServerResponse, answer: HttpAnswer): void {
  res.writeHead(answer.status, answer.headers);
  res.end(answer.body);
}
