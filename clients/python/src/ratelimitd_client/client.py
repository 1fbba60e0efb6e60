"""check (CheckAndConsume) and report (ReportUsage), sync and async.

Every call has a deadline. A call that fails with UNAVAILABLE or DEADLINE_EXCEEDED is retried
with the same request id, so a decision the server made but could not deliver is replayed, not
charged twice (docs/api.md "Request ids"). When every attempt fails, ``check`` follows the
fail-open or fail-closed choice instead of raising; any other gRPC error raises RateLimitdError.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass
from typing import Literal, TypedDict, TypeVar, Unpack

import grpc
import grpc.aio

from ratelimitd_client import http
from ratelimitd_client._gen import ratelimit_pb2 as pb

CheckResponse = pb.CheckResponse
ReportUsageResponse = pb.ReportUsageResponse

# The service is declared in rate_limit_service.proto, which this package does not ship (it
# imports the management API); ratelimit.proto's messages are all the calls need.
_SERVICE = "ratelimitd.v1.RateLimitService"
_CHECK = f"/{_SERVICE}/CheckAndConsume"
_REPORT = f"/{_SERVICE}/ReportUsage"
# Both mean the answer did not arrive; the call may or may not have been applied, and a retry
# with the same request id is exact either way.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
FailMode = Literal["open", "closed"]
Request = TypeVar("Request")
Response = TypeVar("Response")


class RateLimitdError(Exception):
    """ratelimitd answered with an error status (bad input, bad credential): retrying won't help."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class RateLimitdUnavailable(RateLimitdError):
    """Every attempt failed with UNAVAILABLE or DEADLINE_EXCEEDED (raised by ``report``)."""


@dataclass(frozen=True)
class Options:
    """``timeout_s``: each attempt's deadline. ``attempts``: tries in all, with the same request id.
    ``fail``: when ratelimitd cannot be asked, ``"open"`` admits the request, ``"closed"`` refuses it (503).
    ``token``: a credential for ``authorization`` metadata; needed only to decide by project."""

    timeout_s: float = 0.5
    attempts: int = 3
    backoff_s: float = 0.05
    fail: FailMode = "closed"
    token: str | None = None


class Usage(TypedDict, total=False):
    """What ReportUsage takes besides the key and the request id (docs/usage.md)."""

    model: str
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    status_code: int
    latency_ms: int


@dataclass(frozen=True)
class Decision:
    """A CheckAndConsume answer, or the fail-open/fail-closed stand-in when none came."""

    response: pb.CheckResponse
    unreachable: bool = False
    error: str = ""

    @property
    def allowed(self) -> bool:
        return self.response.allowed

    @property
    def request_id(self) -> str:
        return self.response.request_id

    def http(self) -> http.HttpAnswer:
        """The HTTP answer: 200 with x-ratelimit-* headers, or 429/413/401/403/... with a JSON error."""
        if self.unreachable and not self.allowed:
            # self.error names internal addresses: it is for the operator's log, not the end user
            return http.unreachable("The rate limit service is unavailable.")
        return http.answer(self.response)


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


def check_request(
    api_key: str, model: str, *, tokens: int = 0, requests: int = 0, request_id: str | None = None
) -> pb.CheckRequest:
    return pb.CheckRequest(
        api_key=api_key, model=model, tokens=tokens, requests=requests, request_id=request_id or new_request_id()
    )


def fallback(options: Options, request: pb.CheckRequest, error: grpc.RpcError) -> Decision:
    allowed = options.fail == "open"
    response = pb.CheckResponse(allowed=allowed, request_id=request.request_id)
    return Decision(response, unreachable=True, error=_describe(error))


def _describe(error: grpc.RpcError) -> str:
    code, details = _status(error)
    return f"{code.name}: {details}"


def _backoff(options: Options, attempt: int) -> float:
    return float(options.backoff_s * (2**attempt) * random.uniform(0.5, 1.5))


def _metadata(options: Options) -> tuple[tuple[str, str | bytes], ...] | None:
    return (("authorization", f"Bearer {options.token}"),) if options.token else None


