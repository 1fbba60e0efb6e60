"""The console's sign-in and sessions over HTTP: cookie flags, CSRF, expiry, revocation, sign-out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio

from ratelimitd.app import App
from ratelimitd.console.server import COOKIE
from ratelimitd.core import keys
from ratelimitd.engine import ids
from ratelimitd.v1 import admin_pb2 as apb
from tests.conftest import AUTH, OPERATOR_TOKEN, Client, Clock, Storage, channel_client, settings_for

pytestmark = pytest.mark.single_node("sessions are single keys; the console adapter is not storage's concern")

TTL_S = 600
M = "llama-3.1-8b-instant"


@pytest.fixture
async def console_app(storage: Storage, redis_client: redis.asyncio.Redis, clock: Clock) -> AsyncIterator[App]:
    a = App(settings_for(storage.url, http_listen="127.0.0.1:0", console_session_ttl_s=TTL_S))
    await a.start()
    yield a
    await a.stop(0)


@pytest.fixture
async def grpc_client(console_app: App) -> AsyncIterator[Client]:
    c = channel_client(f"127.0.0.1:{console_app.port}")
    yield c
    await c.channel.close()


class Browser:
    """One browser's cookie jar against the console, as its pages call it."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base
        self.csrf = ""

    async def sign_in(self, token: str, **headers: str) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with self.session.post(f"{self.base}/console/api/session", json={"token": token}, headers=headers) as r:
            body = json.loads(await r.text())
            if r.status == 200:
                self.csrf = body["csrfToken"]
            return r.status, body, r

    async def rpc(self, method: str, body: object, *, csrf: str | None = None, **headers: str) -> tuple[int, Any]:
        sent = {"X-CSRF-Token": self.csrf if csrf is None else csrf, **headers}
        async with self.session.post(f"{self.base}/console/rpc/{method}", json=body, headers=sent) as r:
            return r.status, json.loads(await r.text())

    async def whoami(self) -> tuple[int, Any]:
        async with self.session.get(f"{self.base}/console/api/session") as r:
            return r.status, json.loads(await r.text())

    def session_id(self) -> str:
        return next(c.value for c in self.session.cookie_jar if c.key == COOKIE)


@pytest.fixture
async def browser(console_app: App) -> AsyncIterator[Browser]:
    # unsafe: the jar keeps cookies of an IP address (127.0.0.1), as a browser does
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield Browser(session, f"http://127.0.0.1:{console_app.http_port}")


async def _org_with_member(client: Client, role: apb.Role.ValueType) -> tuple[str, str, apb.AddMemberResponse]:
    org = await client.orgs.CreateOrganization(apb.CreateOrganizationRequest(name="acme"), metadata=AUTH)
    added = await client.members.AddMember(
        apb.AddMemberRequest(organization_id=org.id, name="ana", role=role), metadata=AUTH
    )
    return org.id, added.token, added


async def _projects(client: Client, org_id: str) -> list[str]:
    reply = await client.projects.ListProjects(apb.ListProjectsRequest(organization_id=org_id), metadata=AUTH)
    return [p.name for p in reply.projects]


async def test_sign_in_sets_an_httponly_strict_cookie_and_storage_keeps_no_secret(
    browser: Browser, redis_client: redis.asyncio.Redis
) -> None:
    status, body, response = await browser.sign_in(OPERATOR_TOKEN)
    assert status == 200 and body["principal"]["kind"] == "operator"
    cookie = response.cookies[COOKIE]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/console"
    assert cookie["max-age"] == str(TTL_S)
    assert not cookie["secure"]  # plain HTTP: a Secure cookie would never come back
    session_id = browser.session_id()
    stored = await redis_client.get(keys.console_session(ids.sha256_hex(session_id)))
    assert stored is not None and OPERATOR_TOKEN not in stored and session_id not in stored
    assert await redis_client.ttl(keys.console_session(ids.sha256_hex(session_id))) > 0
    status, me = await browser.whoami()
    assert status == 200 and me["csrfToken"] == browser.csrf


async def test_the_cookie_is_secure_behind_a_tls_proxy(browser: Browser) -> None:
    status, _, response = await browser.sign_in(OPERATOR_TOKEN, **{"X-Forwarded-Proto": "https"})
    assert status == 200 and response.cookies[COOKIE]["secure"]


