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
from typing import Any, NamedTuple, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, message_factory, struct_pb2
from google.protobuf.message import DecodeError

from ratelimitd.api.decisions import MAX_REQUESTS, validate_request_id
from ratelimitd.api.errors import rpc
from ratelimitd.api.metrics import Metrics
from ratelimitd.engine import ids, refusals
from ratelimitd.engine.decisions import (
    MAX_ITEMS_PER_DECISION,
    BucketState,
    Caller,
    Decider,
    Decision,
    Item,
    Outcome,
    Scope,
    new_request_id,
)
from ratelimitd.engine.errors import FailedPrecondition, InvalidArgument, StorageOutcomeUnknown
from ratelimitd.engine.headers import rate_limit_headers
from ratelimitd.engine.limits import MAX_LIMIT, Dimension, validate_model
from ratelimitd.engine.refusals import Refusal
from ratelimitd.engine.usage import Usage

log = logging.getLogger(__name__)

ENVOY_SERVICE_NAME = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name
MAX_DESCRIPTORS = MAX_ITEMS_PER_DECISION  # each of ours is one item of the decision
# The phase entry's values: the call after the response, and which tokens its hits_addend counts.
# A total of unknown split is reported as input tokens (spend is then priced at the input price).
USAGE_PHASES = {"usage": "input", "usage_input": "input", "usage_output": "output", "usage_cached": "cached"}

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


class Status(NamedTuple):
    """One descriptor's answer: refused or not, and the bucket to show as its limit."""

    over_limit: bool
    bucket: BucketState | None = None


class Reply(NamedTuple):
    statuses: list[Status]
    headers: Mapping[str, str]
    refusal: Refusal | None = None


class _Parsed(NamedTuple):
    """What one descriptor says, by role, and its cost in hits (Envoy's rules applied)."""

    roles: dict[str, str]
    hits: int
    conflict: str  # an entry key that appears twice with different values, or ""

    @property
    def ours(self) -> bool:
        return "api_key" in self.roles or "model" in self.roles


def bearer(value: str) -> str:
    """An API key as sent: bare, or as an Authorization header value ``Bearer <key>``."""
    scheme, _, rest = value.strip().partition(" ")
    return rest.strip() if scheme.lower() == "bearer" else value.strip()


