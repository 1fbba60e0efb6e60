"""Members, roles and credentials: tokens shown once, stored hashed, effective at once."""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio

from ratelimitd.app import App
from ratelimitd.engine import ids
from ratelimitd.v1 import admin_pb2 as apb
from tests.conftest import AUTH, Client
from tests.control import Metadata, add_member, bearer


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def create_project(client: Client, org: str, name: str, md: Metadata) -> object:
    return client.projects.CreateProject(apb.CreateProjectRequest(organization_id=org, name=name), metadata=md)


async def test_a_member_token_names_its_member(client: Client) -> None:
    org = await client.org("o", [])
    reply = await client.members.AddMember(
        apb.AddMemberRequest(organization_id=org, name="alice@example.com", role=apb.ROLE_DEVELOPER), metadata=AUTH
    )
    assert reply.token.startswith("rlm_") and reply.credential.member_id == reply.member.id
    me = await client.creds.WhoAmI(apb.WhoAmIRequest(), metadata=bearer(reply.token))
    assert (me.kind, me.name, me.organization_id, me.member_id, me.role) == (
        "member", "alice@example.com", org, reply.member.id, apb.ROLE_DEVELOPER,
    )  # fmt: skip
    listed = await client.members.ListMembers(apb.ListMembersRequest(organization_id=org), metadata=bearer(reply.token))
    assert [(m.name, m.role) for m in listed.members] == [("alice@example.com", apb.ROLE_DEVELOPER)]


async def test_role_changes_and_removal_hold_at_once(client: Client) -> None:
    org = await client.org("o", [])
    await add_member(client, org, "alice", apb.ROLE_OWNER)
    rita, token = await add_member(client, org, "rita", apb.ROLE_READER)
    md = bearer(token)
    assert await code_of(create_project(client, org, "one", md)) == grpc.StatusCode.PERMISSION_DENIED
    await client.members.UpdateMember(
        apb.UpdateMemberRequest(member=apb.Member(organization_id=org, id=rita, role=apb.ROLE_DEVELOPER)), metadata=AUTH
    )
    assert await code_of(create_project(client, org, "two", md)) == grpc.StatusCode.OK
    await client.members.UpdateMember(
        apb.UpdateMemberRequest(member=apb.Member(organization_id=org, id=rita, role=apb.ROLE_READER)), metadata=AUTH
    )
    assert await code_of(create_project(client, org, "three", md)) == grpc.StatusCode.PERMISSION_DENIED
    await client.members.RemoveMember(apb.RemoveMemberRequest(organization_id=org, member_id=rita), metadata=AUTH)
    assert await code_of(client.creds.WhoAmI(apb.WhoAmIRequest(), metadata=md)) == grpc.StatusCode.UNAUTHENTICATED
    creds = await client.creds.ListCredentials(apb.ListCredentialsRequest(organization_id=org), metadata=AUTH)
    assert rita not in {c.member_id for c in creds.credentials}, "removing a member leaves its credentials behind"


async def test_credential_rotation(client: Client) -> None:
    org = await client.org("o", [])
    member, old_token = await add_member(client, org, "ci-bot", apb.ROLE_DEVELOPER)
    new = await client.creds.CreateCredential(
        apb.CreateCredentialRequest(organization_id=org, member_id=member, name="2025-rotation"), metadata=AUTH
    )
    listed = await client.creds.ListCredentials(apb.ListCredentialsRequest(organization_id=org), metadata=AUTH)
    assert [c.name for c in listed.credentials] == ["initial", "2025-rotation"]
    old = listed.credentials[0]
    for md in (bearer(old_token), bearer(new.token)):  # both work, and are cached now
        assert (await client.creds.WhoAmI(apb.WhoAmIRequest(), metadata=md)).member_id == member
    await client.creds.RevokeCredential(
        apb.RevokeCredentialRequest(organization_id=org, credential_id=old.id), metadata=AUTH
    )
    assert (
        await code_of(client.creds.WhoAmI(apb.WhoAmIRequest(), metadata=bearer(old_token)))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        await client.creds.WhoAmI(apb.WhoAmIRequest(), metadata=bearer(new.token))
    ).credential_id == new.credential.id


