// check (CheckAndConsume) and report (ReportUsage) over gRPC, with a deadline on every attempt.
// An attempt that fails with UNAVAILABLE or DEADLINE_EXCEEDED is retried with the same request
// id, so a decision the server made but could not deliver is replayed, never charged twice
// (docs/api.md "Request ids"). When every attempt fails, check follows the fail-open or
// fail-closed choice instead of throwing; any other status throws a ConnectError.
import { randomUUID } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import {
  CheckRequestSchema,
  CheckResponseSchema,
  ReportUsageRequestSchema,
  type CheckResponse,
  type ReportUsageResponse,
} from "./gen/ratelimitd/v1/ratelimit_pb.js";
import { RateLimitService } from "./gen/ratelimitd/v1/rate_limit_service_pb.js";

export interface Options {
  /** Each attempt's deadline in ms (500). */
  timeoutMs?: number;
  /** Tries in all, with one request id (3). */
  attempts?: number;
  /** First pause between tries in ms, doubled each time (50). */
  backoffMs?: number;
  /** When ratelimitd cannot be asked: "open" admits the request, "closed" refuses it with 503 ("closed"). */
  fail?: "open" | "closed";
  /** Sent as `authorization: Bearer` metadata; needed only to decide by project. */
  token?: string;
  /** gRPC interceptors, e.g. for tracing. */
  interceptors?: Interceptor[];
}

export interface CheckArgs {
  apiKey: string;
  model: string;
  /** The reservation: prompt tokens + max_tokens. */
  tokens?: number;
  /** 0 means 1. */
  requests?: number;
  /** Made at random when absent, and reused for this call's retries. */
  requestId?: string;
}

export interface ReportArgs {
  apiKey: string;
  requestId: string;
  model?: string;
  inputTokens?: number;
  outputTokens?: number;
  cachedTokens?: number;
  statusCode?: number;
  latencyMs?: number;
}

/** A CheckAndConsume answer, or the fail-open/fail-closed stand-in when none came. */
export interface Decision {
  response: CheckResponse;
  allowed: boolean;
  requestId: string;
  /** True when ratelimitd could not be asked; `error` says why. */
  unreachable: boolean;
  error?: ConnectError;
}

const RETRYABLE = new Set([Code.Unavailable, Code.DeadlineExceeded]);

export function newRequestId(): string {
  return `req_${randomUUID().replaceAll("-", "")}`;
}

export class RateLimitClient {
  private readonly rpc: Client<typeof RateLimitService>;
  private readonly options: Required<Omit<Options, "token" | "interceptors">> & Pick<Options, "token">;

  /** `target`: "http://127.0.0.1:50051" (plaintext h2c), "https://..." (TLS), or a Transport of your own. */
  constructor(target: string | Transport, options: Options = {}) {
    const transport =
      typeof target === "string"
        ? createGrpcTransport({ baseUrl: target, interceptors: options.interceptors ?? [] })
        : target;
    this.rpc = createClient(RateLimitService, transport);
    this.options = {
      timeoutMs: options.timeoutMs ?? 500,
      attempts: options.attempts ?? 3,
      backoffMs: options.backoffMs ?? 50,
      fail: options.fail ?? "closed",
      token: options.token,
    };
  }

  async check(args: CheckArgs): Promise<Decision> {
    const request = create(CheckRequestSchema, {
      caller: { case: "apiKey", value: args.apiKey },
      model: args.model,
      tokens: BigInt(args.tokens ?? 0),
      requests: BigInt(args.requests ?? 0),
      requestId: args.requestId ?? newRequestId(),
    });
    try {
      const response = await this.retry((callOptions) => this.rpc.checkAndConsume(request, callOptions));
      return { response, allowed: response.allowed, requestId: response.requestId, unreachable: false };
    } catch (thrown) {
      const error = ConnectError.from(thrown);
      if (!RETRYABLE.has(error.code)) throw error;
      const allowed = this.options.fail === "open";
      const response = create(CheckResponseSchema, { allowed, requestId: request.requestId });
      return { response, allowed, requestId: request.requestId, unreachable: true, error };
    }
  }

  /** Tells what an admitted request really used; a retry of it is counted once. */
  async report(args: ReportArgs): Promise<ReportUsageResponse> {
    const request = create(ReportUsageRequestSchema, {
      caller: { case: "apiKey", value: args.apiKey },
      requestId: args.requestId,
      model: args.model ?? "",
      inputTokens: BigInt(args.inputTokens ?? 0),
      outputTokens: BigInt(args.outputTokens ?? 0),
      cachedTokens: BigInt(args.cachedTokens ?? 0),
      statusCode: args.statusCode ?? 0,
      latencyMs: BigInt(args.latencyMs ?? 0),
    });
    return this.retry((callOptions) => this.rpc.reportUsage(request, callOptions));
  }

  private async retry<T>(call: (options: { timeoutMs: number; headers?: HeadersInit }) => Promise<T>): Promise<T> {
    const headers = this.options.token ? { authorization: `Bearer ${this.options.token}` } : undefined;
    let pause = this.options.backoffMs;
    for (let attempt = 1; ; attempt++) {
      try {
        return await call({ timeoutMs: this.options.timeoutMs, headers });
      } catch (thrown) {
        const error = ConnectError.from(thrown);
        if (!RETRYABLE.has(error.code) || attempt >= this.options.attempts) throw error;
        await sleep(pause * (0.5 + Math.random()));
        pause *= 2;
      }
    }
  }
}
