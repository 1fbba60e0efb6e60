"""``serve``: run the gRPC server (app.py), or with --workers several (workers.py).

What configures the server from the command line: flags here, over the environment,
over a config file (config_file.py, settings.py); ``config show`` (config.py) prints
the settings they make.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from ratelimitd import __version__, config_file
from ratelimitd.cli.command import SubParsers, run_async
from ratelimitd.core import logs
from ratelimitd.settings import Settings, parse_pairs, parse_windows, setting_descriptions

log = logging.getLogger("ratelimitd")


# Flags whose value is the setting's as it is; the others need converting.
_AS_GIVEN = (
    "listen", "redis_url", "on_storage_error", "workers", "metrics_listen", "tls_cert", "tls_key", "tls_client_ca",
    "redis_tls_ca", "redis_tls_cert", "redis_tls_key", "http_listen", "log_format",
)  # fmt: skip


def serve(args: argparse.Namespace) -> int:
    settings = config_file.resolve(args.config, os.environ, setting_flags(args)).settings
    logs.configure(settings.log_format, settings.log_level, settings.log_repeat_interval_s)
    if args.worker:
        return run_async(_serve_worker(settings))
    if settings.workers > 1:
        return run_async(_serve_supervised(settings))
    return run_async(_serve(settings))


def setting_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the flags of ``serve`` (and ``config show``) set; None: not given."""
    return {
        "data_dir": Path(args.data_dir) if args.data_dir else None,
        "windows": parse_windows(args.windows) if args.windows else None,
        "header_windows": parse_pairs(args.header_windows, "header_windows") if args.header_windows else None,
        "manual_clock": True if args.manual_clock else None,
        "shadow_all": True if args.shadow_all else None,
        **{name: getattr(args, name) for name in _AS_GIVEN},
        "http_cors_origins": _origins(args.http_cors_origins),
    }


def _origins(flag: str | None) -> tuple[str, ...] | None:
    return tuple(filter(None, (o.strip() for o in flag.split(",")))) if flag else None


def _say(settings: Settings, text: str, level: int = logging.INFO) -> None:
    """A line for the operator: printed (warnings on stderr), or with --log-format json one log event, so
    every line a collector reads is JSON. Only a new credential is printed in either format: it is
    shown once and is no log event."""
    if settings.log_format == "json":
        log.log(level, text.removeprefix("ratelimitd: "))
    else:
        print(text, file=sys.stderr if level >= logging.WARNING else sys.stdout, flush=True)


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
    banner = (
        f"ratelimitd {__version__} listening on {address}{transport} "
        f"(gRPC: decisions, management, health, reflection{processes})"
    )
    lines = [banner, f"storage: {storage}"]
    if http:
        lines.append(f"JSON over HTTP (Connect protocol) on http://{http}/ (description: /openapi.json)")
        if settings.console:
            lines.append(f"console on http://{http}/console/ (sign in with a member credential or the operator's)")
    if settings.log_format == "json":
        _say(settings, "; ".join(lines))
    else:
        print("\n".join(lines))
    if not storage_up:
        _storage_unreachable_warning(settings)
    elif token:
        _show_new_credential(token, address)
    elif not settings.operator_token:
        _say(settings, "operator credential: created on first start (set RATELIMITD_TOKEN to use the CLI)")
    sys.stdout.flush()


def _storage_unreachable_warning(settings: Settings) -> None:
    policy = {
        "unavailable": "every call is answered UNAVAILABLE",
        "allow": "decisions are allowed unchecked (--on-storage-error allow), other calls answered UNAVAILABLE",
        "deny": "decisions are refused (--on-storage-error deny), other calls answered UNAVAILABLE",
    }[settings.on_storage_error]
    warning = (
        f"storage is unreachable. Health is NOT_SERVING and {policy} until it answers; "
        "ratelimitd keeps trying and recovers by itself."
    )
    _say(settings, warning if settings.log_format == "json" else f"WARNING: {warning}", logging.WARNING)
    if not settings.operator_token:
        _say(
            settings,
            "operator credential: none yet; one is created and shown here once storage answers (if none exists)",
        )


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
        _say(settings, f"ratelimitd: cannot start: {e}", logging.ERROR)
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
    _say(settings, "ratelimitd: shutting down (a second signal ends the drain early)")
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
        _say(settings, f"ratelimitd: cannot start: {e}", logging.ERROR)
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
        _say(settings, f"ratelimitd: {failure}; stopping", logging.ERROR)
    else:
        _say(settings, "ratelimitd: shutting down (a second signal ends the drain early)")
    stop.clear()
    await supervisor.stop(hurry=stop)
    return 1 if failure else 0


def readable_default(default: str) -> str:
    """A setting's default as a person would write it in the environment."""
    if default in ("", "None"):
        return "unset"
    if default in ("True", "False"):
        return {"True": "on", "False": "off"}[default]
    if default.startswith("{"):
        pairs: dict[str, object] = ast.literal_eval(default)
        return ",".join(f"{k}={v}" for k, v in pairs.items())
    return default


def environment_help() -> str:
    # Settings that exist for the test suite (their description says so) are not for users.
    rows = [(name, readable_default(default), desc) for name, default, desc in setting_descriptions()]
    return "\n".join(
        f"  {name}\n      {desc} (default: {default})"
        for name, default, desc in rows
        if not desc.startswith("tests only")
    )


def add_parsers(sub: SubParsers) -> None:
    p = sub.add_parser(
        "serve",
        help="run the gRPC server",
        description="Run the gRPC server. Without --redis-url it runs a private Valkey in the data directory.",
        epilog="Environment (over --config's file; flags win):\n" + environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_setting_flags(p)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=serve)


def add_setting_flags(p: argparse.ArgumentParser) -> None:
    """The flags of every setting (serve, config show)."""
    p.add_argument("--config", help="a TOML (or .yaml) settings file, under environment and flags; $RATELIMITD_CONFIG")
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
    p.add_argument(
        "--on-storage-error",
        choices=["unavailable", "allow", "deny"],
        help="what decisions answer while storage is unreachable (default unavailable)",
    )
    p.add_argument("--windows", help="limit windows, e.g. minute=60,day=86400 (the default)")
    p.add_argument("--header-windows", help="e.g. requests=day,tokens=minute (the default)")
    p.add_argument("--workers", type=int, help="server processes sharing the port (default 1)")
    p.add_argument("--metrics-listen", help="host:port for Prometheus metrics (/metrics); default off")
    p.add_argument("--http-listen", help="host:port serving every RPC as JSON over HTTP (Connect); default off")
    p.add_argument("--http-cors-origins", help="browser origins allowed over HTTP, comma-separated, or *; default none")
    p.add_argument("--tls-cert", help="PEM certificate of the gRPC port: TLS only (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="PEM CA: clients must present a certificate it issued (mTLS)")
    p.add_argument("--log-format", choices=["text", "json"], help="log lines on stderr (default text)")
    p.add_argument("--manual-clock", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--shadow-all", action="store_true", help="every rate limit only counts what it would refuse (shadow mode)"
    )
