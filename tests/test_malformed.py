"""Requests that are not valid protobuf, on every RPC of every service: a precise status, a quiet log.

The requests are raw bytes sent with identity serializers, as a hostile or
broken client would send them.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from ratelimitd.app import SERVICE_NAMES
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import Client

M = "llama-3.1-8b-instant"
SERVICES = [*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
METHODS: list[MethodDescriptor] = [
    m for name in SERVICES for m in descriptor_pool.Default().FindServiceByName(name).methods
]
# A length-delimited field 1 that claims more bytes than follow: no message type can parse it.
CORRUPT = b"\x0a\xff\xff\xff\x0f\x01"
# From the issue: field 1 (CheckRequest.api_key) holds bytes that are not UTF-8, field 3 is "m1".
ISSUE_BYTES = bytes.fromhex("0a04fffefdfc1a026d31")


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


async def call_raw(channel: Any, method: MethodDescriptor, data: bytes) -> list[bytes]:
    """One call with ``data`` as the (only) request message; the raw reply messages."""
    where = path(method)
    if method.client_streaming and method.server_streaming:
        return [r async for r in channel.stream_stream(where)(iter([data]))]
    if method.server_streaming:
        return [r async for r in channel.unary_stream(where)(data)]
    if method.client_streaming:
        return [await channel.stream_unary(where)(iter([data]))]
    return [await channel.unary_unary(where)(data)]


def assert_refused_plainly(error: grpc.aio.AioRpcError, *expected: str) -> None:
    details = error.details() or ""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), details)
    assert "<class" not in details and "DecodeError" not in details and "Unexpected" not in details, details
    for text in expected:
        assert text in details, details


def assert_quiet(records: list[logging.LogRecord]) -> None:
    """At most one line about malformed requests, and no traceback from anyone."""
    assert [r for r in records if r.exc_info] == [], [r.getMessage() for r in records if r.exc_info]
    assert len([r for r in records if "malformed" in r.getMessage()]) <= 1, [r.getMessage() for r in records]


@pytest.mark.parametrize("method", METHODS, ids=path)
async def test_corrupt_bytes_are_invalid_argument_on_every_rpc_and_logged_once(
    client: Client, method: MethodDescriptor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    request_type = method.input_type.full_name
    for _ in range(20):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call_raw(client.channel, method, CORRUPT)
        assert_refused_plainly(e.value, f"not a valid {request_type} message")
    assert_quiet(caplog.records)


def first_string_field(method: MethodDescriptor) -> FieldDescriptor | None:
    return next((f for f in method.input_type.fields if f.type == FieldDescriptor.TYPE_STRING), None)


STRING_METHODS = [
    m
    for m in METHODS
    if first_string_field(m) is not None
    and m.name not in ("CheckAndConsume", "CheckAndConsumeStream", "ShouldRateLimit")  # lenient: see test_stream.py
]


@pytest.mark.parametrize("method", STRING_METHODS, ids=path)
async def test_a_string_that_is_not_utf8_is_invalid_argument_naming_the_field(
    client: Client, method: MethodDescriptor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    field = first_string_field(method)
    assert field is not None
    message: Any = GetMessageClass(method.input_type)()
    setattr(message, field.name, "XX")
    data = message.SerializeToString().replace(b"XX", b"\xff\xfe")
    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call_raw(client.channel, method, data)
        assert_refused_plainly(e.value, f"field {field.name} is not valid UTF-8")
    assert_quiet(caplog.records)


async def test_every_registered_service_is_covered(client: Client) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name async for reply in call for s in reply.list_services_response.service}
    assert names <= set(SERVICES), names - set(SERVICES)


async def test_check_and_consume_with_a_key_that_is_not_utf8_is_the_invalid_key_refusal(client: Client) -> None:
    org = await client.org("o", [(M, "requests", "minute", 10)])
    _, key = await client.project(org, "a")
    check: Any = client.channel.unary_unary(
        "/ratelimitd.v1.RateLimitService/CheckAndConsume", response_deserializer=pb.CheckResponse.FromString
    )
    reply = await check(ISSUE_BYTES)
    assert (reply.allowed, reply.reason, reply.project_id) == (False, pb.REASON_INVALID_API_KEY, "")

    bad_model = pb.CheckRequest(api_key=key, model="XX").SerializeToString().replace(b"XX", b"\xff\xfe")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await check(bad_model)
    assert_refused_plainly(e.value, "model")

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await check(CORRUPT)
    assert_refused_plainly(e.value, "not a valid ratelimitd.v1.CheckRequest message")
