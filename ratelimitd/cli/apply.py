"""``ratelimitd apply -f FILE``: make an organization match a YAML file (docs/apply.md).

The rule: a section the file writes is matched exactly; a section it leaves
out is left alone. Projects and members the file does not name are kept,
unless ``--prune`` is given (deleting a project stops its keys, so it is
never implicit). Every change goes through the gRPC API with the caller's
credential, so the same authorization and validation apply, and each change
is atomic on its own; a second run with the same file changes nothing.

Changes are made in an order that cannot trip over itself: the organization's
model list before projects' lists (which must fit inside it), new Owners
before old ones are demoted or removed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable

from ratelimitd.cli.apply_plan import Applier, Change
from ratelimitd.cli.apply_spec import SpecError, read_spec
from ratelimitd.cli.client import Api
from ratelimitd.cli.command import SubParsers, verb_parser
from ratelimitd.cli.errors import NOT_UNDERSTOOD, REFUSED
from ratelimitd.cli.output import print_json


def _refuse(problems: list[str], code: int) -> int:
    for problem in problems:
        print(f"ratelimitd: {problem}", file=sys.stderr)
    if len(problems) > 1 or code == REFUSED:
        n = len(problems)
        print(f"ratelimitd: nothing was changed ({n} problem{'s' if n != 1 else ''})", file=sys.stderr)
    return code


async def run(api: Api, args: argparse.Namespace) -> int:
    try:
        spec = read_spec(args.file)  # a small local file, read and checked before any call is made
    except SpecError as e:
        return _refuse(str(e).splitlines(), NOT_UNDERSTOOD)
    quiet = bool(args.json)
    applier = Applier(api, spec, args.prune)
    await applier.plan()
    if applier.problems:
        return _refuse(applier.problems, REFUSED)
    report: Callable[[Change], None] = (lambda c: None) if quiet else (lambda c: print(c.line()))
    if args.dry_run:
        for change in applier.changes:
            report(change)
    else:
        await applier.make(report)
    n = len(applier.changes)
    if quiet:
        changes = [dataclasses.asdict(c) for c in applier.changes]
        print_json({"dry_run": args.dry_run, "changes": changes})
    elif args.dry_run:
        print(f"dry run: {n} change{'s' if n != 1 else ''} would be made; nothing was changed")
    else:
        print(f"{n} change{'s' if n != 1 else ''}" if n else "no changes")
    return 0


def add_parsers(sub: SubParsers) -> None:
    p = verb_parser(sub, "apply", run, "make an organization match a YAML file (docs/apply.md)")
    p.add_argument("-f", "--file", required=True, help="the YAML file ('-' for stdin)")
    p.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    p.add_argument("--prune", action="store_true", help="also delete projects and remove members the file omits")
