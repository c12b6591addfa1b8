"""A refusal at the decision point, in every protocol mode, against a real PostgreSQL.

The gate here is test-only: it refuses any statement that mentions ``forbidden``. What is
checked is what a server would send for a failed statement: ErrorResponse with the
refusal's SQLSTATE and message, then the right ReadyForQuery, the rest of an extended
pipeline discarded up to Sync, and a failed transaction block where there was one.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable

import psycopg
import pytest

from gateway_harness import RunningGateway, token_for
from querywarden import codec
from querywarden.devcluster import DATABASE
from querywarden.hooks import ALLOW, Decision, SessionInfo, StatementRequest
from wire_client import SYNC, WireClient, bind, describe, execute, types

REFUSAL = Decision.refuse(
    "querywarden: statement refused by rule test-forbidden: it mentions a forbidden name",
    sqlstate="42501",
    hint="query another table",
    rule="test-forbidden",
)


class RefuseForbidden:
    """Refuses requests whose SQL mentions 'forbidden'; records what it saw."""

    def __init__(self, *, refuse_function_calls: bool = False) -> None:
        self.seen: list[StatementRequest] = []
        self.refuse_function_calls = refuse_function_calls

    def decide(self, session: SessionInfo, request: StatementRequest) -> Decision:
        self.seen.append(request)
        if request.kind == "function_call" and self.refuse_function_calls:
            return REFUSAL
        return REFUSAL if "forbidden" in request.sql.lower() else ALLOW


class SlowGate(RefuseForbidden):
    """Decides after an await, as a gate that needs I/O (EXPLAIN, an approver) would."""

    def decide(self, session: SessionInfo, request: StatementRequest) -> Decision:  # type: ignore[override]
        decision = super().decide(session, request)

        async def later() -> Decision:
            await asyncio.sleep(0.05)
            return decision

        return later()  # type: ignore[return-value]


@pytest.fixture
def refusing(make_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    gate = RefuseForbidden(refuse_function_calls=True)
    running = make_gateway(gate=gate)
    running.extra["gate"] = gate
    return running


def wire(gw: RunningGateway) -> WireClient:
    return WireClient(gw.host, gw.port, "alice", token_for("alice"), DATABASE)


def assert_refusal(msg_fields: dict[str, str]) -> None:
    assert msg_fields["C"] == "42501"
    assert msg_fields["M"] == REFUSAL.message
    assert msg_fields["H"] == "query another table"
    assert msg_fields["S"] == "ERROR"


def test_simple_query_refused_when_idle(refusing: RunningGateway) -> None:
    client = wire(refusing)
    client.send(codec.query("SELECT 'forbidden'"))
    reply = client.until_ready()
    assert types(reply) == "EZ"
    assert_refusal(reply[0].fields)
    assert reply[1].status == "I"
    client.send(codec.query("SELECT 42"))
    assert [m.type for m in client.until_ready()] == ["T", "D", "C", "Z"]
    client.close()


def test_multi_statement_query_refused_whole(refusing: RunningGateway) -> None:
    client = wire(refusing)
    client.send(codec.query("CREATE TEMP TABLE t1(a int); SELECT 'forbidden'; SELECT 1"))
    reply = client.until_ready()
    assert types(reply) == "EZ"
    assert_refusal(reply[0].fields)
    # Nothing of the message ran: the first statement's table does not exist.
    client.send(codec.query("SELECT to_regclass('pg_temp.t1') IS NULL"))
    rows = client.until_ready()
    assert rows[1].frame.endswith(b"t")
    client.close()


def test_refusal_inside_transaction_block_fails_the_block(refusing: RunningGateway) -> None:
    client = wire(refusing)
    client.send(codec.query("BEGIN"))
    assert client.until_ready()[-1].status == "T"
    client.send(codec.query("SELECT 'forbidden'"))
    reply = client.until_ready()
    assert types(reply) == "EZ"
    assert reply[1].status == "E"
    # The server agrees the block failed: the next statement is refused by PostgreSQL.
    client.send(codec.query("SELECT 1"))
    reply = client.until_ready()
    assert reply[0].fields["C"] == "25P02"
    client.send(codec.query("ROLLBACK"))
    assert client.until_ready()[-1].status == "I"
    client.close()


def test_extended_refused_parse_discards_until_sync(refusing: RunningGateway) -> None:
    client = wire(refusing)
    client.send(
        codec.parse("s1", "SELECT 'forbidden'"),
        bind("", "s1"),
        execute(),
        codec.parse("s2", "SELECT 2"),
        bind("", "s2"),
        execute(),
        SYNC,
    )
    reply = client.until_ready()
    assert types(reply) == "EZ"  # everything after the refusal was discarded up to Sync
    assert_refusal(reply[0].fields)
    assert reply[1].status == "I"
    # The refused statement does not exist: a later Bind of it cannot run it.
    client.send(bind("", "s1"), execute(), SYNC)
    reply = client.until_ready()
    assert types(reply) == "EZ"
    assert reply[0].fields["C"] == "26000"
    # The discarded s2 was never created either.
    client.send(bind("", "s2"), execute(), SYNC)
    assert client.until_ready()[0].fields["C"] == "26000"
    client.close()


def test_extended_refusal_after_allowed_messages_keeps_order(refusing: RunningGateway) -> None:
    client = wire(refusing)
    client.send(
        codec.parse("", "SELECT 1"),
        bind(),
        describe("P"),
        execute(),
        codec.parse("", "SELECT 'forbidden'"),
        bind(),
        execute(),
        SYNC,
        codec.parse("", "SELECT 3"),
        bind(),
        execute(),
        SYNC,
    )
    first = client.until_ready()
    assert types(first) == "12TDCEZ"
    assert_refusal(first[5].fields)
    second = client.until_ready()
    assert types(second) == "12DCZ"
    assert second[2].frame.endswith(b"3")
    client.close()


def test_extended_refusal_in_transaction_block(refusing: RunningGateway) -> None:
    client = wire(refusing)
    client.send(codec.query("BEGIN"))
    client.until_ready()
    client.send(codec.parse("", "SELECT 'forbidden'"), bind(), execute(), SYNC)
    reply = client.until_ready()
    assert types(reply) == "EZ"
    assert reply[1].status == "E"
    client.send(codec.query("ROLLBACK"))
    assert client.until_ready()[-1].status == "I"
    client.close()


def test_function_call_refused(refusing: RunningGateway) -> None:
    client = wire(refusing)
    client.send(codec.query("SELECT 'pg_backend_pid'::regproc::oid"))
    oid = int(client.until_ready()[1].frame[11:].decode())
    # FunctionCall: oid, no argument formats, no arguments, text result.
    payload = codec.UINT32.pack(oid) + b"\0\0" + b"\0\0" + b"\0\0"
    client.send(codec.message(b"F", payload))
    reply = client.until_ready()
    assert types(reply) == "EZ"
    assert_refusal(reply[0].fields)
    gate = refusing.extra["gate"]
    assert any(r.kind == "function_call" and r.function_oid == oid for r in gate.seen)
    client.close()


def test_copy_refused_in_psql(refusing: RunningGateway, pg_table: str) -> None:
    result = subprocess.run(
        ["psql", refusing.dsn(), "-X", "-c", f"\\copy {pg_table} (forbidden) FROM stdin"],
        input="1\n\\.\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "refused by rule test-forbidden" in result.stderr


def test_psycopg_sees_refusal_and_recovers(refusing: RunningGateway) -> None:
    with psycopg.connect(refusing.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute("SELECT 'forbidden'")
        assert info.value.diag.message_hint == "query another table"
        assert conn.execute("SELECT 7").fetchone() == (7,)
        # In pipeline mode the error surfaces when the pipeline syncs.
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.pipeline():
            a = conn.execute("SELECT 1")
            conn.execute("SELECT 'forbidden'")
            conn.execute("SELECT 2")
        assert a.fetchone() == (1,)
        assert conn.execute("SELECT 8").fetchone() == (8,)


def test_gate_sees_each_statement_of_a_multi_statement_query(refusing: RunningGateway) -> None:
    client = wire(refusing)
    client.send(codec.query("SELECT 1; /* a comment; with a semicolon */ SELECT ';'"))
    assert types(client.until_ready()) == "TDCTDCZ"
    request = refusing.extra["gate"].seen[-1]
    assert request.kind == "query"
    assert len(request.statements) == 2
    assert request.statements[1].endswith("SELECT ';'")
    client.close()


def test_awaited_decisions_keep_pipeline_order(make_gateway: Callable[..., RunningGateway]) -> None:
    gw = make_gateway(gate=SlowGate())
    client = wire(gw)
    client.send(
        codec.query("SELECT 1"),
        codec.query("SELECT 'forbidden'"),
        codec.query("SELECT 3"),
    )
    replies = [client.until_ready() for _ in range(3)]
    assert [types(r) for r in replies] == ["TDCZ", "EZ", "TDCZ"]
    assert_refusal(replies[1][0].fields)
    assert replies[2][1].frame.endswith(b"3")
    client.close()


def test_failing_gate_refuses_fail_closed(make_gateway: Callable[..., RunningGateway]) -> None:
    class Broken:
        def decide(self, session: SessionInfo, request: StatementRequest) -> object:
            async def boom() -> Decision:
                raise RuntimeError("policy backend unavailable")

            return boom()

    gw = make_gateway(gate=Broken())
    client = wire(gw)
    client.send(codec.query("SELECT 1"))
    reply = client.until_ready()
    assert types(reply) == "EZ"
    assert reply[0].fields["C"] == "58000"
    assert "was not run" in reply[0].fields["M"]
    client.close()


@pytest.fixture
def pg_table(pg: object) -> str:
    from querywarden.devcluster import EphemeralCluster

    assert isinstance(pg, EphemeralCluster)
    name = "refusal_copy_target"
    pg.psql(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (forbidden int)")
    pg.psql(f"GRANT ALL ON {name} TO PUBLIC")
    return name
