"""OpenTelemetry traces: off unless ``trace_otlp_endpoint`` is set, and then one provider per process.

Off, nothing here runs: the server gets no tracing interceptor and the engine
the hot path's connection itself, so no span object is ever made. On, spans go
to an OTLP/gRPC collector in batches from a background thread (a slow or absent
collector never holds up a call; spans it cannot take are dropped), sampled at
``trace_sample_ratio`` unless the caller's ``traceparent`` already decided.

The provider is ours, not OpenTelemetry's global one, so several servers in one
process (tests) each export their own spans and stop their own exporter.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ratelimitd import __version__
from ratelimitd.core.scripts import LuaScript
from ratelimitd.engine.outcomes import Outcome
from ratelimitd.engine.usage import ReportResult
from ratelimitd.storage.topology import HotPath

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

INSTALL_HINT = "pip install 'ratelimitd[otel]'"
# xds-protos (Envoy's API, a dependency) ships an older copy of opentelemetry-proto's modules in the
# same place; whichever package pip installs last wins, and the exporter needs the newer one.
PROTO_FIX = "pip install --force-reinstall --no-deps opentelemetry-proto=={version}"


def _import_failure(error: ImportError) -> str:
    """Why tracing cannot start, and the command that fixes it."""
    from importlib import metadata

    if (error.name or "").startswith("opentelemetry.proto"):
        try:
            version = metadata.version("opentelemetry-proto")
        except metadata.PackageNotFoundError:
            pass
        else:
            return (
                f"trace_otlp_endpoint is set, but {error.name} is not opentelemetry-proto {version}'s: "
                f"xds-protos installed its older copy over it. Run: {PROTO_FIX.format(version=version)}"
            )
    return f"trace_otlp_endpoint is set, but OpenTelemetry is not installed ({error.name} is missing): {INSTALL_HINT}"


_ORG_OF_KEY = re.compile(r"^rl:\{([^}]*)\}:")


class Tracing:
    """The process's tracer, and the exporter behind it."""

    def __init__(self, endpoint: str, sample_ratio: float, service_name: str = "ratelimitd") -> None:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        except ImportError as e:
            raise RuntimeError(_import_failure(e)) from None
        self.provider: TracerProvider = TracerProvider(
            resource=Resource.create({"service.name": service_name, "service.version": __version__}),
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        )
        # http:// means plaintext to the collector, https:// TLS with the system's CAs.
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer: Tracer = self.provider.get_tracer("ratelimitd", __version__)

    def interceptor(self) -> Any:
        """The gRPC server interceptor that makes each call's span (api/tracing.py)."""
        from ratelimitd.api.tracing import TracingInterceptor

        return TracingInterceptor(self.tracer)

    def storage(self, connection: HotPath) -> TracedScripts:
        return TracedScripts(connection, self.tracer)

    async def flush(self) -> None:
        """Exports every span ended so far (off the event loop: the export blocks)."""
        await asyncio.to_thread(self.provider.force_flush)

    async def stop(self) -> None:
        await asyncio.to_thread(self.provider.shutdown)


class TracedScripts:
    """The hot path's script calls (a ScriptRunner), each in a client span of its own that
    names the script, the organization and, for a decision, its outcome. Never the
    arguments: they carry API key hashes."""

    def __init__(self, connection: HotPath, tracer: Tracer) -> None:
        self._connection = connection
        self._tracer = tracer

    async def run_script(self, script: LuaScript, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        from opentelemetry.trace import SpanKind

        org = _ORG_OF_KEY.match(keys[0]) if keys else None
        attributes = {
            "db.system.name": "redis",
            "db.operation.name": "FCALL",
            "ratelimitd.script": script.name,
            "ratelimitd.organization_id": org[1] if org else "",
        }
        with self._tracer.start_as_current_span(
            f"FCALL {script.name}", kind=SpanKind.CLIENT, attributes=attributes
        ) as span:
            reply = await self._connection.run_script(script, keys, args)
            if outcome := _outcome(script.name, reply):
                span.set_attribute("ratelimitd.outcome", outcome)
            return reply


def _outcome(script: str, reply: Any) -> str:
    """What decide.lua or report.lua answered, by the engine's names (their reply's first element)."""
    if script not in ("decide", "report"):
        return ""
    status = int(reply[0])
    try:
        return (Outcome if script == "decide" else ReportResult)(status).name.lower()
    except ValueError:  # report.lua's refusals (an unknown key, no reservation...): errors for the caller
        return f"status_{status}"
