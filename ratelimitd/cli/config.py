"""``config show``: the settings ``serve`` would run with, each with its source (docs/operations.md)."""

from __future__ import annotations

import argparse
import os

from ratelimitd import config_file
from ratelimitd.cli.command import SubParsers
from ratelimitd.cli.serve import add_setting_flags, setting_flags


def config_show(args: argparse.Namespace) -> int:
    print(config_file.render(config_file.resolve(args.config, os.environ, setting_flags(args))), end="")
    return 0


def add_parsers(sub: SubParsers) -> None:
    p = sub.add_parser("config", help="the settings serve would run with")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    show = verbs.add_parser(
        "show",
        help="print the effective settings, each with its source (secrets redacted)",
        description="Print the settings `serve` with the same file, environment and flags would run with, as a "
        "TOML config file, each with its source. Precedence: flags > environment > file > defaults.",
    )
    add_setting_flags(show)
    show.set_defaults(func=config_show)
