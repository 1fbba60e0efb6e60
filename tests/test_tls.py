"""TLS and mTLS on the gRPC port, with certificates made for this run: the server, the CLI, --workers."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis.asyncio
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ratelimitd.app import App
from ratelimitd.settings import Settings
from ratelimitd.v1 import admin_pb2 as apb
from ratelimitd.v1 import ratelimit_pb2 as pb
from tests.certs import SERVER_NAMES, Pair, authority
from tests.conftest import AUTH, OPERATOR_TOKEN, Cli, Client, Clock, Storage, settings_for, stubs
from tests.edge import EnvoyProcess, Reply, envoy_config, http_request, upstream
from tests.servers import ROOT, RatelimitdProcess, ValkeyProcess, free_port

M = "llama-3.1-8b-instant"
TLS_CLUSTER = ROOT / "clients" / "envoy" / "ratelimitd-tls-cluster.yaml"
HANG_GUARD_S = 10  # generous: a refused handshake must end the call, not hang it


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Pair  # for SERVER_NAMES, issued by ca
    client: Pair  # issued by ca
    other_ca: Path
    stranger: Pair  # a client certificate another CA issued
    internal_only: Pair  # a server certificate for ratelimitd.internal only


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = authority(d, "ca")
    other = authority(d, "other-ca")
    return Pki(
        ca=ca.pem,
        server=ca.issue(d, "server", server_names=SERVER_NAMES),
        client=ca.issue(d, "client", client=True),
        other_ca=other.pem,
        stranger=other.issue(d, "stranger", client=True),
        internal_only=ca.issue(d, "internal-only", server_names=("ratelimitd.internal",)),
    )


def tls_settings(server: Pair, client_ca: Path | None = None) -> dict[str, str | None]:
    return {
        "tls_cert": str(server.cert),
        "tls_key": str(server.key),
        "tls_client_ca": str(client_ca) if client_ca else None,
    }


@pytest.fixture
async def tls_app(storage: Storage, redis_client: redis.asyncio.Redis, clock: Clock, pki: Pki) -> AsyncIterator[App]:
    a = App(settings_for(storage.url, **tls_settings(pki.server)))
    await a.start()
    yield a
    await a.stop(0)


@pytest.fixture
async def mtls_app(storage: Storage, redis_client: redis.asyncio.Redis, clock: Clock, pki: Pki) -> AsyncIterator[App]:
    a = App(settings_for(storage.url, **tls_settings(pki.server, client_ca=pki.ca)))
    await a.start()
    yield a
    await a.stop(0)


def secure(address: str, ca: Path, pair: Pair | None = None) -> Client:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=pair.key.read_bytes() if pair else None,
        certificate_chain=pair.cert.read_bytes() if pair else None,
    )
    return stubs(grpc.aio.secure_channel(address, credentials))


async def decide_and_manage(client: Client) -> pb.CheckResponse:
    """An admin call with the operator's bearer token, then a decision with the key it made."""
    org = await client.org("o", [(M, "requests", "minute", 1)])
    _, key = await client.project(org, "prod")
    return await client.decisions.CheckAndConsume(pb.CheckRequest(api_key=key, model=M), timeout=HANG_GUARD_S)


async def refused_handshake(client: Client) -> grpc.StatusCode:
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.orgs.ListOrganizations(apb.ListOrganizationsRequest(), metadata=AUTH, timeout=HANG_GUARD_S)
        return e.value.code()
    finally:
        await client.channel.close()


# -- the server --------------------------------------------------------------------


async def test_a_tls_client_trusting_the_ca_gets_decisions_and_admin_calls(tls_app: App, pki: Pki) -> None:
    for host in ("127.0.0.1", "localhost"):  # an IP and a DNS name in the certificate
        client = secure(f"{host}:{tls_app.port}", pki.ca)
        try:
            reply = await decide_and_manage(client)
            assert reply.allowed and reply.project_id
        finally:
            await client.channel.close()


async def test_a_plaintext_client_gets_nothing_from_a_tls_port(tls_app: App) -> None:
    plain = stubs(grpc.aio.insecure_channel(f"127.0.0.1:{tls_app.port}"))
    assert await refused_handshake(plain) == grpc.StatusCode.UNAVAILABLE


