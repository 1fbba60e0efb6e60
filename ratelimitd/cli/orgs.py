"""``org create|list|get`` (``org limits`` is in limits.py)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ratelimitd.cli.client import Api
from ratelimitd.cli.command import SubParsers, noun_parser, org_arg, verb_parser
from ratelimitd.cli.limits import add_org_parser
from ratelimitd.cli.output import emit, render
from ratelimitd.cli.pages import collect
from ratelimitd.cli.times import format_stamp
from ratelimitd.v1 import admin_pb2 as apb


def orgs_table(orgs: Sequence[apb.Organization]) -> str:
    return render([(o.id, o.name, format_stamp(o, "create_time")) for o in orgs], ("ID", "NAME", "CREATED"))


async def org_create(api: Api, args: argparse.Namespace) -> int:
    org = await api.orgs.CreateOrganization(apb.CreateOrganizationRequest(name=args.name))
    emit(args, org, lambda: render([(org.id, org.name)], ("ID", "NAME")))
    return 0


async def org_list(api: Api, args: argparse.Namespace) -> int:
    orgs, _ = await collect(
        lambda token, size: api.orgs.ListOrganizations(apb.ListOrganizationsRequest(page_token=token, page_size=size)),
        lambda page: page.organizations,
    )
    reply = apb.ListOrganizationsResponse(organizations=orgs)
    emit(args, reply, lambda: orgs_table(reply.organizations))
    return 0


async def org_get(api: Api, args: argparse.Namespace) -> int:
    org = await api.orgs.GetOrganization(apb.GetOrganizationRequest(organization_id=args.org))
    emit(args, org, lambda: orgs_table([org]))
    return 0


def add_parsers(sub: SubParsers) -> None:
    verbs = noun_parser(sub, "org", "organizations", "Organizations.")
    p = verb_parser(verbs, "create", org_create, "create an organization (operator)")
    p.add_argument("name", help="the organization's name (1-128 characters)")
    verb_parser(verbs, "list", org_list, "list organizations (a member sees its own)")
    org_arg(verb_parser(verbs, "get", org_get, "show one organization"))
    add_org_parser(verbs)
