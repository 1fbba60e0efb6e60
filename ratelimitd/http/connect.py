"""The Connect protocol's unary calls (https://connectrpc.com/docs/protocol), over gRPC.

``POST /<package.Service>/<Method>`` with ``Content-Type: application/json`` (or
``application/proto``) carries the request message itself; the reply is the response
message with 200, or ``{"code": "...", "message": "..."}`` with the HTTP status
Connect gives that code. Each call is made on the loopback gRPC channel: what this
module adds is only the translation, so an HTTP caller and a gRPC caller get the same
answer from the same handlers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

JSON = "application/json"
PROTO = "application/proto"
# Connect's code -> HTTP status (the protocol's table, as amended by its RFC 003).
HTTP_STATUS = {
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
# Only paths shaped like an RPC are this module's; other routes (a console, ...) stay free.
RPC_PATH = r"/{service:[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+}/{method:[A-Za-z_][A-Za-z0-9_]*}"
MAX_TIMEOUT_DIGITS = 10  # the protocol's bound on Connect-Timeout-Ms
_TOKEN_CHARS = re.compile(r"^[\x20-\x7e]*$")
# Requests may leave out zero values; replies carry every field, so `"allowed": false` is there to read.
_PRINT_OPTIONS: dict[str, Any] = {"always_print_fields_with_no_presence": True, "indent": None}


def code_name(code: grpc.StatusCode) -> str:
    """Connect spells gRPC's codes in snake case; CANCELLED is its one other spelling."""
    return "canceled" if code is grpc.StatusCode.CANCELLED else code.name.lower()


def error(status: grpc.StatusCode, message: str, http_status: int | None = None) -> web.Response:
    body = json.dumps({"code": code_name(status), "message": message})
    return web.Response(status=http_status or HTTP_STATUS[status], text=body, content_type=JSON)


@dataclass(frozen=True)
class Rpc:
    """One unary RPC: its message classes and its call on the loopback channel, made once."""

    path: str
    request: type[Message]
    response: type[Message]
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]


def _message_class(descriptor: Any) -> type[Message]:
    cls: type[Message] = message_factory.GetMessageClass(descriptor)
    return cls


def rpc_table(services: Iterable[str], channel: grpc.aio.Channel) -> tuple[dict[str, Rpc], dict[str, str]]:
    """(unary RPCs by path, streaming RPCs by path with what to use instead), for the named services.

    The message types come from the default descriptor pool: the generated modules the
    gRPC server registered have put them there."""
    unary: dict[str, Rpc] = {}
    streaming: dict[str, str] = {}
    for name in services:
        service = descriptor_pool.Default().FindServiceByName(name)
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            if method.client_streaming or method.server_streaming:
                streaming[path] = _streaming_advice(method)
                continue
            # bytes in, bytes out: JSON is read and written here, protobuf passes as it is
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                path, request_serializer=None, response_deserializer=None
            )
            unary[path] = Rpc(path, _message_class(method.input_type), _message_class(method.output_type), call)
    return unary, streaming


def _streaming_advice(method: MethodDescriptor) -> str:
    return (
        f"{method.containing_service.full_name}/{method.name} is a streaming RPC; JSON over HTTP serves unary "
        "RPCs only: call it over gRPC"
    )