async def test_a_client_that_trusts_another_ca_refuses_the_server(tls_app: App, pki: Pki) -> None:
    assert await refused_handshake(secure(f"127.0.0.1:{tls_app.port}", pki.other_ca)) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_serves_a_client_certificate_of_the_ca_and_refuses_others(mtls_app: App, pki: Pki) -> None:
    address = f"127.0.0.1:{mtls_app.port}"
    assert await refused_handshake(secure(address, pki.ca)) == grpc.StatusCode.UNAVAILABLE
    assert await refused_handshake(secure(address, pki.ca, pki.stranger)) == grpc.StatusCode.UNAVAILABLE
    client = secure(address, pki.ca, pki.client)
    try:
        assert (await decide_and_manage(client)).allowed
    finally:
        await client.channel.close()


def test_tls_settings_reach_worker_processes_through_the_environment(pki: Pki) -> None:
    s = Settings.load(env={}, **tls_settings(pki.server, client_ca=pki.ca))
    env = s.to_env()
    assert env["RATELIMITD_TLS_CERT"] == str(pki.server.cert)
    assert env["RATELIMITD_TLS_CLIENT_CA"] == str(pki.ca)
    again = Settings.load(env=env)
    assert (again.tls_cert, again.tls_key, again.tls_client_ca, again.tls) == (
        s.tls_cert,
        s.tls_key,
        s.tls_client_ca,
        "mTLS",
    )
    assert "RATELIMITD_TLS_CERT" not in Settings.load(env={}).to_env()


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"tls_client_ca": "ca"}, "--tls-client-ca needs --tls-cert and --tls-key"),
        ({"tls_cert": "cert"}, "--tls-cert and --tls-key"),
        ({"tls_key": "key"}, "--tls-cert and --tls-key"),
    ],
)
def test_tls_settings_that_cannot_work_are_refused(given: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.load(env={}, **given)


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ratelimitd", "serve", "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)},
    )


def test_serve_with_a_client_ca_but_no_certificate_says_so_and_exits(pki: Pki, valkey: ValkeyProcess) -> None:
    done = serve("--redis-url", valkey.url, "--tls-client-ca", str(pki.ca))
    assert done.returncode == 2 and "listening" not in done.stdout
    assert done.stderr.strip() == (
        "ratelimitd: --tls-client-ca needs --tls-cert and --tls-key: "
        "client certificates (mTLS) are checked only over TLS"
    )


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (lambda p: (p.server.cert, p.client.key, None), "ratelimitd: cannot start: --tls-cert {cert} with key {key}"),
        (lambda p: (p.server.cert, p.server.key, p.server.key), "ratelimitd: cannot start: --tls-client-ca {ca}"),
        (
            lambda p: (p.server.cert.with_suffix(".missing"), p.server.key, None),
            "ratelimitd: cannot start: --tls-cert {cert}",
        ),
    ],
    ids=["key-of-another-certificate", "client-ca-not-a-certificate", "missing-file"],
)
def test_serve_with_unusable_tls_files_names_the_file_and_exits(
    pki: Pki, valkey: ValkeyProcess, files: Callable[[Pki], tuple[Path, Path, Path | None]], message: str
) -> None:
    cert, key, ca = files(pki)
    done = serve("--redis-url", valkey.url, "--tls-cert", str(cert), "--tls-key", str(key),
                 *(["--tls-client-ca", str(ca)] if ca else []))  # fmt: skip
    assert done.returncode == 1 and "listening" not in done.stdout
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(message.format(cert=cert, key=key, ca=ca)), done.stderr


async def test_every_worker_speaks_mtls(valkey: ValkeyProcess, pki: Pki, tmp_path: Path) -> None:
    server = RatelimitdProcess(
        "--redis-url", valkey.url, "--workers", "2",
        "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), "--tls-client-ca", str(pki.ca),
        env={"RATELIMITD_OPERATOR_TOKEN": OPERATOR_TOKEN}, log=tmp_path / "server.log",
    )  # fmt: skip
    server.start()
    try:
        assert "over TLS, client certificates required" in server.output()
        # Each new channel is a new connection, which the kernel hands to either worker.
        for _ in range(6):
            channel = grpc.aio.secure_channel(
                server.address,
                grpc.ssl_channel_credentials(
                    pki.ca.read_bytes(), pki.client.key.read_bytes(), pki.client.cert.read_bytes()
                ),
            )
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=HANG_GUARD_S
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            finally:
                await channel.close()
            assert await refused_handshake(secure(server.address, pki.ca)) == grpc.StatusCode.UNAVAILABLE
        # A refused handshake is the client's problem: no log line each (a scanner would flood the log).
        assert "Handshake failed" not in server.output()
    finally:
        server.stop()


