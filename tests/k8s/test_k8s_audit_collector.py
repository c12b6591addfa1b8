"""The audit exporter's spans and the gateway metrics reach the real OpenTelemetry Collector.

The records are written with the real AuditLog; the exporter reads them from the
directory and POSTs protobuf to the Collector, which writes what it decoded to its file
exporter. The Collector goes down mid-run and a new one comes up on another port: the
exporter, pointed at it, sends what the first never acknowledged. And a real gateway,
with a real client over TLS, exports spans and metrics whose names and attributes follow
the OpenTelemetry conventions as the Collector decodes them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway_harness import POLICY, RunningGateway
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
from querywarden.audit.recorder import pool_name
from querywarden.devcluster import EphemeralCluster
from querywarden.policy import PolicyDocument
from querywarden.tlsutil import write_self_signed

SPAN_KIND_CLIENT = 3


def write_session(log: AuditLog, sid: str, statements: int, *, end: bool = True) -> None:
    log.append(
        "session.connect",
        session_id=sid,
        principal={
            "subject": "agent-1",
            "issuer": "https://idp.example",
            "groups": ["ai"],
            "name": "Agent One",
        },
        client_address="10.1.2.3:50000",
        database="shop",
        upstream_user="app",
        application_name="agent",
        tls={"version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256"},
        server_address="db.internal:5433",
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
    assert session.attributes["user.roles"] == ["ai"]
    assert session.attributes["user.name"] == "Agent One"
    assert session.attributes["tls.protocol.name"] == "tls"
    assert session.attributes["tls.protocol.version"] == "1.3"
    assert session.attributes["tls.cipher"] == "TLS_AES_128_GCM_SHA256"
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
        "db.query.summary": "SELECT public.customers",
        "db.operation.name": "SELECT",
        "db.collection.name": "public.customers",
        "db.response.returned_rows": 2,
        "client.address": "10.1.2.3",
        "client.port": 50000,
        "server.address": "db.internal",
        "server.port": 5433,
        "querywarden.session.id": sid,
        "querywarden.statement.id": f"{sid}-1",
        "user.id": "agent-1",
        "user.name": "Agent One",
        "user.roles": ["ai"],
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
    metrics.operation_duration(0.0007, ("shop", "db.internal", 5433, "allow", None))
    metrics.operation_duration(0.003, ("shop", "db.internal", 5433, "allow", None))
    metrics.connection_opened(pool_name("shop", "db.internal", 5433))
    metrics.shutdown()  # exports once more

    deadline = time.monotonic() + 20
    found = _metrics_of(otel_collector, instance)
    while "db.client.operation.duration" not in found and time.monotonic() < deadline:
        time.sleep(0.1)
        found = _metrics_of(otel_collector, instance)
    duration = found["db.client.operation.duration"]
    assert duration["unit"] == "s"
    histogram = duration["histogram"]["dataPoints"][0]
    assert histogram["count"] in ("2", 2)
    assert histogram["sum"] == pytest.approx(0.0037)
    assert attributes(histogram["attributes"]) == {
        "db.system.name": "postgresql",
        "db.namespace": "shop",
        "server.address": "db.internal",
        "server.port": 5433,
        "querywarden.decision": "allow",
    }
    connections = found["db.client.connection.count"]
    assert connections["sum"].get("isMonotonic", False) is False  # an up-down counter
    (point,) = connections["sum"]["dataPoints"]
    assert int(point["asInt"]) == 1
    assert attributes(point["attributes"]) == {
        "db.client.connection.state": "used",
        "db.client.connection.pool.name": "db.internal:5433/shop",
    }
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


def test_the_gateway_s_spans_and_metrics_follow_the_conventions(
    make_gateway: Callable[..., RunningGateway],
    pg: EphemeralCluster,
    otel_collector: Collector,
    tmp_path: Path,
) -> None:
    """A real gateway, a real client over TLS, the real Collector: names as it decodes them."""
    pg.psql(
        "CREATE TABLE IF NOT EXISTS qc_people (id int);"
        "CREATE TABLE IF NOT EXISTS qc_secrets (id int);"
        "GRANT ALL ON qc_people, qc_secrets TO PUBLIC;"
    )
    cert, key = write_self_signed(tmp_path / "tls", "gateway", hostname="localhost")
    policy = PolicyDocument.model_validate(
        {
            "identity": POLICY.identity.model_dump(by_alias=True),
            "rules": [
                {
                    "name": "agents-read",
                    "subjects": {"groups": ["ai-agents"]},
                    "allow": {"operations": ["select"], "tables": ["public.*", "pg_catalog.*"]},
                    "deny": {"tables": ["public.qc_secrets"]},
                }
            ],
        }
    )
    application = f"collector-{uuid.uuid4().hex[:8]}"
    gw = make_gateway(
        policy=policy,
        tls={"certFile": str(cert), "keyFile": str(key)},
        audit={"directory": str(tmp_path / "audit"), "otlpEndpoint": otel_collector.endpoint},
    )
    try:
        dsn = gw.dsn("alice", sslmode="require", application_name=application)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT id FROM qc_people").fetchall()
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT * FROM qc_secrets")
        (session,) = otel_collector.wait_for_spans(
            lambda s: s.attributes.get("querywarden.session.application_name") == application,
            count=1,
        )
        statements = otel_collector.wait_for_spans(
            lambda s: s.trace_id == session.trace_id and s.parent_span_id != "", count=2
        )
    finally:
        # Closing flushes the metrics once more: no waiting for the export interval.
        gw.call(gw.gateway.close(), timeout=20)
        pg.psql("DROP TABLE qc_people, qc_secrets")

    assert session.resource["service.name"] == "querywarden"
    identity = {"user.id": "alice", "user.roles": ["ai-agents"]}
    upstream = {"server.address": "127.0.0.1", "server.port": pg.port}
    assert {k: session.attributes.get(k) for k in {**identity, **upstream}} == {
        **identity,
        **upstream,
    }
    assert session.attributes["tls.protocol.name"] == "tls"
    assert session.attributes["tls.protocol.version"] in ("1.2", "1.3")
    assert not any(
        k.startswith("querywarden.principal.") and k != "querywarden.principal.issuer"
        for k in session.attributes
    )
    by_decision = {s.attributes["querywarden.decision"]: s for s in statements}
    select = by_decision["allow"]
    assert select.name == "SELECT public.qc_people"
    assert {
        k: select.attributes.get(k)
        for k in ("db.query.summary", "db.collection.name", "db.operation.name", "db.namespace")
    } == {
        "db.query.summary": "SELECT public.qc_people",
        "db.collection.name": "public.qc_people",
        "db.operation.name": "SELECT",
        "db.namespace": "app",
    }
    assert select.attributes["server.port"] == pg.port
    refused = by_decision["refuse"]
    assert refused.attributes["db.collection.name"] == "public.qc_secrets"
    assert refused.attributes["error.type"] == "42501"

    def gateway_metrics() -> dict[str, Any] | None:
        found: dict[str, Any] = {}
        for request in otel_collector.records("metrics"):
            for resource_metrics in request.get("resourceMetrics", []):
                for scope_metrics in resource_metrics.get("scopeMetrics", []):
                    for metric in scope_metrics.get("metrics", []):
                        data = metric.get("histogram") or metric.get("sum") or {}
                        points = [
                            p
                            for p in data.get("dataPoints", [])
                            if attributes(p.get("attributes", [])).get("server.port") == pg.port
                            or f":{pg.port}/"
                            in str(
                                attributes(p.get("attributes", [])).get(
                                    "db.client.connection.pool.name"
                                )
                            )
                        ]
                        if points:
                            found[metric["name"]] = {**metric, "points": points}
                        if metric["name"].startswith("querywarden."):
                            found.setdefault(metric["name"], metric)
                    if scope_metrics.get("scope", {}).get("name") == "querywarden":
                        found["schema"] = scope_metrics.get("schemaUrl")
        wanted = {"db.client.operation.duration", "db.client.connection.count"}
        return found if wanted <= set(found) else None

    deadline = time.monotonic() + 20
    metrics = gateway_metrics()
    while metrics is None and time.monotonic() < deadline:
        time.sleep(0.1)
        metrics = gateway_metrics()
    assert metrics is not None, "the gateway's metrics never reached the Collector"
    duration = metrics["db.client.operation.duration"]
    assert duration["unit"] == "s"
    assert sum(int(p["count"]) for p in duration["points"]) == 2
    assert all(0 < float(p["sum"]) < 1 for p in duration["points"])  # seconds
    (connections,) = metrics["db.client.connection.count"]["points"]
    assert int(connections.get("asInt", 0)) == 0  # the session ended before the last export
    assert {"querywarden.decisions", "querywarden.masked_values"} <= set(metrics)
    assert metrics["schema"] == "https://opentelemetry.io/schemas/1.44.0"
