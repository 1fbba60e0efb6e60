"""Requests that are not valid protobuf: a precise status on every RPC, and a quiet log.

Left to itself, grpc answers a request its deserializer cannot parse with
UNKNOWN "Unexpected <class '...DecodeError'>" and logs a traceback per call,
so anyone, authenticated or not, can fill the log with a few bytes. The
``Guard`` interceptor wraps every handler the server finds (ours, Envoy's,
health, reflection, and any added later), so no RPC can forget it:

- a request that does not parse becomes INVALID_ARGUMENT naming the message
  type and, where the wire format is sound but a string is not UTF-8, the
  field;
- for the methods given as ``lenient`` (CheckAndConsume), a request whose only
  fault is a string that is not UTF-8 is read with U+FFFD in place of the bad
  bytes and decided as usual: a key that is not UTF-8 is an unknown key, so the
  caller gets the same invalid-key refusal as for any other unknown key;
- an unexpected exception in a handler becomes INTERNAL with a message that
  names no Python class;
- the log gets at most one line per ``log_every_s`` about malformed requests,
  with the count since the last line, instead of a traceback per call;
- every handler is put behind the authentication gate (api/gate.py), once per
  method.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any, NamedTuple

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from ratelimitd.api.gate import Gate

log = logging.getLogger(__name__)

_FDP = descriptor_pb2.FieldDescriptorProto
_TWIN_PACKAGE = "ratelimitd.wire_twin"
_MAX_FIELDS_NAMED = 5


class Malformed(NamedTuple):
    """What the deserializer hands the handler instead of a request it could not parse."""

    problem: str


# -- twins: each message with its strings read as bytes ----------------------------


class _Twins:
    """For a message type, a twin whose string fields are bytes (same numbers, same wire type).

    The twin parses any request whose wire format is sound, which tells a
    string that is not UTF-8 apart from bytes that are not protobuf at all, and
    names the field. Twins of every message a type reaches are built once, in a
    private pool, with enums read as plain integers (proto3 enums are open).
    """

    def __init__(self) -> None:
        self._pool = descriptor_pool.DescriptorPool()
        self._classes: dict[str, Any] = {}

    def of(self, descriptor: Any) -> Any:
        name = self._twin_name(descriptor)
        if name not in self._classes:
            # One package per twin file: twins of shared messages (Limit, …) then never clash.
            package = f"{_TWIN_PACKAGE}.t{len(self._classes)}"
            file = descriptor_pb2.FileDescriptorProto(
                name=f"ratelimitd/wire_twin_{len(self._classes)}.proto", package=package, syntax="proto3"
            )
            self._add(descriptor, file, package, set())
            self._pool.Add(file)
            self._classes[name] = message_factory.GetMessageClass(self._pool.FindMessageTypeByName(f"{package}.{name}"))
        return self._classes[name]

    @staticmethod
    def _twin_name(descriptor: Descriptor) -> str:
        return descriptor.full_name.replace("_", "__").replace(".", "_")

    def _add(
        self, descriptor: Descriptor, file: descriptor_pb2.FileDescriptorProto, package: str, seen: set[str]
    ) -> None:
        name = self._twin_name(descriptor)
        if name in seen:
            return
        seen.add(name)
        message = file.message_type.add(name=name)
        for f in descriptor.fields:
            twin = message.field.add(
                name=f.name,
                number=f.number,
                label=_FDP.LABEL_REPEATED if f.is_repeated else _FDP.LABEL_OPTIONAL,
                type=f.type,
            )
            if f.type == FieldDescriptor.TYPE_STRING:
                twin.type = _FDP.TYPE_BYTES
            elif f.type == FieldDescriptor.TYPE_ENUM:
                twin.type = _FDP.TYPE_INT32
            elif f.message_type is not None:  # a message (our protos are proto3: no groups)
                twin.type = _FDP.TYPE_MESSAGE
                twin.type_name = f".{package}.{self._twin_name(f.message_type)}"
                self._add(f.message_type, file, package, seen)


_twins = _Twins()


def _not_utf8(message: Any, path: str = "") -> list[str]:
    """The paths of the fields of a twin that hold bytes which are not UTF-8 (but should be)."""
    found: list[str] = []
    for field, value in message.ListFields():
        where = f"{path}{field.name}"
        values = value if field.is_repeated else [value]
        for v in values:
            if isinstance(v, bytes):
                try:
                    v.decode("utf-8")
                except UnicodeDecodeError:
                    found.append(where)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                found += _not_utf8(v, where + ".")
    return found


def _replace_bad_utf8(message: Any) -> None:
    """In a twin: every byte string becomes its UTF-8 reading with U+FFFD for the bytes that are not."""
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_BYTES:
            if field.is_repeated:
                value[:] = [v.decode("utf-8", "replace").encode() for v in value]
            else:
                setattr(message, field.name, value.decode("utf-8", "replace").encode())
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for v in value if field.is_repeated else [value]:
                _replace_bad_utf8(v)


def served_methods(services: Collection[str]) -> list[str]:
    """The full method names ("/pkg.Service/Method") of services known to the default pool."""
    pool = descriptor_pool.Default()
    return [f"/{name}/{m.name}" for name in services for m in pool.FindServiceByName(name).methods]


def request_class(method: str, deserializer: Callable[[bytes], Any]) -> type[Message] | None:
    """The request type: the class behind ``SomeMessage.FromString``, else the method's declared input type."""
    owner = getattr(deserializer, "__self__", None)
    if isinstance(owner, type) and issubclass(owner, Message):
        return owner
    service, _, name = method.strip("/").rpartition("/")
    try:
        found = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name)
    except KeyError:
        return None
    if found is None:
        return None
    cls: type[Message] = message_factory.GetMessageClass(found.input_type)
    return cls