# -- the CLI -------------------------------------------------------------------------


@pytest.fixture
def tls_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.setenv("RATELIMITD_TOKEN", OPERATOR_TOKEN)
    for name in ("TLS", "TLS_CA", "TLS_CLIENT_CERT", "TLS_CLIENT_KEY", "TLS_SERVER_NAME"):
        monkeypatch.delenv(f"RATELIMITD_{name}", raising=False)
    return Cli(capsys)


async def cli_decision(cli: Cli, address: str, *tls: str) -> str:
    org = (await cli.json("org", "create", "acme", "--address", address, *tls))["id"]
    await cli.ok("org", "limits", str(org), "--model", M, "--set", "rpm=5", "--address", address, *tls)
    await cli.ok("project", "create", str(org), "prod", "--address", address, *tls)
    secret = (await cli.ok("key", "create", str(org), "prod", "k", "--address", address, *tls)).split()[0]
    return await cli.ok("check", "--api-key", secret, "--model", M, "--address", address, *tls)


async def test_the_cli_talks_tls_with_flags(tls_app: App, tls_cli: Cli, pki: Pki) -> None:
    address = f"127.0.0.1:{tls_app.port}"
    assert (await cli_decision(tls_cli, address, "--tls-ca", str(pki.ca))).startswith("ALLOWED")
    err = await tls_cli.fails("org", "list", "--address", address)  # plaintext
    assert err.startswith("ratelimitd: UNAVAILABLE: ")


async def test_the_cli_talks_mtls_with_the_environment(
    mtls_app: App, tls_cli: Cli, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = f"127.0.0.1:{mtls_app.port}"
    monkeypatch.setenv("RATELIMITD_TLS_CA", str(pki.ca))
    err = await tls_cli.fails("org", "list", "--address", address)  # no client certificate
    assert err.startswith("ratelimitd: UNAVAILABLE: ")
    monkeypatch.setenv("RATELIMITD_TLS_CLIENT_CERT", str(pki.client.cert))
    monkeypatch.setenv("RATELIMITD_TLS_CLIENT_KEY", str(pki.client.key))
    assert (await cli_decision(tls_cli, address)).startswith("ALLOWED")
    assert (await tls_cli.ok("health", "--address", address)).strip() == "SERVING"


async def test_the_cli_verifies_the_certificate_for_tls_server_name(
    storage: Storage, redis_client: redis.asyncio.Redis, tls_cli: Cli, pki: Pki
) -> None:
    app = App(settings_for(storage.url, **tls_settings(pki.internal_only)))
    await app.start()
    try:
        address = f"127.0.0.1:{app.port}"
        err = await tls_cli.fails("org", "list", "--address", address, "--tls-ca", str(pki.ca))
        assert err.startswith("ratelimitd: UNAVAILABLE: ")
        await tls_cli.ok("org", "list", "--address", address, "--tls-ca", str(pki.ca),
                         "--tls-server-name", "ratelimitd.internal")  # fmt: skip
    finally:
        await app.stop(0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (lambda p: ["--tls-cert", str(p.client.cert)], "ratelimitd: --tls-cert and --tls-key go together"),
        (lambda p: ["--tls-ca", "/nonexistent/ca.pem"], "ratelimitd: --tls-ca /nonexistent/ca.pem: No such file"),
        (lambda p: ["--tls-ca", str(p.client.key)], "ratelimitd: --tls-ca {key}: not PEM CA certificates"),
    ],
    ids=["cert-without-key", "missing-ca", "ca-not-a-certificate"],
)
async def test_the_cli_names_an_unusable_tls_flag_in_one_line(
    tls_cli: Cli, pki: Pki, flags: Callable[[Pki], list[str]], message: str
) -> None:
    err = await tls_cli.fails("org", "list", "--address", "127.0.0.1:1", *flags(pki), code=2)
    assert err.startswith(message.format(key=pki.client.key)), err


async def test_a_failed_handshake_is_one_line_from_the_cli_process(tls_app: App, pki: Pki) -> None:
    """Outside pytest's capture: gRPC's own handshake logging would add a line to the CLI's error."""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "ratelimitd", "org", "list", "--address", f"127.0.0.1:{tls_app.port}",
         "--tls-ca", str(pki.other_ca)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("ratelimitd: UNAVAILABLE: "), done.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in done.stderr


# -- Envoy ---------------------------------------------------------------------------


