"""OpenTelemetry set-up: traces and metrics, W3C context in message headers.

One provider per process. When ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, spans and metrics are
exported over OTLP/HTTP (Jaeger, an OTel collector or Arize Phoenix receive them).

Spans are recorded only while something exports them (an OTLP endpoint, or an exporter given to
:func:`configure_telemetry`). Without one a span is only its context: its trace and span ids are
made, travel in headers and name the trace in error bodies and logs, but nothing is recorded (a
recorded span nobody reads costs tens of microseconds; a label submission makes several).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Decision, ParentBased, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

_PROPAGATOR = TraceContextTextMapPropagator()


class WhenExported(Sampler):
    """``ParentBased(ALWAYS_ON)`` while a span processor takes the spans; before that, drop (a span is
    then its context only: ids, no attributes, nothing recorded)."""

    def __init__(self) -> None:
        self.exporting = False
        self._inner = ParentBased(ALWAYS_ON)

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if self.exporting:
            return self._inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)
        parent = trace.get_current_span(parent_context).get_span_context()
        return SamplingResult(Decision.DROP, None, parent.trace_state if parent.is_valid else None)

    def get_description(self) -> str:
        return f"WhenExported({self._inner.get_description()})"
_LOCK = threading.Lock()
_CONFIGURED = False


def configure_telemetry(
    service_name: str = "dlforge",
    *,
    span_exporter: SpanExporter | None = None,
    metric_reader: MetricReader | None = None,
) -> None:
    """Install the process-wide providers once (later calls only add a given exporter/reader)."""
    global _CONFIGURED
    with _LOCK:
        provider = trace.get_tracer_provider()
        if not _CONFIGURED or not isinstance(provider, TracerProvider):
            resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
            provider = TracerProvider(resource=resource, sampler=WhenExported())
            readers: list[MetricReader] = []
            endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            if endpoint:
                from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                _export(provider, BatchSpanProcessor(OTLPSpanExporter()))
                readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
            if metric_reader is not None:
                readers.append(metric_reader)
                metric_reader = None
            trace.set_tracer_provider(provider)
            metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
            _CONFIGURED = True
        if span_exporter is not None:
            _export(provider, SimpleSpanProcessor(span_exporter))  # type: ignore[arg-type]


def _export(provider: TracerProvider, processor: SpanProcessor) -> None:
    """Add ``processor``; from now on spans are recorded (see :class:`WhenExported`)."""
    provider.add_span_processor(processor)
    if isinstance(provider.sampler, WhenExported):
        provider.sampler.exporting = True


_TRACER: tuple[object, trace.Tracer] | None = None


def tracer() -> trace.Tracer:
    """The dlforge tracer of the current provider (cached: creating one per span is costly)."""
    global _TRACER
    provider = trace.get_tracer_provider()
    cached = _TRACER
    if cached is None or cached[0] is not provider:
        cached = _TRACER = (provider, trace.get_tracer("dlforge"))
    return cached[1]


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers carrying the current span's W3C trace context."""
    carrier: dict[str, str] = dict(headers or {})
    _PROPAGATOR.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str]) -> Context:
    return _PROPAGATOR.extract(carrier=dict(headers))


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else "-"


class EventMetrics:
    """Counters and a latency histogram for handled, failed and dead-lettered events."""

    def __init__(self) -> None:
        meter = metrics.get_meter("dlforge")
        self.handled = meter.create_counter("dlforge.events.handled", description="events handled")
        self.duplicates = meter.create_counter("dlforge.events.duplicates", description="duplicates skipped")
        self.failed = meter.create_counter("dlforge.events.failed", description="handler attempts that failed")
        self.dead_lettered = meter.create_counter("dlforge.events.dead_lettered", description="events dead-lettered")
        self.latency = meter.create_histogram(
            "dlforge.events.handle_seconds", unit="s", description="receive to commit, per event"
        )


def attach(ctx: Context) -> Any:
    return otel_context.attach(ctx)


def detach(token: Any) -> None:
    otel_context.detach(token)
