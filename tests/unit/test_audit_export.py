"""Audit records -> OTLP spans: mapping, ids, statuses, offsets, memory, delivery, metrics."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otlp_receiver import OtlpReceiver, attributes
from querywarden.audit import export
from querywarden.audit.export import (
    DirectorySource,
    ExportError,
    LogExporter,
    NameScope,
    OffsetState,
    SpanAssembler,
    collection_name,
    collection_names,
    operation_name,
    query_summary,
    read_offset,
    session_span_id,
    statement_span_id,
    tls_protocol,
    trace_id_of,
    write_offset,
)
from querywarden.audit.log import AuditFormatError, AuditLog, read_records
from querywarden.audit.metrics import DURATION_BOUNDS, GatewayMetrics
from querywarden.audit.recorder import pool_name

ERROR = Status.StatusCode.STATUS_CODE_ERROR
UNSET = Status.StatusCode.STATUS_CODE_UNSET


# --- records as the contract spells them --------------------------------------------------


class Records:
    """Builds contract records in order (seq, ts, prev) and serves them as a log reader."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.clock = 1_790_000_000.0
        #: The after_seq of every read: shows where each pass started.
        self.reads: list[int] = []

    def add(self, type_: str, **fields: Any) -> dict[str, Any]:
        seq = len(self.items) + 1
        self.clock += 0.001
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.clock))
        micros = round((self.clock % 1) * 1_000_000) % 1_000_000
        prev = hashlib.sha256(json.dumps(self.items[-1]).encode()).hexdigest() if seq > 1 else ""
        record = {
            "seq": seq,
            "ts": f"{stamp}.{micros:06d}Z",
            "type": type_,
            "prev": prev or "0" * 64,
            **fields,
        }
        self.items.append(record)
        return record

    def connect(self, sid: str, **extra: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "session_id": sid,
            "principal": {
                "subject": "agent-1",
                "issuer": "https://idp",
                "groups": ["a", "b"],
                "name": "Agent One",
            },
            "client_address": "10.0.0.7:51234",
            "database": "shop",
            "upstream_user": "app",
            "application_name": "psql",
            "tls": {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"},
            "server_address": "db.internal:5433",
        }
        fields.update(extra)
        return self.add("session.connect", **fields)

    def request(
        self,
        sid: str,
        n: int,
        text: str = "SELECT * FROM orders",
        *,
        refuse: bool = False,
        summary: Any = "default",
        **extra: Any,
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "session_id": sid,
            "statement_id": f"{sid}-{n}",
            "kind": "query",
            "text": text,
            "statement_name": "",
            "summary": summary
            if summary != "default"
            else {
                "operations": ["select"],
                "reads": ["public.orders"],
                "writes": [],
                "functions": [],
            },
            "decision": {
                "outcome": "refuse" if refuse else "allow",
                "rule": "agents-read",
                "reason": "orders.card is off limits" if refuse else None,
                "sqlstate": "42501" if refuse else None,
            },
            "approval": None,
        }
        fields.update(extra)
        return self.add("statement.request", **fields)

    def result(self, sid: str, n: int, **extra: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "session_id": sid,
            "statement_id": f"{sid}-{n}",
            "duration_ms": 1.5,
            "rows": 3,
            "command": "SELECT 3",
            "sqlstate": None,
            "error": None,
            "masking": {"email": 2, "card": 1},
            "response": {"bytes": 120, "digest": "ab" * 32},
            "sample": [["1", "x***"]],
        }
        fields.update(extra)
        return self.add("statement.result", **fields)

    def end(self, sid: str, **extra: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "session_id": sid,
            "duration_ms": 20.0,
            "statements": 2,
            "refused": 1,
            "masking": {"email": 2},
        }
        fields.update(extra)
        return self.add("session.end", **fields)

    # A RecordSource over these records (no files), with a settable durable limit.

    durable: int | None = None

    def records(self, after_seq: int, up_to: int | None) -> Iterator[dict[str, Any]]:
        self.reads.append(after_seq)
        for record in self.items:
            if up_to is not None and record["seq"] > up_to:
                return
            if record["seq"] > after_seq:
                yield record

    def durable_seq(self) -> int | None:
        return self.durable


def feed_all(assembler: SpanAssembler, records: Records) -> list[Span]:
    spans: list[Span] = []
    for record in records.items:
        spans.extend(feed(assembler, record))
    return spans


def feed(assembler: SpanAssembler, record: dict[str, Any]) -> list[Span]:
    """Feed one record; decode the spans it completes with opentelemetry-proto."""
    return [Span.FromString(encoded) for encoded in assembler.feed(record)]


def attrs(span: Span) -> dict[str, Any]:
    return attributes(span.attributes)


def sha(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


# --- ids ----------------------------------------------------------------------------------


def test_ids_are_the_documented_hashes() -> None:
    assert trace_id_of("s1") == sha("s1")[:16]
    assert session_span_id("s1") == sha("session:s1")[:8]
    assert statement_span_id("s1-1") == sha("s1-1")[:8]
    assert len(trace_id_of("s1")) == 16
    assert len(session_span_id("s1")) == 8


def test_the_same_records_give_the_same_spans() -> None:
    records = Records()
    records.connect("s1")
    records.request("s1", 1)
    records.result("s1", 1)
    records.end("s1")
    records.add(
        "session.auth_failed",
        client_address="1.2.3.4:5",
        user="x",
        database="d",
        reason="expired token",
        sqlstate="28000",
    )
    first = [s.SerializeToString() for s in feed_all(SpanAssembler(), records)]
    second = [s.SerializeToString() for s in feed_all(SpanAssembler(), records)]
    assert first == second
    assert len(first) == 3


# --- the hand-written wire format ---------------------------------------------------------


def official(value: Any) -> AnyValue:
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    return AnyValue(array_value=ArrayValue(values=[official(v) for v in value]))


scalars = (
    st.text()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
)


@given(scalars | st.lists(scalars, max_size=5))
def test_values_are_encoded_as_protobuf_encodes_them(value: Any) -> None:
    assert export._any_value(value) == official(value).SerializeToString()


@pytest.mark.parametrize("size", [0, 127, 128, 16383, 16384, 70_000])
def test_long_values_and_lengths(size: int) -> None:
    value = "é" * size
    assert export._any_value(value) == official(value).SerializeToString()
    encoded = export._attribute("k", value)
    assert Span.FromString(encoded).attributes[0] == KeyValue(key="k", value=official(value))


def test_a_span_encodes_every_field_as_protobuf_does() -> None:
    parts = export._SpanParts(
        b"t" * 16, b"s" * 8, b"p" * 8, "naïve", 3, 2**62, 2**62 + 5, bytearray()
    )
    parts.attributes += export._attribute("a", 1)
    parts.error("bad ünicode")
    expected = Span(
        trace_id=b"t" * 16,
        span_id=b"s" * 8,
        parent_span_id=b"p" * 8,
        name="naïve",
        kind=Span.SpanKind.SPAN_KIND_CLIENT,
        start_time_unix_nano=2**62,
        end_time_unix_nano=2**62 + 5,
        attributes=[KeyValue(key="a", value=AnyValue(int_value=1))],
        status=Status(code=ERROR, message="bad ünicode"),
    )
    assert Span.FromString(parts.encode()) == expected
    assert parts.encode() == expected.SerializeToString()


# --- mapping ------------------------------------------------------------------------------


def test_session_and_statement_spans() -> None:
    records = Records()
    connect = records.connect("s1")
    request = records.request("s1", 1)
    result = records.result("s1", 1)
    end = records.end("s1")
    statement, session = feed_all(SpanAssembler(), records)

    assert session.name == "querywarden.session"
    assert session.kind == Span.SpanKind.SPAN_KIND_SERVER
    assert session.trace_id == trace_id_of("s1")
    assert session.span_id == session_span_id("s1")
    assert session.parent_span_id == b""
    assert session.status.code == UNSET
    assert attrs(session) == {
        "db.system.name": "postgresql",
        "db.namespace": "shop",
        "client.address": "10.0.0.7",
        "client.port": 51234,
        "server.address": "db.internal",
        "server.port": 5433,
        "querywarden.session.id": "s1",
        "user.id": "agent-1",
        "user.name": "Agent One",
        "user.roles": ["a", "b"],
        "querywarden.principal.issuer": "https://idp",
        "querywarden.session.upstream_user": "app",
        "querywarden.session.application_name": "psql",
        "tls.protocol.name": "tls",
        "tls.protocol.version": "1.3",
        "tls.cipher": "TLS_AES_256_GCM_SHA384",
        "querywarden.audit.seq": connect["seq"],
        "querywarden.session.statements": 2,
        "querywarden.session.refused": 1,
        "querywarden.masked_values": 2,
        "querywarden.masking.email": 2,
    }

    assert statement.name == "SELECT public.orders"
    assert statement.kind == Span.SpanKind.SPAN_KIND_CLIENT
    assert statement.trace_id == session.trace_id
    assert statement.parent_span_id == session.span_id
    assert statement.span_id == statement_span_id("s1-1")
    assert statement.status.code == UNSET
    assert attrs(statement) == {
        "db.system.name": "postgresql",
        "db.namespace": "shop",
        "client.address": "10.0.0.7",
        "client.port": 51234,
        "server.address": "db.internal",
        "server.port": 5433,
        "querywarden.session.id": "s1",
        "user.id": "agent-1",
        "user.name": "Agent One",
        "user.roles": ["a", "b"],
        "querywarden.principal.issuer": "https://idp",
        "db.query.text": "SELECT * FROM orders",
        "db.query.summary": "SELECT public.orders",
        "db.operation.name": "SELECT",
        "db.collection.name": "public.orders",
        "querywarden.statement.id": "s1-1",
        "querywarden.statement.kind": "query",
        "querywarden.summary.operations": ["select"],
        "querywarden.summary.reads": ["public.orders"],
        "querywarden.decision": "allow",
        "querywarden.rule": "agents-read",
        "querywarden.audit.seq": request["seq"],
        "db.response.returned_rows": 3,
        "querywarden.command": "SELECT 3",
        "querywarden.duration_ms": 1.5,
        "querywarden.masked_values": 3,
        "querywarden.masking.card": 1,
        "querywarden.masking.email": 2,
        "querywarden.response.bytes": 120,
        "querywarden.response.digest": "ab" * 32,
        "querywarden.audit.result_seq": result["seq"],
    }
    # Times come from the records, to the microsecond.
    assert statement.start_time_unix_nano < statement.end_time_unix_nano
    assert session.start_time_unix_nano < statement.start_time_unix_nano
    assert session.end_time_unix_nano > statement.end_time_unix_nano
    assert statement.start_time_unix_nano % 1000 == 0
    stamp = request["ts"]
    assert statement.start_time_unix_nano // 10**9 == int(
        time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    )
    assert end["seq"] == 4


def test_exact_microseconds() -> None:
    assembler = SpanAssembler()
    assembler.feed(
        {
            "seq": 1,
            "ts": "2026-11-24T06:20:00.123456Z",
            "type": "session.connect",
            "session_id": "s",
        }
    )
    (span,) = feed(
        assembler,
        {"seq": 2, "ts": "2026-11-24T06:20:01.000001Z", "type": "session.end", "session_id": "s"},
    )
    assert span.start_time_unix_nano == 1795501200_123456000
    assert span.end_time_unix_nano == 1795501201_000001000


def test_refused_statement_is_an_error_with_the_reason() -> None:
    records = Records()
    records.connect("s1")
    records.request("s1", 1, "SELECT card FROM orders", refuse=True)
    records.result("s1", 1, rows=None, command=None, sqlstate="42501", error="refused", masking={})
    (span,) = feed_all(SpanAssembler(), records)
    assert span.status.code == ERROR
    assert span.status.message == "orders.card is off limits"
    a = attrs(span)
    assert a["querywarden.decision"] == "refuse"
    assert a["querywarden.reason"] == "orders.card is off limits"
    assert a["db.response.status_code"] == "42501"
    assert a["error.type"] == "42501"
    assert a["querywarden.masked_values"] == 0


def test_refused_statement_without_a_result_closes_with_its_session() -> None:
    records = Records()
    records.connect("s1")
    request = records.request("s1", 1, refuse=True)
    records.end("s1")
    assembler = SpanAssembler()
    statement, session = feed_all(assembler, records)
    assert statement.span_id == statement_span_id("s1-1")
    assert statement.status.code == ERROR
    # Nothing ran: it ends where it started, and is not marked interrupted.
    assert statement.end_time_unix_nano == statement.start_time_unix_nano
    assert "querywarden.interrupted" not in attrs(statement)
    assert session.span_id == session_span_id("s1")
    assert assembler.safe_offset() == 3
    assert request["seq"] == 2


def test_allowed_statement_without_a_result_at_session_end_is_an_error() -> None:
    records = Records()
    records.connect("s1")
    records.request("s1", 1)
    records.end("s1")
    statement, _ = feed_all(SpanAssembler(), records)
    assert statement.status.code == ERROR
    assert "no result" in statement.status.message
    assert attrs(statement)["querywarden.interrupted"] is True


def test_server_error_carries_the_sqlstate() -> None:
    records = Records()
    records.connect("s1")
    records.request(
        "s1",
        1,
        "SELECT * FROM nope",
        summary={"operations": ["select"], "reads": ["public.nope"], "writes": [], "functions": []},
    )
    records.result(
        "s1",
        1,
        rows=None,
        command=None,
        sqlstate="42P01",
        error='relation "nope" does not exist',
        masking={},
    )
    (span,) = feed_all(SpanAssembler(), records)
    assert span.status.code == ERROR
    assert span.status.message == "SQLSTATE 42P01"
    a = attrs(span)
    assert a["db.response.status_code"] == "42P01"
    assert a["error.type"] == "42P01"
    # The server's message may quote a value: it leaves only with the raw text.
    assert "querywarden.error.message" not in a
    assert "db.response.returned_rows" not in a
    (span,) = feed_all(SpanAssembler(query_text="raw"), records)
    assert attrs(span)["querywarden.error.message"] == 'relation "nope" does not exist'


def test_auth_failed_is_a_standalone_span() -> None:
    records = Records()
    record = records.add(
        "session.auth_failed",
        client_address="[::1]:6000",
        user="agent",
        database="shop",
        reason="token expired",
        sqlstate="28000",
    )
    (span,) = feed_all(SpanAssembler(), records)
    assert span.name == "querywarden.auth_failed"
    assert span.parent_span_id == b""
    raw = sha(f"auth_failed:{record['seq']}:{record['prev']}")
    assert (span.trace_id, span.span_id) == (raw[:16], raw[16:24])
    assert span.status.code == ERROR
    assert span.status.message == "token expired"
    assert attrs(span) == {
        "db.system.name": "postgresql",
        "db.namespace": "shop",
        "client.address": "::1",
        "client.port": 6000,
        "querywarden.auth.user": "agent",
        "querywarden.reason": "token expired",
        "db.response.status_code": "28000",
        "error.type": "28000",
        "querywarden.audit.seq": 1,
    }


def test_approval_and_unusual_values() -> None:
    records = Records()
    records.connect("s1", tls=None, client_address="/tmp/.s.PGSQL.5432", application_name="")
    records.request(
        "s1",
        1,
        "DELETE FROM t WHERE x = '\ud800'",
        summary={"operations": ["delete"], "reads": [], "writes": ["public.t"], "functions": []},
        approval={"review_id": "r-9", "approvers": ["dba-1"], "ttl": 300, "scope": {"rows": 10}},
    )
    records.result("s1", 1, rows=2, command="DELETE 2")
    (span,) = feed_all(SpanAssembler(query_text="raw"), records)
    assert span.name == "DELETE public.t"
    a = attrs(span)
    assert a["client.address"] == "/tmp/.s.PGSQL.5432"
    assert "client.port" not in a
    assert a["db.query.text"] == "DELETE FROM t WHERE x = '\ufffd'"
    assert a["querywarden.approval.review_id"] == "r-9"
    assert a["querywarden.approval.approvers"] == ["dba-1"]
    assert a["querywarden.approval.ttl"] == 300
    assert json.loads(a["querywarden.approval.scope"]) == {"rows": 10}
    span.SerializeToString()  # encodable


@pytest.mark.parametrize(
    ("mode", "text", "exported", "name"),
    [
        (
            "normalized",
            "SELECT * FROM t WHERE ssn = '123-45-6789'",
            "SELECT * FROM t WHERE ssn = $1",
            "SELECT public.t",
        ),
        ("normalized", "/* 123-45-6789 */ SELECT 1 -- 123-45-6789", "SELECT $1", "SELECT public.t"),
        # Text that does not parse has no sanitized form: no text, and no name taken from it.
        ("normalized", "ALICE '123-45-6789'", None, "SELECT public.t"),
        ("normalized", "SELECT '\ud800'", None, "SELECT public.t"),
        (
            "raw",
            "SELECT * FROM t WHERE ssn = '123-45-6789'",
            "SELECT * FROM t WHERE ssn = '123-45-6789'",
            "SELECT public.t",
        ),
        ("none", "SELECT * FROM t WHERE ssn = '123-45-6789'", None, "SELECT public.t"),
    ],
)
def test_query_text_is_sanitized_unless_raw(
    mode: str, text: str, exported: str | None, name: str
) -> None:
    records = Records()
    records.connect("s1")
    records.request(
        "s1",
        1,
        text,
        summary={"operations": ["select"], "reads": ["public.t"], "writes": [], "functions": []},
    )
    records.result("s1", 1, rows=1, command="SELECT 1")
    (span,) = feed_all(SpanAssembler(query_text=mode), records)
    assert attrs(span).get("db.query.text") == exported
    assert span.name == name
    if mode != "raw":
        assert b"123-45-6789" not in span.SerializeToString()


def test_a_refusal_reason_quoting_the_input_is_scrubbed_unless_raw() -> None:
    records = Records()
    records.connect("s1")
    reason = """querywarden: syntax error at or near "'123-45-6789'"; the statement was not run"""
    decision = {"outcome": "refuse", "rule": None, "reason": reason, "sqlstate": "42601"}
    records.request("s1", 1, "SELECT 1 '123-45-6789'", summary=None, decision=decision)
    records.result("s1", 1, sqlstate="42601", error=reason)
    (span,) = feed_all(SpanAssembler(), records)
    assert "db.query.text" not in attrs(span)
    assert attrs(span)["querywarden.reason"] == (
        'querywarden: syntax error at or near "****"; the statement was not run'
    )
    assert span.status.message == attrs(span)["querywarden.reason"]
    assert b"123-45-6789" not in span.SerializeToString()
    (span,) = feed_all(SpanAssembler(query_text="raw"), records)
    assert attrs(span)["querywarden.reason"] == reason
    assert attrs(span)["db.query.text"] == "SELECT 1 '123-45-6789'"


def test_an_unknown_query_text_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="query_text"):
        SpanAssembler(query_text="sanitized")


