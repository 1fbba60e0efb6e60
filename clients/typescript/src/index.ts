export { RateLimitClient, newRequestId, type CheckArgs, type Decision, type Options, type ReportArgs } from "./client.js";
export { decisionOf, httpAnswer, rateLimit, type Describe, type HttpAnswer } from "./http.js";
export { Reason, ReportUsageResponse_Result } from "./gen/ratelimitd/v1/ratelimit_pb.js";
