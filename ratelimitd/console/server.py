"""The console's routes on the HTTP server: its pages, sign-in, and its calls to the API.

The console decides nothing itself. A signed-in browser holds only a session id, in an
HttpOnly cookie; ``POST /console/rpc/<package.Service>/<Method>`` forwards the body to
the Connect gateway with ``Bearer <session id>`` as the credential, and the gRPC
server's own authentication (credentials.py resolves the session to the credential
that signed in) and authorization table decide, exactly as for any other caller.

Every POST and DELETE but the sign-in itself must carry the session's CSRF token in
``X-CSRF-Token`` (sessions.csrf_token); a POST from another origin is refused outright.
docs/console.md.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import grpc
from aiohttp import web

from ratelimitd.api.errors import STATUS
from ratelimitd.console import assets
from ratelimitd.core.errors import RatelimitdError
from ratelimitd.engine.authz import Principal
from ratelimitd.engine.credentials import Credentials
from ratelimitd.engine.sessions import Sessions, csrf_token, is_session_token
from ratelimitd.http.connect import Gateway, error

COOKIE = "ratelimitd_session"
CSRF_HEADER = "X-CSRF-Token"
BASE = "/console"
MAX_TOKEN_CHARS = 512
# The pages load only their own files: no inline script, nothing from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

Mount = Callable[[web.Application, Gateway], None]


def mount(credentials: Credentials, sessions: Sessions) -> Mount:
    """What app.py hands the HTTP server: adds the console's routes next to the gateway's."""

    def add_routes(app: web.Application, gateway: Gateway) -> None:
        console = Console(credentials, sessions, gateway, assets.load())
        app.middlewares.append(security_headers)
        app.router.add_get("/", console.to_console)
        app.router.add_get(BASE, console.to_console)
        app.router.add_get(BASE + "/", console.page)
        app.router.add_get(BASE + "/static/{name}", console.asset)
        app.router.add_get(BASE + "/api/session", console.session)
        app.router.add_post(BASE + "/api/session", console.sign_in)
        app.router.add_delete(BASE + "/api/session", console.sign_out)
        app.router.add_post(BASE + "/rpc/{service}/{method}", console.rpc)

    return add_routes


@web.middleware
async def security_headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    response = await handler(request)
    if request.path == BASE or request.path.startswith(BASE + "/"):
        response.headers.update(SECURITY_HEADERS)
    return response


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def _refusal(e: RatelimitdError) -> web.Response:
    return error(STATUS[e.kind], e.message)


def _principal_json(p: Principal) -> dict[str, Any]:
    return {
        "kind": p.kind,
        "name": p.name,
        "organizationId": p.organization_id,
        "memberId": p.member_id,
        "role": str(p.role) if p.role is not None else "",
    }


def _same_origin(request: web.Request) -> bool:
    """A browser names the page's origin on every POST; another site's page must not sign in or act."""
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc == request.host


class Console:
    def __init__(self, credentials: Credentials, sessions: Sessions, gateway: Gateway, files: assets.Assets) -> None:
        self._credentials = credentials
        self._sessions = sessions
        self._gateway = gateway
        self._files = files

    async def to_console(self, _: web.Request) -> web.Response:
        raise web.HTTPFound(BASE + "/")

    async def page(self, _: web.Request) -> web.Response:
        return self._files.response("index.html")

    async def asset(self, request: web.Request) -> web.Response:
        return self._files.response(request.match_info["name"])

    def _session_id(self, request: web.Request) -> str | None:
        value = request.cookies.get(COOKIE)
        return value if value and is_session_token(value) else None

    async def session(self, request: web.Request) -> web.Response:
        """Who is signed in (and the CSRF token the page repeats), or 401."""
        session_id = self._session_id(request)
        if session_id is None:
            return error(grpc.StatusCode.UNAUTHENTICATED, "not signed in")
        try:
            principal = await self._credentials.authenticate("Bearer " + session_id)
        except RatelimitdError as e:
            return _refusal(e)
        return _json({"principal": _principal_json(principal), "csrfToken": csrf_token(session_id)})

    async def sign_in(self, request: web.Request) -> web.Response:
        if not _same_origin(request):
            return error(grpc.StatusCode.PERMISSION_DENIED, "sign-in from another origin is refused")
        token = await self._token(request)
        if isinstance(token, web.Response):
            return token
        try:
            principal = await self._credentials.authenticate("Bearer " + token)
            session_id = await self._sessions.create(token)
        except RatelimitdError as e:
            return _refusal(e)
        response = _json({"principal": _principal_json(principal), "csrfToken": csrf_token(session_id)})
        response.set_cookie(
            COOKIE,
            session_id,
            max_age=self._sessions.ttl_s,
            path=BASE,
            httponly=True,
            samesite="Strict",
            secure=request.secure or request.headers.get("X-Forwarded-Proto") == "https",
        )
        return response

    async def _token(self, request: web.Request) -> str | web.Response:
        """The credential in the sign-in body ``{"token": "..."}``, or the response that says what is wrong."""
        if request.content_type != "application/json":
            return error(grpc.StatusCode.INVALID_ARGUMENT, 'sign in with a JSON body {"token": "..."}', 415)
        try:
            body = json.loads(await request.text())
        except ValueError:
            return error(grpc.StatusCode.INVALID_ARGUMENT, 'the sign-in body is not JSON; send {"token": "..."}')
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token.strip():
            return error(grpc.StatusCode.INVALID_ARGUMENT, "token is empty: paste a member or operator credential")
        token = token.strip()
        if len(token) > MAX_TOKEN_CHARS or not token.isascii() or not token.isprintable():
            return error(grpc.StatusCode.UNAUTHENTICATED, "the token is not a credential of this server")
        if is_session_token(token):
            return error(grpc.StatusCode.INVALID_ARGUMENT, "a console session cannot sign in; use a credential")
        return token

    def _checked_session(self, request: web.Request) -> str | web.Response:
        """The session id of a state-changing request, once its CSRF token and origin are right."""
        session_id = self._session_id(request)
        if session_id is None:
            return error(grpc.StatusCode.UNAUTHENTICATED, "not signed in: sign in to the console first")
        if not _same_origin(request):
            return error(grpc.StatusCode.PERMISSION_DENIED, "a console call from another origin is refused")
        if request.headers.get(CSRF_HEADER) != csrf_token(session_id):
            return error(
                grpc.StatusCode.PERMISSION_DENIED, f"missing or wrong {CSRF_HEADER} header: reload the console"
            )
        return session_id

    async def sign_out(self, request: web.Request) -> web.Response:
        session_id = self._checked_session(request)
        if isinstance(session_id, web.Response):
            return session_id
        try:
            await self._sessions.delete(session_id)
        except RatelimitdError as e:
            return _refusal(e)
        response = _json({})
        response.del_cookie(COOKIE, path=BASE)
        return response

    async def rpc(self, request: web.Request) -> web.StreamResponse:
        session_id = self._checked_session(request)
        if isinstance(session_id, web.Response):
            return session_id
        path = f"/{request.match_info['service']}/{request.match_info['method']}"
        return await self._gateway.forward(request, path, "Bearer " + session_id)
