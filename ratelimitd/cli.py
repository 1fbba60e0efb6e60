"""The ``ratelimitd`` command: serve, demo, check, and a few management verbs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from ratelimitd import __version__
from ratelimitd.settings import Settings, parse_pairs, parse_windows, setting_descriptions

log = logging.getLogger("ratelimitd")


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(coro)


def serve(args: argparse.Namespace) -> int:
    settings = Settings.load(
        listen=args.listen,
        redis_url=args.redis_url,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        on_storage_error=args.on_storage_error,
        windows=parse_windows(args.windows) if args.windows else None,
        header_windows=parse_pairs(args.header_windows, "header_windows") if args.header_windows else None,
        manual_clock=True if args.manual_clock else None,
        workers=args.workers,
        metrics_listen=args.metrics_listen,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        redis_tls_ca=args.redis_tls_ca,
        redis_tls_cert=args.redis_tls_cert,
        redis_tls_key=args.redis_tls_key,
        http_listen=args.http_listen,
        http_cors_origins=_origins(args.http_cors_origins),
    )
    if args.worker:
        return run_async(_serve_worker(settings))
    if settings.workers > 1:
        return run_async(_serve_supervised(settings))
    return run_async(_serve(settings))


def _origins(flag: str | None) -> tuple[str, ...] | None:
    return tuple(filter(None, (o.strip() for o in flag.split(",")))) if flag else None


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _greet(
    settings: Settings,
    address: str,
    embedded: bool,
    token: str | None,
    workers: int = 1,
    storage_up: bool = True,
    http: str = "",
) -> None:
    storage = f"embedded Valkey, data in {settings.data_dir}" if embedded else settings.describe()
    processes = f", {workers} worker processes" if workers > 1 else ""
    transport = {"TLS": " over TLS", "mTLS": " over TLS, client certificates required"}.get(settings.tls, "")
    print(
        f"ratelimitd {__version__} listening on {address}{transport} "
        f"(gRPC: decisions, management, health, reflection{processes})"
    )
    print(f"storage: {storage}")
    if http:
        print(f"JSON over HTTP (Connect protocol) on http://{http}/ (description: /openapi.json)")
        if settings.console:
            print(f"console on http://{http}/console/ (sign in with a member credential or the operator's)")
    if not storage_up:
        _storage_unreachable_warning(settings)
    elif token:
        _show_new_credential(token, address)
    elif not settings.operator_token:
        print("operator credential: created on first start (set RATELIMITD_TOKEN to use the CLI)")
    sys.stdout.flush()


def _storage_unreachable_warning(settings: Settings) -> None:
    policy = {
        "unavailable": "every call is answered UNAVAILABLE",
        "allow": "decisions are allowed unchecked (--on-storage-error allow), other calls answered UNAVAILABLE",
        "deny": "decisions are refused (--on-storage-error deny), other calls answered UNAVAILABLE",
    }[settings.on_storage_error]
    print(
        f"WARNING: storage is unreachable. Health is NOT_SERVING and {policy} until it answers; "
        "ratelimitd keeps trying and recovers by itself.",
        file=sys.stderr,
    )
    if not settings.operator_token:
        print("operator credential: none yet; one is created and shown here once storage answers (if none exists)")


def _show_new_credential(token: str, address: str) -> None:
    print()
    print("First start: an operator credential was created. It is shown only now; keep it safe:")
    print(f"  export RATELIMITD_TOKEN={token}")
    print("Then, in another terminal, watch the reference's worked example run against this server:")
    print(f"  ratelimitd demo --address {address}")
    sys.stdout.flush()


async def _serve(settings: Settings) -> int:
    from ratelimitd.app import App

    app = App(settings)
    host = settings.listen.rsplit(":", 1)[0]
    app.on_late_bootstrap = lambda token: _show_new_credential(token, f"{host}:{app.port}")
    try:
        await app.start()
    except Exception as e:  # noqa: BLE001 - start-up failures end in one clear line
        print(f"ratelimitd: cannot start: {e}", file=sys.stderr)
        await app.stop(0)
        return 1
    stop = _stop_event()
    _greet(
        settings,
        f"{host}:{app.port}",
        app.embedded is not None,
        app.bootstrap_token,
        storage_up=bool(app.health.serving),
        http=f"{settings.http_listen.rpartition(':')[0]}:{app.http_port}" if app.http else "",
    )
    await stop.wait()
    print("ratelimitd: shutting down (a second signal ends the drain early)", flush=True)
    stop.clear()
    await app.drain(settings.drain_s, settings.shutdown_grace_s, hurry=stop)
    return 0


async def _serve_worker(settings: Settings) -> int:
    from ratelimitd.app import App

    app = App(settings, worker=True)
    stop = _stop_event()
    await app.start()
    log.info("worker pid %d serving", os.getpid())
    await stop.wait()
    stop.clear()
    await app.drain(settings.drain_s, settings.shutdown_grace_s, hurry=stop)
    return 0


async def _serve_supervised(settings: Settings) -> int:
    from ratelimitd.workers import Supervisor

    supervisor = Supervisor(settings)
    supervisor.on_late_bootstrap = lambda token: _show_new_credential(token, settings.listen)
    try:
        await supervisor.start()
    except Exception as e:  # noqa: BLE001 - start-up failures end in one clear line
        print(f"ratelimitd: cannot start: {e}", file=sys.stderr)
        await supervisor.stop()
        return 1
    stop = _stop_event()
    _greet(
        settings,
        settings.listen,
        supervisor.embedded is not None,
        supervisor.bootstrap_token,
        settings.workers,
        storage_up=supervisor.storage_up,
        http=settings.http_listen,
    )
    failure = await supervisor.wait(stop)
    if failure:
        print(f"ratelimitd: {failure}; stopping", file=sys.stderr, flush=True)
    else:
        print("ratelimitd: shutting down (a second signal ends the drain early)", flush=True)
    stop.clear()
    await supervisor.stop(hurry=stop)
    return 1 if failure else 0


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    env_help = "\n".join(
        f"  {name:<34} {desc} (default: {default or 'unset'})" for name, default, desc in setting_descriptions()
    )
    p = sub.add_parser(
        "serve",
        help="run the gRPC server",
        description="Run the gRPC server. Without --redis-url it runs a private Valkey in the data directory.",
        epilog="Environment (flags win):\n" + env_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--listen", help="host:port (default 127.0.0.1:50051)")
    p.add_argument(
        "--redis-url",
        help="redis://, rediss://, unix://, redis+cluster://host:port[,...] or "
        "redis+sentinel://host:port[,...]/service URL; unset = embedded Valkey",
    )
    p.add_argument("--redis-tls-ca", help="PEM CA of the storage servers' certificates (rediss schemes)")
    p.add_argument("--redis-tls-cert", help="PEM client certificate for storage (rediss schemes, with --redis-tls-key)")
    p.add_argument("--redis-tls-key", help="PEM private key of --redis-tls-cert")
    p.add_argument("--data-dir", help="data directory of the embedded Valkey")
    p.add_argument("--on-storage-error", choices=["unavailable", "allow", "deny"])
    p.add_argument("--windows", help="limit windows, e.g. minute=60,day=86400")
    p.add_argument("--header-windows", help="e.g. requests=day,tokens=minute")
    p.add_argument("--workers", type=int, help="server processes sharing the port (default 1)")
    p.add_argument("--metrics-listen", help="host:port for Prometheus metrics (/metrics); default off")
    p.add_argument("--http-listen", help="host:port serving every RPC as JSON over HTTP (Connect); default off")
    p.add_argument("--http-cors-origins", help="browser origins allowed over HTTP, comma-separated, or *; default none")
    p.add_argument("--tls-cert", help="PEM certificate of the gRPC port: TLS only (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="PEM CA: clients must present a certificate it issued (mTLS)")
    p.add_argument("--manual-clock", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=serve)


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC's core logs each failed TLS handshake at INFO, on either side: a CLI error would grow a
    # second line, and every stray plaintext connection would write one to the server's log.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
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
    logging.basicConfig(
        level=os.environ.get("RATELIMITD_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    parser = argparse.ArgumentParser(prog="ratelimitd", description="Exact hierarchical rate limits for LLM APIs.")
    parser.add_argument("--version", action="version", version=f"ratelimitd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    from ratelimitd import client_cli, usage_cli

    client_cli.add_parsers(sub)
    usage_cli.add_parsers(sub)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ValueError as e:
        print(f"ratelimitd: {e}", file=sys.stderr)
        return 2
