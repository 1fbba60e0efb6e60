"""Client verbs of the CLI (over the gRPC API): demo, check, and management."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pass
