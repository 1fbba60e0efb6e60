"""The ``ratelimitd`` command: the parser, built from each verb module, and the exit status."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

import ratelimitd.cli.apply as apply
import ratelimitd.cli.audit as audit
import ratelimitd.cli.config as config
import ratelimitd.cli.credentials as credentials
import ratelimitd.cli.decide as decide
import ratelimitd.cli.demo as demo
import ratelimitd.cli.health as health
import ratelimitd.cli.keys as keys
import ratelimitd.cli.members as members
import ratelimitd.cli.models as models
import ratelimitd.cli.orgs as orgs
import ratelimitd.cli.projects as projects
import ratelimitd.cli.serve as serve
import ratelimitd.cli.spend as spend
import ratelimitd.cli.usage as usage
from ratelimitd import __version__
from ratelimitd.cli.errors import NOT_UNDERSTOOD
from ratelimitd.core import logs

# In the order `ratelimitd --help` lists them.
VERB_MODULES = (
    serve,
    config,
    demo,
    decide,
    health,
    orgs,
    projects,
    keys,
    models,
    members,
    credentials,
    audit,
    apply,
    usage,
    spend,
)

EPILOG = """\
Exit status: 0 done; 1 the server (or the CLI) refused the operation; 2 the command line, or a file
it names, cannot be understood (nothing was sent); check: 3 the decision was a refusal.
Client verbs read RATELIMITD_ADDRESS and RATELIMITD_TOKEN when --address and --token are not given."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ratelimitd",
        description="Exact hierarchical rate limits for LLM APIs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ratelimitd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in VERB_MODULES:
        module.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            # Inside the try: a reader that has gone away is noticed here, not in the interpreter's last flush.
            sys.stdout.flush()
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """stdout's reader has gone (``ratelimitd … | head -1``): exit quietly, as a command killed by SIGPIPE."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter flushes stdout once more on exit
    return 128 + signal.SIGPIPE


def _main(argv: Sequence[str] | None) -> int:
    # Every command (demo's private server too) holds back repeated warnings; serve then applies its
    # settings. As with basicConfig, logging that is already set up (a program calling main) stays.
    if not logging.getLogger().handlers:
        logs.configure("text", os.environ.get("RATELIMITD_LOG_LEVEL", "INFO"), logs.DEFAULT_REPEAT_INTERVAL_S)
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ValueError as e:  # every value check (and NotUnderstood) before a call could be made
        print(f"ratelimitd: {e}", file=sys.stderr)
        return NOT_UNDERSTOOD
