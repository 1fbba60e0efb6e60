"""JSON over HTTP (the Connect protocol's unary calls): the same answers as gRPC, from the same server."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from google.protobuf import descriptor_pool, json_format

from ratelimitd.app import HEALTH_SERVICE_NAME, SERVICE_NAMES, App
from ratelimitd.settings import Settings
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.certs import SERVER_NAMES, authority
from tests.conftest import AUTH, OPERATOR_TOKEN, Client, Clock, Storage, channel_client, settings_for
from tests.servers import ROOT, RatelimitdProcess, ValkeyProcess, free_port, wait_until

M = "llama-3.1-8b-instant"
CONSOLE = "https://console.example.com"
DECIDE = "/ratelimitd.v1.RateLimitService/CheckAndConsume"
BEARER = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
DESCRIPTION = ROOT / "ratelimitd/http/openapi/openapi.json"

# Adapter tests: the decisions themselves run on both backends elsewhere.
pytestmark = pytest.mark.single_node("the HTTP layer forwards to the gRPC server; storage is not its concern")


@pytest.fixture
async def http_app(storage: Storage, redis_client: redis.asyncio.Redis, clock: Clock) -> AsyncIterator[App]:
    a = App(settings_for(storage.url, http_listen="127.0.0.1:0", http_cors_origins=(CONSOLE,)))
    await a.start()
    yield a
    await a.stop(0)


@pytest.fixture
async def grpc_client(http_app: App) -> AsyncIterator[Client]:
    c = channel_client(f"127.0.0.1:{http_app.port}")
    yield c
    await c.channel.close()


class Http:
    """An HTTP client of the server, as curl or a browser would be."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def post(
        self, path: str, body: object = None, *, data: str | bytes | None = None, **headers: str
    ) -> tuple[int, Any, dict[str, str]]:
        """(status, parsed JSON body or text, headers); ``body`` is sent as JSON, ``data`` as it is."""
        sent = {"Content-Type": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}}
        payload = json.dumps(body) if data is None else data
        async with self.session.post(self.base + path, data=payload, headers=sent) as r:
            text = await r.text()
            parsed = json.loads(text) if r.content_type == "application/json" else text
            return r.status, parsed, dict(r.headers)

    async def rpc(self, path: str, body: object, **headers: str) -> Any:
        status, reply, _ = await self.post(path, body, **headers)
        assert status == 200, reply
        return reply


@pytest.fixture
async def http(http_app: App) -> AsyncIterator[Http]:
    async with aiohttp.ClientSession() as session:
        yield Http(session, f"http://127.0.0.1:{http_app.http_port}")


def comparable(reply: pb.CheckResponse, org_id: str, project_id: str) -> pb.CheckResponse:
    """A decision without what differs between two organizations set up alike: their ids."""
    same = pb.CheckResponse()
    same.CopyFrom(reply)
    same.message = same.message.replace(org_id, "ORG").replace(project_id, "PROJECT")
    for field in ("request_id", "organization_id", "project_id"):
        same.ClearField(field)
    return same


async def test_decisions_and_refusals_over_http_are_those_of_grpc(grpc_client: Client, http: Http) -> None:
    limits = [(M, "requests", "minute", 2), (M, "tokens", "minute", 1000)]
    answers: dict[str, list[pb.CheckResponse]] = {}
    for transport in ("grpc", "http"):
        org = await grpc_client.org(f"o-{transport}", limits)
        project, key = await grpc_client.project(org, "a")
        replies = []
        for tokens in (100, 2000, 100, 100):  # allowed, too large, allowed, over the project's minute
            if transport == "grpc":
                reply = await grpc_client.decisions.CheckAndConsume(
                    pb.CheckRequest(api_key=key, model=M, tokens=tokens)
                )
            else:
                got = await http.rpc(DECIDE, {"apiKey": key, "model": M, "tokens": tokens})
                reply = json_format.ParseDict(got, pb.CheckResponse())
            replies.append(comparable(reply, org, project))
        answers[transport] = replies
    assert answers["http"] == answers["grpc"]
    reasons = [r.reason for r in answers["http"]]
    assert reasons == [
        pb.REASON_ALLOWED,
        pb.REASON_REQUEST_TOO_LARGE,
        pb.REASON_ALLOWED,
        pb.REASON_ORGANIZATION_LIMIT,
    ]


async def test_a_refusal_reads_as_json_with_every_field_and_its_headers(grpc_client: Client, http: Http) -> None:
    org = await grpc_client.org("o", [(M, "requests", "minute", 1)])
    _, key = await grpc_client.project(org, "a")
    await http.rpc(DECIDE, {"apiKey": key, "model": M})
    refused = await http.rpc(DECIDE, {"apiKey": key, "model": M})
    assert refused["allowed"] is False  # a zero value, written out all the same
    assert refused["reason"] == "REASON_ORGANIZATION_LIMIT"
    assert refused["headers"]["retry-after"] == "60"
    assert refused["binding"]["remaining"] == "0"  # int64 is a string in proto3 JSON


