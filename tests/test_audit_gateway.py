"""The audit log written by the real gateway, for real clients and a real PostgreSQL.

Every request is recorded before it is forwarded and its result after; refusals, masked
results and the extended protocol included. With the audit directory on a full
filesystem (a real 256 KiB tmpfs), nothing runs unrecorded: statements are refused, and
service resumes when space returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from gateway_harness import DATABASE, POLICY, RunningGateway, token_for
from otlp_receiver import OtlpReceiver
from querywarden.audit.log import read_records, verify
from querywarden.audit.tools import replay_command
from querywarden.devcluster import EphemeralCluster
from querywarden.policy import PolicyDocument

RULES = [
    {
        "name": "agents-rw",
        "subjects": {"groups": ["ai-agents"]},
        "allow": {
            "operations": ["select", "insert", "transaction"],
            "tables": ["public.*", "pg_catalog.*"],
        },
        "deny": {"tables": ["public.qa_secrets"]},
    }
]
MASKING = {
    "columns": [{"table": "public.qa_people", "column": "ssn", "strategy": "redact"}],
    "exempt": {"groups": ["dba"]},
}


@pytest.fixture(scope="module")
def tables(pg: EphemeralCluster) -> Iterator[None]:
    pg.psql(
        "CREATE TABLE IF NOT EXISTS qa_people (id int, ssn text);"
        "CREATE TABLE IF NOT EXISTS qa_secrets (id int);"
        "CREATE TABLE IF NOT EXISTS qa_log (note text);"
        "GRANT ALL ON qa_people, qa_secrets, qa_log TO PUBLIC;"
        "TRUNCATE qa_people; INSERT INTO qa_people VALUES (1, '123-45-6789'), (2, '987-65-4321');"
    )
    yield
    pg.psql("DROP TABLE qa_people, qa_secrets, qa_log")


def _policy() -> PolicyDocument:
    return PolicyDocument.model_validate(
        {"identity": POLICY.identity.model_dump(by_alias=True), "rules": RULES, "masking": MASKING}
    )


@pytest.fixture
def audited(
    make_gateway: Callable[..., RunningGateway], tables: None, tmp_path: Path
) -> RunningGateway:
    directory = tmp_path / "audit"
    gw = make_gateway(policy=_policy(), audit={"directory": str(directory), "sampleRows": 3})
    gw.extra["audit"] = directory
    return gw


def _records(gw: RunningGateway) -> list[dict[str, Any]]:
    directory = gw.extra["audit"]
    assert isinstance(directory, Path)
    return list(read_records(directory))


def _wait_for(
    gw: RunningGateway, predicate: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        records = _records(gw)
        if predicate(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def test_a_session_is_recorded_request_first_with_decisions_and_masked_samples(
    audited: RunningGateway, pg: EphemeralCluster
) -> None:
    with psycopg.connect(audited.dsn("alice"), autocommit=True) as conn:
        assert conn.execute("SELECT id, ssn FROM qa_people ORDER BY id").fetchall() == [
            (1, "****"),
            (2, "****"),
        ]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM qa_secrets")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
    records = _wait_for(audited, lambda rs: any(r["type"] == "session.end" for r in rs))
    types = [r["type"] for r in records]
    assert types[0] == "session.connect"
    assert types[-1] == "session.end"
    connect = records[0]
    assert connect["principal"]["subject"] == "alice"
    assert connect["principal"]["groups"] == ["ai-agents"]
    # Where the session went: the upstream the gateway connected it to.
    assert connect["server_address"] == f"127.0.0.1:{pg.port}"
    requests = {r["statement_id"]: r for r in records if r["type"] == "statement.request"}
    results = {r["statement_id"]: r for r in records if r["type"] == "statement.result"}
    assert set(requests) == set(results)
    # Write-ahead: each request record comes before its result record.
    for statement_id, result in results.items():
        assert requests[statement_id]["seq"] < result["seq"]
    by_text = {r["text"]: r for r in requests.values()}
    select = by_text["SELECT id, ssn FROM qa_people ORDER BY id"]
    assert select["decision"]["outcome"] == "allow"
    assert select["decision"]["rule"] == "agents-rw"  # every decision names its rule
    assert select["summary"]["reads"] == ["qa_people"]
    selected = results[select["statement_id"]]
    assert selected["rows"] == 2
    assert selected["command"] == "SELECT 2"
    assert selected["sample"] == [["1", "****"], ["2", "****"]]
    assert selected["masking"] == {"public.qa_people.ssn": 2}
    assert selected["masked"] is True  # the console may show this sample
    assert len(selected["response"]["stream_digest"]) == 64
    refused = by_text["SELECT * FROM qa_secrets"]
    assert refused["decision"]["outcome"] == "refuse"
    assert refused["decision"]["rule"] == "agents-rw"
    assert results[refused["statement_id"]]["sqlstate"] == "42501"
    failed = results[by_text["SELECT 1/0"]["statement_id"]]
    assert failed["sqlstate"] == "22012"
    # The log verifies, and the replay shows what the client saw: masked values only.
    directory = audited.extra["audit"]
    assert isinstance(directory, Path)
    _assert_verifies(directory)
    out = io.StringIO()
    assert replay_command(directory, connect["session_id"], out) == 0
    assert f"to database app at 127.0.0.1:{pg.port} as " in out.getvalue()
    assert "server_address" not in out.getvalue()  # a known field, not an extra
    assert "****" in out.getvalue()
    assert "123-45-6789" not in out.getvalue()


def test_extended_protocol_records_parse_and_each_execute(audited: RunningGateway) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(
            host=audited.host,
            port=audited.port,
            user="alice",
            password=token_for("alice"),
            database=DATABASE,
            ssl=False,
        )
        try:
            statement = await conn.prepare("SELECT id FROM qa_people WHERE id = $1")
            for key in (1, 2, 3):
                await statement.fetch(key)
        finally:
            await conn.close()

    asyncio.run(run())
    records = _wait_for(audited, lambda rs: any(r["type"] == "session.end" for r in rs))
    executes = [
        r
        for r in records
        if r["type"] == "statement.request"
        and r["kind"] == "execute"
        and r["text"] == "SELECT id FROM qa_people WHERE id = $1"
    ]
    assert len(executes) == 3
    # Values bound to a statement over a table with masked columns are redacted.
    assert [e["parameters"] for e in executes] == [["****"]] * 3
    results = {r["statement_id"]: r for r in records if r["type"] == "statement.result"}
    assert [results[e["statement_id"]]["rows"] for e in executes] == [1, 1, 0]


def _assert_verifies(directory: Path) -> None:
    """The chain checks out once the batch fsync has confirmed the tail (HEAD)."""
    deadline = time.monotonic() + 10
    report = verify(directory)
    while not report.ok and time.monotonic() < deadline:
        time.sleep(0.05)
        report = verify(directory)
    assert report.ok, report.problem


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_nothing_runs_unrecorded_when_the_audit_disk_is_full(
    make_gateway: Callable[..., RunningGateway],
    tables: None,
    full_disk: Path,
    pg: EphemeralCluster,
) -> None:
    directory = full_disk / "audit"
    gw = make_gateway(policy=_policy(), audit={"directory": str(directory), "fsync": "always"})
    marker = f"full-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        conn.execute("SELECT 1")
        filler = full_disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            chunk = b"\0" * 4096
            while True:
                os.write(fd, chunk)
        except OSError:
            pass  # the filesystem is full now
        finally:
            os.close(fd)
        # The log's last page may still have room for a few records: go on until the
        # filesystem refuses one.
        refused: psycopg.errors.IoError | None = None
        for attempt in range(200):
            try:
                conn.execute("INSERT INTO qa_log VALUES (%s)", (f"{marker}-{attempt}",))
            except psycopg.errors.IoError as exc:
                refused = exc
                break
        assert refused is not None, "the audit log never filled up"
        assert "audit" in str(refused)
        # The refused statement never reached PostgreSQL; the earlier ones all did.
        assert (
            pg.psql(f"SELECT count(*) FROM qa_log WHERE note = '{marker}-{attempt}'").strip() == "0"
        )
        ran = pg.psql(f"SELECT count(*) FROM qa_log WHERE note LIKE '{marker}-%'").strip()
        assert int(ran) == attempt
        filler.unlink()
        conn.execute("INSERT INTO qa_log VALUES (%s)", (marker,))
    assert pg.psql(f"SELECT count(*) FROM qa_log WHERE note = '{marker}'").strip() == "1"
    _assert_verifies(directory)


def test_the_gateway_exports_spans_from_its_log(
    make_gateway: Callable[..., RunningGateway],
    tables: None,
    pg: EphemeralCluster,
    tmp_path: Path,
) -> None:
    with OtlpReceiver() as receiver:
        gw = make_gateway(
            policy=_policy(),
            audit={"directory": str(tmp_path / "audit"), "otlpEndpoint": receiver.endpoint},
        )
        with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
            conn.execute("SELECT id FROM qa_people").fetchall()
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT * FROM qa_secrets")
        spans = receiver.wait_for(
            lambda got: (
                any(s.name == "querywarden.session" for s in got)
                and sum(s.parent_span_id != "" for s in got) >= 2
            )
        )
    session = next(s for s in spans if s.name == "querywarden.session")
    # The identity as the general conventions name a user.
    assert session.attributes["user.id"] == "alice"
    assert session.attributes["user.roles"] == ["ai-agents"]
    assert "querywarden.principal.subject" not in session.attributes
    # server.* is the upstream database, not the gateway.
    assert session.attributes["server.address"] == "127.0.0.1"
    assert session.attributes["server.port"] == pg.port
    statements = [s for s in spans if s.parent_span_id == session.span_id]
    by_text = {s.attributes["db.query.text"]: s for s in statements}
    select = by_text["SELECT id FROM qa_people"]
    assert select.trace_id == session.trace_id
    assert select.attributes["db.system.name"] == "postgresql"
    assert select.attributes["server.port"] == pg.port
    assert select.attributes["user.id"] == "alice"
    # The log keeps "qa_people" as written; the span names the relation schema-qualified.
    assert select.attributes["db.collection.name"] == "public.qa_people"
    assert select.attributes["db.query.summary"] == "SELECT public.qa_people"
    assert select.name == "SELECT public.qa_people"
    assert select.attributes["db.response.returned_rows"] == 2
    assert select.attributes["querywarden.decision"] == "allow"
    refused = by_text["SELECT * FROM qa_secrets"]
    assert refused.attributes["querywarden.decision"] == "refuse"
    assert refused.attributes["querywarden.rule"] == "agents-rw"


@pytest.mark.parametrize("exporter", ["process", "thread"])
def test_the_exporter_runs_as_a_child_process_or_a_thread(
    make_gateway: Callable[..., RunningGateway], tables: None, tmp_path: Path, exporter: str
) -> None:
    with OtlpReceiver() as receiver:
        gw = make_gateway(
            policy=_policy(),
            audit={
                "directory": str(tmp_path / "audit"),
                "otlpEndpoint": receiver.endpoint,
                "exporter": exporter,
            },
        )
        with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
            conn.execute("SELECT count(*) FROM qa_people").fetchall()
        spans = receiver.wait_for(lambda got: any(s.name == "querywarden.session" for s in got))
        gw.call(gw.gateway.close(), timeout=20)  # the fixture's stop closes it once more
    texts = {s.attributes.get("db.query.text") for s in spans}
    assert "SELECT count(*) FROM qa_people" in texts
    # The child process is gone with the gateway.
    assert (
        subprocess.run(
            ["pgrep", "-f", f"querywarden.audit.export {tmp_path / 'audit'}"], check=False
        ).returncode
        == 1
    )


SSN = "123-45-6789"
#: (what the client sends, what the exported span's db.query.text is by default).
EXPORTED_TEXTS = [
    # Allowed, and run.
    (f"SELECT id FROM qa_people WHERE ssn = '{SSN}'", "SELECT id FROM qa_people WHERE ssn = $1"),
    # Refused by the policy.
    (
        f"SELECT id FROM qa_secrets WHERE id::text = '{SSN}'",
        "SELECT id FROM qa_secrets WHERE id::text = $1",
    ),
    # Run, and the server's error quotes the value: invalid input syntax ... "123-45-6789".
    (f"SELECT '{SSN}'::int", "SELECT $1::int"),
    # A comment is text the normalizer keeps: it goes too.
    (f"/* for {SSN} */ SELECT count(*) FROM qa_log", "SELECT count(*) FROM qa_log"),
    # Refused as unparseable; the parser's message quotes the literal: no text at all.
    (f"SELECT 1 '{SSN}'", None),
]


def _export_session(
    make_gateway: Callable[..., RunningGateway], tmp_path: Path, **audit: Any
) -> tuple[dict[str, Any], list[bytes], list[dict[str, Any]]]:
    """Run EXPORTED_TEXTS through a gateway exporting to a receiver.

    Returns the statement spans' attributes by the text the client sent, the request
    bodies the receiver got, and the records of the local log.
    """
    directory = tmp_path / "audit"
    with OtlpReceiver() as receiver:
        gw = make_gateway(
            policy=_policy(),
            audit={"directory": str(directory), "otlpEndpoint": receiver.endpoint, **audit},
        )
        with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
            for text, _ in EXPORTED_TEXTS:
                # Refused or failed: what matters is what was exported.
                with contextlib.suppress(psycopg.Error):
                    conn.execute(text.encode()).fetchall()
        spans = receiver.wait_for(
            lambda got: (
                any(s.name == "querywarden.session" for s in got)
                and len({s.span_id for s in got if s.parent_span_id}) >= len(EXPORTED_TEXTS)
            )
        )
        bodies = list(receiver.trace_bodies)
    records = list(read_records(directory))
    # Statement spans in the order sent, by the audit seq of their request record.
    sent = {r["seq"]: r["text"] for r in records if r["type"] == "statement.request"}
    by_text = {
        sent[s.attributes["querywarden.audit.seq"]]: s.attributes for s in spans if s.parent_span_id
    }
    return by_text, bodies, records


def test_exported_spans_carry_normalized_text_and_no_literal(
    make_gateway: Callable[..., RunningGateway], tables: None, tmp_path: Path
) -> None:
    by_text, bodies, records = _export_session(make_gateway, tmp_path)
    for text, exported in EXPORTED_TEXTS:
        assert by_text[text].get("db.query.text") == exported, text
    refused = by_text[EXPORTED_TEXTS[1][0]]
    assert refused["querywarden.decision"] == "refuse"
    unparseable = by_text[EXPORTED_TEXTS[4][0]]
    assert unparseable["querywarden.decision"] == "refuse"
    assert unparseable["querywarden.reason"].count('"****"') == 1
    failed = by_text[EXPORTED_TEXTS[2][0]]
    assert failed["db.response.status_code"] == "22P02"
    assert "querywarden.error.message" not in failed
    # Byte for byte, nothing the receiver got holds the value.
    assert bodies
    assert not [body for body in bodies if SSN.encode() in body]
    # The local log, the record of truth, has the exact text and messages.
    texts = [r["text"] for r in records if r["type"] == "statement.request"]
    assert texts == [text for text, _ in EXPORTED_TEXTS]
    errors = [r["error"] for r in records if r["type"] == "statement.result" and r["error"]]
    assert any(SSN in error for error in errors)


@pytest.mark.parametrize("exporter", ["thread", "process"])
def test_raw_query_text_exports_the_exact_text(
    make_gateway: Callable[..., RunningGateway], tables: None, tmp_path: Path, exporter: str
) -> None:
    by_text, bodies, _ = _export_session(
        make_gateway, tmp_path, exportQueryText="raw", exporter=exporter
    )
    for text, _ in EXPORTED_TEXTS:
        assert by_text[text]["db.query.text"] == text
    failed = by_text[EXPORTED_TEXTS[2][0]]
    assert failed["querywarden.error.message"] == f'invalid input syntax for type integer: "{SSN}"'
    assert any(SSN.encode() in body for body in bodies)