def test_long_text_is_cut() -> None:
    records = Records()
    records.connect("s1")
    records.request("s1", 1, "SELECT " + "x" * 100_000)
    records.result("s1", 1)
    (span,) = feed_all(SpanAssembler(), records)
    a = attrs(span)
    assert len(a["db.query.text"]) == 32 * 1024
    assert a["querywarden.query.truncated"] is True


@pytest.mark.parametrize(
    ("text", "operations", "expected"),
    [
        ("SELECT 1", ["select"], "SELECT"),
        ("  -- hi\n/* c */ select * from t", ["select"], "SELECT"),
        ("WITH x AS (SELECT 1) DELETE FROM t", ["delete", "select"], "DELETE"),
        ("WITH x AS (SELECT 1) SELECT * FROM x", ["select"], "SELECT"),
        ("DROP TABLE t", ["ddl", "ddl:drop", "ddl:drop_table"], "DROP"),
        ("CREATE VIEW v AS SELECT 1", ["ddl:create_view"], "CREATE"),
        (
            "WITH x AS (DELETE FROM t RETURNING *) INSERT INTO u SELECT * FROM x",
            ["delete", "insert", "select"],
            "WITH",
        ),
        ("(SELECT 1) UNION (SELECT 2)", ["select"], "SELECT"),
        ("(TABLE t)", ["select", "ddl:x"], "SELECT"),
        ("TRUNCATE t", ["truncate"], "TRUNCATE"),
        ("(SELECT 1)", ["select"], "SELECT"),
        ("", None, None),
        ("VACUUM", None, "VACUUM"),
    ],
)
def test_operation_name(text: str, operations: list[str] | None, expected: str | None) -> None:
    summary = None if operations is None else {"operations": operations}
    assert operation_name(text, summary) == expected


