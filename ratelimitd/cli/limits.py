"""``org limits`` and ``project limits``: show limits, or set and clear them for one model.

``--set`` and ``--clear`` take every value after them, so ``--set rpm=10 ORG``
would hand ORG to ``--set``; values that cannot be a limit (or a limit's name)
at the end of those lists are taken back as the positionals they were meant to be.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, Literal

from ratelimitd.cli.client import Api, resolve_project
from ratelimitd.cli.command import SubParsers, verb_parser
from ratelimitd.cli.errors import NotUnderstood
from ratelimitd.cli.output import emit, render
from ratelimitd.v1 import admin_pb2 as apb

SHORTHANDS = {
    "rpm": ("requests", "minute"),
    "rpd": ("requests", "day"),
    "tpm": ("tokens", "minute"),
    "tpd": ("tokens", "day"),
}


def metric_window(name: str) -> tuple[str, str]:
    """``rpm`` (and the other shorthands) or ``METRIC/WINDOW``; the server checks that they exist."""
    if name in SHORTHANDS:
        return SHORTHANDS[name]
    metric, sep, window = name.partition("/")
    if not sep:
        raise NotUnderstood(f"limit {name!r} is not one of {', '.join(SHORTHANDS)} or METRIC/WINDOW")
    return metric, window


def parse_limit_args(model: str, items: Sequence[str]) -> list[apb.Limit]:
    """``rpm=100`` or ``requests/minute=100`` (any configured window) for one model."""
    limits = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise NotUnderstood(f"limit {item!r} is not NAME=NUMBER (e.g. rpm=100 or tokens/day=500000)")
        metric, window = metric_window(name)
        limits.append(apb.Limit(model=model, metric=metric, window=window, limit=int(value)))
    return limits


def parse_clear_args(model: str, items: Sequence[str]) -> list[apb.LimitKey]:
    return [apb.LimitKey(model=model, metric=m, window=w) for m, w in map(metric_window, items)]


def _is_setting(value: str) -> bool:
    return "=" in value


def _is_name(value: str) -> bool:
    return value in SHORTHANDS or "/" in value


class LimitList(argparse.Action):
    """Collects ``--set``/``--clear`` values; trailing ones that cannot be a limit go to ``args.stray``."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        items = list(values)
        fits = _is_setting if self.dest == "set" else _is_name
        cut = len(items)
        while cut and not fits(items[cut - 1]):
            cut -= 1
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), *items[:cut]])
        namespace.stray = [*namespace.stray, *((self.dest, v) for v in items[cut:])]


def take_positionals(args: argparse.Namespace, names: Sequence[str]) -> None:
    """Fills positionals left empty from values given after ``--set``/``--clear``; the rest stay
    limits (and fail as such when they are not)."""
    stray: list[tuple[str, str]] = args.stray
    for name in names:
        if getattr(args, name) is None:
            if not stray:
                raise NotUnderstood(f"{name.upper()} is missing (see --help)")
            setattr(args, name, stray.pop(0)[1])
    for dest, value in stray:
        getattr(args, dest).append(value)


def changes(args: argparse.Namespace) -> tuple[list[apb.Limit], list[apb.LimitKey]]:
    """The limits to set and to clear; giving either needs ``--model``, so that none is set for '*' by accident."""
    to_set = parse_limit_args(args.model or "*", args.set)
    to_clear = parse_clear_args(args.model or "*", args.clear)
    if (to_set or to_clear) and args.model is None:
        raise NotUnderstood(
            "--set and --clear need --model: a model's name, or '*' for the default of every model "
            "without limits of its own"
        )
    return to_set, to_clear


def limits_table(limits: Sequence[apb.Limit]) -> str:
    return render([(x.model, x.metric, x.window, x.limit) for x in limits], ("MODEL", "METRIC", "WINDOW", "LIMIT"))


def _opt(msg: apb.EffectiveLimit, field: Literal["custom", "organization"]) -> str:
    return str(getattr(msg, field)) if msg.HasField(field) else "-"


def project_limits_table(reply: apb.ProjectLimits) -> str:
    rows = [
        (e.model, e.metric, e.window, _opt(e, "custom"), _opt(e, "organization"), e.effective) for e in reply.effective
    ]
    return render(rows, ("MODEL", "METRIC", "WINDOW", "PROJECT", "ORGANIZATION (CEILING)", "EFFECTIVE"))


async def org_limits(api: Api, args: argparse.Namespace) -> int:
    take_positionals(args, ("org",))
    to_set, to_clear = changes(args)
    if to_set or to_clear:
        reply = await api.orgs.SetOrganizationLimits(
            apb.SetOrganizationLimitsRequest(organization_id=args.org, set=to_set, clear=to_clear)
        )
    else:
        reply = await api.orgs.GetOrganizationLimits(apb.GetOrganizationLimitsRequest(organization_id=args.org))
    emit(args, reply, lambda: limits_table(reply.limits))
    return 0


async def project_limits(api: Api, args: argparse.Namespace) -> int:
    take_positionals(args, ("org", "project"))
    to_set, to_clear = changes(args)
    project = await resolve_project(api, args.org, args.project)
    if to_set or to_clear:
        reply = await api.projects.SetProjectLimits(
            apb.SetProjectLimitsRequest(organization_id=args.org, project_id=project, set=to_set, clear=to_clear)
        )
    else:
        reply = await api.projects.GetProjectLimits(
            apb.GetProjectLimitsRequest(organization_id=args.org, project_id=project)
        )
    emit(args, reply, lambda: project_limits_table(reply))
    return 0


def _limit_flags(p: argparse.ArgumentParser, positionals: Sequence[tuple[str, str]]) -> None:
    for name, help in positionals:
        p.add_argument(name, nargs="?", metavar=name.upper(), help=help)
    p.add_argument(
        "--model",
        help="the model --set/--clear are for (required with them); '*' is the default for every model "
        "without limits of its own",
    )
    p.add_argument(
        "--set", nargs="*", default=[], action=LimitList, metavar="LIMIT", help="rpm=100 tpm=6000 or requests/day=1000"
    )
    p.add_argument("--clear", nargs="*", default=[], action=LimitList, metavar="NAME", help="rpm tpd or tokens/minute")
    p.set_defaults(stray=[])
    names = " ".join(name.upper() for name, _ in positionals)
    p.usage = f"%(prog)s [-h] {names} [--model MODEL] [--set LIMIT ...] [--clear NAME ...] [client flags]"


def add_org_parser(org: SubParsers) -> None:
    p = verb_parser(org, "limits", org_limits, "show, or with --model and --set/--clear change, organization limits")
    _limit_flags(p, [("org", "organization id")])


def add_project_parser(proj: SubParsers) -> None:
    p = verb_parser(
        proj, "limits", project_limits, "show effective limits, or with --model and --set/--clear change custom ones"
    )
    _limit_flags(p, [("org", "organization id"), ("project", "project id or name")])
