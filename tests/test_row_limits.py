"""A rule's maxRows through the real gateway, real clients and a real PostgreSQL.

Past the limit the client gets SQLSTATE 54000 instead of the rest of the result, and the
statement is cancelled upstream so the server's state matches the error: what it wrote is
rolled back, and in a transaction block the transaction is failed.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable, Iterator

import asyncpg
import psycopg
import pytest

from gateway_harness import DATABASE, POLICY, RunningGateway, token_for
from querywarden import codec
from querywarden.devcluster import EphemeralCluster
from querywarden.policy import PolicyDocument
from wire_client import SYNC, WireClient, bind, execute, types

LIMIT = 100

RULES = [
    {
        "name": "agents-bounded",
        "subjects": {"groups": ["ai-agents"]},
        "allow": {
            "operations": ["select", "transaction", "copy_out"],
            "tables": ["public.*", "pg_catalog.*"],
        },
        "limits": {"maxRows": LIMIT},
    },
    {
        "name": "dba-bounded",
        "subjects": {"groups": ["dba"]},
        "allow": {"operations": ["*"], "tables": ["*"]},
        "limits": {"maxRows": LIMIT},
    },
]

BIG = "SELECT g, repeat('x', 20) FROM generate_series(1, 5000000) g"


@pytest.fixture(scope="module")
def numbers(pg: EphemeralCluster) -> Iterator[None]:
    pg.psql(
        "CREATE TABLE IF NOT EXISTS qw_numbers (n int);"
        "CREATE TABLE IF NOT EXISTS qw_sink (n int);"
        "GRANT ALL ON qw_numbers, qw_sink TO PUBLIC;"
        "TRUNCATE qw_numbers; INSERT INTO qw_numbers SELECT generate_series(1, 1000);"
    )
    yield
    pg.psql("DROP TABLE qw_numbers, qw_sink")


@pytest.fixture
def bounded(make_gateway: Callable[..., RunningGateway], numbers: None) -> RunningGateway:
    policy = PolicyDocument.model_validate(
        {"identity": POLICY.identity.model_dump(by_alias=True), "rules": RULES}
    )
    return make_gateway(policy=policy)


def _assert_limit_error(error: psycopg.Error, *, cancelled: bool) -> None:
    diag = error.diag
    assert diag.sqlstate == "54000"
    assert diag.message_primary is not None
    assert f"more than {LIMIT} rows" in diag.message_primary
    assert "agents-bounded" in diag.message_primary or "dba-bounded" in diag.message_primary
    assert diag.message_hint is not None and f"LIMIT {LIMIT}" in diag.message_hint
    assert diag.message_detail is not None
    assert ("cancelled on the server" in diag.message_detail) is cancelled


def test_results_up_to_the_limit_pass_and_larger_ones_fail(bounded: RunningGateway) -> None:
    with psycopg.connect(bounded.dsn("alice"), autocommit=True) as conn:
        rows = conn.execute(f"SELECT n FROM qw_numbers ORDER BY n LIMIT {LIMIT}").fetchall()
        assert [r[0] for r in rows] == list(range(1, LIMIT + 1))
        with pytest.raises(psycopg.errors.ProgramLimitExceeded) as info:
            conn.execute("SELECT n FROM qw_numbers").fetchall()
        # A big result is cancelled long before it ends; a short overrun may have finished.
        assert info.value.diag.message_detail is not None
        with pytest.raises(psycopg.errors.ProgramLimitExceeded) as big:
            conn.execute(BIG).fetchall()
        _assert_limit_error(big.value, cancelled=True)
        # The session carries on, and each result is counted afresh.
        assert conn.execute("SELECT count(*) FROM qw_numbers").fetchone() == (1000,)
        assert len(conn.execute(f"SELECT n FROM qw_numbers LIMIT {LIMIT}").fetchall()) == LIMIT


def test_cancelled_write_is_rolled_back(bounded: RunningGateway) -> None:
    with psycopg.connect(bounded.dsn("bob"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.ProgramLimitExceeded) as info:
            conn.execute(
                "INSERT INTO qw_sink SELECT g FROM generate_series(1, 2000000) g RETURNING n"
            )
        detail = info.value.diag.message_detail or ""
        written = conn.execute("SELECT count(*) FROM qw_sink").fetchone()
        # What the error says is what happened on the server.
        if "cancelled on the server" in detail:
            assert written == (0,)
        else:
            assert "finished on the server" in detail
            assert written == (2000000,)
        conn.execute("TRUNCATE qw_sink")


def test_transaction_block_fails_like_any_error(bounded: RunningGateway) -> None:
    with psycopg.connect(bounded.dsn("alice")) as conn:
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.ProgramLimitExceeded) as info:
            conn.execute(BIG).fetchall()
        _assert_limit_error(info.value, cancelled=True)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_copy_to_stdout_is_bounded(bounded: RunningGateway) -> None:
    with psycopg.connect(bounded.dsn("alice"), autocommit=True) as conn:
        out = io.BytesIO()
        bounded_copy = f"COPY (SELECT n FROM qw_numbers LIMIT {LIMIT}) TO STDOUT"
        with conn.cursor() as cur, cur.copy(bounded_copy) as copy:
            for chunk in copy:
                out.write(chunk)
        assert out.getvalue().count(b"\n") == LIMIT
        with (
            pytest.raises(psycopg.errors.ProgramLimitExceeded),
            conn.cursor() as cur,
            cur.copy(f"COPY ({BIG}) TO STDOUT") as copy,
        ):
            for _chunk in copy:
                pass
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_extended_protocol_and_portals_are_counted_across_fetches(
    bounded: RunningGateway,
) -> None:
    async def scenario() -> None:
        conn = await asyncpg.connect(
            host=bounded.host,
            port=bounded.port,
            user="alice",
            password=token_for("alice"),
            database=DATABASE,
            ssl=False,
        )
        try:
            rows = await conn.fetch("SELECT n FROM qw_numbers WHERE n <= $1", LIMIT)
            assert len(rows) == LIMIT
            with pytest.raises(asyncpg.exceptions.ProgramLimitExceededError):
                await conn.fetch("SELECT n FROM qw_numbers WHERE n <= $1", 5000)
            # A cursor fetches in chunks (Execute with a row count, PortalSuspended):
            # the limit holds for the portal, not for each chunk.
            seen = 0
            with pytest.raises(asyncpg.exceptions.ProgramLimitExceededError):
                async with conn.transaction():
                    async for _row in conn.cursor("SELECT n FROM qw_numbers", prefetch=30):
                        seen += 1
            assert seen <= LIMIT
            assert await conn.fetchval("SELECT count(*) FROM qw_numbers") == 1000
        finally:
            await conn.close()

    asyncio.run(scenario())


def test_pipelined_requests_are_not_cancelled(bounded: RunningGateway) -> None:
    # With a second request already on its way to the server, a cancel could hit it: the
    # gateway withholds the rows and reports the first statement as finished instead.
    client = WireClient(bounded.host, bounded.port, "alice", token_for("alice"), DATABASE)
    try:
        client.send(
            codec.query("SELECT n FROM qw_numbers"),
            codec.query("SELECT count(*) FROM qw_numbers"),
        )
        first, second = client.until_ready(), client.until_ready()
        assert types(first) == "T" + "D" * LIMIT + "EZ"
        error = first[-2].fields
        assert error["C"] == "54000"
        assert "finished on the server" in error["D"]
        assert types(second) == "TDCZ"
        assert second[1].frame.endswith(b"1000")
        # Extended protocol, nothing sent after the Sync: cancelled upstream.
        client.send(codec.parse("", BIG), bind(), execute(), SYNC)
        reply = client.until_ready()
        assert reply[-1].status == "I"
        assert reply[-2].fields["C"] == "54000"
        assert "cancelled on the server" in reply[-2].fields["D"]
        assert sum(m.type == "D" for m in reply) == LIMIT
        client.send(codec.query("SELECT 1"))
        assert types(client.until_ready()) == "TDCZ"
    finally:
        client.close()
