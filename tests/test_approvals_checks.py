"""Statements are held for an approver only when the server would run them.

Through the real gateway and a real PostgreSQL: before a statement is held, the gateway
checks it on a side connection (Parse and Describe for DML, a catalog lookup for
``DROP ... IF EXISTS``). A misspelt name fails at once with PostgreSQL's own error and
opens no review; dropping what does not exist runs (a NOTICE); whatever the check cannot
vouch for (utility statements, a transaction block, the session's temporary tables, a
side connection that fails) is held as before, and an approver decides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway_harness import DATABASE, POLICY, RunningGateway, token_for
from held_statement import HeldStatement, admin_call
from querywarden import codec
from querywarden.audit.log import read_records
from querywarden.devcluster import EphemeralCluster
from querywarden.policy import PolicyDocument
from wire_client import SYNC, WireClient

ROLE, PASSWORD = "qc_agent", "qc-agent-pw"

RULES = [
    {
        "name": "agents-reviewed",
        "subjects": {"groups": ["ai-agents"]},
        "allow": {
            "operations": ["select", "insert", "transaction", "ddl", "set", "set_search_path"],
            "tables": ["*"],
        },
        "review": {"operations": ["delete", "ddl:drop", "ddl:alter_table"]},
        # The agent's own upstream role: the checks must connect as it too.
        "upstreamRole": "agent",
    },
    {
        "name": "dba-all",
        "subjects": {"groups": ["dba"]},
        "allow": {"operations": ["*"], "tables": ["*"]},
    },
]


@pytest.fixture(scope="module")
def tables(pg: EphemeralCluster) -> Iterator[None]:
    pg.psql(
        f"DO $$ BEGIN CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$; "
        f"GRANT ALL ON SCHEMA public TO {ROLE}; "
        "CREATE TABLE IF NOT EXISTS qc_items (id int, name text); "
        f"ALTER TABLE qc_items OWNER TO {ROLE}; "
        "CREATE SCHEMA IF NOT EXISTS qc_s; "
        f"GRANT ALL ON SCHEMA qc_s TO {ROLE}; "
        "CREATE TABLE IF NOT EXISTS qc_s.qc_only (id int); "
        f"ALTER TABLE qc_s.qc_only OWNER TO {ROLE}"
    )
    yield
    pg.psql("DROP TABLE qc_items; DROP SCHEMA qc_s CASCADE")


@pytest.fixture
def gw(make_gateway: Callable[..., RunningGateway], tables: None, tmp_path: Path) -> RunningGateway:
    policy = PolicyDocument.model_validate(
        {
            "identity": POLICY.identity.model_dump(by_alias=True),
            "rules": RULES,
            "approvals": {"approvers": {"groups": ["dba"]}, "hold": "20s"},
        }
    )
    running = make_gateway(
        policy=policy,
        upstream={"roles": {"agent": {"user": ROLE, "password": PASSWORD}}},
        stateDirectory=str(tmp_path / "state"),
        admin={"port": 0},
        audit={"directory": str(tmp_path / "audit")},
    )
    running.extra["audit"] = tmp_path / "audit"
    return running


def _reviews(gw: RunningGateway) -> list[dict[str, Any]]:
    return list(admin_call(gw, "GET", "/reviews")["reviews"])


def _denied_after_hold(gw: RunningGateway, held: HeldStatement) -> str:
    """Deny the review ``held`` waits on; the statement it was; the client's error."""
    review_id = held.review_id()
    review = admin_call(gw, "POST", f"/reviews/{review_id}/deny", body={"comment": "checked: held"})
    held.finish()
    assert isinstance(held.error, psycopg.errors.InsufficientPrivilege), held.error
    assert "checked: held" in str(held.error)
    return str(review["statement"])


def _server_error(pg: EphemeralCluster, sql: str) -> psycopg.Error:
    """What PostgreSQL itself answers ``sql`` (no gateway), as the agent's role."""
    with psycopg.connect(_direct(pg), autocommit=True) as direct:
        try:
            direct.execute(sql)
        except psycopg.Error as exc:
            return exc
    raise AssertionError(f"{sql!r} did not fail on the server")


def _direct(pg: EphemeralCluster) -> str:
    return f"host=127.0.0.1 port={pg.port} dbname={DATABASE} user={ROLE} password={PASSWORD}"