def test_collection_name_prefers_the_written_relation_and_skips_wildcards() -> None:
    assert collection_name({"writes": ["public.a"], "reads": ["public.b"]}) == "public.a"
    assert collection_name({"writes": [], "reads": ["*.*", "public.b"]}) == "public.b"
    assert collection_name({"reads": [{"schema": "s", "name": "t"}]}) == "s.t"
    assert collection_name(None) is None


def test_collection_names_are_schema_qualified() -> None:
    # The log keeps names as written; the export resolves them as PostgreSQL would.
    assert collection_name({"reads": ["orders"]}) == "public.orders"
    assert collection_name({"reads": ["pg_class"]}) == "pg_catalog.pg_class"
    assert collection_name({"reads": ["s.t"]}) == "s.t"
    assert collection_name({"reads": ["orders"]}, NameScope(("app",))) == "app.orders"
    # Several schemas may be on the path: which one holds it would be a guess.
    assert collection_name({"reads": ["orders"]}, NameScope(("app", "public"))) == "orders"
    # So is a name the session also made a temporary relation under.
    scratch = NameScope(temporary=frozenset({"orders"}))
    assert collection_names({"reads": ["orders", "pg_temp.orders", "t"]}, scratch) == [
        "orders",
        "pg_temp.orders",
        "public.t",
    ]


