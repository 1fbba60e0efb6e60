"""Times on the command line and in tables: "N[smhd]" periods, moments, and UTC formatting."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from ratelimitd.cli.errors import NotUnderstood

_PERIOD = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def now_ms() -> int:
    return int(time.time() * 1000)


def period_s(text: str) -> int | None:
    """Seconds in '90s', '90m', '24h' or '7d'; None when ``text`` is not one."""
    m = _PERIOD.match(text)
    return int(m[1]) * _UNIT_S[m[2]] if m else None


def parse_period_s(text: str, flag: str) -> int:
    """A period back from now, at least a second long, for ``flag``."""
    seconds = period_s(text)
    if not seconds:
        raise NotUnderstood(f"{flag} {text!r} is not a number followed by s, m, h or d, above zero (e.g. 24h)")
    return seconds


def parse_moment_ms(text: str, flag: str) -> int:
    """Unix milliseconds from '2025-06-01', '2025-06-01T12:00:00Z', '90m' or '7d' (ago), or a number of ms."""
    if text.isdigit():
        return int(text)
    seconds = period_s(text)
    if seconds is not None:
        return now_ms() - seconds * 1000
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise NotUnderstood(
            f"{flag} {text!r} is not ISO 8601 (2025-06-01T12:00:00Z), N[smhd] ago, or milliseconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def stamp(ms: int) -> Timestamp:
    """Unix milliseconds as a request's Timestamp."""
    t = Timestamp()
    t.FromMilliseconds(ms)
    return t


def format_stamp(message: Message, field: str) -> str:
    """A Timestamp field of ``message`` as format_ms shows it; "-" when absent."""
    return format_ms(getattr(message, field).ToMilliseconds()) if message.HasField(field) else "-"


def format_ms(ms: int) -> str:
    """Milliseconds since the epoch as UTC time for tables; "-" for never."""
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