async def test_a_call_without_the_csrf_token_is_refused_and_changes_nothing(
    browser: Browser, grpc_client: Client
) -> None:
    org_id, owner_token, _ = await _org_with_member(grpc_client, apb.ROLE_OWNER)
    await browser.sign_in(owner_token)
    create = {"organizationId": org_id, "name": "prod"}
    for csrf in ("", "0" * 32):
        status, reply = await browser.rpc("ratelimitd.v1.ProjectService/CreateProject", create, csrf=csrf)
        assert (status, reply["code"]) == (403, "permission_denied")
        assert "X-CSRF-Token" in reply["message"]
    assert await _projects(grpc_client, org_id) == []
    status, reply = await browser.rpc("ratelimitd.v1.ProjectService/CreateProject", create)
    assert status == 200 and reply["name"] == "prod"
    assert await _projects(grpc_client, org_id) == ["prod"]


async def test_another_origin_can_neither_sign_in_nor_call(browser: Browser, grpc_client: Client) -> None:
    status, body, _ = await browser.sign_in(OPERATOR_TOKEN, Origin="https://evil.example")
    assert (status, body["code"]) == (403, "permission_denied")
    await browser.sign_in(OPERATOR_TOKEN)
    create = {"name": "evil"}
    status, reply = await browser.rpc(
        "ratelimitd.v1.OrganizationService/CreateOrganization", create, Origin="https://evil.example"
    )
    assert status == 403 and "another origin" in reply["message"]
    orgs = await grpc_client.orgs.ListOrganizations(apb.ListOrganizationsRequest(), metadata=AUTH)
    assert [o.name for o in orgs.organizations] == []


@pytest.mark.parametrize(
    ("token", "status", "says"),
    [
        ("", 400, "token is empty"),
        ("rlt_not-a-credential", 401, "unknown or revoked"),
        ("rls_" + "x" * 40, 400, "a console session cannot sign in"),
    ],
)
async def test_a_bad_sign_in_names_the_problem_and_sets_no_cookie(
    browser: Browser, token: str, status: int, says: str
) -> None:
    got, body, response = await browser.sign_in(token)
    assert got == status and says in body["message"]
    assert COOKIE not in response.cookies


async def test_the_session_ends_when_its_time_is_up(browser: Browser, clock: Clock) -> None:
    await browser.sign_in(OPERATOR_TOKEN)
    await clock.advance(TTL_S - 1)
    assert (await browser.whoami())[0] == 200
    await clock.advance(1)
    status, reply = await browser.whoami()
    assert status == 401 and "expired" in reply["message"]
    status, reply = await browser.rpc("ratelimitd.v1.CredentialService/WhoAmI", {})
    assert status == 401 and "sign in again" in reply["message"]


async def test_revoking_the_credential_ends_its_session_at_the_next_request(
    browser: Browser, grpc_client: Client, redis_client: redis.asyncio.Redis
) -> None:
    org_id, token, added = await _org_with_member(grpc_client, apb.ROLE_DEVELOPER)
    await browser.sign_in(token)
    status, me = await browser.rpc("ratelimitd.v1.CredentialService/WhoAmI", {})
    assert status == 200 and me["memberId"] == added.member.id
    await grpc_client.creds.RevokeCredential(
        apb.RevokeCredentialRequest(organization_id=org_id, credential_id=added.credential.id), metadata=AUTH
    )
    status, reply = await browser.rpc("ratelimitd.v1.CredentialService/WhoAmI", {})
    assert status == 401 and "revoked" in reply["message"]
    assert await redis_client.get(keys.console_session(ids.sha256_hex(browser.session_id()))) is None


async def test_removing_the_member_ends_its_session(browser: Browser, grpc_client: Client) -> None:
    org_id, token, added = await _org_with_member(grpc_client, apb.ROLE_DEVELOPER)
    await browser.sign_in(token)
    await grpc_client.members.RemoveMember(
        apb.RemoveMemberRequest(organization_id=org_id, member_id=added.member.id), metadata=AUTH
    )
    status, _ = await browser.rpc("ratelimitd.v1.ProjectService/ListProjects", {"organizationId": org_id})
    assert status == 401


