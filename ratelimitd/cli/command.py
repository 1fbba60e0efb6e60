"""Running a client verb: the flags every verb shares, the event loop, and errors into exit codes."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeAlias

import grpc

from ratelimitd.cli.client import Api
from ratelimitd.cli.errors import NOT_UNDERSTOOD, REFUSED, NotUnderstood, Refused
from ratelimitd.tls import ClientTls

DEFAULT_ADDRESS = "127.0.0.1:50051"

Verb = Callable[[Api, argparse.Namespace], Awaitable[int]]
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(coro)


def verb_command(verb: Verb) -> Callable[[argparse.Namespace], int]:
    """The ``func`` argparse calls for ``verb``: connects, runs it, and reports a failure in one line."""

    def run(args: argparse.Namespace) -> int:
        return run_async(with_api(args, lambda api: verb(api, args)))

    return run


async def with_api(args: argparse.Namespace, verb: Callable[[Api], Awaitable[int]]) -> int:
    api = Api(args.address or DEFAULT_ADDRESS, args.token, client_tls(args))
    try:
        return await verb(api)
    except grpc.aio.AioRpcError as e:
        return fail(f"{e.code().name}: {e.details()}{_credential_hint(e, api)}", REFUSED)
    except Refused as e:
        return fail(str(e), REFUSED)
    except NotUnderstood as e:
        return fail(str(e), NOT_UNDERSTOOD)
    finally:
        await api.channel.close()


def _credential_hint(e: grpc.aio.AioRpcError, api: Api) -> str:
    if e.code() != grpc.StatusCode.UNAUTHENTICATED:
        return ""
    if api.has_token:
        return " (the CLI sent the credential from --token or RATELIMITD_TOKEN)"
    return " (no credential was sent: set RATELIMITD_TOKEN or pass --token)"


def fail(message: str, code: int) -> int:
    print(f"ratelimitd: {message}", file=sys.stderr)
    return code


def client_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    env = os.environ.get
    p.add_argument(
        "--address",
        default=env("RATELIMITD_ADDRESS"),
        help=f"server host:port (default: RATELIMITD_ADDRESS, else {DEFAULT_ADDRESS})",
    )
    p.add_argument("--token", default=env("RATELIMITD_TOKEN"), help="credential (default: RATELIMITD_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the reply as JSON instead of a table")
    tls = p.add_argument_group("TLS (docs/operations.md); any of these turns TLS on")
    tls.add_argument(
        "--tls", action="store_true", default=_flag(env("RATELIMITD_TLS")), help="TLS, trusting the system's roots"
    )
    tls.add_argument("--tls-ca", default=env("RATELIMITD_TLS_CA"), help="PEM CA to trust for the server's certificate")
    tls.add_argument(
        "--tls-cert",
        default=env("RATELIMITD_TLS_CLIENT_CERT"),
        help="PEM client certificate, for mTLS (with --tls-key)",
    )
    tls.add_argument("--tls-key", default=env("RATELIMITD_TLS_CLIENT_KEY"), help="PEM private key of --tls-cert")
    tls.add_argument(
        "--tls-server-name",
        default=env("RATELIMITD_TLS_SERVER_NAME"),
        help="verify the server's certificate for this name instead of the address's host",
    )
    return p


def _flag(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def client_tls(args: argparse.Namespace) -> ClientTls:
    return ClientTls(
        enabled=args.tls, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name
    )


def verb_parser(
    sub: SubParsers, name: str, verb: Verb, help: str, description: str | None = None
) -> argparse.ArgumentParser:
    """A client verb's parser, with the shared flags, that runs ``verb``."""
    p = client_flags(sub.add_parser(name, help=help, description=description or _sentence(help)))
    p.set_defaults(func=verb_command(verb))
    return p


def _sentence(help: str) -> str:
    return help[:1].upper() + help[1:] + "."


def noun_parser(sub: SubParsers, name: str, help: str, description: str) -> SubParsers:
    """A command that groups verbs (``org create``, ``org list``...); returns where its verbs go."""
    return sub.add_parser(name, help=help, description=description).add_subparsers(dest="verb", required=True)


def org_arg(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("org", help="organization id (org_...)")
    return p


def project_arg(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("project", help="project id (proj_...) or name")
    return p