async def test_report_usage_reconciles_once(grpc_client: Client, http: Http) -> None:
    org = await grpc_client.org("o", [(M, "requests", "minute", 10), (M, "tokens", "minute", 1000)])
    _, key = await grpc_client.project(org, "a")
    decided = await http.rpc(DECIDE, {"apiKey": key, "model": M, "tokens": 500, "requestId": "r1"})
    assert decided["allowed"] is True
    report = {"apiKey": key, "requestId": "r1", "inputTokens": 100, "outputTokens": 50}
    first = await http.rpc("/ratelimitd.v1.RateLimitService/ReportUsage", report)
    again = await http.rpc("/ratelimitd.v1.RateLimitService/ReportUsage", report)
    assert (first["result"], again["result"]) == ("RESULT_RECONCILED", "RESULT_DUPLICATE")
    after = await grpc_client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M))
    tokens = [b for b in after.buckets if b.metric == "tokens" and b.scope == pb.SCOPE_ORGANIZATION]
    assert tokens[0].remaining == 1000 - 150  # the estimate of 500 replaced by the 150 used


async def test_management_with_a_bearer_token(grpc_client: Client, http: Http) -> None:
    created = await http.rpc("/ratelimitd.v1.OrganizationService/CreateOrganization", {"name": "acme"}, **BEARER)
    assert created["id"].startswith("org_")
    got = await grpc_client.orgs.GetOrganization(
        apb.GetOrganizationRequest(organization_id=created["id"]), metadata=AUTH
    )
    assert got.name == "acme"
    status, me, _ = await http.post("/ratelimitd.v1.CredentialService/WhoAmI", data="", **BEARER)  # empty: {}
    assert status == 200, me
    assert me["kind"] == "operator"


