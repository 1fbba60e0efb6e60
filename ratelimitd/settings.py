"""One frozen settings object: defaults, then a config file, then environment (RATELIMITD_*), then flags.

Every setting has a description; ``ratelimitd serve --help`` and docs/operations.md
list them. Secrets are redacted in ``repr``. The file is read by config_file.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ratelimitd.core.logs import DEFAULT_REPEAT_INTERVAL_S
from ratelimitd.core.retention import DEFAULT_MAX_EVENTS, Retention
from ratelimitd.core.storage_url import StorageTls, parse, redact

STORAGE_ERROR_POLICIES = ("unavailable", "allow", "deny")
UNKNOWN_DOMAIN_POLICIES = ("error", "allow")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Numeric settings where 0 means "none" rather than a mistake.
MAY_BE_ZERO = ("drain_s", "metrics_model_labels", "metrics_organization_labels", "log_repeat_interval_s")
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
    # -- traces and spend alerts (docs/operations.md "Tracing", "Spend alerts") --
    trace_otlp_endpoint: str = _field(
        "",
        "OTLP/gRPC collector traces are exported to, http://host:port (plaintext) or https://host:port (TLS); "
        "empty: tracing off, no span is made (needs the otel extra: pip install 'ratelimitd[otel]')",
    )
    trace_sample_ratio: float = _field(
        1.0, "share of new traces recorded, more than 0 and at most 1; a caller's traceparent decision is kept"
    )
    spend_webhook_url: str = _field(
        "", "http(s) URL POSTed once per organization, project, month and spend threshold crossed; empty: off"
    )
    spend_webhook_org_urls: dict[str, str] = _field(
        {}, "per organization: ORG_ID=URL,... sent there instead of spend_webhook_url"
    )
    spend_webhook_secret: str | None = _secret_field(
        "key of the HMAC-SHA256 signature of each spend alert (X-Ratelimitd-Signature); required with a webhook"
    )
    spend_alert_interval_s: float = _field(30.0, "how often spend is compared with the spend limits' thresholds")
    spend_webhook_attempts: int = _field(6, "tries of one spend alert before it is recorded as failed")
    spend_webhook_backoff_s: float = _field(1.0, "wait before the second try, doubled before each next (at most 300 s)")
    spend_webhook_timeout_s: float = _field(10.0, "one try's time limit for the receiver's answer")

    # -- logs and metric labels (issue 14, items 2 and 4) --
    log_format: str = _field("text", "log lines on stderr: 'text' (for people) or 'json' (one event per line)")
    log_level: str = _field("INFO", "the least severe log level written: DEBUG, INFO, WARNING or ERROR")
    log_repeat_interval_s: float = _field(
        DEFAULT_REPEAT_INTERVAL_S,
        "a warning or error repeated with the same text is written once per this long, then with its count",
    )
    metrics_model_labels: int = _field(
        0, 'per-model decision counts for up to this many models (the rest as model="other"); 0: off'
    )
    metrics_organization_labels: int = _field(
        0,
        'per-organization decision counts for up to this many organizations (the rest as organization="other"); 0: off',
    )

    # -- shadow mode (issue 14, item 6; docs/operations.md "Shadow mode") --
    shadow_all: bool = _field(
        False, "every rate limit is a shadow limit: counted as 'would have refused', never refusing"
    )

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
        self._check_traces_and_alerts()
        for origin in self.http_cors_origins:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(f"http_cors_origins: {origin!r} is not an origin such as https://console.example.com")
        self._check_logs()
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

    def _check_traces_and_alerts(self) -> None:
        if self.trace_otlp_endpoint and not self.trace_otlp_endpoint.startswith(("http://", "https://")):
            raise ValueError(f"trace_otlp_endpoint {self.trace_otlp_endpoint!r} is not an http:// or https:// URL")
        if not 0 < self.trace_sample_ratio <= 1:
            raise ValueError(f"trace_sample_ratio must be more than 0 and at most 1, not {self.trace_sample_ratio}")
        urls = {"spend_webhook_url": self.spend_webhook_url} if self.spend_webhook_url else {}
        urls.update({f"spend_webhook_org_urls {org}": url for org, url in self.spend_webhook_org_urls.items()})
        for what, url in urls.items():
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{what}: {url!r} is not an http:// or https:// URL")
        if urls and not self.spend_webhook_secret:
            raise ValueError("a spend webhook needs spend_webhook_secret: receivers check each alert's signature")

    def _check_logs(self) -> None:
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, not {self.log_format!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}")

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
        return cls.layered(os.environ if env is None else env, {}, overrides)

    @classmethod
    def layered(cls, env: Mapping[str, str], file_values: Mapping[str, Any], overrides: Mapping[str, Any]) -> Settings:
        """Defaults < a config file's values < RATELIMITD_<NAME> variables < overrides (None: not given)."""
        values: dict[str, Any] = dict(file_values)
        values.update(env_values(env))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def env_values(env: Mapping[str, str]) -> dict[str, Any]:
    """The settings that RATELIMITD_<NAME> variables set (an empty one sets nothing)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        raw = env.get(f"RATELIMITD_{f.name.upper()}")
        if raw is not None and raw != "":
            values[f.name] = _convert(f.name, raw)
    return values


def _convert(name: str, raw: str) -> Any:
    if name == "windows":
        return parse_windows(raw)
    if name in ("header_windows", "envoy_descriptor_keys", "spend_webhook_org_urls"):
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
