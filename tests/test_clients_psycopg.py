"""psycopg 3 through the gateway sees what it sees directly.

Most tests run one scenario on a connection through the gateway and on a direct
connection, and compare what the scenario observed.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from client_helpers import dropping, unique_name
from gateway_harness import RunningGateway
from querywarden.devcluster import EphemeralCluster

Scenario = Callable[[psycopg.Connection[Any]], Any]


def through_and_direct(
    pg: EphemeralCluster,
    gateway: RunningGateway,
    scenario: Scenario,
    *,
    autocommit: bool = True,
) -> tuple[Any, Any]:
    """Run ``scenario`` through the gateway, then directly; return both outcomes."""
    outcomes = []
    for dsn in (gateway.dsn(), pg.dsn()):
        with psycopg.connect(dsn, autocommit=autocommit, connect_timeout=10) as conn:
            outcomes.append(scenario(conn))
    return outcomes[0], outcomes[1]


@pytest.fixture
def table(pg: EphemeralCluster) -> Iterator[str]:
    """A fresh table with a column of each interesting type, owned by the upstream role."""
    name = unique_name("pg3")
    pg.psql(
        f"CREATE TABLE {name} (id int PRIMARY KEY, n numeric, t text, b bytea, "
        "ts timestamptz, doc jsonb, arr int[], tags text[]); "
        f"ALTER TABLE {name} OWNER TO qw_scram"
    )
    with dropping(pg, name):
        yield name


TYPES_QUERY = """
SELECT g AS i4,
       g::bigint * 10000000000 AS i8,
       (g / 7.0)::numeric(20, 10) AS num,
       'Infinity'::numeric AS inf,
       g * 0.25::float8 AS f8,
       g % 2 = 0 AS flag,
       'row ' || g || ' ünïcødé' AS txt,
       decode(md5(g::text), 'hex') AS raw,
       timestamptz '2024-02-29 23:59:59.123456+00' + g * interval '1 day 1 second' AS tstz,
       date '2000-01-01' + g AS d,
       interval '1 day 2 hours' * g AS iv,
       md5(g::text)::uuid AS id,
       jsonb_build_object('g', g, 'nested', jsonb_build_array(g, 'x', NULL)) AS doc,
       ARRAY[g, NULL, g * 2] AS ints,
       ARRAY['a', NULL, 'c,d', '"q"'] AS texts,
       CASE WHEN g % 3 = 0 THEN NULL ELSE g END AS maybe,
       NULL::text AS nothing
