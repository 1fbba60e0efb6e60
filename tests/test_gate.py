"""One authentication gate for every RPC: no method is served without a rule, and a new one
cannot forget it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as common_pb
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from ratelimitd.api.gate import IN_REQUEST_METHODS, Gate, Rule, operations, rule_of
from ratelimitd.api.wire import Guard, served_methods
from ratelimitd.app import SERVICE_NAMES, App
from ratelimitd.engine.authz import POLICY
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.conftest import Client

SERVED = [*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
METHODS = served_methods(SERVED)
BEARER_METHODS = [m for m in METHODS if rule_of(m) is Rule.BEARER]


def test_every_served_method_has_a_rule() -> None:
    assert {m: rule_of(m) for m in METHODS if rule_of(m) is None} == {}
    Gate.check(METHODS)  # what start-up runs


def test_only_the_decision_path_names_its_caller_in_the_request() -> None:
    assert {m for m in METHODS if rule_of(m) is Rule.IN_REQUEST} == IN_REQUEST_METHODS
    # every management and usage operation is behind the bearer check (CheckAndConsumeByProject
    # is the decision path's; ManageProject's operations are ProjectService's own)
    reached = {op for m in BEARER_METHODS for op in operations(m.rpartition("/")[2])}
    assert reached == set(POLICY) - {"CheckAndConsumeByProject"}


def test_a_method_without_a_rule_stops_start_up() -> None:
    with pytest.raises(RuntimeError) as e:
        Gate.check(["/ratelimitd.v1.OrganizationService/Unlisted", "/other.v1.New/Thing", *METHODS])
    assert str(e.value) == (
        "no access rule for /other.v1.New/Thing, /ratelimitd.v1.OrganizationService/Unlisted: "
        "add it to api/gate.py and engine/authz.py's POLICY"
    )


@pytest.mark.parametrize("method", BEARER_METHODS, ids=lambda m: m.rpartition("/")[2])
@pytest.mark.parametrize("credential", [None, "Bearer rlt_not-a-credential"], ids=["none", "unknown"])
async def test_every_bearer_method_refuses_a_caller_without_a_valid_credential(
    app: App, method: str, credential: str | None
) -> None:
    metadata = (("authorization", credential),) if credential else None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            method
        )  # raw bytes: an empty request parses as every message
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(b"", metadata=metadata, timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture
async def unlisted_server() -> AsyncIterator[str]:
    """A server behind the gate with two handlers the gate has no rule for: a method our
    service lacks in the authorization table, and a service the gate does not know."""
    server = grpc.aio.server(interceptors=[Guard(gate=Gate())])

    async def answer(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return b"served"

    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(answer)
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler("ratelimitd.v1.OrganizationService", {"Unlisted": handler}),
            grpc.method_handlers_generic_handler("other.v1.New", {"Thing": handler}),
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


@pytest.mark.parametrize("method", ["/ratelimitd.v1.OrganizationService/Unlisted", "/other.v1.New/Thing"])
async def test_a_handler_without_a_rule_is_refused(unlisted_server: str, method: str) -> None:
    async with grpc.aio.insecure_channel(unlisted_server) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
            await call(b"", timeout=30)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert e.value.details() == f"{method} has no access rule on this server, so it is refused"


async def test_the_decision_path_refuses_a_caller_it_cannot_name(client: Client) -> None:
    """IN_REQUEST methods: a project reference needs a credential; an Envoy call without a key is refused."""
    ref = pb.ProjectRef(organization_id="org_aaaaaaaaaaaa", project_id="proj_aaaaaaaaaaaa")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.decisions.CheckAndConsume(pb.CheckRequest(project=ref, model="m"))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.decisions.ReportUsage(pb.ReportUsageRequest(project=ref, request_id="r", model="m"))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    (answer,) = [
        a async for a in client.decisions.CheckAndConsumeStream(iter([pb.CheckRequest(project=ref, model="m")]))
    ]
    assert answer.error_code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    envoy = rls_pb2_grpc.RateLimitServiceStub(client.channel)
    reply = await envoy.ShouldRateLimit(
        rls_pb2.RateLimitRequest(
            domain="ratelimitd",
            descriptors=[
                common_pb.RateLimitDescriptor(entries=[common_pb.RateLimitDescriptor.Entry(key="model", value="m")])
            ],
        )
    )
    assert reply.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT
    assert json.loads(reply.raw_body)["error"]["code"] == "invalid_api_key"