class BadRequest(Exception):
    """A request this layer refuses before it reaches the gRPC server; the message names the problem."""

    def __init__(
        self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT, http_status: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.http_status = http_status

    def response(self) -> web.Response:
        return error(self.code, self.message, self.http_status)


def encoding(request: web.Request) -> str:
    content_type = request.content_type  # lower case, without parameters such as charset
    if content_type not in (JSON, PROTO):
        got = request.headers.get("Content-Type") or "none"
        raise BadRequest(f"Content-Type {got} is not served here: send {JSON} (or {PROTO})", http_status=415)
    version = request.headers.get("Connect-Protocol-Version")
    if version is not None and version != "1":
        raise BadRequest(f"Connect-Protocol-Version {version!r} is not supported: send 1 (or leave it out)")
    return content_type


def timeout_s(request: web.Request) -> float | None:
    raw = request.headers.get("Connect-Timeout-Ms")
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > MAX_TIMEOUT_DIGITS:
        raise BadRequest(f"Connect-Timeout-Ms {raw!r} must be a whole number of milliseconds, at most 10 digits")
    return int(raw) / 1000


def metadata(request: web.Request) -> tuple[tuple[str, str], ...]:
    """The credential, as gRPC callers send it: the one header the handlers read."""
    value = request.headers.get("Authorization")
    if value is None:
        return ()
    if not _TOKEN_CHARS.match(value):
        raise BadRequest(
            "the Authorization header is not printable ASCII, so it is no credential", grpc.StatusCode.UNAUTHENTICATED
        )
    return (("authorization", value),)


def json_to_protobuf(body: bytes, rpc: Rpc) -> bytes:
    name = rpc.request.DESCRIPTOR.full_name
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"the request body is not UTF-8, so not JSON for {name}") from None
    if not text.strip():
        return b""  # an empty body is the empty message, as in Connect's own servers
    try:
        value = json.loads(text)
    except ValueError as e:
        raise BadRequest(f"the request body is not valid JSON ({e}); {name} is a JSON object") from None
    if not isinstance(value, dict):
        raise BadRequest(f"the request body is a JSON {type(value).__name__}, not the JSON object {name} is")
    try:
        return json_format.ParseDict(value, rpc.request()).SerializeToString()
    except Exception as e:  # noqa: BLE001 - json_format raises several kinds; each means bad input
        problem = " ".join(str(e).split())
        raise BadRequest(f"the request body is not a valid {name} in JSON: {problem}") from None


def protobuf_to_json(data: bytes, rpc: Rpc) -> str:
    reply = rpc.response.FromString(data)
    return json_format.MessageToJson(reply, **_PRINT_OPTIONS)


class Gateway:
    """The aiohttp handler of every RPC path: checks the HTTP envelope, forwards, translates the answer."""

    def __init__(self, unary: dict[str, Rpc], streaming: dict[str, str], max_body: int) -> None:
        self._unary = unary
        self._streaming = streaming
        self._max_body = max_body

    async def handle(self, request: web.Request) -> web.StreamResponse:
        return await self.forward(request, request.path, None)

    async def forward(self, request: web.Request, path: str, authorization: str | None) -> web.StreamResponse:
        """Calls the RPC at ``path`` with ``request``'s body; ``authorization``, when given, is the
        credential instead of the request's own header (the console's session, resolved by the auth path)."""
        rpc = self._unary.get(path)
        if rpc is None:
            return self._not_here(path)
        if request.method != "POST":
            refused = error(grpc.StatusCode.INVALID_ARGUMENT, f"{path} takes POST, not {request.method}", 405)
            refused.headers["Allow"] = "POST"
            return refused
        try:
            content_type = encoding(request)
            deadline = timeout_s(request)
            credential = metadata(request) if authorization is None else (("authorization", authorization),)
            body = await self._read(request)
            data = json_to_protobuf(body, rpc) if content_type == JSON else body
        except BadRequest as e:
            return e.response()
        try:
            reply = await rpc.call(data, metadata=credential, timeout=deadline)
        except grpc.aio.AioRpcError as e:
            return error(e.code(), e.details() or code_name(e.code()))
        if content_type == PROTO:
            return web.Response(body=reply, content_type=PROTO)
        return web.Response(text=protobuf_to_json(reply, rpc), content_type=JSON)

    def _not_here(self, path: str) -> web.Response:
        # A bare 404 reads as "unimplemented" to Connect clients (its HTTP -> code table); the body says why.
        if path in self._streaming:
            return error(grpc.StatusCode.UNIMPLEMENTED, self._streaming[path], 404)
        return error(grpc.StatusCode.UNIMPLEMENTED, f"no RPC {path} here (docs/api.md lists them; /openapi.json)", 404)

    async def _read(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > self._max_body:
            raise BadRequest(self._too_large(), grpc.StatusCode.RESOURCE_EXHAUSTED, 413)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadRequest(self._too_large(), grpc.StatusCode.RESOURCE_EXHAUSTED, 413) from None

    def _too_large(self) -> str:
        return f"the request body is larger than {self._max_body} bytes, the most one call takes"
