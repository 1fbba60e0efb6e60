"""An HTTP edge's rules (Envoy's ShouldRateLimit today): how descriptor values become
one decision, which descriptors a refusal blames, and how a usage call is read.

api/envoy.py adapts the protocol onto these; nothing here knows gRPC. Values an end
user decides (the API key, the model, the token estimate, the request id) never
make an error here: a fail-open Envoy would let such a request through unlimited.
A bad value is a refusal with a JSON body (engine/outcomes.py), and nothing is charged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from ratelimitd.core.errors import InvalidArgument
from ratelimitd.engine import ids, outcomes
from ratelimitd.engine.decisions import Caller, Item, new_request_id
from ratelimitd.engine.headers import rate_limit_headers
from ratelimitd.engine.limits import MAX_LIMIT, validate_model
from ratelimitd.engine.outcomes import BucketState, Decision, Outcome, Refusal
from ratelimitd.engine.requests import validate_request_id

# The phase entry's values: the call after the response, and which tokens its hits_addend counts.
# A total of unknown split is reported as input tokens (spend is then priced at the input price).
USAGE_PHASES = {"usage": "input", "usage_input": "input", "usage_output": "output", "usage_cached": "cached"}


class Status(NamedTuple):
    """One descriptor's answer: refused or not, and the bucket to show as its limit."""

    over_limit: bool
    bucket: BucketState | None = None


_NOT_OURS = Status(False)  # a descriptor without our entries: never over limit, no bucket shown


class Reply(NamedTuple):
    statuses: list[Status]
    headers: Mapping[str, str]
    refusal: Refusal | None = None


class Parsed(NamedTuple):
    """What one descriptor says, by role, and its cost in hits (Envoy's rules applied)."""

    roles: dict[str, str]
    hits: int
    conflict: str  # an entry key that appears twice with different values, or ""

    @property
    def ours(self) -> bool:
        return "api_key" in self.roles or "model" in self.roles


class EdgeRequest(NamedTuple):
    """A request-time call, read: who asks (None: a malformed key, refused without a storage
    call), its request id, the decision's items, and each descriptor's item (None: not ours)."""

    caller: Caller | None
    request_id: str
    items: list[Item]
    slots: list[int | None]


class RequestCache:
    """Request-time calls already read, by their descriptors' contents: an edge sends the same few
    (key, model, estimate) sets again and again, and reading one is most of a call's own work.

    Bounded: at most ``size`` requests, the oldest dropped first. Only what is the same on
    every call is kept: a well-formed key, no request id (those are new per call), every
    value short. Nothing expires or needs invalidating: a request's reading depends only on
    its contents and the server's descriptor keys, fixed at start-up; whether its key is still
    valid is decided in storage on every call. The keys stay in this process's memory, like
    ids.parse_api_key_cached's.
    """

    def __init__(self, size: int = 4096, max_value_chars: int = 256) -> None:
        self._size = size
        self._max_value_chars = max_value_chars
        self._known: dict[tuple[object, ...], EdgeRequest] = {}

    def __len__(self) -> int:
        return len(self._known)

    def get(self, key: tuple[object, ...]) -> EdgeRequest | None:
        return self._known.get(key)

    def put(self, key: tuple[object, ...], request: EdgeRequest) -> None:
        if request.request_id or request.caller is None:
            return
        if any(isinstance(part, str) and len(part) > self._max_value_chars for part in key):
            return
        if len(self._known) >= self._size:
            del self._known[next(iter(self._known))]  # dicts keep insertion order: the oldest
        self._known[key] = request


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


