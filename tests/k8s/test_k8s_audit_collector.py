"""The audit exporter's spans and the gateway metrics reach the real OpenTelemetry Collector.

The records are written with the real AuditLog; the exporter reads them from the
directory and POSTs protobuf to the Collector, which writes what it decoded to its file
exporter. The Collector goes down mid-run and a new one comes up on another port: the
exporter, pointed at it, sends what the first never acknowledged.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from k8sharness.collector import (
    SPAN_KIND_SERVER,
    STATUS_CODE_ERROR,
    STATUS_CODE_UNSET,
    Collector,
    ReceivedSpan,
    attributes,
)
from querywarden.audit.export import (
    ExportError,
    LogExporter,
    read_offset,
    session_span_id,
    statement_span_id,
    trace_id_of,
)
from querywarden.audit.log import AuditLog
from querywarden.audit.metrics import GatewayMetrics

SPAN_KIND_CLIENT = 3


def write_session(log: AuditLog, sid: str, statements: int, *, end: bool = True) -> None:
    log.append(
        "session.connect",
        session_id=sid,
        principal={"subject": "agent-1", "issuer": "https://idp.example", "groups": ["ai"]},
        client_address="10.1.2.3:50000",
        database="shop",
        upstream_user="app",
        application_name="agent",
        tls={"version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256"},
    )
    for n in range(1, statements + 1):
        refused = n == 2
        log.append(
            "statement.request",
            session_id=sid,
            statement_id=f"{sid}-{n}",
            kind="query",
            text="SELECT email FROM public.customers" if not refused else "DROP TABLE orders",
            statement_name="",
            summary={
                "operations": ["ddl", "ddl:drop", "ddl:drop_table"] if refused else ["select"],
                "reads": [] if refused else ["public.customers"],
                "writes": ["public.orders"] if refused else [],
                "functions": [],
            },
            decision={
                "outcome": "refuse" if refused else "allow",
                "rule": "agents-read-only",
                "reason": "agents may not drop tables" if refused else None,
                "sqlstate": "42501" if refused else None,
            },
            approval=None,
        )
        log.append(
            "statement.result",
            session_id=sid,
            statement_id=f"{sid}-{n}",
            duration_ms=0.8,
            rows=None if refused else 2,
            command=None if refused else "SELECT 2",
            sqlstate="42501" if refused else None,
            error="agents may not drop tables" if refused else None,
            masking={} if refused else {"email": 2},
            response={"bytes": 90, "digest": "1" * 64},
            sample=[],
        )
    if end:
        log.append(
            "session.end",
            session_id=sid,
            duration_ms=10.0,
            statements=statements,
            refused=1,
            masking={"email": 2 * (statements - 1)},
        )


def spans_of(collector: Collector, instance: str, count: int) -> dict[str, ReceivedSpan]:
    spans = collector.wait_for_spans(
        lambda s: s.resource.get("service.instance.id") == instance, count=count
    )
    return {span.span_id: span for span in spans}


def test_audit_spans_reach_the_collector(otel_collector: Collector, tmp_path: Path) -> None:
    instance = f"gw-{uuid.uuid4().hex[:8]}"  # the session's Collector is shared
    sid = f"sess-{uuid.uuid4().hex[:8]}"
    with AuditLog(tmp_path / "audit", fsync="always") as log:
        write_session(log, sid, 3)
        log.append(
            "session.auth_failed",
            client_address="10.9.9.9:1234",
            user="agent-2",
            database="shop",
            reason="token expired",
            sqlstate="28000",
        )
        log.sync()
        exporter = LogExporter(tmp_path / "audit", otel_collector.endpoint, instance_id=instance)
        assert exporter.export_pending() == 5

    spans = spans_of(otel_collector, instance, 5)
    session = spans[session_span_id(sid).hex()]
    select = spans[statement_span_id(f"{sid}-1").hex()]
    refused = spans[statement_span_id(f"{sid}-2").hex()]
    (failed,) = [s for s in spans.values() if s.name == "querywarden.auth_failed"]

    assert session.name == "querywarden.session"
    assert session.trace_id == trace_id_of(sid).hex()
    assert session.parent_span_id == ""
    assert session.kind == SPAN_KIND_SERVER
    assert session.scope == "querywarden.audit"
    assert session.resource["service.name"] == "querywarden"
    assert session.attributes["querywarden.principal.groups"] == ["ai"]
    assert session.attributes["tls.protocol.version"] == "TLSv1.3"
    assert session.attributes["querywarden.masking.email"] == 4

    assert select.name == "SELECT public.customers"
    assert select.kind == SPAN_KIND_CLIENT
    assert select.trace_id == session.trace_id
    assert select.parent_span_id == session.span_id
    assert select.status_code == STATUS_CODE_UNSET
    expected: dict[str, Any] = {
        "db.system.name": "postgresql",
        "db.namespace": "shop",
        "db.query.text": "SELECT email FROM public.customers",
        "db.operation.name": "SELECT",
        "db.collection.name": "public.customers",
        "db.response.returned_rows": 2,
        "client.address": "10.1.2.3",
        "client.port": 50000,
        "querywarden.session.id": sid,
        "querywarden.statement.id": f"{sid}-1",
        "querywarden.principal.subject": "agent-1",
        "querywarden.principal.issuer": "https://idp.example",
        "querywarden.decision": "allow",
        "querywarden.rule": "agents-read-only",
        "querywarden.masked_values": 2,
        "querywarden.masking.email": 2,
    }
    assert {k: select.attributes.get(k) for k in expected} == expected

    assert refused.name == "DROP public.orders"
    assert refused.status_code == STATUS_CODE_ERROR
    assert refused.status_message == "agents may not drop tables"
    assert refused.attributes["querywarden.decision"] == "refuse"
    assert refused.attributes["db.response.status_code"] == "42501"

    assert failed.status_code == STATUS_CODE_ERROR
    assert failed.attributes["querywarden.reason"] == "token expired"
    assert failed.trace_id != session.trace_id


def test_collector_down_then_another_one_up(otel_collector: Collector, tmp_path: Path) -> None:
    instance = f"gw-{uuid.uuid4().hex[:8]}"
    directory = tmp_path / "audit"
    first = Collector(tmp_path / "first")
    (tmp_path / "first").mkdir()
    first.start()
    try:
        with AuditLog(directory, fsync="always") as log:
            write_session(log, "a-" + instance, 2)
            log.sync()
            exporter = LogExporter(directory, first.endpoint, instance_id=instance)
            assert exporter.export_pending() == 3
            spans_of(first, instance, 3)
            first.stop()  # the Collector goes away; the gateway goes on logging
            write_session(log, "b-" + instance, 4)
            log.sync()
            before = read_offset(directory / "otlp.offset")
            with pytest.raises(ExportError):
                exporter.export_pending()
            assert read_offset(directory / "otlp.offset") == before
    finally:
        first.stop()

    # The session's Collector plays the one that comes back (another address), and a new
    # exporter plays the restarted gateway: same directory, same offset file.
    exporter = LogExporter(directory, otel_collector.endpoint, instance_id=instance)
    assert exporter.export_pending() == 5
    spans = spans_of(otel_collector, instance, 5)
    ids = {s.attributes.get("querywarden.statement.id") for s in spans.values()}
    assert {f"b-{instance}-{n}" for n in range(1, 5)} <= ids


def test_metrics_reach_the_collector(otel_collector: Collector) -> None:
    instance = f"gw-{uuid.uuid4().hex[:8]}"
    metrics = GatewayMetrics(otel_collector.endpoint, instance_id=instance, export_interval=60)
    metrics.decision("allow", "agents-read-only")
    metrics.decision("refuse", "agents-read-only")
    metrics.masked(4)
    metrics.auth_refused("expired")
    metrics.statement_latency(0.7, "allow")
    metrics.statement_latency(3.0, "allow")
    metrics.shutdown()  # exports once more

    deadline = time.monotonic() + 20
    found = _metrics_of(otel_collector, instance)
    while "querywarden.statement.duration" not in found and time.monotonic() < deadline:
        time.sleep(0.1)
        found = _metrics_of(otel_collector, instance)
    histogram = found["querywarden.statement.duration"]["histogram"]["dataPoints"][0]
    assert histogram["count"] in ("2", 2)
    assert attributes(histogram["attributes"]) == {"outcome": "allow"}
    decisions = found["querywarden.decisions"]["sum"]["dataPoints"]
    assert {
        (attributes(p["attributes"])["outcome"], int(p.get("asInt", 0))) for p in decisions
    } == {("allow", 1), ("refuse", 1)}
    assert found["querywarden.masked_values"]["sum"]["dataPoints"][0]["asInt"] in ("4", 4)


def _metrics_of(collector: Collector, instance: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for request in collector.records("metrics"):
        for resource_metrics in request.get("resourceMetrics", []):
            resource = attributes(resource_metrics.get("resource", {}).get("attributes", []))
            if resource.get("service.instance.id") != instance:
                continue
            for scope_metrics in resource_metrics.get("scopeMetrics", []):
                for metric in scope_metrics.get("metrics", []):
                    found[metric["name"]] = metric
    return found
