"""Delivers spend alerts to a webhook: signed, retried with back-off, recorded in the audit trail.

Runs in the background of every ratelimitd process that has a webhook set: each
``spend_alert_interval_s`` it claims the crossings due (engine/spend_alerts.py,
once across all processes) and POSTs each as JSON to the organization's URL
(``spend_webhook_org_urls``) or the platform's (``spend_webhook_url``). The body
is signed with HMAC-SHA256 under ``spend_webhook_secret``:

    X-Ratelimitd-Signature: sha256=<hex of HMAC-SHA256(secret, body)>

A 2xx answer is delivered; anything else (another status, no answer within the
timeout, a refused connection) is tried again after ``spend_webhook_backoff_s``,
doubled before each next try (at most 300 s), ``spend_webhook_attempts`` tries
in all. Either way the result goes to the organization's audit trail. The secret
and the URL's query never reach a log line or the audit trail.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import urlsplit

from ratelimitd import __version__
from ratelimitd.engine.spend_alerts import SpendAlerts, SpendCrossing

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Ratelimitd-Signature"
MAX_BACKOFF_S = 300.0
# Deliveries under way at once; more crossings wait their turn.
MAX_CONCURRENT_DELIVERIES = 8


class WebhookSettings(NamedTuple):
    url: str
    org_urls: Mapping[str, str]
    secret: str
    attempts: int
    backoff_s: float
    timeout_s: float


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def payload(crossing: SpendCrossing) -> bytes:
    return json.dumps(
        {
            "type": "spend.threshold_crossed",
            "id": crossing.alert_id,
            "organization_id": crossing.organization_id,
            "project_id": crossing.project_id,
            "month": crossing.month,
            "threshold_percent": crossing.threshold,
            "spend_usd": round(crossing.spend_usd, 6),
            "limit_usd": round(crossing.limit_usd, 6),
        },
        sort_keys=True,
    ).encode()


def _where(url: str) -> str:
    """The URL without its query and credentials: what logs and the audit trail may show."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"


def _post(url: str, body: bytes, signature: str, alert_id: str, timeout_s: float) -> int:
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": f"ratelimitd/{__version__}",
            SIGNATURE_HEADER: signature,
            "X-Ratelimitd-Alert-Id": alert_id,
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


class SpendAlertSender:
    def __init__(self, alerts: SpendAlerts, webhook: WebhookSettings) -> None:
        self._alerts = alerts
        self._webhook = webhook
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_DELIVERIES)

    async def run(self, interval_s: float) -> None:
        """Scans and delivers every ``interval_s``, first after one interval, until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.run_once()
            except Exception as e:  # noqa: BLE001 - the loop outlives any one scan
                log.warning("spend alert scan paused: %s: %s", type(e).__name__, e)

    async def run_once(self) -> list[bool]:
        """One scan: claims what is due and delivers it; returns whether each was delivered.
        Scopes are delivered concurrently, one scope's thresholds in ascending order."""
        scopes: dict[tuple[str, str], list[SpendCrossing]] = {}
        for crossing in await self._alerts.claim_all():
            scopes.setdefault((crossing.organization_id, crossing.project_id), []).append(crossing)
        delivered = await asyncio.gather(*(self._deliver_in_order(c) for c in scopes.values()))
        return [d for scope in delivered for d in scope]

    async def _deliver_in_order(self, crossings: list[SpendCrossing]) -> list[bool]:
        return [await self.deliver(c) for c in sorted(crossings, key=lambda c: c.threshold)]

    async def deliver(self, crossing: SpendCrossing) -> bool:
        async with self._slots:
            url = self._webhook.org_urls.get(crossing.organization_id, self._webhook.url)
            body = payload(crossing)
            signature = sign(self._webhook.secret, body)
            delay = self._webhook.backoff_s
            for attempt in range(1, self._webhook.attempts + 1):
                delivered, result = await self._try(url, body, signature, crossing.alert_id)
                if delivered:
                    await self._record(crossing, True, attempt, result)
                    return True
                if attempt < self._webhook.attempts:
                    log.info("spend alert %s to %s: %s; again in %g s", crossing.alert_id, _where(url), result, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_BACKOFF_S)
            log.warning(
                "spend alert %s to %s not delivered after %d tries: %s",
                crossing.alert_id, _where(url), self._webhook.attempts, result,
            )  # fmt: skip
            await self._record(crossing, False, self._webhook.attempts, result)
            return False

    async def _try(self, url: str, body: bytes, signature: str, alert_id: str) -> tuple[bool, str]:
        """One POST (in a thread: urllib blocks): delivered or not, and the receiver's answer."""
        try:
            status = await asyncio.to_thread(_post, url, body, signature, alert_id, self._webhook.timeout_s)
        except OSError as e:  # refused, unreachable, timed out
            return False, f"{type(e).__name__}: {str(e)[:120]}" if str(e) else type(e).__name__
        return 200 <= status < 300, f"HTTP {status}"

    async def _record(self, crossing: SpendCrossing, delivered: bool, attempts: int, result: str) -> None:
        try:
            await self._alerts.record_delivery(crossing, delivered=delivered, attempts=attempts, result=result)
        except Exception as e:  # noqa: BLE001 - the alert went (or did not) either way; say so in the log
            log.warning("spend alert %s: its audit record failed: %s: %s", crossing.alert_id, type(e).__name__, e)
