"""``key create|list|revoke``: a project's API keys."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ratelimitd.cli.client import Api, resolve_project
from ratelimitd.cli.command import SubParsers, noun_parser, org_arg, project_arg, verb_parser
from ratelimitd.cli.output import emit, render
from ratelimitd.cli.pages import collect
from ratelimitd.cli.times import format_stamp
from ratelimitd.v1 import admin_pb2 as apb


def keys_table(keys: Sequence[apb.ApiKey]) -> str:
    return render(
        [(k.id, k.name, k.prefix + "…", format_stamp(k, "create_time"), format_stamp(k, "last_use_time"),
          "revoked" if k.revoked else "active")
         for k in keys],
        ("ID", "NAME", "PREFIX", "CREATED", "LAST USED", "STATE"),
    )  # fmt: skip


async def key_create(api: Api, args: argparse.Namespace) -> int:
    project = await resolve_project(api, args.org, args.project)
    reply = await api.projects.CreateApiKey(
        apb.CreateApiKeyRequest(organization_id=args.org, project_id=project, name=args.name)
    )
    emit(
        args,
        reply,
        lambda: f"{reply.secret}\n\nkey id {reply.key.id}; the secret above is shown only now, keep it safe.",
    )
    return 0


async def key_list(api: Api, args: argparse.Namespace) -> int:
    project = await resolve_project(api, args.org, args.project)
    keys, _ = await collect(
        lambda token, size: api.projects.ListApiKeys(
            apb.ListApiKeysRequest(organization_id=args.org, project_id=project, page_token=token, page_size=size)
        ),
        lambda page: page.keys,
    )
    reply = apb.ListApiKeysResponse(keys=keys)
    emit(args, reply, lambda: keys_table(reply.keys))
    return 0


async def key_revoke(api: Api, args: argparse.Namespace) -> int:
    reply = await api.projects.RevokeApiKey(apb.RevokeApiKeyRequest(organization_id=args.org, key_id=args.key))
    emit(args, reply, lambda: keys_table([reply]))
    return 0


def add_parsers(sub: SubParsers) -> None:
    verbs = noun_parser(sub, "key", "API keys", "A project's API keys.")
    p = project_arg(org_arg(verb_parser(verbs, "create", key_create, "create an API key; the secret is printed once")))
    p.add_argument("name", help="a name for the key (e.g. where it is used)")
    project_arg(org_arg(verb_parser(verbs, "list", key_list, "list a project's API keys (metadata only)")))
    p = org_arg(verb_parser(verbs, "revoke", key_revoke, "revoke an API key, effective for the next decision"))
    p.add_argument("key", help="the key's id (key_...), as key list shows it")