def _agent(gw: RunningGateway) -> psycopg.Connection[Any]:
    return psycopg.connect(gw.dsn("alice"), autocommit=True)


def test_a_statement_the_server_would_refuse_gets_its_error_and_no_review(
    gw: RunningGateway, pg: EphemeralCluster
) -> None:
    pg.psql("TRUNCATE qc_items; INSERT INTO qc_items VALUES (1, 'a')")
    cases = [
        ("DELETE FROM qc_items WHERE nmae = 'a'", psycopg.errors.UndefinedColumn),
        ("  DELETE FROM qc_itemz WHERE id = 1;", psycopg.errors.UndefinedTable),
        ("DELETE FROM qc_items WHERE name = 1", psycopg.errors.UndefinedFunction),
    ]
    with _agent(gw) as conn:
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        for sql, error in cases:
            direct = _server_error(pg, sql)
            with pytest.raises(error) as refused:
                conn.execute(sql)
            got, want = refused.value.diag, direct.diag
            # As if the gateway were not there: the server's fields, position included.
            assert (got.sqlstate, got.message_primary) == (want.sqlstate, want.message_primary)
            assert got.statement_position == want.statement_position is not None
            assert got.message_hint == want.message_hint
            assert got.severity == "ERROR"
        assert not any("held for approval" in n for n in notices), notices
        # The session goes on, and a statement that would run is still held.
        assert conn.execute("SELECT count(*) FROM qc_items").fetchone() == (1,)
    assert _reviews(gw) == []
    statement = _denied_after_hold(gw, HeldStatement(_agent(gw), "DELETE FROM qc_items"))
    assert statement == "DELETE FROM qc_items"
    assert pg.psql("SELECT count(*) FROM qc_items").strip() == "1"
    refusals = [
        r
        for r in read_records(gw.extra["audit"])
        if r["type"] == "statement.request" and r.get("decision", {}).get("rule") == "server-check"
    ]
    assert len(refusals) == len(cases), refusals


def test_an_extended_protocol_parse_gets_the_servers_error(
    gw: RunningGateway, pg: EphemeralCluster
) -> None:
    sql = "DELETE FROM qc_items WHERE nmae = 'a'"
    want = _server_error(pg, sql).diag
    client = WireClient(gw.host, gw.port, "alice", token_for("alice"), DATABASE)
    client.send(codec.parse("", sql), SYNC)
    reply = client.until_ready()
    assert [m.type for m in reply] == ["E", "Z"]
    fields = reply[0].fields
    assert (fields["C"], fields["M"], fields["P"]) == (
        want.sqlstate,
        want.message_primary,
        str(want.statement_position),
    )
    client.send(codec.query("SELECT 1"))
    assert [m.type for m in client.until_ready()] == ["T", "D", "C", "Z"]
    client.close()
    assert _reviews(gw) == []


def test_drop_if_exists_of_nothing_runs_and_of_something_is_held(
    gw: RunningGateway, pg: EphemeralCluster
) -> None:
    with _agent(gw) as conn:
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("DROP TABLE IF EXISTS qc_missing, qc_s.qc_missing_too")
        conn.execute("DROP SCHEMA IF EXISTS qc_no_schema")
        conn.execute("DROP TYPE IF EXISTS qc_no_type")
        # The server's own notices, and no hold.
        assert any('"qc_missing" does not exist' in n for n in notices), notices
        assert any('"qc_no_schema" does not exist' in n for n in notices), notices
        assert not any("held for approval" in n for n in notices), notices
    assert _reviews(gw) == []
    unheld = [
        r["approval"]
        for r in read_records(gw.extra["audit"])
        if r["type"] == "statement.request" and r.get("approval")
    ]
    assert len(unheld) == 3 and all(a["how"] == "not held" for a in unheld), unheld

    # One of the objects exists: the statement would drop it, so an approver decides.
    for sql in (
        "DROP TABLE IF EXISTS qc_missing, qc_items",
        "DROP TABLE IF EXISTS qc_s.qc_only",
        "DROP SCHEMA IF EXISTS qc_s CASCADE",
        "DROP TYPE IF EXISTS qc_items",  # a table's row type is a type
        # The server truncates names to 63 bytes: this one names qc_items_... below.
        "DROP TABLE IF EXISTS qc_items_" + "x" * 60,
        # A plain DROP, and a DROP of kinds the gateway does not look up, are utility
        # statements: held whatever exists.
        "DROP TABLE qc_missing",
        "DROP FUNCTION IF EXISTS qc_no_function()",
    ):
        if "x" * 60 in sql:
            pg.psql(f"CREATE TABLE IF NOT EXISTS qc_items_{'x' * 54} ()")
        assert _denied_after_hold(gw, HeldStatement(_agent(gw), sql)) == sql
    pg.psql(f"DROP TABLE qc_items_{'x' * 54}")
    assert pg.psql("SELECT count(*) FROM pg_tables WHERE tablename = 'qc_only'").strip() == "1"