def read_request(
    data: bytes, deserializer: Callable[[bytes], Any], cls: type[Message] | None, lenient: bool
) -> Any:  # the request, or a Malformed
    try:
        return deserializer(data)
    except Exception:  # noqa: BLE001 - whatever a parser raises, the caller sent bytes it cannot read
        pass
    if cls is None:
        return Malformed("the request is not a valid protobuf message")
    type_name = cls.DESCRIPTOR.full_name
    twin_class = _twins.of(cls.DESCRIPTOR)
    try:
        twin = twin_class.FromString(data)
    except Exception:  # noqa: BLE001 - not even the wire format holds
        return Malformed(f"the request is not a valid {type_name} message (its bytes are not protobuf)")
    bad = _not_utf8(twin)
    if lenient and bad:
        _replace_bad_utf8(twin)
        return cls.FromString(twin.SerializeToString())
    named = ", ".join(bad[:_MAX_FIELDS_NAMED]) + (", …" if len(bad) > _MAX_FIELDS_NAMED else "")
    fields = f"field {named} is" if len(bad) == 1 else f"fields {named} are"
    return Malformed(f"the request is not a valid {type_name} message: {fields} not valid UTF-8")


# -- the interceptor ----------------------------------------------------------------


class _QuietLog:
    """One warning line per interval about malformed requests, with how many there were."""

    def __init__(self, every_s: float) -> None:
        self._every_s = every_s
        self._last = float("-inf")
        self._unlogged = 0

    def malformed(self, method: str, problem: str) -> None:
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last < self._every_s:
            return
        log.warning(
            "malformed requests refused with INVALID_ARGUMENT: %d since the last line; latest %s: %s",
            self._unlogged,
            method,
            problem,
        )
        self._last, self._unlogged = now, 0


Context = grpc.aio.ServicerContext[Any, Any]


