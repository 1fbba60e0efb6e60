"""``credential create|list|revoke`` and ``whoami``: management credentials."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ratelimitd.cli.client import Api, resolve_member
from ratelimitd.cli.command import SubParsers, noun_parser, verb_parser
from ratelimitd.cli.errors import NotUnderstood
from ratelimitd.cli.members import ROLE_NAMES, shown_once
from ratelimitd.cli.output import emit, render
from ratelimitd.cli.pages import collect
from ratelimitd.cli.times import format_stamp
from ratelimitd.v1 import admin_pb2 as apb


def credentials_table(creds: Sequence[apb.Credential]) -> str:
    return render(
        [(c.id, c.kind, c.name, c.member_id or "-", format_stamp(c, "create_time")) for c in creds],
        ("ID", "KIND", "NAME", "MEMBER", "CREATED"),
    )


async def credential_create(api: Api, args: argparse.Namespace) -> int:
    if bool(args.org) != bool(args.member):
        raise NotUnderstood(
            "credential create: give both --org and --member (a member's credential) or neither (operator)"
        )
    member = await resolve_member(api, args.org, args.member) if args.member else ""
    reply = await api.creds.CreateCredential(
        apb.CreateCredentialRequest(organization_id=args.org or "", member_id=member, name=args.name)
    )
    emit(args, reply, lambda: shown_once(reply.token, f"credential {reply.credential.id} created"))
    return 0


async def credential_list(api: Api, args: argparse.Namespace) -> int:
    creds, _ = await collect(
        lambda token, size: api.creds.ListCredentials(
            apb.ListCredentialsRequest(organization_id=args.org or "", page_token=token, page_size=size)
        ),
        lambda page: page.credentials,
    )
    reply = apb.ListCredentialsResponse(credentials=creds)
    emit(args, reply, lambda: credentials_table(reply.credentials))
    return 0


async def credential_revoke(api: Api, args: argparse.Namespace) -> int:
    reply = await api.creds.RevokeCredential(
        apb.RevokeCredentialRequest(organization_id=args.org or "", credential_id=args.credential)
    )
    emit(args, reply, lambda: credentials_table([reply]))
    return 0


async def whoami(api: Api, args: argparse.Namespace) -> int:
    me = await api.creds.WhoAmI(apb.WhoAmIRequest())

    def text() -> str:
        if me.kind == "operator":
            return f"platform operator (credential {me.credential_id}, {me.name})"
        role = ROLE_NAMES[me.role]
        return f"{me.name}: {role} of {me.organization_id} (member {me.member_id}, credential {me.credential_id})"

    emit(args, me, text)
    return 0


def add_parsers(sub: SubParsers) -> None:
    verbs = noun_parser(sub, "credential", "management credentials", "Management credentials.")
    p = verb_parser(
        verbs, "create", credential_create, "a member's (--org, --member) or an operator credential; printed once"
    )
    p.add_argument("name", help="what the credential is for (e.g. deploy pipeline)")
    p.add_argument("--org", help="organization id (with --member)")
    p.add_argument("--member", help="member id or name (with --org)")
    p = verb_parser(
        verbs, "list", credential_list, "an organization's member credentials, or without --org the operator's"
    )
    p.add_argument("--org", help="organization id; without it, the operator credentials")
    p = verb_parser(verbs, "revoke", credential_revoke, "revoke a credential (--org for a member's)")
    p.add_argument("credential", help="the credential's id (cred_...)")
    p.add_argument("--org", help="organization id, for a member's credential")
    verb_parser(sub, "whoami", whoami, "who the credential speaks for")