def token_estimate(text: str) -> int | None:
    """A whole number of tokens as an entry carries it, or None.

    Envoy's json_to_metadata writes a JSON number that is not a plain integer
    (``1e3``) as ``1000.000000``: a zero fraction is still a whole number.
    """
    whole, dot, fraction = (text or "0").partition(".")
    if not (whole.isascii() and whole.isdigit()) or (dot and fraction.strip("0")):
        return None
    if len(whole.lstrip("0")) > len(str(MAX_LIMIT)):
        return None  # and never int() thousands of digits: Python refuses, and an error fails open
    value = int(whole)
    return value if value <= MAX_LIMIT else None


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
        self._decisions = metrics.decisions
        self._reports = metrics.reports
        self._seconds = metrics.envoy_seconds
        self._labelled = metrics.labelled

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
        parsed = [self._read(i, d, default_hits) for i, d in enumerate(descriptors, 1)]
        phases = {p.roles.get("phase") for p in parsed if p.ours or "phase" in p.roles}
        if None in phases and len(phases) > 1:
            raise InvalidArgument(
                f"descriptors mix the usage phase ({self._keys['phase']} entry) with request-time descriptors; "
                "Envoy sends them in separate calls"
            )
        if phases and None not in phases:
            return await self._report(parsed)
        return await self._check(parsed)

    def _read(self, index: int, d: _Descriptor, default_hits: int) -> _Parsed:
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
        return _Parsed(roles, hits, conflict)

    # -- request time: one decision ---------------------------------------------

    async def _check(self, parsed: list[_Parsed]) -> Reply:
        early = self._validate(parsed)
        if isinstance(early, Refusal):
            return self._early_refusal(parsed, early)
        caller, request_id, items, slots = early
        if caller is None:  # malformed key: refused without a storage call
            decision = Decision(Outcome.INVALID_API_KEY, "", "", request_id, 0, None, (), False)
        else:
            # No replay: the request id comes from a header, and repeating one must not
            # buy a free pass. The reservation still waits under it for the usage call.
            try:
                with self._seconds.time():
                    decision = await self._decider.check_items(caller, items, request_id, replay=False)
            except StorageOutcomeUnknown as e:
                # The generic advice (retry with the same request id) does not hold here:
                # Envoy never retries a decision, and this path never replays one.
                raise e.advising("Envoy does not retry a decision; its failure_mode_deny decides the request") from e
        self._decisions[decision.outcome].inc()
        if self._labelled is not None:  # a request's first descriptor names its model
            self._labelled(items[0].model if items else "", decision.organization_id, decision.outcome)
        return self._reply(decision, items, slots)

    def _validate(self, parsed: list[_Parsed]) -> Refusal | tuple[Caller | None, str, list[Item], list[int | None]]:
        for i, p in enumerate(parsed, 1):
            if p.conflict:
                return refusals.invalid_request(
                    f"Descriptor {i} carries `{p.conflict}` twice with different values; send one."
                )
        api_keys = {p.roles["api_key"] for p in parsed if p.roles.get("api_key")}
        if not api_keys:
            return refusals.missing_api_key()
        if len(api_keys) > 1:
            # One request, one caller: two keys cannot be charged in one atomic step
            # (nor is it clear whose request it is), so neither is.
            return refusals.conflicting_api_keys()
        request_ids = {p.roles["request_id"] for p in parsed if p.roles.get("request_id")}
        if len(request_ids) > 1:
            return refusals.invalid_request("The request carries two different request ids; send one.")
        request_id = next(iter(request_ids), "")
        try:
            validate_request_id(request_id)
        except InvalidArgument as e:
            return refusals.invalid_request(f"Invalid request id: {e.message}.")
        items: list[Item] = []
        slots: list[int | None] = []
        for p in parsed:
            if not p.ours:
                slots.append(None)
                continue
            model = p.roles.get("model", "")
            if not model:
                return refusals.model_not_found("No model given; name the model the request is for.")
            try:
                validate_model(model, wildcard=False)
            except InvalidArgument:
                return refusals.model_not_found(
                    f"The model `{model[:128]}` does not exist or you do not have access to it."
                )
            estimate = token_estimate(p.roles.get("tokens", ""))
            if estimate is None:
                return refusals.invalid_request(
                    f"Invalid token estimate {p.roles['tokens'][:40]!r}: it must be a whole number "
                    f"from 0 to {MAX_LIMIT}."
                )
            # hits_addend 0 checks without charging anything, the estimate included.
            slots.append(len(items))
            items.append(Item(model, p.hits, estimate if p.hits else 0))
        parsed_key = ids.parse_api_key_cached(next(iter(api_keys)))
        caller = None if parsed_key is None else Caller(parsed_key.org_id, parsed_key.key_id, parsed_key.hash, "")
        return caller, request_id, items, slots

    def _early_refusal(self, parsed: list[_Parsed], refusal: Refusal) -> Reply:
        any_ours = any(p.ours for p in parsed)
        return Reply([Status(p.ours or not any_ours) for p in parsed], {}, refusal)

    def _reply(self, decision: Decision, items: list[Item], slots: list[int | None]) -> Reply:
        headers = rate_limit_headers(decision, self._header_windows)
        item_buckets = decision.item_buckets or ((),) * len(items)
        binding = decision.binding
        # The items a refusal blames: those with the binding bucket, the unavailable
        # model's item, or (key, spend limit) all of them.
        if binding is not None:
            blamed = {j for j, bs in enumerate(item_buckets) if any(b is binding for b in bs)}
        elif decision.outcome in (Outcome.MODEL_NOT_AVAILABLE, Outcome.MODEL_BLOCKED) and (
            1 <= decision.detail <= len(items)
        ):
            blamed = {decision.detail - 1}
        else:
            blamed = set(range(len(items)))
        statuses = []
        for slot in slots:
            if slot is None:
                statuses.append(Status(False))
            else:
                statuses.append(Status(not decision.allowed and slot in blamed, shown(item_buckets[slot], binding)))
        if decision.allowed:
            return Reply(statuses, headers)
        first = min(blamed, default=0)
        model = items[first].model
        # A bucket shared by several items (one model named twice) was asked for their sum.
        same = [it for it in items if it.model == model]
        refusal = refusals.refusal(decision, model, sum(it.requests for it in same), sum(it.tokens for it in same))
        return Reply(statuses, headers, refusal)

    # -- after the response: the usage report -----------------------------------

    async def _report(self, parsed: list[_Parsed]) -> Reply:
        ok = Reply([Status(False)] * len(parsed), {})
        usage = [p for p in parsed if "phase" in p.roles]
        api_keys = {p.roles["api_key"] for p in usage if p.roles.get("api_key")}
        parsed_key = ids.parse_api_key_cached(next(iter(api_keys))) if len(api_keys) == 1 else None
        if parsed_key is None:
            log.debug("usage call without one well-formed API key: nothing to charge")
            return ok
        models = {p.roles["model"] for p in usage if p.roles.get("model")}
        if len(models) > 1:
            raise InvalidArgument(f"usage descriptors name {len(models)} models; one request reports one model")
        request_ids = {p.roles["request_id"] for p in usage if p.roles.get("request_id")}
        if len(request_ids) > 1:
            raise InvalidArgument("usage descriptors carry two different request ids")
        request_id = validate_request_id(next(iter(request_ids), "")) or new_request_id()
        tokens = {"input": 0, "output": 0, "cached": 0}
        for p in usage:
            tokens[USAGE_PHASES[p.roles["phase"]]] += p.hits
        caller = Caller(parsed_key.org_id, parsed_key.key_id, parsed_key.hash, "")
        try:
            report = await self._usage.report(
                caller, request_id, next(iter(models), ""), tokens["input"], tokens["output"], tokens["cached"]
            )
            self._reports[report.result].inc()
        except FailedPrecondition as e:
            # The key was refused at request time, or the id is another project's: nothing to charge.
            log.debug("usage of key %s not recorded: %s", parsed_key.key_id, e.message)
        return ok