FROM generate_series(1, 300) g
ORDER BY g
"""


def test_text_and_binary_results_match_direct(
    pg: EphemeralCluster, gateway: RunningGateway
) -> None:
    def scenario(conn: psycopg.Connection[Any]) -> Any:
        out = []
        for binary in (False, True):
            with conn.cursor(binary=binary) as cur:
                cur.execute(TYPES_QUERY)
                description = [(c.name, c.type_code) for c in cur.description or ()]
                out.append(
                    (description, cur.fetchall(), cur.pgresult and cur.pgresult.binary_tuples)
                )
            # The same with parameters (extended protocol, typed binds).
            with conn.cursor(binary=binary) as cur:
                cur.execute(
                    "SELECT %s::int, %s::numeric, %s::text, %s::bytea, %s::timestamptz, "
                    "%s::jsonb, %s::int[], %s::text",
                    (
                        7,
                        Decimal("12345.678900"),
                        "hé\tllo",
                        b"\x00\xff\x10",
                        datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
                        Jsonb({"a": [1, None]}),
                        [1, None, 3],
                        None,
                    ),
                )
                out.append(cur.fetchall())
        return out

    through, direct = through_and_direct(pg, gateway, scenario)
    assert through == direct
    (text_desc, text_rows, text_fmt), _, (bin_desc, bin_rows, bin_fmt), params = through
    assert (text_fmt, bin_fmt) == (0, 1)
    assert text_desc == bin_desc
    assert text_rows == bin_rows
    assert len(text_rows) == 300
    first = text_rows[0]
    assert first[0] == 1 and isinstance(first[2], Decimal) and isinstance(first[7], bytes)
    assert first[8] == datetime(2024, 3, 1, 23, 59, 59, 123456, tzinfo=UTC) + timedelta(seconds=1)
    assert first[13] == [1, None, 2] and first[14] == ["a", None, "c,d", '"q"']
    assert text_rows[2][15] is None and text_rows[0][16] is None
    assert params[0][2] == "hé\tllo" and params[0][3] == b"\x00\xff\x10"
    assert params[0][5] == {"a": [1, None]} and params[0][7] is None


def test_large_values(pg: EphemeralCluster, gateway: RunningGateway) -> None:
    """Values of several MB cross the gateway in pieces and arrive whole."""

    def scenario(conn: psycopg.Connection[Any]) -> Any:
        big_text = "abcdefghijklmnopqrstuvwxyz" * 115_385 + "!"
        big_bytes = bytes(range(256)) * 20_000
        out = []
        for binary in (False, True):
            cur = conn.cursor(binary=binary)
            cur.execute(
                "SELECT repeat('ab', 4000000), %s::text, %s::bytea, length(%s::text)",
                (big_text, big_bytes, big_text),
            )
            row = cur.fetchone()
            assert row is not None
            out.append(
                (
                    hashlib.sha256(row[0].encode()).hexdigest(),
                    row[1] == big_text,
                    row[2] == big_bytes,
                    row[3],
                )
            )
        return out

    through, direct = through_and_direct(pg, gateway, scenario)
    assert through == direct
    assert through[0][1:] == (True, True, 3_000_011)
    assert through[0] == through[1]


def test_server_side_prepared_statements(pg: EphemeralCluster, gateway: RunningGateway) -> None:
    def scenario(conn: psycopg.Connection[Any]) -> Any:
        query = "SELECT %s::int * 2 AS doubled, %s::text || '!' AS shout, now() IS NOT NULL"
        results = [conn.execute(query, (i, f"v{i}"), prepare=True).fetchall() for i in range(10)]
        binary = [
            conn.cursor(binary=True).execute(query, (i, "b"), prepare=True).fetchone()
            for i in range(3)
        ]
        prepared = conn.execute(
            "SELECT statement FROM pg_prepared_statements ORDER BY prepare_time"
        ).fetchall()
        # A prepared statement that fails at execution, then the statement works again.
        failing = "SELECT 10 / %s::int"
        conn.execute(failing, (5,), prepare=True)
        with pytest.raises(errors.DivisionByZero):
            conn.execute(failing, (0,), prepare=True)
        after = conn.execute(failing, (2,), prepare=True).fetchone()
        conn.execute("DEALLOCATE ALL")
        left = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
        return results, binary, prepared, after, left

    through, direct = through_and_direct(pg, gateway, scenario)
    assert through == direct
    results, binary, prepared, after, left = through
    assert results[3] == [(6, "v3!", True)]
    assert binary[2] == (4, "b!", True)
    assert any("$1::int * 2" in s for (s,) in prepared), prepared
    assert after == (5,)
    assert left == (0,)


def test_pipeline_mode(pg: EphemeralCluster, gateway: RunningGateway, table: str) -> None:
    ins = sql.SQL("INSERT INTO {} (id, t) VALUES (%s, %s)").format(sql.Identifier(table))
    sel = sql.SQL("SELECT id, t FROM {} ORDER BY id").format(sql.Identifier(table))

    def scenario(conn: psycopg.Connection[Any]) -> Any:
        conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(table)))
        transcript: list[Any] = []
        with conn.pipeline() as pipeline:
            cursors = [conn.execute(ins, (i, f"p{i}")) for i in range(1, 6)]
            select = conn.execute(sel)
            conn.execute("SELECT %s::text", ("x",), prepare=True)
            pipeline.sync()
            transcript.append([c.rowcount for c in cursors])
            transcript.append(select.fetchall())

        # An error in the middle: the server skips the rest up to the next Sync and rolls
        # back the implicit transaction. (When psycopg raises, on a later execute or at
        # the end of the block, depends on timing; that it raises this error does not.)
        with pytest.raises(errors.DivisionByZero), conn.pipeline():
            conn.execute(ins, (10, "before error"))
            conn.execute("SELECT 1 / %s::int", (0,))
            conn.execute(ins, (11, "skipped"))
            conn.execute(sel)
        transcript.append(str(conn.info.transaction_status))

        with conn.pipeline():
            conn.execute(ins, (13, "recovered"))
            again = conn.execute(sel)
        transcript.append(again.fetchall())
        transcript.append(conn.execute("SELECT 'plain' AS after_pipeline").fetchone())
        return transcript

    through, direct = through_and_direct(pg, gateway, scenario)
    assert through == direct
    assert through == [
        [1, 1, 1, 1, 1],
        [(i, f"p{i}") for i in range(1, 6)],
        str(TransactionStatus.IDLE),
        [*((i, f"p{i}") for i in range(1, 6)), (13, "recovered")],
        ("plain",),
    ]


def test_long_pipeline(pg: EphemeralCluster, gateway: RunningGateway, table: str) -> None:
    """Thousands of statements in flight at once: flow control must not deadlock."""
    ins = sql.SQL("INSERT INTO {} (id, t) VALUES (%s, %s) RETURNING id, length(t)").format(
        sql.Identifier(table)
    )

    def scenario(conn: psycopg.Connection[Any]) -> Any:
        conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(table)))
        padding = "p" * 2000
        with conn.pipeline():
            cursors = [conn.execute(ins, (i, f"{i}{padding}")) for i in range(1, 5001)]
            wide = conn.execute("SELECT repeat('w', 1000) FROM generate_series(1, 5000)")
        returned = [c.fetchone() for c in cursors]
        return returned[:3], returned[-1], len(wide.fetchall())

    through, direct = through_and_direct(pg, gateway, scenario)
    assert through == direct
    assert through == ([(1, 2001), (2, 2001), (3, 2001)], (5000, 2004), 5000)


def test_copy_text_and_binary(pg: EphemeralCluster, gateway: RunningGateway) -> None:
    types = ["int4", "numeric", "text", "bytea", "timestamptz", "jsonb", "int4[]", "text[]"]
    start = datetime(2023, 5, 6, 7, 8, 9, 101112, tzinfo=UTC)

    def make_rows(offset: int) -> list[tuple[Any, ...]]:
        return [
            (
                offset + i,
                Decimal(i) / 8,
                None if i % 11 == 0 else f"line {i}\twith tab\nand newline \\ {'é' * (i % 5)}",
                bytes([i % 256, 0, 255]) * (i % 4),
                start + timedelta(minutes=i),
                Jsonb({"i": i, "odd": i % 2 == 1}),
                [i, None, -i],
                ["x", None, f"y{i}"],
            )
            for i in range(1, 4001)
        ]

    huge = ("big row " * 200_000, b"\x01\x02" * 500_000)

    def scenario(conn: psycopg.Connection[Any]) -> Any:
        name = unique_name("pg3_copy")
        conn.execute(
            f"CREATE TABLE {name} (id int PRIMARY KEY, n numeric, t text, b bytea, "
            "ts timestamptz, doc jsonb, arr int[], tags text[])"
        )
        try:
            cur = conn.cursor()
            with cur.copy(f"COPY {name} FROM STDIN") as copy:
                for row in make_rows(0):
                    copy.write_row(row)
            text_in = cur.rowcount
            with cur.copy(f"COPY {name} FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(types)
                for row in make_rows(10_000):
                    copy.write_row(row)
                copy.write_row((99_999, None, huge[0], huge[1], None, None, None, None))
            binary_in = cur.rowcount
            # The server fails the COPY at an early row while psycopg is still sending:
            # the rest of the data is dropped and the error arrives at the end.
            with (
                pytest.raises(errors.UniqueViolation),
                cur.copy(f"COPY {name} (id) FROM STDIN") as copy,
            ):
                for i in range(100_000):
                    copy.write_row((1 if i == 5 else 50_000 + i,))

            select = f"SELECT * FROM {name} WHERE id <> 99999 ORDER BY id"
            text_out = b""
            with cur.copy(f"COPY ({select}) TO STDOUT") as copy:
                for block in copy:
                    text_out += bytes(block)
            binary_out = b""
            with cur.copy(f"COPY ({select}) TO STDOUT (FORMAT BINARY)") as copy:
                for block in copy:
                    binary_out += bytes(block)
            with cur.copy(f"COPY ({select}) TO STDOUT (FORMAT BINARY)") as copy:
                copy.set_types(types)
                decoded = list(copy.rows())
            with cur.copy(f"COPY (SELECT t, b FROM {name} WHERE id = 99999) TO STDOUT") as copy:
                big_out = b"".join(bytes(block) for block in copy)
            table_rows = cur.execute(select).fetchall()
            return (
                text_in,
                binary_in,
                hashlib.sha256(text_out).hexdigest(),
                hashlib.sha256(binary_out).hexdigest(),
                decoded,
                table_rows,
                hashlib.sha256(big_out).hexdigest(),
            )
        finally:
            conn.execute(f"DROP TABLE {name}")

    through, direct = through_and_direct(pg, gateway, scenario)
    assert through == direct
    text_in, binary_in, _, _, decoded, table_rows, _ = through
    assert (text_in, binary_in) == (4000, 4001)
    expected = make_rows(0) + make_rows(10_000)
    assert len(decoded) == 8000
    assert [tuple(r) for r in decoded] == table_rows
    assert [r[:5] + r[6:] for r in table_rows] == [r[:5] + r[6:] for r in expected]
    assert [r[5] for r in table_rows] == [r[5].obj for r in expected]


def test_transactions_and_status(pg: EphemeralCluster, gateway: RunningGateway, table: str) -> None:
    ins = sql.SQL("INSERT INTO {} (id, t) VALUES (%s, %s)").format(sql.Identifier(table))
    sel = sql.SQL("SELECT id, t FROM {} ORDER BY id").format(sql.Identifier(table))

    def visible() -> list[tuple[Any, ...]]:
        with psycopg.connect(pg.dsn(), autocommit=True) as other:
            return other.execute(sel).fetchall()

    def scenario(conn: psycopg.Connection[Any]) -> Any:
        conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(table)))
        conn.commit()
        steps: list[Any] = [conn.info.transaction_status]
        conn.execute(ins, (1, "committed"))
        steps.append(conn.info.transaction_status)
        steps.append(visible())
        conn.commit()
        steps += [conn.info.transaction_status, visible()]

        conn.execute(ins, (2, "rolled back"))
        conn.rollback()
        steps += [conn.info.transaction_status, visible()]

        conn.execute(ins, (3, "lost"))
        with pytest.raises(errors.UniqueViolation):
            conn.execute(ins, (1, "duplicate"))
        steps.append(conn.info.transaction_status)
        with pytest.raises(errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        steps.append(conn.info.transaction_status)
        conn.rollback()
        steps += [conn.info.transaction_status, visible()]

        with conn.transaction():
            conn.execute(ins, (4, "outer"))
            with pytest.raises(errors.DivisionByZero), conn.transaction():
                conn.execute(ins, (5, "savepoint rolled back"))
                conn.execute("SELECT 1/0")
            steps.append(conn.info.transaction_status)
            conn.execute(ins, (6, "after savepoint"))
        steps.append(conn.info.transaction_status)
        conn.commit()
        steps.append(visible())
        return steps

    through, direct = through_and_direct(pg, gateway, scenario, autocommit=False)
    assert through == direct
    idle, intrans, inerror = (
        TransactionStatus.IDLE,
        TransactionStatus.INTRANS,
        TransactionStatus.INERROR,
    )
    assert through[:5] == [idle, intrans, [], idle, [(1, "committed")]]
    assert through[5:7] == [idle, [(1, "committed")]]
    assert through[7:11] == [inerror, inerror, idle, [(1, "committed")]]
    assert through[11] == intrans
    assert [r[0] for r in through[-1]] == [1, 4, 6]


def test_listen_notify(pg: EphemeralCluster, gateway: RunningGateway) -> None:
    channel = unique_name("chan")
    with (
        psycopg.connect(gateway.dsn(), autocommit=True) as listener,
        psycopg.connect(pg.dsn(), autocommit=True) as direct_sender,
        psycopg.connect(gateway.dsn(), autocommit=True) as gateway_sender,
    ):
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        direct_sender.execute("SELECT pg_notify(%s, %s)", (channel, "from direct"))
        gateway_sender.execute(sql.SQL("NOTIFY {}, 'from gateway'").format(sql.Identifier(channel)))
        with gateway_sender.transaction():
            gateway_sender.execute("SELECT pg_notify(%s, %s)", (channel, "in a transaction"))
            gateway_sender.execute("SELECT pg_notify(%s, %s)", (channel, "ü" * 1000))
        received = list(listener.notifies(timeout=10, stop_after=4))
        # A notification that arrives while the listener is idle is delivered too.
        direct_sender.execute("SELECT pg_notify(%s, %s)", (channel, "while idle"))
        time.sleep(0.2)
        received += list(listener.notifies(timeout=10, stop_after=1))
        upstream_pids = {
            direct_sender.info.backend_pid,
            gateway_sender.execute("SELECT pg_backend_pid()").fetchone()[0],
        }
    assert [(n.channel, n.payload) for n in received] == [
        (channel, "from direct"),
        (channel, "from gateway"),
        (channel, "in a transaction"),
        (channel, "ü" * 1000),
        (channel, "while idle"),
    ]
    assert {n.pid for n in received} == upstream_pids


def test_large_result_with_server_side_cursor(
    pg: EphemeralCluster, gateway: RunningGateway
) -> None:
    query = (
        "SELECT g, md5(g::text), g::numeric / 3, now() - g * interval '1 s' < now() "
        "FROM generate_series(1, 200000) g ORDER BY g"
    )

    def scenario(conn: psycopg.Connection[Any]) -> Any:
        digest = hashlib.sha256()
        count = 0
        last = None
        with conn.cursor(name="big_stream") as cur:
            cur.itersize = 5000
            cur.execute(query)
            for row in cur:
                digest.update(repr(row).encode())
                count += 1
                last = row
        return count, digest.hexdigest(), last

    through, direct = through_and_direct(pg, gateway, scenario, autocommit=False)
    assert through == direct
    assert through[0] == 200_000
    assert through[2][:2] == (200_000, hashlib.md5(b"200000").hexdigest())


def test_cancel(gateway: RunningGateway) -> None:
    with psycopg.connect(gateway.dsn(), autocommit=True) as conn:
        timer = threading.Timer(1.0, conn.cancel_safe)
        started = time.monotonic()
        timer.start()
        try:
            with pytest.raises(errors.QueryCanceled, match="canceling statement due to user"):
                conn.execute("SELECT pg_sleep(30)")
        finally:
            timer.cancel()
        assert time.monotonic() - started < 20
        assert conn.execute("SELECT 'still usable'").fetchone() == ("still usable",)
        assert conn.info.transaction_status == TransactionStatus.IDLE