def _status(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    return error.code(), error.details() or ""


def _raise(error: grpc.RpcError, attempts_failed: bool) -> None:
    code, details = _status(error)
    raise (RateLimitdUnavailable if attempts_failed else RateLimitdError)(code, details) from error


class Client:
    """Blocking client. ``Client("127.0.0.1:50051")`` or ``Client(channel=...)`` for TLS or interceptors."""

    def __init__(self, address: str = "", *, channel: grpc.Channel | None = None, options: Options = Options()) -> None:
        self._channel = channel or grpc.insecure_channel(address)
        self._options = options
        self._check = self._channel.unary_unary(
            _CHECK,
            request_serializer=pb.CheckRequest.SerializeToString,
            response_deserializer=pb.CheckResponse.FromString,
        )
        self._report = self._channel.unary_unary(
            _REPORT,
            request_serializer=pb.ReportUsageRequest.SerializeToString,
            response_deserializer=pb.ReportUsageResponse.FromString,
        )

    def check(
        self, api_key: str, model: str, *, tokens: int = 0, requests: int = 0, request_id: str | None = None
    ) -> Decision:
        request = check_request(api_key, model, tokens=tokens, requests=requests, request_id=request_id)
        try:
            return Decision(self._call(self._check, request))
        except grpc.RpcError as error:
            if _status(error)[0] not in RETRYABLE:
                _raise(error, attempts_failed=False)
            return fallback(self._options, request, error)

    def report(self, api_key: str, request_id: str, **usage: Unpack[Usage]) -> pb.ReportUsageResponse:
        """Tells what an admitted request really used; a retry of it is counted once."""
        request = pb.ReportUsageRequest(api_key=api_key, request_id=request_id, **usage)
        try:
            return self._call(self._report, request)
        except grpc.RpcError as error:
            _raise(error, attempts_failed=_status(error)[0] in RETRYABLE)
            raise

    def _call(self, method: grpc.UnaryUnaryMultiCallable[Request, Response], request: Request) -> Response:
        for attempt in range(self._options.attempts):
            try:
                return method(request, timeout=self._options.timeout_s, metadata=_metadata(self._options))
            except grpc.RpcError as error:
                if _status(error)[0] not in RETRYABLE or attempt == self._options.attempts - 1:
                    raise
                time.sleep(_backoff(self._options, attempt))
        raise AssertionError("attempts must be at least 1")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client (grpc.aio); the same calls as Client, awaited."""

    def __init__(
        self, address: str = "", *, channel: grpc.aio.Channel | None = None, options: Options = Options()
    ) -> None:
        self._channel = channel or grpc.aio.insecure_channel(address)
        self._options = options
        self._check = self._channel.unary_unary(
            _CHECK,
            request_serializer=pb.CheckRequest.SerializeToString,
            response_deserializer=pb.CheckResponse.FromString,
        )
        self._report = self._channel.unary_unary(
            _REPORT,
            request_serializer=pb.ReportUsageRequest.SerializeToString,
            response_deserializer=pb.ReportUsageResponse.FromString,
        )

    async def check(
        self, api_key: str, model: str, *, tokens: int = 0, requests: int = 0, request_id: str | None = None
    ) -> Decision:
        request = check_request(api_key, model, tokens=tokens, requests=requests, request_id=request_id)
        try:
            return Decision(await self._call(self._check, request))
        except grpc.RpcError as error:
            if _status(error)[0] not in RETRYABLE:
                _raise(error, attempts_failed=False)
            return fallback(self._options, request, error)

    async def report(self, api_key: str, request_id: str, **usage: Unpack[Usage]) -> pb.ReportUsageResponse:
        """Tells what an admitted request really used; a retry of it is counted once."""
        request = pb.ReportUsageRequest(api_key=api_key, request_id=request_id, **usage)
        try:
            return await self._call(self._report, request)
        except grpc.RpcError as error:
            _raise(error, attempts_failed=_status(error)[0] in RETRYABLE)
            raise

    async def _call(self, method: grpc.aio.UnaryUnaryMultiCallable[Request, Response], request: Request) -> Response:
        for attempt in range(self._options.attempts):
            try:
                return await method(request, timeout=self._options.timeout_s, metadata=_metadata(self._options))
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE or attempt == self._options.attempts - 1:
                    raise
                await asyncio.sleep(_backoff(self._options, attempt))
        raise AssertionError("attempts must be at least 1")

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()
