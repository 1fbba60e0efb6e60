// Calls the console's API: sign-in, sign-out, and every RPC through /console/rpc/ with the
// session's CSRF token. The session itself is an HttpOnly cookie this code never sees.

let csrf = "";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function parse(response) {
  const text = await response.text();
  let body = {};
  try { body = text ? JSON.parse(text) : {}; } catch { body = { message: text }; }
  if (!response.ok) {
    throw new ApiError(response.status, body.code || "unknown", body.message || response.statusText);
  }
  return body;
}

export async function currentSession() {
  const response = await fetch("api/session", { credentials: "same-origin" });
  if (response.status === 401) return null;
  const body = await parse(response);
  csrf = body.csrfToken;
  return body.principal;
}

export async function signIn(token) {
  const response = await fetch("api/session", {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token }),
  });
  const body = await parse(response);
  csrf = body.csrfToken;
  return body.principal;
}

export async function signOut() {
  await fetch("api/session", { method: "DELETE", credentials: "same-origin", headers: { "X-CSRF-Token": csrf } });
  csrf = "";
}

// Every item of a List RPC, page after page (each List RPC pages: page_size at most 1000,
// next_page_token until it is empty). ``field`` names the reply's list.
export async function listAll(service, method, request, field) {
  const items = [];
  let pageToken = "";
  do {
    const reply = await call(service, method, { ...request, pageSize: 1000, pageToken });
    items.push(...(reply[field] || []));
    pageToken = reply.nextPageToken || "";
  } while (pageToken);
  return items;
}

// call("ProjectService", "GetProject", {...}) -> the response message as JSON.
export async function call(service, method, request = {}) {
  const response = await fetch(`rpc/ratelimitd.v1.${service}/${method}`, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: JSON.stringify(request),
  });
  return parse(response);
}
