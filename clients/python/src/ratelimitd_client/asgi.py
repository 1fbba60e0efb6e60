"""ASGI middleware: asks ratelimitd before the app runs, answers a refusal itself.

An admitted request reaches the app with the decision in ``scope["state"]["ratelimitd"]`` (its
``request_id`` is the one to report usage with) and its response carries the x-ratelimit-*
headers. A refused one never reaches the app: it gets the refusal's status (429, 413, 401, 403,
...), headers (retry-after on 429) and an OpenAI-style JSON error body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ratelimitd_client import http
from ratelimitd_client.client import AsyncClient

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def bearer_token(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            text: str = value.decode("latin-1")
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


class RateLimitMiddleware:
    """``model``: the model name, or a function of the scope that returns it.
    ``tokens``: the reservation (prompt + max_tokens) as a function of the scope; 0 by default."""

    def __init__(
        self,
        app: App,
        client: AsyncClient,
        model: str | Callable[[Scope], str],
        tokens: Callable[[Scope], int] = lambda _scope: 0,
    ) -> None:
        self.app, self.client = app, client
        self.model_of = model if callable(model) else (lambda _scope: model)
        self.tokens_of = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api_key = bearer_token(scope)
        if not api_key:
            await _respond(send, http.missing_api_key())
            return
        decision = await self.client.check(api_key, self.model_of(scope), tokens=self.tokens_of(scope))
        answer = decision.http()
        if answer.status != 200:
            await _respond(send, answer)
            return
        scope.setdefault("state", {})["ratelimitd"] = decision
        await self.app(scope, receive, _with_headers(send, answer.headers))


def _encode(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


async def _respond(send: Send, answer: http.HttpAnswer) -> None:
    await send({"type": "http.response.start", "status": answer.status, "headers": _encode(answer.headers)})
    await send({"type": "http.response.body", "body": answer.body})


def _with_headers(send: Send, headers: dict[str, str]) -> Send:
    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), *_encode(headers)]
        await send(message)

    return send_with_headers
