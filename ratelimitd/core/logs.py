"""The process's log: text for people or one JSON event per line, with repeats held back.

A JSON event has a stable schema: ``time`` (UTC, ISO 8601, milliseconds), ``level``
(lower case), ``event`` (the message), ``logger``, and, when the code that logs knows
them, ``org``, ``project`` and ``request_id`` (passed as ``extra=``); a held-back
repeat adds ``repeated``, and a failure ``error``. Nothing else from a record is
written, so a field can never carry a secret by accident; and every message is
scrubbed of anything shaped like an API key or credential.

A warning or error whose text (before its arguments are filled in) was already
written within ``repeat_interval_s`` is not written again; the next one after the
interval says how many were held back. A storage outage logged by every call then
costs one line a minute, not one per call.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
import time
from collections.abc import Callable

CONTEXT_FIELDS = ("org", "project", "request_id")
DEFAULT_REPEAT_INTERVAL_S = 60.0
# rlk_ (API key), rlm_ (member credential), rlt_ (operator credential): the id part may
# show, the secret never.
_SECRET = re.compile(r"\b(rl[kmt]_)[A-Za-z0-9_-]{8,}")


def scrub(text: str) -> str:
    return _SECRET.sub(r"\1…", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": scrub(record.getMessage()),
            "logger": record.name,
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value:
                event[name] = value
        repeated = getattr(record, "repeated", 0)
        if repeated:
            event["repeated"] = repeated
        if record.exc_info and record.exc_info[1] is not None:
            event["error"] = scrub(f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}")
        return json.dumps(event, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = scrub(super().format(record))
        repeated = getattr(record, "repeated", 0)
        return f"{line} (and {repeated} more like it held back)" if repeated else line


class RepeatFilter(logging.Filter):
    """Lets a WARNING-or-worse message template through once per ``interval_s``."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._clock = clock
        # template -> (when it was last written, how many were held back since); bounded below
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or self._interval_s <= 0:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self._interval_s:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        if len(self._seen) >= 1000:  # templates are few; this only guards against unbounded growth
            self._seen.clear()
        self._seen[key] = (now, 0)
        if last is not None and last[1]:
            record.repeated = last[1]
        return True


def configure(log_format: str, level: str, repeat_interval_s: float) -> None:
    """Replaces the root logger's handlers with one on stderr in ``log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RepeatFilter(repeat_interval_s))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
