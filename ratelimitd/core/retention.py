"""How long what ratelimitd writes is kept. Every key expires or is bounded:

- buckets (the organization's decision state hash) expire once all are drained
  (lib.lua); the configuration cached there is bounded by projects x models;
- request records (replay answers and reservations) after ``request_ttl_s``;
- usage counters ``minute_s``/``hour_s``/``day_s`` after their bucket ends;
- a project's request log keeps ``log_entries`` entries, and disappears
  ``log_ttl_s`` after its newest one;
- monthly spend after 400 days.

An organization's audit stream keeps about ``DEFAULT_MAX_EVENTS`` events (the
setting RATELIMITD_AUDIT_MAX_EVENTS changes it).

Organizations, projects, keys, limits, prices and credentials stay until
deleted: they are what users configured.
"""

from __future__ import annotations

from typing import NamedTuple

DEFAULT_MAX_EVENTS = 10_000


class Retention(NamedTuple):
    request_ttl_s: int = 900
    minute_s: int = 6 * 3600
    hour_s: int = 35 * 86400
    day_s: int = 400 * 86400
    log_entries: int = 1000
    log_ttl_s: int = 7 * 86400