@pytest.mark.parametrize("authorization", [None, "Bearer rlt_not-a-credential", "Bearer caf\u00e9"])
async def test_without_a_valid_credential_401_unauthenticated_and_nothing_created(
    grpc_client: Client, http: Http, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    status, reply, _ = await http.post(
        "/ratelimitd.v1.OrganizationService/CreateOrganization", {"name": "x"}, **headers
    )
    assert status == 401 and reply["code"] == "unauthenticated", reply
    assert reply["message"]
    listed = await grpc_client.orgs.ListOrganizations(apb.ListOrganizationsRequest(), metadata=AUTH)
    assert list(listed.organizations) == []


async def test_bad_json_is_400_invalid_argument_naming_the_problem_and_changes_nothing(
    grpc_client: Client, http: Http
) -> None:
    org = await grpc_client.org("o", [(M, "requests", "minute", 10)])
    create = "/ratelimitd.v1.ProjectService/CreateProject"
    cases = [
        ('{"organizationId": "' + org + '", "name": "a"', "not valid JSON (Expecting ',' delimiter"),
        ('{"organizationId": "' + org + '", "nmae": "a"}', '"nmae"'),
        ('{"organizationId": "' + org + '", "name": 7}', "name"),
        ('["a"]', "a JSON list, not the JSON object ratelimitd.v1.CreateProjectRequest is"),
    ]
    for body, named in cases:
        status, reply, _ = await http.post(create, data=body, **BEARER)
        assert (status, reply["code"]) == (400, "invalid_argument"), reply
        assert named in reply["message"], reply
    # the server's own validation, word for word as over gRPC
    status, reply, _ = await http.post(create, {"organizationId": org, "name": "Not A Name"}, **BEARER)
    assert (status, reply["code"]) == (400, "invalid_argument") and "name" in reply["message"]
    listed = await grpc_client.projects.ListProjects(apb.ListProjectsRequest(organization_id=org), metadata=AUTH)
    assert list(listed.projects) == []


async def test_envelope_errors_name_what_is_wrong(grpc_client: Client, http: Http) -> None:
    status, reply, _ = await http.post(DECIDE, {"apiKey": "rlk_x", "model": M}, Content_Type="text/plain")
    assert status == 415 and "text/plain" in reply["message"]
    status, reply, _ = await http.post(DECIDE, {"apiKey": "rlk_x", "model": M}, Connect_Timeout_Ms="soon")
    assert (status, reply["code"]) == (400, "invalid_argument") and "Connect-Timeout-Ms" in reply["message"]
    status, reply, _ = await http.post(DECIDE, {"apiKey": "rlk_x", "model": M}, Connect_Protocol_Version="2")
    assert (status, reply["code"]) == (400, "invalid_argument") and "Connect-Protocol-Version" in reply["message"]
    status, reply, _ = await http.post(DECIDE, data=b"\xff{}")
    assert (status, reply["code"]) == (400, "invalid_argument") and "UTF-8" in reply["message"]
    status, reply, _ = await http.post(DECIDE, data=b" " * (4 * 1024 * 1024 + 1))  # over gRPC's 4 MiB too
    assert (status, reply["code"]) == (413, "resource_exhausted") and "larger than" in reply["message"]


async def test_unknown_and_streaming_methods_are_404_and_other_verbs_405(http: Http) -> None:
    status, reply, _ = await http.post("/ratelimitd.v1.RateLimitService/Decide", {})
    assert (status, reply["code"]) == (404, "unimplemented")
    assert "/ratelimitd.v1.RateLimitService/Decide" in reply["message"]
    status, reply, _ = await http.post("/ratelimitd.v1.RateLimitService/CheckAndConsumeStream", {})
    assert status == 404 and "streaming" in reply["message"]
    async with http.session.get(http.base + DECIDE) as r:
        assert r.status == 405 and (await r.json())["code"] == "invalid_argument"
        assert r.headers["Allow"] == "POST"


async def test_binary_protobuf_and_the_health_check_are_served_too(grpc_client: Client, http: Http) -> None:
    org = await grpc_client.org("o", [(M, "requests", "minute", 10)])
    _, key = await grpc_client.project(org, "a")
    body = pb.CheckRequest(api_key=key, model=M).SerializeToString()
    async with http.session.post(http.base + DECIDE, data=body, headers={"Content-Type": "application/proto"}) as r:
        assert r.status == 200 and r.content_type == "application/proto"
        assert pb.CheckResponse.FromString(await r.read()).allowed
    health = await http.rpc("/grpc.health.v1.Health/Check", {"service": "storage"})
    assert health == {"status": "SERVING"}


async def test_connect_timeout_ms_is_the_calls_deadline(own_valkey: ValkeyProcess) -> None:
    app = App(settings_for(own_valkey.url, http_listen="127.0.0.1:0", manual_clock=False))
    await app.start()
    grpc_client = channel_client(f"127.0.0.1:{app.port}")
    assert own_valkey.proc is not None
    try:
        org = await grpc_client.org("o", [(M, "requests", "minute", 10)])
        _, key = await grpc_client.project(org, "a")
        own_valkey.proc.send_signal(signal.SIGSTOP)  # storage answers nothing, within the test's 10 s storage timeout
        async with aiohttp.ClientSession() as session:
            http = Http(session, f"http://127.0.0.1:{app.http_port}")
            status, reply, _ = await http.post(DECIDE, {"apiKey": key, "model": M}, Connect_Timeout_Ms="300")
        assert (status, reply["code"]) == (504, "deadline_exceeded"), reply
    finally:
        own_valkey.proc.send_signal(signal.SIGCONT)
        await grpc_client.channel.close()
        await app.stop(0)


async def preflight(http: Http, origin: str) -> tuple[int, dict[str, str]]:
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    async with http.session.options(http.base + DECIDE, headers=headers) as r:
        return r.status, dict(r.headers)


async def test_cors_preflight_allows_the_configured_origin_only(http: Http) -> None:
    status, headers = await preflight(http, CONSOLE)
    assert status == 204 and headers["Access-Control-Allow-Origin"] == CONSOLE
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    assert "POST" in headers["Access-Control-Allow-Methods"]
    status, headers = await preflight(http, "https://evil.example.com")
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    _, _, allowed = await http.post(DECIDE, {"apiKey": "rlk_x", "model": M}, Origin=CONSOLE)
    _, _, other = await http.post(DECIDE, {"apiKey": "rlk_x", "model": M}, Origin="https://evil.example.com")
    assert allowed["Access-Control-Allow-Origin"] == CONSOLE and "Access-Control-Allow-Origin" not in other


async def test_no_origin_is_allowed_by_default(storage: Storage, redis_client: redis.asyncio.Redis) -> None:
    app = App(settings_for(storage.url, http_listen="127.0.0.1:0"))
    await app.start()
    try:
        async with aiohttp.ClientSession() as session:
            status, _ = await preflight(Http(session, f"http://127.0.0.1:{app.http_port}"), CONSOLE)
        assert status == 403
    finally:
        await app.stop(0)


def served_paths() -> set[str]:
    pool = descriptor_pool.Default()
    return {
        f"/{name}/{m.name}"
        for name in [*SERVICE_NAMES, HEALTH_SERVICE_NAME]
        for m in pool.FindServiceByName(name).methods
        if not (m.client_streaming or m.server_streaming)
    }


async def test_the_served_description_is_the_committed_one_and_covers_every_rpc_of_ours(http: Http) -> None:
    async with http.session.get(http.base + "/openapi.json") as r:
        served = await r.json()
    committed = json.loads(DESCRIPTION.read_text())
    assert served == committed
    ours = {p for p in served_paths() if p.startswith("/ratelimitd.")}
    assert set(committed["paths"]) == ours
    check = committed["paths"][DECIDE]["post"]
    assert check["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("ratelimitd.v1.CheckRequest")
    assert committed["components"]["schemas"]["ratelimitd.v1.CheckRequest"]["properties"]["apiKey"]["type"] == "string"


def test_a_stale_description_fails_the_generated_code_check(tmp_path: Path) -> None:
    for part in ("scripts", "proto"):
        shutil.copytree(ROOT / part, tmp_path / part)
    copy = tmp_path / DESCRIPTION.relative_to(ROOT)
    copy.parent.mkdir(parents=True)
    shutil.copyfile(DESCRIPTION, copy)
    check = [sys.executable, str(tmp_path / "scripts/gen_protos.py"), "--check", "--language", "openapi"]
    fresh = subprocess.run(check, capture_output=True, text=True, timeout=120, check=False)
    assert fresh.returncode == 0, fresh.stderr
    copy.write_text(copy.read_text().replace('"title": "ratelimitd"', '"title": "edited by hand"'))
    stale = subprocess.run(check, capture_output=True, text=True, timeout=120, check=False)
    assert stale.returncode == 1
    assert "ratelimitd/http/openapi/openapi.json" in stale.stderr


def listening_sockets(port: int) -> int:
    """TCP sockets listening on the port, from /proc (Linux): each worker's own, with SO_REUSEPORT."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for row in rows if row.split()[1].endswith(f":{port:04X}") and row.split()[3] == "0A")


async def test_every_worker_serves_http_on_the_shared_port(storage: Storage, tmp_path: Path) -> None:
    http_port = free_port()
    server = RatelimitdProcess(
        "--redis-url", storage.url, "--workers", "2", "--http-listen", f"127.0.0.1:{http_port}",
        env={"RATELIMITD_OPERATOR_TOKEN": OPERATOR_TOKEN}, log=tmp_path / "s.log",
    )  # fmt: skip
    server.start()
    try:
        # one per worker (SO_REUSEPORT), none in the supervisor; a worker binds it as it starts
        wait_until(lambda: listening_sockets(http_port) == 2, "an HTTP socket in each of the two workers")
        # a new connection per call: the kernel spreads connections, not calls, over the workers
        for _ in range(8):
            async with aiohttp.ClientSession() as session:
                me = await Http(session, f"http://127.0.0.1:{http_port}").rpc(
                    "/ratelimitd.v1.CredentialService/WhoAmI", {}, **BEARER
                )
                assert me["kind"] == "operator"
    finally:
        server.stop()
    assert f"JSON over HTTP (Connect protocol) on http://127.0.0.1:{http_port}/" in server.output()


async def test_a_taken_http_port_stops_start_up_naming_it(storage: Storage) -> None:
    app = App(settings_for(storage.url, http_listen="127.0.0.1:0"))
    await app.start()
    taken = f"127.0.0.1:{app.http_port}"
    other = App(settings_for(storage.url, http_listen=taken))
    try:
        with pytest.raises(OSError, match=f"cannot listen on {taken} \\(HTTP\\)"):
            await other.start()
    finally:
        await other.stop(0)
        await app.stop(0)


async def test_http_reaches_an_mtls_grpc_port_through_its_own_socket(
    storage: Storage, redis_client: redis.asyncio.Redis, tmp_path: Path
) -> None:
    ca = authority(tmp_path, "ca")
    server = ca.issue(tmp_path, "server", server_names=SERVER_NAMES)
    tls = {"tls_cert": str(server.cert), "tls_key": str(server.key), "tls_client_ca": str(ca.pem)}
    app = App(settings_for(storage.url, http_listen="127.0.0.1:0", **tls))
    await app.start()
    try:
        async with aiohttp.ClientSession() as session:
            me = await Http(session, f"http://127.0.0.1:{app.http_port}").rpc(
                "/ratelimitd.v1.CredentialService/WhoAmI", {}, **BEARER
            )
        assert me["kind"] == "operator"
    finally:
        await app.stop(0)


def test_cors_origins_are_read_from_the_environment_and_checked() -> None:
    env = {"RATELIMITD_HTTP_CORS_ORIGINS": "https://a.example.com, http://localhost:5173"}
    assert Settings.load(env=env).http_cors_origins == ("https://a.example.com", "http://localhost:5173")
    with pytest.raises(ValueError, match=r"'a\.example\.com' is not an origin"):
        Settings.load(env={}, http_cors_origins=("a.example.com",))
    with pytest.raises(ValueError, match="is not an origin"):
        Settings.load(env={}, http_cors_origins=("https://a.example.com/console",))