async def test_operator_credentials_can_be_created_listed_and_revoked(client: Client) -> None:
    made = await client.creds.CreateCredential(apb.CreateCredentialRequest(name="deploy pipeline"), metadata=AUTH)
    md = bearer(made.token)
    me = await client.creds.WhoAmI(apb.WhoAmIRequest(), metadata=md)
    assert (me.kind, me.name, me.credential_id) == ("operator", "deploy pipeline", made.credential.id)
    listed = await client.creds.ListCredentials(apb.ListCredentialsRequest(), metadata=md)
    assert [c.name for c in listed.credentials] == ["from settings", "deploy pipeline"]
    (settings_cred,) = [c for c in listed.credentials if c.name == "from settings"]
    await client.creds.RevokeCredential(apb.RevokeCredentialRequest(credential_id=settings_cred.id), metadata=md)
    assert await code_of(client.creds.WhoAmI(apb.WhoAmIRequest(), metadata=AUTH)) == grpc.StatusCode.UNAUTHENTICATED
    events = await client.audit.ListAuditEvents(apb.ListAuditEventsRequest(), metadata=md)
    assert [(e.operation, e.actor.name) for e in events.events] == [
        ("RevokeCredential", "deploy pipeline"), ("CreateCredential", "from settings"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "header",
    ["", "Bearer", "Bearer ", "Basic abc", "Bearer rlt_nope", "Bearer rlm_" + "a" * 56, "bearer rlm_x"],
)
async def test_bad_credentials_are_unauthenticated(client: Client, header: str) -> None:
    md = (("authorization", header),) if header else ()
    assert await code_of(client.creds.WhoAmI(apb.WhoAmIRequest(), metadata=md)) == grpc.StatusCode.UNAUTHENTICATED


async def test_a_forged_member_token_for_another_member_fails(client: Client) -> None:
    org = await client.org("o", [])
    _, token = await add_member(client, org, "alice", apb.ROLE_READER)
    bob, _ = await add_member(client, org, "bob", apb.ROLE_OWNER)
    # alice's secret under bob's id: the hash no longer matches anything
    forged = "rlm_" + bob.removeprefix("mem_") + token[16:]
    assert ids.parse_member_token(forged) is not None
    assert (
        await code_of(client.creds.WhoAmI(apb.WhoAmIRequest(), metadata=bearer(forged)))
        == grpc.StatusCode.UNAUTHENTICATED
    )


async def test_tokens_are_stored_only_as_hashes(client: Client, redis_client: redis.asyncio.Redis) -> None:
    org = await client.org("o", [])
    _, token = await add_member(client, org, "alice", apb.ROLE_OWNER)
    op = await client.creds.CreateCredential(apb.CreateCredentialRequest(name="x"), metadata=AUTH)
    secrets = [token, token[-32:], op.token, op.token[4:]]
    async for k in redis_client.scan_iter("*"):
        dump = str(await redis_client.dump(k))
        assert not any(s in dump for s in secrets), k


async def test_another_process_honours_a_revocation_once_its_cache_entry_expires(
    client: Client, app: App, redis_client: redis.asyncio.Redis
) -> None:
    """The 2 s bound across processes, shown with a second Credentials whose cache has expired."""
    from ratelimitd.core.errors import Unauthenticated
    from ratelimitd.engine.audit import Audit
    from ratelimitd.engine.credentials import Credentials

    org = await client.org("o", [])
    member, token = await add_member(client, org, "rita", apb.ROLE_READER)
    other = Credentials(redis_client, Audit(redis_client, 10), cache_ttl_s=0.0)
    assert (await other.authenticate(f"Bearer {token}")).member_id == member
    await client.members.RemoveMember(apb.RemoveMemberRequest(organization_id=org, member_id=member), metadata=AUTH)
    with pytest.raises(Unauthenticated, match="unknown or revoked"):
        await other.authenticate(f"Bearer {token}")
