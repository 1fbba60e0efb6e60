"""One frozen settings object: defaults, then environment (RATELIMITD_*), then flags.

Every setting has a description; ``ratelimitd serve --help`` and docs/operations.md
list them. Secrets are redacted in ``repr``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ratelimitd.storage.redis import redact

STORAGE_ERROR_POLICIES = ("unavailable", "allow", "deny")


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
        None, "redis://, rediss:// or unix:// URL of Redis/Valkey; unset: run an embedded Valkey in data_dir"
    )
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
    request_ttl_s: int = _field(900, "how long a request id is remembered (replays, usage reconciliation)")
    health_interval_s: float = _field(1.0, "how often storage health is probed")
    audit_max_events: int = _field(
        10_000, "audit events kept per organization (and for the platform); older ones are trimmed (approximately)"
    )
    manual_clock: bool = _field(False, "tests only: read time from the 'rl:clock' key instead of Redis TIME")
    operator_token: str | None = _secret_field("operator credential to accept (stored as a hash)")

    def __post_init__(self) -> None:
        if self.on_storage_error not in STORAGE_ERROR_POLICIES:
            raise ValueError(f"on_storage_error must be one of {', '.join(STORAGE_ERROR_POLICIES)}")
        for metric, window in self.header_windows.items():
            if window not in self.windows:
                raise ValueError(f"header_windows: {metric}={window} names no configured window")
        if self.storage_timeout_ms <= 0 or self.request_ttl_s <= 0 or self.health_interval_s <= 0:
            raise ValueError("timeouts and intervals must be positive")
        if self.audit_max_events <= 0:
            raise ValueError("audit_max_events must be positive")

    def describe(self) -> str:
        redis = redact(self.redis_url) if self.redis_url else f"embedded Valkey in {self.data_dir}"
        return f"listen={self.listen} storage={redis}"

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
    if name == "header_windows":
        return parse_pairs(raw, "header_windows")
    if name == "data_dir":
        return Path(raw)
    if name in ("storage_timeout_ms", "request_ttl_s", "audit_max_events"):
        return int(raw)
    if name == "health_interval_s":
        return float(raw)
    if name == "manual_clock":
        return raw.lower() in ("1", "true", "yes")
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
        rows.append((f"RATELIMITD_{f.name.upper()}", str(default), f.metadata["description"]))
    return rows