def envoy_over_tls(tmp: Path, upstream_port: int, ratelimitd_port: int, pki: Pki, *, client_cert: bool) -> EnvoyProcess:
    """clients/envoy/envoy.yaml with its ratelimitd cluster replaced by the shipped TLS one, whose
    file paths and port point at this run's certificates and server."""
    config = envoy_config(
        listen_port=free_port(),
        admin_port=free_port(),
        upstream_port=upstream_port,
        ratelimitd_port=ratelimitd_port,
        failure_mode_deny=True,  # a refused handshake must show as 503, not pass unlimited
    )
    (cluster,) = yaml.safe_load(TLS_CLUSTER.read_text())
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
        "port_value"
    ] = ratelimitd_port
    context = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    context["validation_context"]["trusted_ca"] = {"filename": str(pki.ca)}
    if client_cert:
        context["tls_certificates"] = [
            {"certificate_chain": {"filename": str(pki.client.cert)}, "private_key": {"filename": str(pki.client.key)}}
        ]
    else:
        del context["tls_certificates"]
    clusters = config["static_resources"]["clusters"]
    clusters[:] = [c for c in clusters if c["name"] != "ratelimitd"] + [cluster]
    envoy = EnvoyProcess(config, tmp)
    envoy.start()
    return envoy


@pytest.fixture
def upstream_port() -> Iterator[int]:
    with upstream() as port:
        yield port


async def chat(envoy: EnvoyProcess, key: str) -> Reply:
    body = {"model": M, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": f"Bearer {key}"}
    return await asyncio.to_thread(http_request, envoy.port, "POST", "/v1/chat/completions", body, headers)


async def test_envoy_asks_ratelimitd_over_mtls_and_a_request_is_rate_limited(
    mtls_app: App, pki: Pki, upstream_port: int, tmp_path: Path
) -> None:
    client = secure(f"127.0.0.1:{mtls_app.port}", pki.ca, pki.client)
    org = await client.org("o", [(M, "requests", "minute", 100)])
    _, key = await client.project(org, "prod", [(M, "requests", "minute", 2)])
    await client.channel.close()
    envoy = envoy_over_tls(tmp_path, upstream_port, mtls_app.port, pki, client_cert=True)
    try:
        assert [(await chat(envoy, key)).status for _ in range(2)] == [200, 200]
        refused = await chat(envoy, key)
        assert refused.status == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
        stats = await asyncio.to_thread(http_request, envoy.admin_port, "GET", "/stats?filter=ratelimitd.ssl")
        handshakes = re.search(rb"cluster\.ratelimitd\.ssl\.handshake: (\d+)", stats.body)
        assert handshakes and int(handshakes[1]) >= 1, stats.body
    finally:
        envoy.stop()


async def test_envoy_without_its_client_certificate_gets_no_decision_from_mtls(
    mtls_app: App, pki: Pki, upstream_port: int, tmp_path: Path
) -> None:
    envoy = envoy_over_tls(tmp_path, upstream_port, mtls_app.port, pki, client_cert=False)
    try:
        reply = await chat(envoy, "rlk_anything")
        assert reply.status == 503  # failure_mode_deny: ratelimitd could not be asked
        stats = await asyncio.to_thread(http_request, envoy.admin_port, "GET", "/stats?filter=ratelimitd")
        failed = re.search(rb"cluster\.ratelimitd\.upstream_cx_connect_fail: (\d+)", stats.body)
        assert failed and int(failed[1]) >= 1, stats.body
    finally:
        envoy.stop()


async def test_the_cli_with_tls_alone_trusts_the_default_roots(tls_app: App, pki: Pki) -> None:
    """--tls (or RATELIMITD_TLS=1) without a CA: gRPC's default roots, which this run points at its CA."""
    base = [sys.executable, "-m", "ratelimitd", "health", "--address", f"127.0.0.1:{tls_app.port}"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
    runs = [
        (base, env),  # plaintext: the TLS port answers nothing
        ([*base, "--tls"], env),  # gRPC's own roots do not hold this run's CA
        ([*base, "--tls"], {**env, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(pki.ca)}),
        (base, {**env, "RATELIMITD_TLS": "1", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(pki.ca)}),
    ]
    done = [
        await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60, cwd=ROOT, env=e)
        for argv, e in runs
    ]
    assert [d.returncode for d in done] == [1, 1, 0, 0], [d.stderr for d in done]
    assert "CERTIFICATE_VERIFY_FAILED" in done[1].stderr
    assert [d.stdout for d in done[2:]] == ["SERVING\n"] * 2