def shown(buckets: Sequence[BucketState], binding: BucketState | None) -> BucketState | None:
    """The bucket a descriptor reports as its limit: the binding one, else the one closest to full."""
    # By identity: two buckets of different models may hold equal values.
    if binding is not None and any(b is binding for b in buckets):
        return binding
    return min(buckets, key=lambda b: (b.remaining / b.limit if b.limit else 0.0, b.remaining), default=None)


def to_pb(reply: Reply) -> Any:
    over = any(s.over_limit for s in reply.statuses) or reply.refusal is not None
    headers = [base_pb2.HeaderValue(key=k, value=v) for k, v in reply.headers.items()]
    response = rls_pb2.RateLimitResponse(
        overall_code=_OVER_LIMIT if over else _OK,
        statuses=[_status_pb(s) for s in reply.statuses],
        response_headers_to_add=headers,
    )
    if reply.refusal is not None:
        response.response_headers_to_add.append(_JSON)
        response.raw_body = reply.refusal.body()
        # Envoy can answer 429 (or one rate_limited_status) only; the status a refusal
        # deserves goes into dynamic metadata, where local_reply_config can apply it.
        response.dynamic_metadata.CopyFrom(_metadata(reply.refusal))
    return response


def _status_pb(s: Status) -> Any:
    status = rls_pb2.RateLimitResponse.DescriptorStatus(code=_OVER_LIMIT if s.over_limit else _OK)
    b = s.bucket
    if b is not None:
        status.current_limit.requests_per_unit = min(b.limit, _UINT32_MAX)
        status.current_limit.unit = _UNITS.get(b.dimension.window_ms, _Unit.UNKNOWN)
        status.current_limit.name = _limit_name(b.scope, b.dimension)
        status.limit_remaining = min(b.remaining, _UINT32_MAX)
        status.duration_until_reset.CopyFrom(_duration(b.reset_after_ms))
    return status


@functools.cache
def _limit_name(scope: Scope, dimension: Dimension) -> str:
    return f"{scope.name.lower()} {dimension.metric} per {dimension.window}"


def _duration(ms: int) -> Any:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=ms % 1000 * 1_000_000)


def _metadata(refusal: Refusal) -> Any:
    metadata = struct_pb2.Struct()
    metadata.update({"http_status": str(refusal.http_status), "type": refusal.type, "code": refusal.code})
    return metadata
