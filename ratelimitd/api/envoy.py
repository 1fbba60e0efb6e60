"""Envoy's rate limit service (envoy.service.ratelimit.v3) on the decision engine.

One ShouldRateLimit is one decision: the descriptors become the items of one
``check_items`` call (one atomic step, one Redis round trip). The call Envoy
makes once a stream is done (descriptors marked with the phase entry) becomes
one ``Usage.report`` instead, and never refuses. clients/envoy/README.md
describes the mapping for users.

Two kinds of bad input, two answers:

- What the Envoy configuration decides (the domain, ``hits_addend``, the phase
  marker, mixing phases) is checked like any RPC input: a mistake is a gRPC
  error, and Envoy's ``failure_mode_deny`` decides what the client gets.
- What an end user decides (the header or body values that entries carry: the
  API key, the model, the token estimate, the request id) is never an error: a
  fail-open Envoy would let such a request through unlimited. A bad value is a
  refusal with a JSON body, and nothing is charged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from time import perf_counter
from typing import Any, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2
from google.protobuf.message import DecodeError

from ratelimitd.api.errors import rpc
from ratelimitd.api.metrics import Metrics
from ratelimitd.core.errors import FailedPrecondition, InvalidArgument, StorageOutcomeUnknown
from ratelimitd.engine.decisions import MAX_ITEMS_PER_DECISION, Decider
from ratelimitd.engine.edge import (
    USAGE_PHASES,
    EdgeRequest,
    Parsed,
    Reply,
    RequestCache,
    Status,
    answer,
    bearer,
    early_refusal,
    request_items,
    usage_call,
)
from ratelimitd.engine.limits import MAX_LIMIT, Dimension
from ratelimitd.engine.outcomes import Decision, Outcome, Refusal, Scope
from ratelimitd.engine.requests import MAX_REQUESTS
from ratelimitd.engine.usage import Usage

log = logging.getLogger(__name__)

ENVOY_SERVICE_NAME = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name
MAX_DESCRIPTORS = MAX_ITEMS_PER_DECISION  # each of ours is one item of the decision

_OK = rls_pb2.RateLimitResponse.OK
_OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
_Unit = rls_pb2.RateLimitResponse.RateLimit
_UNITS = {
    1_000: _Unit.SECOND,
    60_000: _Unit.MINUTE,
    3_600_000: _Unit.HOUR,
    86_400_000: _Unit.DAY,
    7 * 86_400_000: _Unit.WEEK,
    30 * 86_400_000: _Unit.MONTH,
    365 * 86_400_000: _Unit.YEAR,
}
_UINT32_MAX = 2**32 - 1
_JSON = base_pb2.HeaderValue(key="content-type", value="application/json")


# -- typed views of the generated (untyped) request messages --------------------


class _Entry(Protocol):
    @property
    def key(self) -> str: ...
    @property
    def value(self) -> str: ...


class _UInt64Value(Protocol):
    @property
    def value(self) -> int: ...


class _Descriptor(Protocol):
    @property
    def entries(self) -> Sequence[_Entry]: ...
    @property
    def hits_addend(self) -> _UInt64Value: ...
    def HasField(self, field_name: str) -> bool: ...


class RateLimitRequest(Protocol):
    @property
    def domain(self) -> str: ...
    @property
    def descriptors(self) -> Sequence[_Descriptor]: ...
    @property
    def hits_addend(self) -> int: ...


# -- reading requests whose strings are not UTF-8 --------------------------------


def _bytes_request_class() -> Any:
    """RateLimitRequest as it is on the wire, with its strings read as bytes.

    Envoy copies header bytes into descriptor entries as they are, so an entry
    value need not be UTF-8, which protobuf refuses in a string field. That must
    end in a refusal, not in a parse error that a fail-open Envoy answers by
    letting the request through unlimited. Strings and bytes share a wire type:
    this twin (the fields we read, numbered as in the xds-protos descriptors)
    parses whatever Envoy sends.
    """
    package = "ratelimitd.envoy_bytes"
    fdp = descriptor_pb2.FieldDescriptorProto
    request = rls_pb2.RateLimitRequest.DESCRIPTOR
    descriptor = request.fields_by_name["descriptors"].message_type
    entry = descriptor.fields_by_name["entries"].message_type
    hits = descriptor.fields_by_name["hits_addend"]

    def field(source: Any, kind: descriptor_pb2.FieldDescriptorProto.Type.ValueType, message: str = "") -> Any:
        return fdp(
            name=source.name,
            number=source.number,
            type=kind,
            type_name=f".{package}.{message}" if message else None,
            label=fdp.LABEL_REPEATED if source.is_repeated else fdp.LABEL_OPTIONAL,
        )

    messages = {
        "Entry": [
            field(entry.fields_by_name["key"], fdp.TYPE_BYTES),
            field(entry.fields_by_name["value"], fdp.TYPE_BYTES),
        ],
        "UInt64": [field(hits.message_type.fields_by_name["value"], fdp.TYPE_UINT64)],
        "Descriptor": [
            field(descriptor.fields_by_name["entries"], fdp.TYPE_MESSAGE, "Entry"),
            field(hits, fdp.TYPE_MESSAGE, "UInt64"),
        ],
        "Request": [
            field(request.fields_by_name["domain"], fdp.TYPE_BYTES),
            field(request.fields_by_name["descriptors"], fdp.TYPE_MESSAGE, "Descriptor"),
            field(request.fields_by_name["hits_addend"], fdp.TYPE_UINT32),
        ],
    }
    pool = descriptor_pool.DescriptorPool()
    pool.Add(
        descriptor_pb2.FileDescriptorProto(
            name="ratelimitd/envoy_bytes.proto",
            package=package,
            syntax="proto3",
            message_type=[descriptor_pb2.DescriptorProto(name=n, field=f) for n, f in messages.items()],
        )
    )
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.Request"))


_BytesRequest = _bytes_request_class()


def parse_request(data: bytes) -> Any:
    """The request Envoy sent; bytes that are not UTF-8 become U+FFFD, so they get refused."""
    try:
        return rls_pb2.RateLimitRequest.FromString(data)
    except DecodeError:
        raw = _BytesRequest.FromString(data)  # still malformed: the error is gRPC's to report

    def text(b: bytes) -> str:
        return b.decode("utf-8", "replace")

    request = rls_pb2.RateLimitRequest(domain=text(raw.domain), hits_addend=raw.hits_addend)
    for d in raw.descriptors:
        copy = request.descriptors.add()
        for e in d.entries:
            copy.entries.add(key=text(e.key), value=text(e.value))
        if d.HasField("hits_addend"):
            copy.hits_addend.value = d.hits_addend.value
    return request


def request_key(descriptors: Sequence[_Descriptor], default_hits: int) -> tuple[object, ...]:
    """Everything a request-time call's reading depends on, as one hashable value: each
    descriptor's own hits_addend (None when unset: a number or None also marks where a
    descriptor starts, since entries are strings), then its entries' keys and values."""
    key: list[object] = [default_hits]
    for d in descriptors:
        key.append(d.hits_addend.value if d.HasField("hits_addend") else None)
        for entry in d.entries:
            key += (entry.key, entry.value)
    return tuple(key)


