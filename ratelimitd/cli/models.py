"""``models show|set``: which models an organization, or one of its projects, may call."""

from __future__ import annotations

import argparse

from ratelimitd.cli.client import Api, resolve_project
from ratelimitd.cli.command import SubParsers, noun_parser, org_arg, verb_parser
from ratelimitd.cli.errors import NotUnderstood
from ratelimitd.cli.output import emit, render
from ratelimitd.cli.projects import project_label
from ratelimitd.v1 import admin_pb2 as apb

ACCESS_NAMES = {
    apb.MODEL_ACCESS_UNRESTRICTED: "unrestricted",
    apb.MODEL_ACCESS_ALLOW_LIST: "allow",
    apb.MODEL_ACCESS_BLOCK_LIST: "block",
}


def policy_text(policy: apb.ModelPolicy) -> str:
    name = ACCESS_NAMES[policy.access]
    return name if policy.access == apb.MODEL_ACCESS_UNRESTRICTED else f"{name}: {', '.join(policy.models) or '(none)'}"


def permissions_table(reply: apb.ModelPermissions, project_name: str) -> str:
    rows = [("organization", reply.organization_id, policy_text(reply.organization))]
    if reply.HasField("project"):
        rows.append(
            ("project", project_label(reply.project_id, {reply.project_id: project_name}), policy_text(reply.project))
        )
    return render(rows, ("SCOPE", "ID", "MODELS"))


def _policy(args: argparse.Namespace) -> apb.ModelPolicy:
    if args.allow is not None:
        if not args.allow:
            raise NotUnderstood(
                "models set --allow needs at least one model: an empty allow list would refuse every model "
                "(--unrestricted removes the list)"
            )
        return apb.ModelPolicy(access=apb.MODEL_ACCESS_ALLOW_LIST, models=args.allow)
    if args.block is not None:
        return apb.ModelPolicy(access=apb.MODEL_ACCESS_BLOCK_LIST, models=args.block)
    return apb.ModelPolicy(access=apb.MODEL_ACCESS_UNRESTRICTED)


async def _project_name(api: Api, org: str, project_id: str) -> str:
    if not project_id:
        return ""
    return (await api.projects.GetProject(apb.GetProjectRequest(organization_id=org, project_id=project_id))).name


async def models_show(api: Api, args: argparse.Namespace) -> int:
    project = await resolve_project(api, args.org, args.project) if args.project else ""
    reply = await api.models.GetModelPermissions(
        apb.GetModelPermissionsRequest(organization_id=args.org, project_id=project)
    )
    name = "" if args.json else await _project_name(api, args.org, project)
    emit(args, reply, lambda: permissions_table(reply, name))
    return 0


async def models_set(api: Api, args: argparse.Namespace) -> int:
    policy = _policy(args)
    project = await resolve_project(api, args.org, args.project) if args.project else ""
    reply = await api.models.SetModelPermissions(
        apb.SetModelPermissionsRequest(organization_id=args.org, project_id=project, policy=policy)
    )
    name = "" if args.json else await _project_name(api, args.org, project)
    emit(args, reply, lambda: permissions_table(reply, name))
    return 0


def add_parsers(sub: SubParsers) -> None:
    verbs = noun_parser(sub, "models", "model permissions", "Model permissions.")
    p = org_arg(verb_parser(verbs, "show", models_show, "show the organization's (and a project's) model permissions"))
    p.add_argument("project", nargs="?", help="project id or name (optional)")
    p = org_arg(
        verb_parser(verbs, "set", models_set, "replace the organization's (or with --project a project's) model list")
    )
    p.add_argument("--project", help="a project's list (id or name) instead of the organization's")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--allow", nargs="*", metavar="MODEL", help="only these models")
    which.add_argument("--block", nargs="*", metavar="MODEL", help="every model but these")
    which.add_argument("--unrestricted", action="store_true", help="no list")
