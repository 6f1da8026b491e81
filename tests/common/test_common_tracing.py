"""Spans are recorded while something exports them; before that a span is its context only."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dlforge.common.tracing import WhenExported, _export, extract_context, inject_headers


def test_without_an_exporter_spans_carry_ids_but_are_not_recorded_and_with_one_they_are() -> None:
    provider = TracerProvider(sampler=WhenExported())
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("quiet") as span:
        ctx = span.get_span_context()
        assert not span.is_recording() and ctx.is_valid and not ctx.trace_flags.sampled
        headers = inject_headers()
        assert headers["traceparent"].split("-")[1] == format(ctx.trace_id, "032x")
    # a child (e.g. the consumer of a message) continues the trace it was sent
    with tracer.start_as_current_span("child", context=extract_context(headers)) as child:
        assert child.get_span_context().trace_id == ctx.trace_id

    exporter = InMemorySpanExporter()
    _export(provider, SimpleSpanProcessor(exporter))
    with tracer.start_as_current_span("exported") as span:
        assert span.is_recording() and span.get_span_context().trace_flags.sampled
    assert [s.name for s in exporter.get_finished_spans()] == ["exported"]