def add_to_server(servicer: EnvoyRateLimitServicer, server: grpc.aio.Server) -> None:
    """Like rls_pb2_grpc.add_RateLimitServiceServicer_to_server, with ``parse_request``."""
    handlers = {
        "ShouldRateLimit": grpc.unary_unary_rpc_method_handler(
            servicer.ShouldRateLimit,
            request_deserializer=parse_request,
            response_serializer=rls_pb2.RateLimitResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ENVOY_SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(ENVOY_SERVICE_NAME, handlers)


# -- the answer, typed, before it becomes a RateLimitResponse --------------------


class EnvoyRateLimitServicer:
    """``ShouldRateLimit``. Registered with ``add_to_server``."""

    def __init__(
        self,
        decider: Decider,
        usage: Usage,
        *,
        domains: Sequence[str],
        unknown_domain: str,
        descriptor_keys: Mapping[str, str],
        header_windows: Mapping[str, str],
        storage_failed: Callable[[], None],
        metrics: Metrics,
    ) -> None:
        self._decider = decider
        self._usage = usage
        self._domains = frozenset(domains)
        self._domains_text = ",".join(domains)
        self._allow_unknown = unknown_domain == "allow"
        self._roles = {key: role for role, key in descriptor_keys.items()}
        self._keys = dict(descriptor_keys)
        self._header_windows = dict(header_windows)
        self.storage_failed = storage_failed
        self._count = metrics.count_decision
        self._reports = metrics.reports
        self._observe_seconds = metrics.envoy_seconds.observe
        self._known = RequestCache()

    @rpc
    async def ShouldRateLimit(self, request: RateLimitRequest, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return to_pb(await self.decide(request))

    async def decide(self, request: RateLimitRequest) -> Reply:
        domain = request.domain
        if not domain:
            raise InvalidArgument("domain is empty")
        descriptors = request.descriptors
        if domain not in self._domains:
            if self._allow_unknown:
                return Reply([Status(False)] * len(descriptors), {})
            raise InvalidArgument(
                f"domain {domain[:80]!r} is not one of {self._domains_text} (RATELIMITD_ENVOY_DOMAINS)"
            )
        if not descriptors:
            raise InvalidArgument("descriptors is empty")
        if len(descriptors) > MAX_DESCRIPTORS:
            raise InvalidArgument(f"{len(descriptors)} descriptors; at most {MAX_DESCRIPTORS} are allowed in one call")
        if request.hits_addend > MAX_REQUESTS:
            raise InvalidArgument(f"hits_addend is {request.hits_addend}; at most {MAX_REQUESTS} are allowed")
        # Envoy's rule: an unset or 0 request-level hits_addend counts 1; a
        # descriptor's own hits_addend, when set (even to 0), replaces it.
        default_hits = request.hits_addend or 1
        key = request_key(descriptors, default_hits)
        known = self._known.get(key)
        if known is not None:
            return await self._decide(known)
        parsed = [self._read(i, d, default_hits) for i, d in enumerate(descriptors, 1)]
        phases = {p.roles.get("phase") for p in parsed if p.ours or "phase" in p.roles}
        if None in phases and len(phases) > 1:
            raise InvalidArgument(
                f"descriptors mix the usage phase ({self._keys['phase']} entry) with request-time descriptors; "
                "Envoy sends them in separate calls"
            )
        if phases and None not in phases:
            return await self._report(parsed)
        request_time = request_items(parsed)
        if isinstance(request_time, Refusal):
            return early_refusal(parsed, request_time)
        self._known.put(key, request_time)
        return await self._decide(request_time)

    def _read(self, index: int, d: _Descriptor, default_hits: int) -> Parsed:
        roles: dict[str, str] = {}
        conflict = ""
        for entry in d.entries:
            role = self._roles.get(entry.key)
            if role is None:
                continue  # not ours: a descriptor may carry entries for other purposes
            value = bearer(entry.value) if role == "api_key" else entry.value
            if roles.setdefault(role, value) != value:
                conflict = entry.key
        if "phase" in roles and roles["phase"] not in USAGE_PHASES:
            raise InvalidArgument(
                f"descriptor {index}: {self._keys['phase']} {roles['phase'][:40]!r} is not one of "
                f"{', '.join(USAGE_PHASES)}"
            )
        hits = d.hits_addend.value if d.HasField("hits_addend") else default_hits
        most = MAX_LIMIT if "phase" in roles else MAX_REQUESTS
        if hits > most:
            raise InvalidArgument(f"descriptor {index}: hits_addend is {hits}; at most {most} are allowed")
        return Parsed(roles, hits, conflict)

    # -- request time: one decision ---------------------------------------------

    async def _decide(self, request: EdgeRequest) -> Reply:
        if request.caller is None:  # malformed key: refused without a storage call
            decision = Decision(Outcome.INVALID_API_KEY, "", "", request.request_id, 0, None, (), False)
        else:
            # No replay: the request id comes from a header, and repeating one must not
            # buy a free pass. The reservation still waits under it for the usage call.
            started = perf_counter()  # by hand: prometheus_client's timer costs an object and two calls more
            try:
                decision = await self._decider.check_items(
                    request.caller, request.items, request.request_id, replay=False
                )
            except StorageOutcomeUnknown as e:
                # The generic advice (retry with the same request id) does not hold here:
                # Envoy never retries a decision, and this path never replays one.
                raise e.advising("Envoy does not retry a decision; its failure_mode_deny decides the request") from e
            finally:
                self._observe_seconds(perf_counter() - started)
        # a request's first descriptor names its model
        self._count(decision, request.items[0].model if request.items else "")
        return answer(decision, request, self._header_windows)

    # -- after the response: the usage report -----------------------------------

    async def _report(self, parsed: list[Parsed]) -> Reply:
        ok = Reply([Status(False)] * len(parsed), {})
        call = usage_call(parsed)
        if call is None:
            log.debug("usage call without one well-formed API key: nothing to charge")
            return ok
        try:
            report = await self._usage.report(*call)
            self._reports[report.result].inc()
        except FailedPrecondition as e:
            # The key was refused at request time, or the id is another project's: nothing to charge.
            log.debug("usage of key %s not recorded: %s", call.caller.key_id, e.message)
        return ok


def to_pb(reply: Reply) -> Any:
    over = reply.refusal is not None or any(s.over_limit for s in reply.statuses)
    # Filled in place: messages passed to a constructor are copied once more, on every decision.
    response = rls_pb2.RateLimitResponse(overall_code=_OVER_LIMIT if over else _OK)
    add_status = response.statuses.add
    for s in reply.statuses:
        _fill_status(add_status(), s)
    add_header = response.response_headers_to_add.add
    for key, value in reply.headers.items():
        header = add_header()
        header.key = key
        header.value = value
    if reply.refusal is not None:
        response.response_headers_to_add.append(_JSON)
        response.raw_body = reply.refusal.body()
        # Envoy can answer 429 (or one rate_limited_status) only; the status a refusal
        # deserves goes into dynamic metadata, where local_reply_config can apply it.
        response.dynamic_metadata.CopyFrom(_metadata(reply.refusal))
    return response


def _fill_status(status: Any, s: Status) -> None:
    status.code = _OVER_LIMIT if s.over_limit else _OK
    b = s.bucket
    if b is not None:
        unit, name = _limit_of(b.scope, b.dimension)
        limit = status.current_limit
        limit.requests_per_unit = b.limit if b.limit < _UINT32_MAX else _UINT32_MAX
        limit.unit = unit
        limit.name = name  # never empty: the limit is present even when the numbers are 0
        status.limit_remaining = b.remaining if b.remaining < _UINT32_MAX else _UINT32_MAX
        until_reset = status.duration_until_reset
        until_reset.SetInParent()  # present even when the bucket is full now (0 s)
        seconds, ms = divmod(b.reset_after_ms, 1000)
        until_reset.seconds = seconds
        until_reset.nanos = ms * 1_000_000


@functools.cache
def _limit_of(scope: Scope, dimension: Dimension) -> tuple[Any, str]:
    """A bucket's RateLimit unit and name, by (scope, dimension): a few of them, built once each."""
    return _UNITS.get(
        dimension.window_ms, _Unit.UNKNOWN
    ), f"{scope.name.lower()} {dimension.metric} per {dimension.window}"


def _metadata(refusal: Refusal) -> Any:
    metadata = struct_pb2.Struct()
    metadata.update({"http_status": str(refusal.http_status), "type": refusal.type, "code": refusal.code})
    return metadata