def request_items(parsed: Sequence[Parsed]) -> Refusal | EdgeRequest:
    """The decision a request-time call asks for, or the refusal its end-user values earn."""
    for i, p in enumerate(parsed, 1):
        if p.conflict:
            return outcomes.invalid_request(
                f"Descriptor {i} carries `{p.conflict}` twice with different values; send one."
            )
    api_keys = {p.roles["api_key"] for p in parsed if p.roles.get("api_key")}
    if not api_keys:
        return outcomes.missing_api_key()
    if len(api_keys) > 1:
        # One request, one caller: two keys cannot be charged in one atomic step
        # (nor is it clear whose request it is), so neither is.
        return outcomes.conflicting_api_keys()
    request_ids = {p.roles["request_id"] for p in parsed if p.roles.get("request_id")}
    if len(request_ids) > 1:
        return outcomes.invalid_request("The request carries two different request ids; send one.")
    request_id = next(iter(request_ids), "")
    try:
        validate_request_id(request_id)
    except InvalidArgument as e:
        return outcomes.invalid_request(f"Invalid request id: {e.message}.")
    items: list[Item] = []
    slots: list[int | None] = []
    for p in parsed:
        if not p.ours:
            slots.append(None)
            continue
        model = p.roles.get("model", "")
        if not model:
            return outcomes.model_not_found("No model given; name the model the request is for.")
        try:
            validate_model(model, wildcard=False)
        except InvalidArgument:
            return outcomes.model_not_found(
                f"The model `{model[:128]}` does not exist or you do not have access to it."
            )
        estimate = token_estimate(p.roles.get("tokens", ""))
        if estimate is None:
            return outcomes.invalid_request(
                f"Invalid token estimate {p.roles['tokens'][:40]!r}: it must be a whole number from 0 to {MAX_LIMIT}."
            )
        # hits_addend 0 checks without charging anything, the estimate included.
        slots.append(len(items))
        items.append(Item(model, p.hits, estimate if p.hits else 0))
    parsed_key = ids.parse_api_key_cached(next(iter(api_keys)))
    caller = None if parsed_key is None else Caller(parsed_key.org_id, parsed_key.key_id, parsed_key.hash, "")
    return EdgeRequest(caller, request_id, items, slots)


def early_refusal(parsed: Sequence[Parsed], refusal: Refusal) -> Reply:
    """A refusal before any decision: our descriptors over limit (all, when none is ours)."""
    any_ours = any(p.ours for p in parsed)
    return Reply([Status(p.ours or not any_ours) for p in parsed], {}, refusal)


def answer(decision: Decision, request: EdgeRequest, header_windows: Mapping[str, str]) -> Reply:
    """Each descriptor's status, the headers, and the refusal of a decision."""
    items, slots = request.items, request.slots
    headers = rate_limit_headers(decision, header_windows)
    item_buckets = decision.item_buckets or ((),) * len(items)
    binding = decision.binding
    if decision.allowed:  # nothing blamed: each descriptor shows its own tightest bucket
        return Reply(
            [_NOT_OURS if slot is None else Status(False, shown(item_buckets[slot], binding)) for slot in slots],
            headers,
        )
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
            statuses.append(_NOT_OURS)
        else:
            statuses.append(Status(slot in blamed, shown(item_buckets[slot], binding)))
    first = min(blamed, default=0)
    model = items[first].model
    # A bucket shared by several items (one model named twice) was asked for their sum.
    same = [it for it in items if it.model == model]
    refusal = outcomes.http_refusal(decision, model, sum(it.requests for it in same), sum(it.tokens for it in same))
    return Reply(statuses, headers, refusal)


def shown(buckets: Sequence[BucketState], binding: BucketState | None) -> BucketState | None:
    """The bucket a descriptor reports as its limit: the binding one, else the enforcing one closest to
    full (a shadow limit's bucket changes nothing a client sees)."""
    # By identity: two buckets of different models may hold equal values.
    if binding is not None and any(b is binding for b in buckets):
        return binding
    # min() by (share left, remaining) over the enforcing buckets, the first of equals; a loop
    # rather than min() with a key function, called per bucket on every decision.
    best, best_key = None, (0.0, 0)
    for b in buckets:
        if not b.shadow:
            key = (b.remaining / b.limit if b.limit else 0.0, b.remaining)
            if best is None or key < best_key:
                best, best_key = b, key
    return best


class UsageCall(NamedTuple):
    """What a usage call (after the response) reports, for Usage.report."""

    caller: Caller
    request_id: str
    model: str
    input_tokens: int
    output_tokens: int
    cached_tokens: int


def usage_call(parsed: Sequence[Parsed]) -> UsageCall | None:
    """The report a usage call makes; None without one well-formed API key (nothing to charge)."""
    usage = [p for p in parsed if "phase" in p.roles]
    api_keys = {p.roles["api_key"] for p in usage if p.roles.get("api_key")}
    parsed_key = ids.parse_api_key_cached(next(iter(api_keys))) if len(api_keys) == 1 else None
    if parsed_key is None:
        return None
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
    return UsageCall(caller, request_id, next(iter(models), ""), tokens["input"], tokens["output"], tokens["cached"])