@pytest.mark.parametrize(
    ("operation", "summary", "expected"),
    [
        ("SELECT", {"reads": ["orders"]}, "SELECT public.orders"),
        ("SELECT", {"reads": ["customers", "orders"]}, "SELECT public.customers public.orders"),
        ("INSERT", {"writes": ["s.t"], "reads": ["orders"]}, "INSERT s.t SELECT public.orders"),
        ("UPDATE", {"writes": ["t"], "reads": ["t"]}, "UPDATE public.t"),
        ("SELECT", {"reads": []}, "SELECT"),
        ("VACUUM", None, "VACUUM"),
        (None, {"reads": ["t"]}, None),
    ],
)
def test_query_summary(
    operation: str | None, summary: dict[str, list[str]] | None, expected: str | None
) -> None:
    assert query_summary(operation, summary) == expected


def test_query_summary_is_capped_at_a_whole_name() -> None:
    summary = {"reads": [f"table_{n:04d}" for n in range(100)]}
    text = query_summary("SELECT", summary)
    assert text is not None
    assert len(text) <= 255
    assert text.split(" ")[-1].startswith("public.table_")
    assert len(text.split(" ")[-1]) == len("public.table_0000")


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("TLSv1.3", ("tls", "1.3")),
        ("TLSv1.2", ("tls", "1.2")),
        ("TLSv1", ("tls", "1")),
        ("SSLv3", ("ssl", "3")),
        ("unknown", (None, None)),
        (None, (None, None)),
    ],
)
def test_tls_protocol(version: str | None, expected: tuple[str | None, str | None]) -> None:
    assert tls_protocol(version) == expected