def test_what_a_side_connection_cannot_see_is_held(
    gw: RunningGateway, pg: EphemeralCluster
) -> None:
    with _agent(gw) as conn:
        # The session's temporary table: only it can see it.
        conn.execute("CREATE TEMP TABLE qc_scratch (id int)")
        held = HeldStatement(conn, "DROP TABLE IF EXISTS qc_scratch")
        assert _denied_after_hold(gw, held) == "DROP TABLE IF EXISTS qc_scratch"
    with _agent(gw) as conn:
        conn.execute("CREATE TEMP TABLE qc_items (id int, nmae text)")
        # PostgreSQL would delete from the temporary qc_items, which has the column.
        held = HeldStatement(conn, "DELETE FROM qc_items WHERE nmae = 'a'")
        assert _denied_after_hold(gw, held) == "DELETE FROM qc_items WHERE nmae = 'a'"

    with _agent(gw) as conn:
        # A transaction block: what it created is not committed, nor visible elsewhere.
        conn.execute("BEGIN")
        conn.execute("CREATE TABLE qc_new (id int)")
        held = HeldStatement(conn, "DELETE FROM qc_new WHERE id = 1")
        assert _denied_after_hold(gw, held) == "DELETE FROM qc_new WHERE id = 1"
    with _agent(gw) as conn:
        conn.execute("BEGIN")
        held = HeldStatement(conn, "DROP TABLE IF EXISTS qc_missing")
        assert _denied_after_hold(gw, held) == "DROP TABLE IF EXISTS qc_missing"
    assert pg.psql("SELECT to_regclass('qc_new') IS NULL").strip() == "t"

    with _agent(gw) as conn:
        # A search_path of several schemas: the gateway knows which, not their order.
        conn.execute("SET search_path TO qc_s, public")
        held = HeldStatement(conn, "DELETE FROM qc_only WHERE id = 1")
        assert _denied_after_hold(gw, held) == "DELETE FROM qc_only WHERE id = 1"


def test_utility_statements_are_held_although_they_would_fail(
    gw: RunningGateway, pg: EphemeralCluster
) -> None:
    # PostgreSQL parses ALTER TABLE without looking up the column: Parse cannot tell.
    sql = "ALTER TABLE qc_items DROP COLUMN nmae"
    assert isinstance(_server_error(pg, sql), psycopg.errors.UndefinedColumn)
    assert _denied_after_hold(gw, HeldStatement(_agent(gw), sql)) == sql


def test_a_check_that_fails_holds_the_statement(gw: RunningGateway, pg: EphemeralCluster) -> None:
    sql = "DELETE FROM qc_items WHERE nmae = 'a'"
    with _agent(gw) as conn:
        # The agent's session is open; its role may log in no more, so the check's side
        # connection (as the same role) fails: the statement is held, as before.
        pg.psql(f"ALTER ROLE {ROLE} NOLOGIN")
        try:
            assert _denied_after_hold(gw, HeldStatement(conn, sql)) == sql
        finally:
            pg.psql(f"ALTER ROLE {ROLE} LOGIN")
    with _agent(gw) as conn:
        # A lock the check would wait for: after lock_timeout it cannot tell, so it holds.
        with psycopg.connect(_direct(pg)) as locker:
            locker.execute("LOCK TABLE qc_items IN ACCESS EXCLUSIVE MODE")
            held = HeldStatement(conn, sql)
            review_id = held.review_id()
        admin_call(gw, "POST", f"/reviews/{review_id}/deny", body={"comment": "no"})
        held.finish()
        assert isinstance(held.error, psycopg.errors.InsufficientPrivilege), held.error
    # The role logs in again: the check is made, and the server's error comes back.
    with _agent(gw) as conn, pytest.raises(psycopg.errors.UndefinedColumn):
        conn.execute(sql)
