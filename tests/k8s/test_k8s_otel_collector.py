"""Spans sent with the OpenTelemetry SDK over OTLP/HTTP reach the Collector intact."""

from __future__ import annotations

import uuid

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode, format_span_id, format_trace_id

from k8sharness.collector import (
    SPAN_KIND_INTERNAL,
    SPAN_KIND_SERVER,
    STATUS_CODE_ERROR,
    STATUS_CODE_UNSET,
    Collector,
)


def test_spans_sent_over_otlp_are_written_by_the_file_exporter(otel_collector: Collector) -> None:
    # A service name of this test's own: the session's Collector is shared.
    service = f"querywarden-harness-{uuid.uuid4().hex[:8]}"
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(
        SimpleSpanProcessor(
            OTLPSpanExporter(endpoint=f"{otel_collector.endpoint}/v1/traces", timeout=10)
        )
    )
    # A tracer of its own, not the global one: nothing else in the session is affected.
    tracer = provider.get_tracer("querywarden.tests.k8s")
    try:
        with tracer.start_as_current_span("session", kind=SpanKind.SERVER) as session:
            session.set_attribute("db.system.name", "postgresql")
            session.set_attribute("enduser.id", "system:serviceaccount:apps:agent")
            with tracer.start_as_current_span("statement") as statement:
                statement.set_attribute("db.query.text", "DROP TABLE orders")
                statement.set_attribute("querywarden.decision", "deny")
                statement.set_attribute("querywarden.rows", 0)
                statement.set_attribute("querywarden.masked", True)
                statement.set_attribute("querywarden.groups", ["ai-agents", "dba"])
                statement.set_status(Status(StatusCode.ERROR, "refused by policy"))
        sent_session, sent_statement = session.get_span_context(), statement.get_span_context()
    finally:
        provider.shutdown()

    spans = otel_collector.wait_for_spans(
        lambda s: s.resource.get("service.name") == service, count=2
    )

    by_name = {span.name: span for span in spans}
    assert sorted(by_name) == ["session", "statement"]
    received_session, received_statement = by_name["session"], by_name["statement"]
    assert received_session.trace_id == format_trace_id(sent_session.trace_id)
    assert received_session.span_id == format_span_id(sent_session.span_id)
    assert received_statement.trace_id == received_session.trace_id
    assert received_statement.span_id == format_span_id(sent_statement.span_id)
    assert received_statement.parent_span_id == received_session.span_id
    assert received_session.parent_span_id == ""
    assert received_session.scope == "querywarden.tests.k8s"
    assert (received_session.kind, received_statement.kind) == (
        SPAN_KIND_SERVER,
        SPAN_KIND_INTERNAL,
    )
    assert received_session.status_code == STATUS_CODE_UNSET
    assert received_statement.status_code == STATUS_CODE_ERROR
    assert received_statement.status_message == "refused by policy"
    assert received_session.attributes == {
        "db.system.name": "postgresql",
        "enduser.id": "system:serviceaccount:apps:agent",
    }
    assert received_statement.attributes == {
        "db.query.text": "DROP TABLE orders",
        "querywarden.decision": "deny",
        "querywarden.rows": 0,
        "querywarden.masked": True,
        "querywarden.groups": ["ai-agents", "dba"],
    }
    assert received_session.resource["telemetry.sdk.language"] == "python"
    assert len(spans) == 2  # each span exactly once
