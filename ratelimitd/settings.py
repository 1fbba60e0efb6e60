"""One frozen settings object: defaults, then environment (RATELIMITD_*), then flags.

Every setting has a description; ``ratelimitd serve --help`` and docs/operations.md
list them. Secrets are redacted in ``repr``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ratelimitd.engine.audit import DEFAULT_MAX_EVENTS
from ratelimitd.engine.retention import Retention
from ratelimitd.storage.topology import StorageTls, parse, redact

STORAGE_ERROR_POLICIES = ("unavailable", "allow", "deny")
UNKNOWN_DOMAIN_POLICIES = ("error", "allow")
# Numeric settings where 0 means "none" rather than a mistake.
MAY_BE_ZERO = ("drain_s",)
# A browser's Origin header: scheme://host[:port], nothing after it.
_ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://[^/\s]+$")
# What each Envoy descriptor entry can carry, and the entry key that carries it by default.
ENVOY_DESCRIPTOR_ROLES = {
    "api_key": "api_key",
    "model": "model",
    "tokens": "tokens",
    "request_id": "request_id",
    "phase": "phase",
}


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "ratelimitd"


def parse_pairs(text: str, what: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{what}: {item!r} is not NAME=VALUE")
        pairs[name.strip()] = value.strip()
    return pairs


def parse_windows(text: str) -> dict[str, int]:
    windows = {}
    for name, value in parse_pairs(text, "windows").items():
        if not name.isidentifier() or not value.isdigit() or int(value) <= 0:
            raise ValueError(f"windows: {name}={value} must be a name and a positive number of seconds")
        windows[name] = int(value)
    if not windows:
        raise ValueError("windows: at least one window is required")
    return windows


def _secret_field(description: str) -> Any:
    return field(default=None, repr=False, metadata={"description": description, "secret": True})


def _field(default: Any, description: str) -> Any:
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"description": description})
    return field(default=default, metadata={"description": description})


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str = _field("127.0.0.1:50051", "host:port of the gRPC server (all services, one port)")
    redis_url: str | None = _field(
        None,
        "storage URL: redis://, rediss:// or unix:// (one server), redis+cluster://host:port[,host:port...] "
        "(a Cluster), redis+sentinel://host:port[,host:port...]/service[/db] (Sentinel); rediss+cluster:// and "
        "rediss+sentinel:// with TLS; unset: run an embedded Valkey in data_dir",
    )
    redis_tls_ca: str | None = _field(
        None, "rediss schemes: PEM CA certificates that signed the storage servers' certificates; unset: the system's"
    )
    redis_tls_cert: str | None = _field(
        None, "rediss schemes: PEM client certificate to present to storage servers that ask for one"
    )
    redis_tls_key: str | None = _field(None, "rediss schemes: PEM private key of redis_tls_cert")
    data_dir: Path = _field(default_data_dir(), "where the embedded Valkey keeps its data")
    storage_timeout_ms: int = _field(250, "fail a storage call after this long (decisions answer UNAVAILABLE)")
    on_storage_error: str = _field(
        "unavailable",
        "what CheckAndConsume answers when storage is unreachable: 'unavailable' (gRPC UNAVAILABLE, the caller "
        "decides), 'allow' (fail open) or 'deny' (fail closed)",
    )
    windows: dict[str, int] = _field({"minute": 60, "day": 86400}, "limit windows, NAME=SECONDS,...")
    header_windows: dict[str, str] = _field(
        {"requests": "day", "tokens": "minute"}, "which window each metric's x-ratelimit-* headers report"
    )
    request_ttl_s: int = _field(
        900, "how long a request id is remembered: replays, and the reservation ReportUsage reconciles"
    )
    usage_minute_retention_s: int = _field(6 * 3600, "keep 1-minute usage buckets this long")
    usage_hour_retention_s: int = _field(35 * 86400, "keep 1-hour usage buckets this long")
    usage_day_retention_s: int = _field(400 * 86400, "keep 1-day usage buckets this long")
    usage_rollup_interval_s: float = _field(20.0, "how often finished usage minutes are added to hours and days")
    log_entries: int = _field(1000, "request log entries kept per project (newest first)")
    log_retention_s: int = _field(7 * 86400, "a project's request log is dropped this long after its last entry")
    health_interval_s: float = _field(1.0, "how often storage health is probed")
    metrics_listen: str = _field("", "host:port to serve Prometheus metrics over HTTP (/metrics); empty: off")
    workers: int = _field(1, "server processes sharing the port (SO_REUSEPORT), one per core you give it")
    http_listen: str = _field(
        "", "host:port to serve every unary RPC as JSON over HTTP/1.1 (the Connect protocol, docs/api.md); empty: off"
    )
    http_cors_origins: tuple[str, ...] = _field(
        (), "JSON over HTTP: browser origins allowed to call it (CORS), comma-separated, or * for any; empty: none"
    )
    console: bool = _field(True, "serve the web console at /console/ on the HTTP port (http_listen); docs/console.md")
    console_session_ttl_s: int = _field(8 * 3600, "a console sign-in lasts this long, then the browser signs in again")
    drain_s: float = _field(
        5.0,
        "on SIGTERM/SIGINT: report NOT_SERVING but keep answering this long, so load balancers move away; 0: no drain",
    )
    shutdown_grace_s: float = _field(
        10.0, "after the drain: stop accepting calls; calls in flight get this long to finish"
    )
    worker_restart_backoff_s: float = _field(
        1.0, "--workers: a dead worker is restarted after this long, doubled for each recent crash (at most 30 s)"
    )
    worker_crash_limit: int = _field(
        5, "--workers: this many worker crashes within worker_crash_window_s stop the whole server (exit status 1)"
    )
    worker_crash_window_s: float = _field(60.0, "--workers: the window worker_crash_limit counts crashes in")
    audit_max_events: int = _field(
        DEFAULT_MAX_EVENTS,
        "audit events kept per organization (and for the platform); older ones are trimmed (approximately)",
    )
    manual_clock: bool = _field(False, "tests only: read time from the 'rl:clock' key instead of Redis TIME")
    envoy_domains: tuple[str, ...] = _field(
        ("ratelimitd",), "Envoy rate limit domains ShouldRateLimit decides (the filter's `domain`), comma-separated"
    )
    envoy_unknown_domain: str = _field(
        "error",
        "what ShouldRateLimit answers for another domain: 'error' (INVALID_ARGUMENT, Envoy's failure_mode_deny "
        "decides) or 'allow' (OK, nothing charged)",
    )
    envoy_descriptor_keys: dict[str, str] = _field(
        ENVOY_DESCRIPTOR_ROLES,
        "Envoy descriptor entry keys, ROLE=KEY,... for the roles api_key, model, tokens (token estimate), "
        "request_id and phase; roles not named keep their default key",
    )
    tls_cert: str | None = _field(
        None, "PEM certificate (chain) of the gRPC port; with tls_key, the port speaks TLS only; unset: plaintext"
    )
    tls_key: str | None = _field(None, "PEM private key of tls_cert")
    tls_client_ca: str | None = _field(
        None, "PEM CA certificates; set: clients must present a certificate one of them issued (mTLS)"
    )
    operator_token: str | None = _secret_field("operator credential to accept (stored as a hash)")

    def __post_init__(self) -> None:
        if self.on_storage_error not in STORAGE_ERROR_POLICIES:
            raise ValueError(f"on_storage_error must be one of {', '.join(STORAGE_ERROR_POLICIES)}")
        for metric, window in self.header_windows.items():
            if window not in self.windows:
                raise ValueError(f"header_windows: {metric}={window} names no configured window")
        if self.envoy_unknown_domain not in UNKNOWN_DOMAIN_POLICIES:
            raise ValueError(f"envoy_unknown_domain must be one of {', '.join(UNKNOWN_DOMAIN_POLICIES)}")
        if not self.envoy_domains or not all(self.envoy_domains):
            raise ValueError("envoy_domains: at least one non-empty domain is required")
        if unknown := set(self.envoy_descriptor_keys) - set(ENVOY_DESCRIPTOR_ROLES):
            raise ValueError(
                f"envoy_descriptor_keys: {sorted(unknown)[0]!r} is not one of {', '.join(ENVOY_DESCRIPTOR_ROLES)}"
            )
        keys = self.envoy_keys
        if len(set(keys.values())) != len(keys):
            raise ValueError(f"envoy_descriptor_keys: two roles share one key in {keys}")
        self._check_tls()
        self._check_storage()
        for origin in self.http_cors_origins:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(f"http_cors_origins: {origin!r} is not an origin such as https://console.example.com")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
                if not (value == 0 and f.name in MAY_BE_ZERO):
                    raise ValueError(f"{f.name} must be positive, not {value}")

    def _check_tls(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: both for TLS, neither for plaintext")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError(
                "--tls-client-ca needs --tls-cert and --tls-key: client certificates (mTLS) are checked only over TLS"
            )

    def _check_storage(self) -> None:
        if self.redis_url:
            parse(self.redis_url)  # a ValueError that names what is wrong with it
        if bool(self.redis_tls_cert) != bool(self.redis_tls_key):
            raise ValueError("--redis-tls-cert and --redis-tls-key go together: both or neither")

    @property
    def storage_tls(self) -> StorageTls:
        return StorageTls(self.redis_tls_ca, self.redis_tls_cert, self.redis_tls_key)

    @property
    def tls(self) -> str:
        """How the port is reached: 'plaintext', 'TLS' or 'mTLS'."""
        return "mTLS" if self.tls_client_ca else "TLS" if self.tls_cert else "plaintext"

    @property
    def retention(self) -> Retention:
        return Retention(
            request_ttl_s=self.request_ttl_s,
            minute_s=self.usage_minute_retention_s,
            hour_s=self.usage_hour_retention_s,
            day_s=self.usage_day_retention_s,
            log_entries=self.log_entries,
            log_ttl_s=self.log_retention_s,
        )

    @property
    def envoy_keys(self) -> dict[str, str]:
        """Every descriptor role and its entry key: the configured ones over the defaults."""
        return {**ENVOY_DESCRIPTOR_ROLES, **self.envoy_descriptor_keys}

    def describe(self) -> str:
        redis = redact(self.redis_url) if self.redis_url else f"embedded Valkey in {self.data_dir}"
        return f"listen={self.listen} storage={redis}"

    def to_env(self) -> dict[str, str]:
        """These settings as RATELIMITD_* variables, as load() reads them (for worker processes)."""
        env = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, dict):
                value = ",".join(f"{k}={v}" for k, v in value.items())
            elif isinstance(value, tuple):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = "1" if value else "0"
            env[f"RATELIMITD_{f.name.upper()}"] = str(value)
        return env

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then RATELIMITD_<NAME> variables, then explicit overrides (None = not given)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"RATELIMITD_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _convert(f.name, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _convert(name: str, raw: str) -> Any:
    if name == "windows":
        return parse_windows(raw)
    if name in ("header_windows", "envoy_descriptor_keys"):
        return parse_pairs(raw, name)
    if name in ("envoy_domains", "http_cors_origins"):
        return tuple(filter(None, (d.strip() for d in raw.split(","))))
    if name == "data_dir":
        return Path(raw)
    default = {f.name: f.default for f in dataclasses.fields(Settings)}[name]
    try:
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(f"RATELIMITD_{name.upper()}={raw!r} is not a number") from None
    return raw


def setting_descriptions() -> list[tuple[str, str, str]]:
    """(environment variable, default, description) for every setting."""
    rows = []
    for f in dataclasses.fields(Settings):
        if f.metadata.get("secret"):
            default: object = ""
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = f.default
        if isinstance(default, tuple):
            default = ",".join(default)
        rows.append((f"RATELIMITD_{f.name.upper()}", str(default), f.metadata["description"]))
    return rows