async def test_sign_out_deletes_the_session(browser: Browser, redis_client: redis.asyncio.Redis) -> None:
    await browser.sign_in(OPERATOR_TOKEN)
    session_id = browser.session_id()
    async with browser.session.delete(f"{browser.base}/console/api/session", headers={}) as r:
        assert r.status == 403  # sign-out is a change too: it needs the CSRF token
    async with browser.session.delete(
        f"{browser.base}/console/api/session", headers={"X-CSRF-Token": browser.csrf}
    ) as r:
        assert r.status == 200
    assert await redis_client.get(keys.console_session(ids.sha256_hex(session_id))) is None
    browser.session.cookie_jar.update_cookies({COOKIE: session_id})  # a copy kept by an attacker
    assert (await browser.whoami())[0] == 401


async def test_a_reader_session_is_refused_every_write_by_the_same_table(browser: Browser, grpc_client: Client) -> None:
    org_id, token, _ = await _org_with_member(grpc_client, apb.ROLE_READER)
    project = await grpc_client.projects.CreateProject(
        apb.CreateProjectRequest(organization_id=org_id, name="prod"), metadata=AUTH
    )
    await browser.sign_in(token)
    writes = [
        ("ProjectService/CreateProject", {"organizationId": org_id, "name": "staging"}),
        ("ProjectService/DeleteProject", {"organizationId": org_id, "projectId": project.id}),
        ("ProjectService/CreateApiKey", {"organizationId": org_id, "projectId": project.id, "name": "k"}),
        (
            "ProjectService/SetProjectLimits",
            {"organizationId": org_id, "projectId": project.id, "set": [
                {"model": M, "metric": "requests", "window": "minute", "limit": "5"}]},
        ),
    ]  # fmt: skip
    for method, body in writes:
        status, reply = await browser.rpc("ratelimitd.v1." + method, body)
        assert (status, reply["code"]) == (403, "permission_denied"), method
        assert "role is reader" in reply["message"]
    status, reply = await browser.rpc("ratelimitd.v1.ProjectService/ListProjects", {"organizationId": org_id})
    assert status == 200 and [p["name"] for p in reply["projects"]] == ["prod"]
    keys_reply = await grpc_client.projects.ListApiKeys(
        apb.ListApiKeysRequest(organization_id=org_id, project_id=project.id), metadata=AUTH
    )
    assert list(keys_reply.keys) == []


async def test_the_console_pages_are_served_from_the_package_with_a_strict_policy(browser: Browser) -> None:
    async with browser.session.get(f"{browser.base}/console/") as r:
        page = await r.text()
        assert r.status == 200 and 'src="static/app.js"' in page
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    async with browser.session.get(f"{browser.base}/console/static/app.js") as r:
        assert r.status == 200 and r.content_type == "text/javascript"
    async with browser.session.get(f"{browser.base}/console/static/..%2Fserver.py") as r:
        assert r.status == 404
    status, reply = await browser.rpc("ratelimitd.v1.CredentialService/WhoAmI", {})
    assert status == 401 and "not signed in" in reply["message"]


async def test_a_session_made_by_one_process_works_on_another(
    storage: Storage, browser: Browser, console_app: App
) -> None:
    """--workers N or several machines: sessions live in storage, not in a process."""
    other = App(settings_for(storage.url, http_listen="127.0.0.1:0", console_session_ttl_s=TTL_S))
    await other.start()
    try:
        await browser.sign_in(OPERATOR_TOKEN)
        jar = aiohttp.CookieJar(unsafe=True)
        jar.update_cookies({COOKIE: browser.session_id()})
        async with aiohttp.ClientSession(cookie_jar=jar) as session:
            elsewhere = Browser(session, f"http://127.0.0.1:{other.http_port}")
            elsewhere.csrf = browser.csrf
            status, me = await elsewhere.rpc("ratelimitd.v1.CredentialService/WhoAmI", {})
            assert status == 200 and me["kind"] == "operator"
            async with session.delete(
                f"{elsewhere.base}/console/api/session", headers={"X-CSRF-Token": browser.csrf}
            ) as r:
                assert r.status == 200
        assert (await browser.whoami())[0] == 401  # signed out there, so here too
    finally:
        await other.stop(0)
