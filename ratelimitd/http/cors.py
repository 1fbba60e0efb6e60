"""CORS: which browser origins may call the HTTP server (setting http_cors_origins; default none).

Without an allowed origin a browser may not read any answer, and cannot even send a
JSON POST or an Authorization header (both need a preflight first). Callers that are
not browsers never send ``Origin`` and are not affected.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection

from aiohttp import web
from aiohttp.typedefs import Middleware

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# What Connect clients send (connect-web adds X-User-Agent), and the credential.
ALLOWED_HEADERS = "Authorization, Content-Type, Connect-Protocol-Version, Connect-Timeout-Ms, X-User-Agent"
ALLOWED_METHODS = "POST"
PREFLIGHT_MAX_AGE_S = "7200"


def middleware(origins: Collection[str]) -> Middleware:
    allowed = frozenset(origins)
    any_origin = "*" in allowed

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None:
            return await handler(request)
        permitted = any_origin or origin in allowed
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return _preflight(origin, permitted)
        response = await handler(request)
        if permitted:
            _allow(response, origin)
        return response

    return cors


def _preflight(origin: str, permitted: bool) -> web.Response:
    if not permitted:
        # No Access-Control-* headers: the browser refuses the call; the text tells whoever looks.
        text = f"origin {origin} may not call this server: it is not in RATELIMITD_HTTP_CORS_ORIGINS"
        return web.Response(status=403, text=text)
    response = web.Response(status=204)
    _allow(response, origin)
    response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
    response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
    response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE_S
    return response


def _allow(response: web.StreamResponse, origin: str) -> None:
    # The origin itself rather than "*", so one answer never serves another origin from a cache.
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers.add("Vary", "Origin")
