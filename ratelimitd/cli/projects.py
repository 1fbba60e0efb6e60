"""``project create|list|get|update|delete`` (``project limits`` is in limits.py), and project names for tables."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

from ratelimitd.cli.client import Api, resolve_project
from ratelimitd.cli.command import SubParsers, noun_parser, org_arg, project_arg, verb_parser
from ratelimitd.cli.errors import NotUnderstood
from ratelimitd.cli.limits import add_project_parser
from ratelimitd.cli.output import emit, render
from ratelimitd.cli.pages import MAX_PAGE, collect
from ratelimitd.cli.times import format_stamp
from ratelimitd.engine import ids
from ratelimitd.v1 import admin_pb2 as apb


async def list_projects(api: Api, org: str, *, page_size: int = 0, token: str = "") -> tuple[list[apb.Project], str]:
    """Every project, or with ``page_size`` one page of them."""
    return await collect(
        lambda t, size: api.projects.ListProjects(
            apb.ListProjectsRequest(organization_id=org, page_size=size, page_token=t)
        ),
        lambda page: page.projects,
        token=token,
        page_size=page_size or MAX_PAGE,
        one_page=bool(page_size or token),
    )


async def project_names(api: Api, org: str) -> dict[str, str]:
    """Names by id, for tables that show both."""
    projects, _ = await list_projects(api, org)
    return {p.id: p.name for p in projects}


def project_label(project_id: str, names: Mapping[str, str]) -> str:
    """``myapp-prod (proj_…)``; the id alone for a project that is gone, "-" for none."""
    if not project_id:
        return "-"
    name = names.get(project_id)
    return f"{name} ({project_id})" if name else project_id


def projects_table(projects: Sequence[apb.Project]) -> str:
    return render(
        [(p.id, p.name, format_stamp(p, "create_time"), p.description) for p in projects],
        ("ID", "NAME", "CREATED", "DESCRIPTION"),
    )


async def project_create(api: Api, args: argparse.Namespace) -> int:
    p = await api.projects.CreateProject(
        apb.CreateProjectRequest(organization_id=args.org, name=args.name, description=args.description)
    )
    emit(args, p, lambda: projects_table([p]))
    return 0


async def project_list(api: Api, args: argparse.Namespace) -> int:
    """Every page, unless --page-size or --page-token asks for one page."""
    projects, token = await list_projects(api, args.org, page_size=args.page_size, token=args.page_token)
    reply = apb.ListProjectsResponse(projects=projects, next_page_token=token)

    def table() -> str:
        text = projects_table(reply.projects)
        return text + (f"\n\nnext page: --page-token {reply.next_page_token}" if reply.next_page_token else "")

    emit(args, reply, table)
    return 0


async def project_get(api: Api, args: argparse.Namespace) -> int:
    request = apb.GetProjectRequest(organization_id=args.org)
    if ids.is_id("proj", args.project):
        request.project_id = args.project
    else:
        request.name = args.project
    p = await api.projects.GetProject(request)
    emit(args, p, lambda: projects_table([p]))
    return 0


async def project_update(api: Api, args: argparse.Namespace) -> int:
    if args.name is None and args.description is None:
        raise NotUnderstood("project update: give --name and/or --description")
    request = apb.UpdateProjectRequest(
        project=apb.Project(organization_id=args.org, id=await resolve_project(api, args.org, args.project))
    )
    if args.name is not None:
        request.project.name = args.name
        request.update_mask.paths.append("name")
    if args.description is not None:
        request.project.description = args.description
        request.update_mask.paths.append("description")
    p = await api.projects.UpdateProject(request)
    emit(args, p, lambda: projects_table([p]))
    return 0


async def project_delete(api: Api, args: argparse.Namespace) -> int:
    project = await resolve_project(api, args.org, args.project)
    p = await api.projects.DeleteProject(apb.DeleteProjectRequest(organization_id=args.org, project_id=project))
    emit(args, p, lambda: f"deleted project {p.name} ({p.id}); its API keys no longer work")
    return 0


def _org_and_project(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return project_arg(org_arg(p))


def add_parsers(sub: SubParsers) -> None:
    verbs = noun_parser(sub, "project", "projects", "Projects of an organization.")
    p = org_arg(verb_parser(verbs, "create", project_create, "create a project"))
    p.add_argument("name", help="the project's name, unique in the organization (e.g. myapp-prod)")
    p.add_argument("--description", default="", help="free text shown in listings")
    p = org_arg(
        verb_parser(verbs, "list", project_list, "list projects by name (every page unless --page-size/--page-token)")
    )
    p.add_argument("--page-size", type=int, default=0, help="one page of this many projects")
    p.add_argument("--page-token", default="", help="the page a previous listing named as the next one")
    _org_and_project(verb_parser(verbs, "get", project_get, "show one project"))
    p = _org_and_project(verb_parser(verbs, "update", project_update, "rename a project and/or change its description"))
    p.add_argument("--name", help="the new name")
    p.add_argument("--description", help="the new description")
    _org_and_project(verb_parser(verbs, "delete", project_delete, "delete a project; its keys stop working at once"))
    add_project_parser(verbs)
