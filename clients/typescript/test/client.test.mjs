// Run by tests/test_clients.py against a live server: the organization's `*` limit gives every
// model its own bucket of 2 requests and 1,000 tokens a minute on a stopped clock, so each test
// asks for a model of its own and counts exactly.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { createServer } from "node:http";
import { once } from "node:events";
import { test } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import { RateLimitClient, Reason, ReportUsageResponse_Result, decisionOf, httpAnswer, rateLimit } from "../dist/index.js";

const address = process.env.RATELIMITD_TEST_ADDRESS;
const key = process.env.RATELIMITD_TEST_KEY_TYPESCRIPT;
const skip = address ? false : "run by tests/test_clients.py, which starts a live server";
const baseUrl = `http://${address}`;
const freshModel = () => `ts-${randomBytes(6).toString("hex")}`;

async function unusedAddress() {
  const server = createServer().listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address();
  server.close();
  await once(server, "close");
  return `http://127.0.0.1:${port}`;
}

test("an admitted request carries the rate limit headers", { skip }, async () => {
  const decision = await new RateLimitClient(baseUrl).check({ apiKey: key, model: freshModel(), tokens: 100 });
  const answer = httpAnswer(decision);
  assert.equal(answer.status, 200);
  assert.equal(answer.headers["x-ratelimit-remaining-requests"], "1");
  assert.equal(answer.headers["x-ratelimit-remaining-tokens"], "900");
  assert.match(decision.requestId, /^req_/);
});

test("refusals become 429 with retry-after, 413 and 401", { skip }, async () => {
  const client = new RateLimitClient(baseUrl);
  const model = freshModel();
  for (let i = 0; i < 2; i++) assert.equal((await client.check({ apiKey: key, model })).allowed, true);
  const limited = httpAnswer(await client.check({ apiKey: key, model }));
  assert.equal(limited.status, 429);
  assert.ok(Number(limited.headers["retry-after"]) >= 1);
  assert.deepEqual(JSON.parse(limited.body).error.code, "rate_limit_exceeded");
  assert.equal(httpAnswer(await client.check({ apiKey: key, model: freshModel(), tokens: 1001 })).status, 413);
  assert.equal(httpAnswer(await client.check({ apiKey: "rl_not-a-key", model: freshModel() })).status, 401);
});

test("a lost answer is retried with the same request id and charged once", { skip }, async () => {
  const ids = [];
  // The call reaches the server and is decided, but its answer is lost once: what a timeout or
  // a dropped connection after sending looks like to the caller.
  const loseFirst = (next) => async (req) => {
    ids.push(req.message.requestId);
    const res = await next(req);
    if (ids.length === 1) throw new ConnectError("connection lost after the call was sent", Code.Unavailable);
    return res;
  };
  const client = new RateLimitClient(baseUrl, { interceptors: [loseFirst], backoffMs: 0 });
  const model = freshModel();
  const decision = await client.check({ apiKey: key, model });
  assert.equal(decision.allowed, true);
  assert.equal(decision.response.reason, Reason.ALLOWED);
  assert.equal(decision.response.replayed, true);
  assert.deepEqual(ids, [decision.requestId, decision.requestId]);
  // charged once: of 2 requests, one more fits, then none
  assert.equal((await client.check({ apiKey: key, model })).allowed, true);
  assert.equal((await client.check({ apiKey: key, model })).allowed, false);
});

test("an unreachable service fails open or closed as chosen", { skip }, async () => {
  const target = await unusedAddress();
  for (const [fail, status] of [["open", 200], ["closed", 503]]) {
    const client = new RateLimitClient(target, { fail, attempts: 2, backoffMs: 0 });
    const decision = await client.check({ apiKey: key, model: freshModel() });
    assert.equal(decision.unreachable, true);
    assert.equal(decision.allowed, fail === "open");
    assert.equal(httpAnswer(decision).status, status);
  }
});

test("bad input throws with the server's status", { skip }, async () => {
  await assert.rejects(new RateLimitClient(baseUrl).check({ apiKey: key, model: "" }), (error) => {
    assert.equal(error.code, Code.InvalidArgument);
    assert.match(error.message, /model/);
    return true;
  });
});

test("check then report reconciles once", { skip }, async () => {
  const client = new RateLimitClient(baseUrl);
  const decision = await client.check({ apiKey: key, model: freshModel(), tokens: 500 });
  const usage = { apiKey: key, requestId: decision.requestId, inputTokens: 100, outputTokens: 50 };
  const first = await client.report(usage);
  const again = await client.report(usage);
  assert.equal(first.result, ReportUsageResponse_Result.RECONCILED);
  assert.equal(first.tokenDelta, -350n);
  assert.equal(again.result, ReportUsageResponse_Result.DUPLICATE);
});

test("the middleware serves admitted requests and answers refusals", { skip }, async (t) => {
  const model = freshModel();
  const guard = rateLimit(new RateLimitClient(baseUrl), () => ({ model, tokens: 10 }));
  const reached = [];
  const server = createServer((req, res) =>
    guard(req, res, () => {
      reached.push(decisionOf(req).requestId);
      res.end("ok");
    }),
  ).listen(0, "127.0.0.1");
  await once(server, "listening");
  t.after(() => server.close());
  const url = `http://127.0.0.1:${server.address().port}/v1/chat/completions`;
  const call = (authorization) => fetch(url, { method: "POST", headers: authorization ? { authorization } : {} });
  const answers = [];
  for (let i = 0; i < 3; i++) answers.push(await call(`Bearer ${key}`));
  assert.deepEqual(answers.map((r) => r.status), [200, 200, 429]);
  assert.equal(reached.length, 2);
  assert.equal(answers[1].headers.get("x-ratelimit-remaining-requests"), "0");
  assert.equal(await answers[1].text(), "ok");
  assert.ok(answers[2].headers.get("retry-after"));
  assert.equal((await answers[2].json()).error.code, "rate_limit_exceeded");
  const missing = await call(undefined);
  assert.equal(missing.status, 401);
  assert.equal((await missing.json()).error.code, "invalid_api_key");
});
