"""``member add|list|role|remove``, and the role names every verb shows."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from google.protobuf.field_mask_pb2 import FieldMask

from ratelimitd.cli.client import Api, list_members, resolve_member
from ratelimitd.cli.command import SubParsers, noun_parser, org_arg, verb_parser
from ratelimitd.cli.output import emit, render
from ratelimitd.cli.times import format_stamp
from ratelimitd.v1 import admin_pb2 as apb

ROLES = {"owner": apb.ROLE_OWNER, "developer": apb.ROLE_DEVELOPER, "reader": apb.ROLE_READER}
ROLE_NAMES = {v: k for k, v in ROLES.items()} | {apb.ROLE_UNSPECIFIED: "-"}


def members_table(members: Sequence[apb.Member]) -> str:
    return render(
        [(m.id, m.name, ROLE_NAMES[m.role], format_stamp(m, "create_time")) for m in members],
        ("ID", "NAME", "ROLE", "ADDED"),
    )


def shown_once(token: str, what: str) -> str:
    return f"{token}\n\n{what}; the token above is shown only now, keep it safe."


async def member_add(api: Api, args: argparse.Namespace) -> int:
    reply = await api.members.AddMember(
        apb.AddMemberRequest(organization_id=args.org, name=args.name, role=ROLES[args.role])
    )
    emit(args, reply, lambda: shown_once(reply.token, f"member {reply.member.name} ({reply.member.id}) added"))
    return 0


async def member_list(api: Api, args: argparse.Namespace) -> int:
    reply = await list_members(api, args.org)
    emit(args, reply, lambda: members_table(reply.members))
    return 0


async def member_role(api: Api, args: argparse.Namespace) -> int:
    member = await resolve_member(api, args.org, args.member)
    reply = await api.members.UpdateMember(
        apb.UpdateMemberRequest(
            member=apb.Member(organization_id=args.org, id=member, role=ROLES[args.role]),
            update_mask=FieldMask(paths=["role"]),
        )
    )
    emit(args, reply, lambda: members_table([reply]))
    return 0


async def member_remove(api: Api, args: argparse.Namespace) -> int:
    member = await resolve_member(api, args.org, args.member)
    reply = await api.members.RemoveMember(apb.RemoveMemberRequest(organization_id=args.org, member_id=member))
    emit(args, reply, lambda: f"removed member {reply.name} ({reply.id}) and revoked its credentials")
    return 0


def add_parsers(sub: SubParsers) -> None:
    verbs = noun_parser(sub, "member", "organization members", "Members of an organization.")
    p = org_arg(verb_parser(verbs, "add", member_add, "add a member; its first token is printed once"))
    p.add_argument("name", help="unique in the organization, e.g. an e-mail address")
    p.add_argument("--role", choices=ROLES, required=True, help="what the member may do")
    org_arg(verb_parser(verbs, "list", member_list, "list members"))
    p = member_arg(org_arg(verb_parser(verbs, "role", member_role, "change a member's role")))
    p.add_argument("role", choices=ROLES, help="the new role")
    member_arg(org_arg(verb_parser(verbs, "remove", member_remove, "remove a member and revoke its credentials")))


def member_arg(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("member", help="member id (mem_...) or name")
    return p