class Guard(grpc.aio.ServerInterceptor):
    """Wraps every handler: requests that do not parse, and unexpected errors, get a precise status."""

    def __init__(self, lenient: Collection[str] = (), log_every_s: float = 60.0, gate: Gate | None = None) -> None:
        """``lenient``: full method names ("/pkg.Service/Method") that read bad UTF-8 as U+FFFD.
        ``gate``: the authentication gate every handler is put behind (api/gate.py)."""
        self._lenient = frozenset(lenient)
        self._gate = gate
        self._log = _QuietLog(log_every_s)
        # method -> (the handler grpc found, its guarded twin): wrapping costs far more than a
        # lookup, and this runs on every call, the hot path's included.
        self._guarded: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._guarded.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._guard(handler, method))
            self._guarded[method] = cached
        guarded: grpc.RpcMethodHandler[Any, Any] = cached[1]
        return guarded

    def _guard(self, handler: Any, method: str) -> Any:
        changes: dict[str, Any] = {}
        if handler.request_deserializer is not None:
            deserializer = handler.request_deserializer
            changes["request_deserializer"] = functools.partial(
                read_request,
                deserializer=deserializer,
                cls=request_class(method, deserializer),
                lenient=method in self._lenient,
            )
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                if self._gate is not None:
                    behaviour = self._gate.wrap(method, behaviour)
                changes[kind] = self._behaviour(
                    behaviour, method, streaming_in=kind.startswith("stream"), streaming_out=kind.endswith("stream")
                )
        return handler._replace(**changes)

    async def _refuse(self, context: Context, method: str, problem: str) -> None:
        self._log.malformed(method, problem)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)

    def _checked(self, request: Any, context: Context, method: str, streaming_in: bool) -> Any:
        """A unary request as it is; a request stream that refuses the first message that did not parse."""
        if not streaming_in:
            return request

        async def messages() -> AsyncIterator[Any]:
            async for message in request:
                if isinstance(message, Malformed):
                    await self._refuse(context, method, message.problem)
                yield message

        return messages()

    def _behaviour(
        self, behaviour: Callable[..., Any], method: str, streaming_in: bool, streaming_out: bool
    ) -> Callable[..., Any]:
        # grpc picks how to drive a handler by its kind (coroutine, async generator, plain),
        # so the wrapper must be of the same kind.
        if inspect.isasyncgenfunction(behaviour):

            async def generator(request: Any, context: Context) -> AsyncIterator[Any]:
                if isinstance(request, Malformed):
                    await self._refuse(context, method, request.problem)
                try:
                    async for reply in behaviour(self._checked(request, context, method, streaming_in), context):
                        yield reply
                except Exception as e:  # noqa: BLE001 - see _unexpected
                    await _unexpected(context, method, e)

            return generator

        if inspect.iscoroutinefunction(behaviour):
            # Ours, on the hot path: awaited directly, without asking per call what it returned.
            async def awaited(request: Any, context: Context) -> Any:
                if isinstance(request, Malformed):
                    await self._refuse(context, method, request.problem)
                try:
                    return await behaviour(self._checked(request, context, method, streaming_in), context)
                except Exception as e:  # noqa: BLE001 - see _unexpected
                    await _unexpected(context, method, e)

            return awaited

        if not streaming_out:
            # A plain function with one reply (health's unimplemented List) is called from the
            # loop like a coroutine; it only raises, so it blocks nothing.
            async def coroutine(request: Any, context: Context) -> Any:
                if isinstance(request, Malformed):
                    await self._refuse(context, method, request.problem)
                try:
                    reply = behaviour(self._checked(request, context, method, streaming_in), context)
                    return await reply if inspect.isawaitable(reply) else reply
                except Exception as e:  # noqa: BLE001 - see _unexpected
                    await _unexpected(context, method, e)

            return coroutine
        return behaviour  # a plain function streaming its replies: none is registered


async def _unexpected(context: Context, method: str, error: Exception) -> None:
    """An abort passes through; anything else is a defect: logged in full, INTERNAL for the caller.

    grpc's own answer would be UNKNOWN with the exception's class and text, which
    can carry internals (a storage reply, a script line) to any caller.
    """
    if isinstance(error, grpc.aio.AbortError):
        raise error
    if isinstance(error, NotImplementedError):  # what generated servicer bases raise for a missing method
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server")
    log.exception("%s failed unexpectedly", method)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error in ratelimitd; the server log has the details")
