"""Wires settings, storage, engine and the gRPC server into one running service."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ratelimitd.alerts import SpendAlertSender, WebhookSettings
from ratelimitd.api import envoy
from ratelimitd.api.admin import (
    AuditServicer,
    CredentialServicer,
    Management,
    MemberServicer,
    ModelPermissionServicer,
    OrganizationServicer,
    ProjectServicer,
)
from ratelimitd.api.decisions import RateLimitServicer
from ratelimitd.api.gate import Gate
from ratelimitd.api.health import StorageHealth
from ratelimitd.api.manage import ProjectManager
from ratelimitd.api.metrics import Metrics
from ratelimitd.api.usage import UsageServicer
from ratelimitd.api.wire import Guard, served_methods
from ratelimitd.console import server as console
from ratelimitd.core.errors import StorageUnavailable
from ratelimitd.core.storage_url import parse
from ratelimitd.engine.audit import Audit
from ratelimitd.engine.clock import Clock, manual_clock, server_time
from ratelimitd.engine.control import ControlPlane
from ratelimitd.engine.credentials import Credentials
from ratelimitd.engine.decisions import Decider
from ratelimitd.engine.limits import Dimensions
from ratelimitd.engine.live import LiveState
from ratelimitd.engine.members import Members
from ratelimitd.engine.permissions import ModelPermissions
from ratelimitd.engine.rollup import UsageRollup
from ratelimitd.engine.scripts import Scripts
from ratelimitd.engine.sessions import Sessions
from ratelimitd.engine.spend_alerts import SpendAlerts
from ratelimitd.engine.usage import Usage
from ratelimitd.settings import Settings
from ratelimitd.storage import redis as storage
from ratelimitd.storage.embedded import EmbeddedValkey
from ratelimitd.storage.hot_path import hot_path_connection
from ratelimitd.tls import server_credentials
from ratelimitd.tracing import Tracing
from ratelimitd.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    rate_limit_service_pb2,
    rate_limit_service_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)

if TYPE_CHECKING:
    from ratelimitd.http.server import HttpServer

log = logging.getLogger(__name__)

# How long past its grace period a stopping gRPC server is waited for.
_STOP_MARGIN_S = 5.0

SERVICE_NAMES = [
    rate_limit_service_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["OrganizationService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["ProjectService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["ModelPermissionService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["MemberService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["CredentialService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
    usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
    envoy.ENVOY_SERVICE_NAME,
]
# A key that is not UTF-8 is refused like any unknown key rather than as a malformed request (api/wire.py).
CHECK_AND_CONSUME = f"/{SERVICE_NAMES[0]}/CheckAndConsume"
CHECK_AND_CONSUME_STREAM = f"/{SERVICE_NAMES[0]}/CheckAndConsumeStream"
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class App:
    """One ratelimitd process. ``start`` returns once the port accepts calls."""

    def __init__(self, settings: Settings, *, worker: bool = False) -> None:
        """``worker``: one of several processes on one port, started by the supervisor
        (workers.py), which has already bootstrapped the operator credential."""
        self.settings = settings
        self.worker = worker
        self.embedded: EmbeddedValkey | None = None
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.redis_url = ""
        self.bootstrap_token: str | None = None
        self.metrics_port = 0
        self.http: HttpServer | None = None  # JSON over HTTP, when settings.http_listen asks for it
        self.http_port = 0
        # Told the operator credential created once storage first answers, when it did not at start.
        self.on_late_bootstrap: Callable[[str], None] = lambda token: None
        self._late_bootstrap: asyncio.Task[None] | None = None
        self.tracing: Tracing | None = None
        self.spend_alerts: SpendAlertSender | None = None
        self._spend_alerts_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        s = self.settings
        # Port sharing only among our own workers: otherwise a second server on
        # the same port must fail rather than split the traffic silently. The
        # port is taken before storage starts, so a server that cannot listen
        # never touches the data directory.
        self.gate = Gate()
        if s.trace_otlp_endpoint:
            self.tracing = Tracing(s.trace_otlp_endpoint, s.trace_sample_ratio)
        traced = [self.tracing.interceptor()] if self.tracing else []
        server = grpc.aio.server(
            interceptors=[*traced, Guard(lenient=[CHECK_AND_CONSUME, CHECK_AND_CONSUME_STREAM], gate=self.gate)],
            options=[("grpc.so_reuseport", 1 if self.worker else 0)],
        )
        self.port = _bind(server, s)
        if s.http_listen:
            # only then: aiohttp takes a noticeable part of a start-up that does not serve HTTP
            from ratelimitd.http.server import HttpServer

            self.http = HttpServer(s.http_listen, s.http_cors_origins, share_port=self.worker)
            self.http_port = self.http.bind()
            self.http.add_loopback(server)
        if s.redis_url:
            self.redis_url = s.redis_url
        else:
            self.embedded = EmbeddedValkey(s.data_dir)
            self.redis_url = await self.embedded.start()
        timeout_s = s.storage_timeout_ms / 1000
        self.redis = storage.connect(self.redis_url, timeout_s=timeout_s, tls=s.storage_tls)
        self.pipeline = hot_path_connection(parse(self.redis_url), timeout_s=timeout_s, tls=s.storage_tls)
        scripts = Scripts(self.redis)
        dims = Dimensions(s.windows)
        audit = Audit(self.redis, s.audit_max_events)
        self.control = ControlPlane(self.redis, scripts, dims, audit)
        clock = manual_clock(self.redis) if s.manual_clock else server_time
        sessions = Sessions(self.redis, s.console_session_ttl_s, clock)
        self.credentials = Credentials(self.redis, audit, sessions=sessions)
        self.gate.open(self.credentials, self.storage_failed)
        if self.http is not None and s.console:
            self.http.mounts.append(console.mount(self.credentials, sessions))
        management = Management(
            self.control,
            self.credentials,
            Members(self.redis, self.control, self.credentials, audit),
            ModelPermissions(self.redis, self.control, audit),
        )
        # Tracing off: the engine gets the connection itself, so the hot path makes no span.
        scripts_runner = self.tracing.storage(self.pipeline) if self.tracing else self.pipeline
        self.decider = Decider(scripts_runner, scripts, dims, s.retention, clock=clock, shadow_all=s.shadow_all)
        self.usage = Usage(self.redis, scripts_runner, scripts, dims, self.control, s.retention, clock=clock)
        self.rollup = UsageRollup(self.redis, scripts, dims, s.retention, clock=clock)
        self._rollup_task = asyncio.get_running_loop().create_task(self._maintain(s.usage_rollup_interval_s))
        self._start_spend_alerts(audit, clock)
        self.metrics = Metrics(s.metrics_model_labels, s.metrics_organization_labels)
        self.health = StorageHealth(
            self.pipeline, SERVICE_NAMES, s.health_interval_s, on_change=lambda up: self.metrics.storage_up.set(int(up))
        )
        await self.health.start()
        if self.health.serving and not self.worker:
            self.bootstrap_token = await self.credentials.bootstrap(s.operator_token)
        elif not self.worker:
            self._late_bootstrap = asyncio.get_running_loop().create_task(self._bootstrap_once_storage_answers())

        failed = self.storage_failed
        rate_limit_service_pb2_grpc.add_RateLimitServiceServicer_to_server(
            RateLimitServicer(
                self.decider,
                self.usage,
                self.gate,
                s.header_windows,
                s.on_storage_error,
                self.storage_failed,
                self.metrics,
                ProjectManager(ProjectServicer(management, failed)),
            ),
            server,
        )
        usage_pb2_grpc.add_UsageServiceServicer_to_server(
            UsageServicer(
                self.usage,
                self.storage_failed,
                LiveState(self.redis, scripts, dims, s.retention, self.control, clock),
            ),
            server,
        )
        admin_pb2_grpc.add_OrganizationServiceServicer_to_server(OrganizationServicer(management, failed), server)
        admin_pb2_grpc.add_ProjectServiceServicer_to_server(ProjectServicer(management, failed), server)
        admin_pb2_grpc.add_ModelPermissionServiceServicer_to_server(ModelPermissionServicer(management, failed), server)
        admin_pb2_grpc.add_MemberServiceServicer_to_server(MemberServicer(management, failed), server)
        admin_pb2_grpc.add_CredentialServiceServicer_to_server(CredentialServicer(management, failed), server)
        admin_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(management, failed), server)
        envoy.add_to_server(
            envoy.EnvoyRateLimitServicer(
                self.decider,
                self.usage,
                domains=s.envoy_domains,
                unknown_domain=s.envoy_unknown_domain,
                descriptor_keys=s.envoy_keys,
                header_windows=s.header_windows,
                storage_failed=self.storage_failed,
                metrics=self.metrics,
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        served = [*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(served, server)
        Gate.check(served_methods(served))
        await server.start()
        self.server = server
        if self.http is not None:
            await self.http.start([*SERVICE_NAMES, HEALTH_SERVICE_NAME], s.shutdown_grace_s)
        # What start-up built lives as long as the process: out of the collector's sight, so
        # collections on the hot path scan only the garbage of calls, and stay short.
        gc.freeze()
        if s.metrics_listen and not self.worker:
            self.metrics_port = self.metrics.serve(s.metrics_listen)

    def _start_spend_alerts(self, audit: Audit, clock: Clock) -> None:
        """With a webhook set: the background scan and delivery of spend alerts (alerts.py)."""
        s = self.settings
        if not (s.spend_webhook_url or s.spend_webhook_org_urls) or not s.spend_webhook_secret:
            return
        webhook = WebhookSettings(
            s.spend_webhook_url, s.spend_webhook_org_urls, s.spend_webhook_secret,
            s.spend_webhook_attempts, s.spend_webhook_backoff_s, s.spend_webhook_timeout_s,
        )  # fmt: skip
        self.spend_alerts = SpendAlertSender(SpendAlerts(self.redis, audit, clock=clock), webhook)
        self._spend_alerts_task = asyncio.get_running_loop().create_task(
            self.spend_alerts.run(s.spend_alert_interval_s)
        )

    async def _bootstrap_once_storage_answers(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            if not self.health.serving:
                continue
            try:
                token = await self.credentials.bootstrap(self.settings.operator_token)
            except StorageUnavailable:
                continue
            if token:
                self.on_late_bootstrap(token)
            return

    def storage_failed(self) -> None:
        """Any call that found storage unreachable: count it, and turn health NOT_SERVING now."""
        self.metrics.storage_errors.inc()
        self.health.failed()

    async def drain(self, drain_s: float, grace_s: float, hurry: asyncio.Event) -> None:
        """Stops the way load balancers need: NOT_SERVING at once while calls are still
        answered for ``drain_s`` (``hurry`` ends that early), then no new calls, and
        ``grace_s`` for the calls in flight before they are cancelled."""
        log.info(
            "draining: health NOT_SERVING, still answering for %g s, then up to %g s for calls in flight",
            drain_s,
            grace_s,
        )
        if self.server is not None:
            await self.health.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hurry.wait(), drain_s)
        await self.stop(grace_s)

    async def _maintain(self, rollup_interval_s: float) -> None:
        """Background upkeep: once, what failed creates left behind; then the usage rollup."""
        try:
            if removed := await self.control.sweep_unindexed_organizations():
                log.info("removed %d organization record(s) left by failed creates", len(removed))
        except Exception as e:  # noqa: BLE001 - the next start sweeps again; serving goes on
            log.warning("sweep of unindexed organizations skipped: %s: %s", type(e).__name__, e)
        await self.rollup.run(rollup_interval_s)

    async def stop(self, grace_s: float = 2.0) -> None:
        if self._late_bootstrap is not None:
            self._late_bootstrap.cancel()
        if hasattr(self, "metrics"):
            self.metrics.stop()
        if self.http is not None:
            await self.http.stop()  # before the gRPC server: its calls go through it
        if self.server is not None:
            await self.health.stop()
            try:
                # grpc.aio's stop has been seen to stall in rare runs; a stop must end.
                await asyncio.wait_for(self.server.stop(grace_s), grace_s + _STOP_MARGIN_S)
            except TimeoutError:
                log.warning("the gRPC server did not stop within %g s; going on", grace_s + _STOP_MARGIN_S)
        if self._spend_alerts_task is not None:
            self._spend_alerts_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._spend_alerts_task
        if hasattr(self, "rollup"):
            self._rollup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rollup_task
        if hasattr(self, "redis"):
            await self.redis.aclose()
            await self.pipeline.close()
        if self.embedded is not None:
            self.embedded.stop()
        if self.tracing is not None:
            await self.tracing.stop()  # exports the spans still queued

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()


def _bind(server: grpc.aio.Server, s: Settings) -> int:
    listen = s.listen
    try:
        if s.tls_cert and s.tls_key:
            port = server.add_secure_port(listen, server_credentials(s.tls_cert, s.tls_key, s.tls_client_ca))
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError:  # grpc's "Failed to bind", whose details go to its own log
        port = 0
    if not port:
        raise OSError(f"cannot listen on {listen}: the address is in use or not available here")
    return port
