"""Shared set-up for control-plane tests: an organization with a member of every role."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio
from google.protobuf.timestamp_pb2 import Timestamp

from ratelimitd.v1 import admin_pb2 as apb
from tests.conftest import AUTH, Client

M = "llama-3.1-8b-instant"
Metadata = tuple[tuple[str, str], ...]


def ts(ms: int) -> Timestamp:
    """Unix milliseconds as a request's Timestamp."""
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def usd(dollars: float) -> int:
    """Dollars as the API's micro-dollars, so a test can keep its amounts readable."""
    return round(dollars * 1_000_000)


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class World:
    """Organization ``org`` with project ``proj`` (name "app"), its key, and members:
    alice (owner), dave (developer), rita (reader), sam (reader, spare), rex (owner
    whose only credential was revoked). Plus a spare member credential and a
    spare operator credential to revoke."""

    org: str
    proj: str
    key_id: str
    secret: str
    members: dict[str, str]  # name -> member id
    tokens: dict[str, Metadata]  # role name -> metadata, plus "operator", "none", "revoked"
    spare_credential: str
    spare_operator_credential: str


async def add_member(client: Client, org: str, name: str, role: apb.Role.ValueType) -> tuple[str, str]:
    """Returns (member id, token)."""
    reply = await client.members.AddMember(
        apb.AddMemberRequest(organization_id=org, name=name, role=role), metadata=AUTH
    )
    return reply.member.id, reply.token


async def make_world(client: Client) -> World:
    org = await client.org("acme", [(M, "requests", "minute", 100)])
    proj, secret = await client.project(org, "app")
    (key,) = (
        await client.projects.ListApiKeys(apb.ListApiKeysRequest(organization_id=org, project_id=proj), metadata=AUTH)
    ).keys
    members, tokens = {}, {}
    for name, role, label in (
        ("alice", apb.ROLE_OWNER, "owner"), ("dave", apb.ROLE_DEVELOPER, "developer"),
        ("rita", apb.ROLE_READER, "reader"), ("sam", apb.ROLE_READER, "spare"), ("rex", apb.ROLE_OWNER, "revoked"),
    ):  # fmt: skip
        members[name], token = await add_member(client, org, name, role)
        tokens[label] = bearer(token)
    rex_creds = await client.creds.ListCredentials(apb.ListCredentialsRequest(organization_id=org), metadata=AUTH)
    (rex_cred,) = [c.id for c in rex_creds.credentials if c.member_id == members["rex"]]
    await client.creds.RevokeCredential(
        apb.RevokeCredentialRequest(organization_id=org, credential_id=rex_cred), metadata=AUTH
    )
    spare = await client.creds.CreateCredential(
        apb.CreateCredentialRequest(organization_id=org, member_id=members["sam"], name="spare"), metadata=AUTH
    )
    spare_op = await client.creds.CreateCredential(apb.CreateCredentialRequest(name="spare operator"), metadata=AUTH)
    tokens["operator"] = AUTH
    tokens["none"] = ()
    return World(org, proj, key.id, secret, members, tokens, spare.credential.id, spare_op.credential.id)


async def snapshot(r: redis.asyncio.Redis) -> dict[str, object]:
    """Every key and its serialized value, to show that a refused call stored nothing."""
    return {k: await r.dump(k) async for k in r.scan_iter("*")}