def test_a_temporary_relation_s_name_stays_as_written_from_its_creation_on() -> None:
    records = Records()
    records.connect("s1")
    before = {"operations": ["select"], "reads": ["scratch"], "writes": [], "functions": []}
    records.request("s1", 1, "SELECT * FROM scratch", summary=before)
    records.result("s1", 1)
    create = {"operations": ["ddl"], "reads": [], "writes": ["pg_temp.scratch"], "functions": []}
    records.request("s1", 2, "CREATE TEMP TABLE scratch (n int)", summary=create)
    records.result("s1", 2)
    records.request("s1", 3, "SELECT * FROM scratch", summary=before)
    records.result("s1", 3)
    first, created, after = feed_all(SpanAssembler(), records)
    assert attrs(first)["db.collection.name"] == "public.scratch"
    assert attrs(created)["db.collection.name"] == "pg_temp.scratch"
    assert attrs(after)["db.collection.name"] == "scratch"


def test_a_widened_search_path_leaves_names_as_written() -> None:
    records = Records()
    records.connect("s1")
    records.request(
        "s1",
        1,
        "SELECT * FROM orders",
        summary={"operations": ["select"], "reads": ["orders"], "writes": [], "functions": []},
        search_path=["app", "public"],
    )
    records.result("s1", 1)
    (span,) = feed_all(SpanAssembler(), records)
    a = attrs(span)
    assert span.name == "SELECT orders"
    assert a["db.query.summary"] == "SELECT orders"
    assert a["db.collection.name"] == "orders"


def test_function_call_without_text_is_named_generically() -> None:
    records = Records()
    records.connect("s1")
    records.request("s1", 1, "", summary=None, kind="function_call")
    records.result("s1", 1)
    (span,) = feed_all(SpanAssembler(), records)
    assert span.name == "querywarden.statement"
    assert "db.operation.name" not in attrs(span)


# --- pending records and the restart offset -----------------------------------------------


def test_statements_are_exported_while_their_session_is_open() -> None:
    records = Records()
    records.connect("s1")  # 1
    records.request("s1", 1)  # 2
    records.request("s1", 2)  # 3 (pipelined)
    assembler = SpanAssembler()
    assert feed_all(assembler, records) == []
    assert assembler.safe_offset() == 0  # the connect is still needed
    (span,) = feed(assembler, records.result("s1", 2))  # 4
    assert span.span_id == statement_span_id("s1-2")
    assert assembler.safe_offset() == 0
    assert (assembler.open_sessions, assembler.open_statements) == (1, 1)


def test_safe_offset_is_the_oldest_needed_record_minus_one() -> None:
    records = Records()
    assembler = SpanAssembler()
    for record in (
        records.connect("a"),  # 1
        records.connect("b"),  # 2
        records.request("b", 1),  # 3
        records.end("a"),  # 4
    ):
        assembler.feed(record)
    assert assembler.safe_offset() == 1  # b's connect (2) is needed
    assembler.feed(records.result("b", 1))  # 5
    assert assembler.safe_offset() == 1
    assembler.feed(records.end("b"))  # 6
    assert assembler.safe_offset() == 6
    assembler.feed(records.add("review.created", review_id="r"))  # 7: unknown, nothing needed
    assert assembler.safe_offset() == 7


def test_memory_stays_bounded_in_a_long_session() -> None:
    records = Records()
    assembler = SpanAssembler()
    assembler.feed(records.connect("long"))
    exported = 0
    for n in range(1, 5001):
        assembler.feed(records.request("long", n))
        exported += len(assembler.feed(records.result("long", n)))
        assert assembler.open_statements == 0
        records.items.clear()  # the test keeps nothing either
    assert exported == 5000
    assert (assembler.open_sessions, assembler.open_statements) == (1, 0)
    for n in range(2000):
        sid = f"short-{n}"
        assembler.feed(records.connect(sid))
        assembler.feed(records.request(sid, 1))
        assembler.feed(records.result(sid, 1))
        assembler.feed(records.end(sid))
    assert (assembler.open_sessions, assembler.open_statements) == (1, 0)


def test_open_entries_are_capped() -> None:
    records = Records()
    assembler = SpanAssembler(max_open=3)
    spans: list[Span] = []
    for n in range(5):
        spans.extend(feed(assembler, records.connect(f"s{n}")))
    assert assembler.open_sessions == 3
    assert [s.span_id for s in spans] == [session_span_id("s0"), session_span_id("s1")]
    assert all(attrs(s)["querywarden.interrupted"] for s in spans)
    assert assembler.safe_offset() == 2


def test_result_without_its_request_is_ignored() -> None:
    records = Records()
    records.result("gone", 1)
    assembler = SpanAssembler()
    assert feed_all(assembler, records) == []
    assert assembler.safe_offset() == 1


# --- the offset file ----------------------------------------------------------------------


def test_offset_file_round_trip_and_bad_contents(tmp_path: Path) -> None:
    path = tmp_path / "otlp.offset"
    assert read_offset(path) == OffsetState(0, 0)
    write_offset(path, OffsetState(5, 9))
    assert read_offset(path) == OffsetState(5, 9)
    assert json.loads(path.read_text()) == {"offset": 5, "sent": 9}
    assert not path.with_name("otlp.offset.tmp").exists()
    path.write_text("{garbage")
    assert read_offset(path) == OffsetState(0, 0)  # re-sending is safe, skipping is not


# --- delivery -----------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def exporter_for(records: Records, tmp_path: Path, endpoint: str, **kw: Any) -> LogExporter:
    return LogExporter(tmp_path, endpoint, source=records, instance_id="gw-1", **kw)


