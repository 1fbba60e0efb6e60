"""How long what ratelimitd writes is kept. Every key expires or is bounded:

- buckets expire once drained (decide.lua, report.lua);
- request records (replay answers and reservations) after ``request_ttl_s``;
- usage counters ``minute_s``/``hour_s``/``day_s`` after their bucket ends;
- a project's request log keeps ``log_entries`` entries, and disappears
  ``log_ttl_s`` after its newest one;
- monthly spend after 400 days.

Organizations, projects, keys, limits, prices and credentials stay until
deleted: they are what users configured.
"""

from __future__ import annotations

from typing import NamedTuple


class Retention(NamedTuple):
    request_ttl_s: int = 900
    minute_s: int = 2 * 86400
    hour_s: int = 35 * 86400
    day_s: int = 400 * 86400
    log_entries: int = 1000
    log_ttl_s: int = 7 * 86400

    def args(self) -> list[str | int]:
        """As the Lua scripts take them (see the ARGV headers of decide.lua and report.lua)."""
        return [self.request_ttl_s * 1000, self.minute_s, self.hour_s, self.day_s, self.log_entries, self.log_ttl_s]
