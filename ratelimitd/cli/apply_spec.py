"""Reading an ``apply`` file: its shape, and every value the server would refuse on its own.

Nothing here calls the server: a file is checked whole, each problem named by
where it is in the file, before any call is made.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ratelimitd.cli.limits import SHORTHANDS, metric_window
from ratelimitd.cli.members import ROLES
from ratelimitd.core.errors import InvalidArgument
from ratelimitd.engine.limits import MAX_LIMITS_PER_SCOPE, METRICS, validate_limit_value, validate_model
from ratelimitd.engine.members import validate_member_name
from ratelimitd.engine.permissions import Access, validate_policy
from ratelimitd.engine.projects import validate_description, validate_project_name
from ratelimitd.v1 import admin_pb2 as apb

LimitKey = tuple[str, str, str]  # model, metric, window

_SHORT = {v: k for k, v in SHORTHANDS.items()}
ACCESS = {"allow": apb.MODEL_ACCESS_ALLOW_LIST, "block": apb.MODEL_ACCESS_BLOCK_LIST}


@dataclass(frozen=True)
class Policy:
    access: str  # "unrestricted", "allow" or "block"
    models: tuple[str, ...]

    def text(self) -> str:
        return self.access if self.access == "unrestricted" else f"{self.access} [{', '.join(self.models)}]"

    def message(self) -> apb.ModelPolicy:
        return apb.ModelPolicy(access=ACCESS.get(self.access, apb.MODEL_ACCESS_UNRESTRICTED), models=self.models)


UNRESTRICTED = Policy("unrestricted", ())


@dataclass
class ProjectSpec:
    description: str | None = None
    limits: dict[LimitKey, int] | None = None
    models: Policy | None = None


@dataclass
class Spec:
    organization: str
    models: Policy | None = None
    projects: dict[str, ProjectSpec] | None = None
    members: dict[str, str] | None = None


# -- reading the file ------------------------------------------------------------


class SpecError(ValueError):
    pass


def _mapping(value: Any, where: str, allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected a mapping, found {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise SpecError(f"{where}: key {key!r} must be a string (quote it)")
        if allowed is not None and key not in allowed:
            raise SpecError(f"{where}: unknown key {key!r} (expected one of {', '.join(allowed)})")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise SpecError(f"{where}: expected a string, found {type(value).__name__}")
    return value


def _policy(value: Any, where: str) -> Policy:
    if value == "unrestricted":
        return UNRESTRICTED
    spec = _mapping(value, where, ("allow", "block"))
    if len(spec) != 1:
        raise SpecError(f"{where}: give exactly one of 'allow' or 'block' (or the word unrestricted)")
    ((access, models),) = spec.items()
    if not isinstance(models, list):
        raise SpecError(f"{where}.{access}: expected a list of model names")
    return Policy(access, tuple(sorted(_string(m, f"{where}.{access}[{i}]") for i, m in enumerate(models))))


def _limits(value: Any, where: str) -> dict[LimitKey, int]:
    limits = {}
    for model, entries in _mapping(value, where).items():
        for name, number in _mapping(entries, f"{where}.{model}").items():
            try:
                metric, window = metric_window(name)
            except ValueError as e:
                raise SpecError(f"{where}.{model}.{name}: {e}") from None
            if isinstance(number, bool) or not isinstance(number, int):
                raise SpecError(f"{where}.{model}.{name}: {number!r} is not a whole number")
            if (model, metric, window) in limits:
                raise SpecError(f"{where}.{model}.{name}: the same limit is named twice")
            limits[(model, metric, window)] = number
    return limits


def load(text: str, source: str) -> Spec:
    spec = _read(text, source)
    problems = _problems(spec)
    if problems:
        raise SpecError("\n".join(problems))
    return spec


def _read(text: str, source: str) -> Spec:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{source}: not valid YAML: {str(e).splitlines()[0]}") from None
    top = _mapping(raw, source, ("organization", "models", "projects", "members"))
    if "organization" not in top:
        raise SpecError(f"{source}: 'organization' (the organization's id) is required")
    spec = Spec(_string(top["organization"], f"{source}: organization"))
    if "models" in top:
        spec.models = _policy(top["models"], "models")
    if "projects" in top:
        spec.projects = {}
        for name, body in _mapping(top["projects"], "projects").items():
            where = f"projects.{name}"
            p = _mapping(body, where, ("description", "limits", "models"))
            spec.projects[name] = ProjectSpec(
                description=_string(p["description"] or "", f"{where}.description") if "description" in p else None,
                limits=_limits(p["limits"], f"{where}.limits") if "limits" in p else None,
                models=_policy(p["models"], f"{where}.models") if "models" in p else None,
            )
    if "members" in top:
        spec.members = {}
        for name, role in _mapping(top["members"], "members").items():
            if role not in ROLES:
                raise SpecError(f"members.{name}: role {role!r} is not one of {', '.join(ROLES)}")
            spec.members[name] = role
    return spec


def _problems(spec: Spec) -> list[str]:
    """Every value the server would refuse on its own, each with where it is in the file."""
    problems: list[str] = []

    def check(where: str, validate: Callable[..., object], *args: Any) -> None:
        try:
            validate(*args)
        except InvalidArgument as e:
            problems.append(f"{where}: {e.message}")

    def check_policy(where: str, policy: Policy | None) -> None:
        if policy is None or policy.access == "unrestricted":
            return
        if policy.access == "allow" and not policy.models:
            problems.append(f"{where}.allow: an empty allow list would refuse every model; name at least one")
        check(f"{where}.{policy.access}", validate_policy, Access(policy.access), policy.models)

    check_policy("models", spec.models)
    for name, project in (spec.projects or {}).items():
        where = f"projects.{name}"
        check(where, validate_project_name, name)
        if project.description is not None:
            check(f"{where}.description", validate_description, project.description)
        for (model, metric, window), value in sorted((project.limits or {}).items()):
            at = f"{where}.limits.{model}.{limit_text((model, metric, window), None).split(' ', 1)[1]}"
            check(at, functools.partial(validate_model, wildcard=True), model)
            if metric not in METRICS:
                problems.append(f"{at}: metric {metric!r} is not one of {', '.join(METRICS)}")
            check(at, validate_limit_value, value)
        check_policy(f"{where}.models", project.models)
        if len(project.limits or {}) > MAX_LIMITS_PER_SCOPE:
            problems.append(
                f"{where}.limits: {len(project.limits or {})} limits; a project holds at most {MAX_LIMITS_PER_SCOPE}"
            )
    for name in spec.members or {}:
        check(f"members.{name}", validate_member_name, name)
    return problems


def limit_text(key: LimitKey, value: int | None) -> str:
    model, metric, window = key
    name = _SHORT.get((metric, window), f"{metric}/{window}")
    return f"{model} {name}={value}" if value is not None else f"{model} {name}"


def from_message(p: apb.ModelPolicy) -> Policy:
    names = {v: k for k, v in ACCESS.items()}
    return Policy(names.get(p.access, "unrestricted"), tuple(sorted(p.models)))


def read_spec(source: str) -> Spec:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as e:
        raise SpecError(f"{source}: cannot read: {e.strerror}") from None
    return load(text, source)