def test_export_posts_protobuf_and_persists_the_offset(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    records = Records()
    records.connect("s1")
    records.request("s1", 1)
    records.result("s1", 1)
    records.request("s1", 2)
    exporter = exporter_for(records, tmp_path, receiver.endpoint, headers={"X-Tenant": "t"})
    assert exporter.export_pending() == 1
    (span,) = receiver.spans()
    assert span.span_id == statement_span_id("s1-1").hex()
    assert span.resource == {
        "service.name": "querywarden",
        "service.version": "0.1.0",
        "service.instance.id": "gw-1",
    }
    assert span.scope == "querywarden.audit"
    # The connect (1) is still needed; every record up to 4 was read and sent.
    assert read_offset(tmp_path / "otlp.offset") == OffsetState(0, 4)
    assert exporter.export_pending() == 0  # nothing new


def test_failure_keeps_the_offset_and_a_new_exporter_resumes_without_resending(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    records = Records()
    records.connect("s1")  # 1
    records.request("s1", 1)  # 2
    records.result("s1", 1)  # 3
    records.request("s1", 2)  # 4
    first = exporter_for(records, tmp_path, receiver.endpoint)
    assert first.export_pending() == 1
    assert read_offset(tmp_path / "otlp.offset") == OffsetState(0, 4)

    receiver.stop()
    records.result("s1", 2)  # 5
    records.connect("s2")  # 6
    records.request("s2", 1)  # 7
    records.result("s2", 1)  # 8
    with pytest.raises(ExportError):
        first.export_pending()
    assert read_offset(tmp_path / "otlp.offset") == OffsetState(0, 4)
    assert first.failures == 1
    receiver.start()  # same port

    second = exporter_for(records, tmp_path, receiver.endpoint)  # a restarted gateway
    assert second.export_pending() == 2
    ids = [s.span_id for s in receiver.spans()[1:]]
    # s1-1 was delivered before: the watermark keeps it from being sent again.
    assert ids == [statement_span_id("s1-2").hex(), statement_span_id("s2-1").hex()]
    assert read_offset(tmp_path / "otlp.offset") == OffsetState(0, 8)


def test_an_outage_holds_one_batch_and_rereads_nothing(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    records = Records()
    records.connect("long")  # 1: keeps the restart offset at 0 throughout
    for n in range(1, 31):
        records.request("long", n)
        records.result("long", n)
    exporter = exporter_for(records, tmp_path, receiver.endpoint, batch_max=4)
    receiver.fail_with = 503
    for _ in range(3):
        with pytest.raises(ExportError):
            exporter.export_pending()
        # Reading stopped at the first full batch; that batch waits in memory.
        assert len(exporter._unsent) == 4
    assert records.reads == [0]  # the retries fail on the held batch, before any reading
    receiver.fail_with = None
    assert exporter.export_pending() == 30
    assert records.reads == [0, 9]  # then reading goes on from where it stopped
    assert len(receiver.spans()) == 30
    assert read_offset(tmp_path / "otlp.offset") == OffsetState(0, 61)


def test_http_error_status_is_a_failure(tmp_path: Path, receiver: OtlpReceiver) -> None:
    records = Records()
    records.connect("s1")
    records.request("s1", 1)
    records.result("s1", 1)
    exporter = exporter_for(records, tmp_path, receiver.endpoint)
    receiver.fail_with = 503
    with pytest.raises(ExportError, match="503"):
        exporter.export_pending()
    assert read_offset(tmp_path / "otlp.offset") == OffsetState(0, 0)
    receiver.fail_with = None
    assert exporter.export_pending() == 1
    assert exporter.failures == 0


def test_batches_are_split_and_each_moves_the_offset(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    records = Records()
    for n in range(10):
        sid = f"s{n}"
        records.connect(sid)
        records.request(sid, 1)
        records.result(sid, 1)
        records.end(sid)
    exporter = exporter_for(records, tmp_path, receiver.endpoint, batch_max=3)
    assert exporter.export_pending() == 20
    assert len(receiver.unique_spans()) == 20
    assert len(receiver.spans()) == 20
    assert [path for path, _ in receiver.requests] == ["/v1/traces"] * 7
    assert read_offset(tmp_path / "otlp.offset") == OffsetState(40, 40)


def test_a_halted_pass_ends_after_its_current_batch(tmp_path: Path, receiver: OtlpReceiver) -> None:
    records = Records()
    records.connect("s")
    for n in range(1, 11):
        records.request("s", n)
        records.result("s", n)
    exporter = exporter_for(records, tmp_path, receiver.endpoint, batch_max=2)
    halt = threading.Event()
    halt.set()  # what run() does when stop is set mid-pass
    assert exporter._export(halt) == 2
    assert read_offset(tmp_path / "otlp.offset") == OffsetState(0, 5)
    assert exporter.export_pending() == 8  # a plain call is never halted


def test_interrupted_sessions_of_a_previous_process_are_closed(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    records = Records()
    records.connect("old")  # 1
    records.request("old", 1)  # 2
    records.connect("new")  # 3: written by this process
    exporter = exporter_for(records, tmp_path, receiver.endpoint, interrupted_through=2)
    assert exporter.export_pending() == 2
    spans = receiver.unique_spans()
    statement = spans[statement_span_id("old-1").hex()]
    session = spans[session_span_id("old").hex()]
    assert statement.status_code == session.status_code == ERROR
    assert statement.attributes["querywarden.interrupted"] is True
    assert read_offset(tmp_path / "otlp.offset") == OffsetState(2, 3)
    # A restart does not send them again.
    again = exporter_for(records, tmp_path, receiver.endpoint, interrupted_through=2)
    assert again.export_pending() == 0


def test_only_durable_records_are_exported(tmp_path: Path, receiver: OtlpReceiver) -> None:
    records = Records()
    records.connect("s1")  # 1
    records.request("s1", 1)  # 2
    records.result("s1", 1)  # 3
    records.request("s1", 2)  # 4
    records.result("s1", 2)  # 5
    records.durable = 3
    exporter = exporter_for(records, tmp_path, receiver.endpoint)
    assert exporter.export_pending() == 1
    assert read_offset(tmp_path / "otlp.offset") == OffsetState(0, 3)
    records.durable = 5
    assert exporter.export_pending() == 1
    assert [s.attributes["querywarden.statement.id"] for s in receiver.spans()] == ["s1-1", "s1-2"]


def fill(log: AuditLog, count: int) -> None:
    for n in range(count):
        log.append("note", n=n, pad="x" * 50)


def test_directory_source_reads_what_the_log_reader_reads(tmp_path: Path) -> None:
    with AuditLog(tmp_path, fsync="always", max_segment_bytes=2000) as log:
        fill(log, 100)
    assert len(list(tmp_path.glob("audit-*.jsonl"))) > 5
    everything = list(read_records(tmp_path))
    for after in (0, 1, 17, 18, 50, 99, 100):
        for up_to in (None, 60, 100):
            source = DirectorySource(tmp_path)
            expected = [
                r for r in everything if r["seq"] > after and (up_to is None or r["seq"] <= up_to)
            ]
            assert list(source.records(after, up_to)) == expected


def test_directory_source_resumes_without_parsing_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[int] = []
    real = export._record

    def counting(line: bytes, segment: str, number: int | None) -> dict[str, Any]:
        record = real(line, segment, number)
        parsed.append(record["seq"])
        return record

    monkeypatch.setattr(export, "_record", counting)
    source = DirectorySource(tmp_path)
    with AuditLog(tmp_path, fsync="always", max_segment_bytes=2000) as log:
        fill(log, 30)
        assert [r["seq"] for r in source.records(20, None)] == list(range(21, 31))
        assert parsed == list(range(21, 31))  # 1..20 skipped by their prefix
        fill(log, 30)  # into new segments
        parsed.clear()
        assert [r["seq"] for r in source.records(30, 45)] == list(range(31, 46))
        assert parsed == list(range(31, 46))  # resumed: nothing before 31 read again
        parsed.clear()
        assert [r["seq"] for r in source.records(45, None)] == list(range(46, 61))
        assert parsed == list(range(46, 61))


def test_directory_source_skips_a_torn_tail_and_refuses_garbage(tmp_path: Path) -> None:
    with AuditLog(tmp_path, fsync="always") as log:
        fill(log, 3)
    (segment,) = tmp_path.glob("audit-*.jsonl")
    with segment.open("ab") as handle:
        handle.write(b'{"seq":4,"ts":"')  # a write in progress
    source = DirectorySource(tmp_path)
    assert [r["seq"] for r in source.records(0, None)] == [1, 2, 3]
    with segment.open("ab") as handle:
        handle.write(b"oops\n")  # completed, but not JSON
    with pytest.raises(AuditFormatError, match="line 4"):
        list(DirectorySource(tmp_path).records(0, None))
    with pytest.raises(AuditFormatError):
        list(source.records(3, None))  # resumed at line 4


def test_directory_source_goes_on_past_a_segment_deleted_under_it(tmp_path: Path) -> None:
    with AuditLog(tmp_path, fsync="always", max_segment_bytes=2000) as log:
        fill(log, 40)
    source = DirectorySource(tmp_path)
    assert len(list(source.records(0, 5))) == 5
    segments = sorted(tmp_path.glob("audit-*.jsonl"))
    segments[0].unlink()  # retention, while the reader was in it
    second_first = int(segments[1].name[6:26])
    assert [r["seq"] for r in source.records(5, None)] == list(range(second_first, 41))


def test_directory_source_reads_head(tmp_path: Path) -> None:
    source = DirectorySource(tmp_path)
    assert source.durable_seq() == 0
    (tmp_path / "HEAD").write_text('{"seq": 7, "hash": "x", "segment": "y"}')
    assert source.durable_seq() == 7
    (tmp_path / "HEAD").write_text("[]")
    with pytest.raises(ValueError, match="HEAD"):
        source.durable_seq()


def test_endpoint_must_be_http(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="http"):
        LogExporter(tmp_path, "file:///etc/passwd")


def test_run_backs_off_and_catches_up(tmp_path: Path, receiver: OtlpReceiver) -> None:
    records = Records()
    records.connect("s1")
    records.request("s1", 1)
    records.result("s1", 1)
    receiver.fail_with = 503
    exporter = exporter_for(records, tmp_path, receiver.endpoint)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(exporter.run(interval=0.05, stop=stop))
        await asyncio.sleep(0.5)
        # 0.1, 0.2, 0.4 s waits: a few attempts, not one per interval.
        attempts = len(receiver.requests)
        assert 2 <= attempts <= 4
        assert exporter.failures >= 2
        receiver.fail_with = None
        for _ in range(100):
            if receiver.spans():
                break
            await asyncio.sleep(0.05)
        records.request("s1", 2)
        records.result("s1", 2)
        records.end("s1")
        stop.set()  # the last pass sends what came in meanwhile
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert set(receiver.unique_spans()) == {
        statement_span_id("s1-1").hex(),
        statement_span_id("s1-2").hex(),
        session_span_id("s1").hex(),
    }


# --- metrics ------------------------------------------------------------------------------


def test_metrics_without_a_reader_do_nothing() -> None:
    metrics = GatewayMetrics(None)
    metrics.decision("allow", "r")
    metrics.masked(3)
    metrics.auth_refused("expired")
    metrics.operation_duration(1.0, ("shop", "db", 5432, "allow", None))
    metrics.connection_opened("db:5432/shop")
    assert metrics._provider is None
    assert metrics.duration_metric() is None
    snapshot = metrics.snapshot()
    assert (snapshot.decisions, snapshot.masked, snapshot.connections) == ({}, 0, {})
    metrics.shutdown()


def test_metrics_for_a_scrape_count_without_an_endpoint() -> None:
    metrics = GatewayMetrics(None, scrape=True)
    metrics.decision("allow", "r")
    metrics.connection_opened("db:5432/shop")
    metrics.connection_opened("db:5432/shop")
    metrics.connection_closed("db:5432/shop")
    metrics.connection_closed("elsewhere:1/x")  # never opened: not negative
    assert metrics._provider is None
    snapshot = metrics.snapshot()
    assert snapshot.decisions == {("allow", "r"): 1}
    assert snapshot.connections == {"db:5432/shop": 1}
    metrics.decision("allow", "r")
    assert snapshot.decisions == {("allow", "r"): 1}  # a copy


def test_metrics_reach_the_receiver(receiver: OtlpReceiver) -> None:
    metrics = GatewayMetrics(receiver.endpoint, instance_id="gw-1", export_interval=60)
    for _ in range(3):
        metrics.decision("allow", "agents-read")
    metrics.decision("refuse", None)
    metrics.masked(5)
    metrics.masked(2)
    metrics.auth_refused("expired")
    allowed = ("shop", "db.internal", 5433, "allow", None)
    for seconds in (0.00005, 0.0003, 0.0003, 0.007, 20.0):
        metrics.operation_duration(seconds, allowed)
    metrics.operation_duration(0.0002, ("shop", "db.internal", 5433, "refuse", "42501"))
    metrics.operation_duration(0.001, ("shop", "db.internal", 5433, "allow", "22P02"))
    metrics.connection_opened(pool_name("shop", "db.internal", 5433))
    metrics.shutdown()

    decisions = {
        (p.attributes["outcome"], p.attributes.get("rule")): p.value
        for p in receiver.points("querywarden.decisions")
    }
    assert decisions == {("allow", "agents-read"): 3, ("refuse", None): 1}
    assert [p.value for p in receiver.points("querywarden.masked_values")] == [7]
    (refused,) = receiver.points("querywarden.auth.refused")
    assert (refused.attributes, refused.value) == ({"reason": "expired"}, 1)
    durations = {
        (p.attributes["querywarden.decision"], p.attributes.get("error.type")): p
        for p in receiver.points("db.client.operation.duration")
    }
    allow = durations[("allow", None)]
    assert allow.attributes == {
        "db.system.name": "postgresql",
        "db.namespace": "shop",
        "server.address": "db.internal",
        "server.port": 5433,
        "querywarden.decision": "allow",
    }
    assert allow.unit == "s"
    assert allow.count == 5
    assert allow.value == pytest.approx(20.00765)
    assert len(allow.bucket_counts) == len(DURATION_BOUNDS) + 1
    assert allow.bucket_counts[0] == 1  # 0.05 ms <= 0.1 ms
    assert allow.bucket_counts[2] == 2  # 0.25 ms < 0.3 ms <= 0.5 ms
    assert allow.bucket_counts[-1] == 1  # over 10 s
    refusal = durations[("refuse", "42501")]
    assert refusal.attributes["db.response.status_code"] == "42501"
    assert durations[("allow", "22P02")].count == 1
    (connections,) = receiver.points("db.client.connection.count")
    assert connections.value == 1
    assert connections.attributes == {
        "db.client.connection.state": "used",
        "db.client.connection.pool.name": "db.internal:5433/shop",
    }
    assert refused.resource["service.instance.id"] == "gw-1"


def test_metrics_hot_path_is_cheaper_than_sdk_instruments(receiver: OtlpReceiver) -> None:
    # Measured against the SDK's synchronous instruments in the same run, so that a busy
    # machine slows both sides alike.
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    meter = provider.get_meter("baseline")
    counter = meter.create_counter("c")
    histogram = meter.create_histogram("h")
    metrics = GatewayMetrics(receiver.endpoint, export_interval=3600)
    count = 5_000
    try:
        started = time.perf_counter()
        for _ in range(count):
            counter.add(1, {"outcome": "allow", "rule": "agents-read"})
            histogram.record(0.0004, {"outcome": "allow"})
        sdk = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(count):
            metrics.decision("allow", "agents-read")
            metrics.operation_duration(0.0004, ("shop", "db", 5432, "allow", None))
        ours = time.perf_counter() - started
    finally:
        metrics.shutdown()
        provider.shutdown()
    assert ours < sdk / 3


def test_docs_list_every_exported_attribute() -> None:
    """docs/audit.md names every attribute a span can carry (and its conventions version)."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "audit.md").read_text()
    assert "semantic conventions **1.44.0**" in docs
    assert export.SCHEMA_URL.endswith("/1.44.0")
    records = Records()
    records.connect("s1")
    records.request("s1", 1, approval={"review_id": "r-1"})
    records.result("s1", 1, sqlstate="22P02", error="bad input")
    records.request("s1", 2, "SELECT " + "x" * 40_000, refuse=True)
    records.request("s1", 3, kind="parse", statement_name="p1")
    records.end("s1")
    records.add(
        "session.auth_failed",
        client_address="10.0.0.9:1",
        user="u",
        database="shop",
        reason="expired",
        sqlstate="28000",
    )
    records.connect("s2")
    assembler = SpanAssembler(query_text="raw")
    spans = feed_all(assembler, records) + [
        Span.FromString(raw) for raw in assembler.close_all("stopped")
    ]
    keys = {key for span in spans for key in attrs(span)}
    assert {"user.id", "server.port", "db.query.summary", "querywarden.interrupted"} <= keys
    for key in keys:
        # Per-name families are documented by their pattern.
        documented = re.sub(r"^(querywarden\.(?:masking|approval))\..+$", r"\1.", key)
        assert f"`{documented}" in docs or f".{key.rpartition('.')[2]}`" in docs, key


def test_an_export_request_names_the_conventions_schema() -> None:
    request = ExportTraceServiceRequest.FromString(
        export._export_request(export._resource("gw-1"), b"", [b""])
    )
    (resource_spans,) = request.resource_spans
    (scope_spans,) = resource_spans.scope_spans
    assert scope_spans.schema_url == "https://opentelemetry.io/schemas/1.44.0"
