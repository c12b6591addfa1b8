"""asyncpg through the gateway sees what it sees directly.

asyncpg speaks only the extended protocol, decodes results in binary and pipelines
aggressively (executemany, prepared statements, COPY), so it exercises the gateway's
message tracking differently from libpq.
"""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from client_helpers import direct_url, unique_name
from gateway_harness import RunningGateway
from querywarden.devcluster import EphemeralCluster

Scenario = Callable[[asyncpg.Connection], Awaitable[Any]]


def through_and_direct(
    pg: EphemeralCluster, gateway: RunningGateway, scenario: Scenario
) -> tuple[Any, Any]:
    """Run ``scenario`` on a connection through the gateway, then on a direct one."""

    async def run(url: str, **kwargs: Any) -> Any:
        conn = await asyncpg.connect(url, timeout=10, **kwargs)
        try:
            return await scenario(conn)
        finally:
            await conn.close()

    async def both() -> tuple[Any, Any]:
        # Through the gateway with asyncpg's default sslmode (prefer: the gateway answers
        # 'N' and the session goes on in plaintext); directly with TLS.
        through = await run(gateway.url())
        direct = await run(direct_url(pg))
        return through, direct

    return asyncio.run(both())


def rows(records: list[asyncpg.Record]) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in records]


TYPES_QUERY = """
SELECT g AS i4, g::bigint << 40 AS i8, g::int2 AS i2,
       (g / 7.0)::numeric(30, 12) AS num, g * 0.5::float8 AS f8, g * 0.25::float4 AS f4,
       g % 2 = 0 AS flag, 'zeile ' || g || ' ✓' AS txt, decode(md5(g::text), 'hex') AS raw,
       timestamptz '1999-12-31 23:59:59.999999+00' + g * interval '1 hour' AS tstz,
       timestamp '2020-02-29 01:02:03' + g * interval '1 minute' AS ts,
       date '2024-01-01' + g AS d, time '12:00' + g * interval '1 s' AS t,
       g * interval '1 day 3 hours 4 microseconds' AS iv, md5(g::text)::uuid AS id,
       jsonb_build_object('g', g, 'a', jsonb_build_array(1, 'two', NULL)) AS doc,
       ARRAY[g, NULL, -g] AS ints, ARRAY[['a', 'b'], ['c', NULL]] AS grid,
       inet '10.0.0.1' + g AS addr, int4range(g, g + 10) AS rng,
       CASE WHEN g % 4 = 0 THEN NULL ELSE g END AS maybe
FROM generate_series(1, 250) g ORDER BY g
"""


def test_binary_decoding_of_types(pg: EphemeralCluster, gateway: RunningGateway) -> None:
    async def scenario(conn: asyncpg.Connection) -> Any:
        records = await conn.fetch(TYPES_QUERY)
        with_params = await conn.fetchrow(
            "SELECT $1::int, $2::numeric, $3::text, $4::bytea, $5::timestamptz, $6::date, "
            "$7::int[], $8::text, $9::jsonb",
            -5,
            Decimal("-1.5e-10"),
            "tab\tand ✓",
            b"\x00\x01\xfe",
            datetime(2001, 2, 3, 4, 5, 6, 7, tzinfo=UTC),
            date(1970, 1, 1),
            [1, None],
            None,
            '{"k": [true, null]}',
        )
        return [list(r.items()) for r in records], list(with_params.items())

    through, direct = through_and_direct(pg, gateway, scenario)
    assert through == direct
    records, params = through
    assert len(records) == 250
    first = dict(records[0])
    assert first["i8"] == 1 << 40 and first["num"] == Decimal("0.142857142857")
    assert first["tstz"] == datetime(2000, 1, 1, 0, 59, 59, 999999, tzinfo=UTC)
    assert first["grid"] == [["a", "b"], ["c", None]] and first["ints"] == [1, None, -1]
    assert dict(records[3])["maybe"] is None
    assert [v for _, v in params] == [
        -5,
        Decimal("-1.5e-10"),
        "tab\tand ✓",
        b"\x00\x01\xfe",
        datetime(2001, 2, 3, 4, 5, 6, 7, tzinfo=UTC),
        date(1970, 1, 1),
        [1, None],
        None,
        '{"k": [true, null]}',
    ]


def test_prepared_statements(pg: EphemeralCluster, gateway: RunningGateway) -> None:
    async def scenario(conn: asyncpg.Connection) -> Any:
        stmt = await conn.prepare(
            "SELECT g, $1::text || g AS label, g * $2::numeric AS scaled "
            "FROM generate_series(1, $3::int) g"
        )
        params = [t.name for t in stmt.get_parameters()]
        attrs = [(a.name, a.type.name) for a in stmt.get_attributes()]
        fetched = [rows(await stmt.fetch(f"run{i}-", Decimal(i) / 4, i * 10)) for i in range(5)]
        single = await stmt.fetchrow("one", Decimal(2), 1)
        value = await stmt.fetchval("x", Decimal(1), 3, column=1)
        cursor_rows = []
        async with conn.transaction():
            async for record in stmt.cursor("cur", Decimal(3), 2000, prefetch=128):
                cursor_rows.append(tuple(record))
        named = await conn.fetch(
            "SELECT name IS NOT NULL, statement FROM pg_prepared_statements "
            "WHERE statement LIKE 'SELECT g, $1::text%' ORDER BY statement"
        )
        # A failing execution of a prepared statement leaves it (and the session) usable.
        divide = await conn.prepare("SELECT 100 / $1::int")
        with pytest.raises(asyncpg.DivisionByZeroError):
            await divide.fetchval(0)
        after = await divide.fetchval(7)
        return params, attrs, fetched, tuple(single), value, cursor_rows, rows(named), after

    through, direct = through_and_direct(pg, gateway, scenario)
    assert through == direct
    params, attrs, fetched, single, value, cursor_rows, named, after = through
    assert params == ["text", "numeric", "int4"]
    assert attrs == [("g", "int4"), ("label", "text"), ("scaled", "numeric")]
    assert [len(f) for f in fetched] == [0, 10, 20, 30, 40]
    assert single == (1, "one1", Decimal(2))
    assert value == "x1"
    assert len(cursor_rows) == 2000 and cursor_rows[-1][1] == "cur2000"
    assert len(named) == 1 and named[0][0] is True
    assert after == 14


def test_copy_records_from_query_and_to_table(
    pg: EphemeralCluster, gateway: RunningGateway
) -> None:
    start = datetime(2022, 6, 1, tzinfo=UTC)
    records = [
        (
            i,
            None if i % 9 == 0 else f"name\t{i}\n✓",
            Decimal(i) / 3,
            start + timedelta(seconds=i),
            [i, None],
            bytes([i % 256]) * (i % 5),
        )
        for i in range(1, 20001)
    ]
    # COPY text format: \N is NULL; "\\x0N" is the bytea '\x0N' (one byte).
    text_source = "".join(
        f"{i}\tcopied {i}\t{i}.5\t\\N\t{{{i}}}\t\\\\x0{i % 10}\n" for i in range(30001, 33001)
    )

    async def scenario(conn: asyncpg.Connection) -> Any:
        table = unique_name("apg_copy")
        await conn.execute(
            f"CREATE TABLE {table} (id int PRIMARY KEY, name text, n numeric, "
            "ts timestamptz, arr int[], b bytea)"
        )
        try:
            status_records = await conn.copy_records_to_table(table, records=records)
            status_file = await conn.copy_to_table(
                table, source=io.BytesIO(text_source.encode()), format="text"
            )
            # COPY in with an error: the server rejects the data, the session recovers.
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.copy_records_to_table(table, records=[(1, "dup", 0, None, None, None)])
            # Failing early in a long COPY while asyncpg still streams records.
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.copy_records_to_table(
                    table,
                    records=((2 if i == 3 else 100_000 + i, "x" * 40) for i in range(100_000)),
                    columns=["id", "name"],
                )
            count = await conn.fetchval(f"SELECT count(*) FROM {table}")

            out_text = io.BytesIO()
            status_out = await conn.copy_from_query(
                f"SELECT * FROM {table} ORDER BY id", output=out_text
            )
            out_csv = io.BytesIO()
            await conn.copy_from_query(
                f"SELECT id, name FROM {table} WHERE id <= $1 ORDER BY id",
                500,
                output=out_csv,
                format="csv",
                header=True,
            )
            out_binary = io.BytesIO()
            await conn.copy_from_table(table, output=out_binary, format="binary")
            chunks: list[bytes] = []

            async def sink(chunk: bytes) -> None:
                chunks.append(chunk)

            await conn.copy_from_query(f"SELECT id FROM {table} ORDER BY id", output=sink)
            ordered = rows(await conn.fetch(f"SELECT * FROM {table} WHERE id <= 20000 ORDER BY id"))
            return (
                status_records,
                status_file,
                count,
                status_out,
                out_text.getvalue(),
                out_csv.getvalue(),
                len(out_binary.getvalue()),
                b"".join(chunks),
                ordered,
            )
        finally:
            await conn.execute(f"DROP TABLE {table}")

    through, direct = through_and_direct(pg, gateway, scenario)
    assert through == direct
    status_records, status_file, count, status_out, text, csv_out, _, ids, ordered = through
    assert (status_records, status_file, count) == ("COPY 20000", "COPY 3000", 23000)
    assert status_out == "COPY 23000"
    assert text.count(b"\n") == 23000
    assert text.endswith(b"33000\tcopied 33000\t33000.5\t\\N\t{33000}\t\\\\x00\n")
    parsed = list(csv.reader(io.StringIO(csv_out.decode())))
    assert parsed[0] == ["id", "name"] and len(parsed) == 501
    assert parsed[1] == ["1", "name\t1\n✓"] and parsed[9] == ["9", ""]
    assert ids == b"".join(b"%d\n" % i for i in [*range(1, 20001), *range(30001, 33001)])
    assert ordered == records


def test_executemany(pg: EphemeralCluster, gateway: RunningGateway) -> None:
    async def scenario(conn: asyncpg.Connection) -> Any:
        table = unique_name("apg_many")
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text, n float8)")
        try:
            await conn.executemany(
                f"INSERT INTO {table} VALUES ($1, $2, $3)",
                [(i, f"v{i}", i / 7) for i in range(1, 5001)],
            )
            await conn.executemany(
                f"UPDATE {table} SET v = $2 WHERE id = $1", [(i, "updated") for i in range(1, 101)]
            )
            # executemany is atomic: a failing row rolls back the whole batch.
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.executemany(
                    f"INSERT INTO {table} VALUES ($1, $2, $3)",
                    [(i, "batch", 0.0) for i in (6001, 6002, 3, 6004)],
                )
            summary = await conn.fetchrow(
                f"SELECT count(*), count(*) FILTER (WHERE v = 'updated'), sum(n), max(id) "
                f"FROM {table}"
            )
            return tuple(summary), await conn.fetchval("SELECT 'ok'")
        finally:
            await conn.execute(f"DROP TABLE {table}")

    through, direct = through_and_direct(pg, gateway, scenario)
    assert through == direct
    (count, updated, total, top), ok = through
    assert (count, updated, top, ok) == (5000, 100, 5000, "ok")
    assert total == pytest.approx(sum(i / 7 for i in range(1, 5001)))


def test_transactions(pg: EphemeralCluster, gateway: RunningGateway) -> None:
    async def scenario(conn: asyncpg.Connection) -> Any:
        table = unique_name("apg_tx")
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        steps: list[Any] = []
        try:
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
                steps.append(conn.is_in_transaction())
            steps.append(conn.is_in_transaction())
            with pytest.raises(RuntimeError, match="boom"):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES (2)")
                    raise RuntimeError("boom")
            async with conn.transaction(isolation="serializable", readonly=False):
                await conn.execute(f"INSERT INTO {table} VALUES (3)")
                with pytest.raises(asyncpg.UniqueViolationError):
                    async with conn.transaction():  # a savepoint
                        await conn.execute(f"INSERT INTO {table} VALUES (4)")
                        await conn.execute(f"INSERT INTO {table} VALUES (1)")
                steps.append(await conn.fetchval("SHOW transaction_isolation"))
            async with conn.transaction(readonly=True):
                with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                    await conn.execute(f"INSERT INTO {table} VALUES (5)")
            tx = conn.transaction()
            await tx.start()
            await conn.execute(f"INSERT INTO {table} VALUES (6)")
            await tx.rollback()
            steps.append([r[0] for r in await conn.fetch(f"SELECT id FROM {table} ORDER BY id")])
            steps.append(conn.is_in_transaction())
            return steps
        finally:
            await conn.execute(f"DROP TABLE {table}")

    through, direct = through_and_direct(pg, gateway, scenario)
    assert through == direct
    assert through == [True, False, "serializable", [1, 3], False]


def test_error_then_normal_query(pg: EphemeralCluster, gateway: RunningGateway) -> None:
    async def scenario(conn: asyncpg.Connection) -> Any:
        seen = []
        for bad in ("SELECT 1/0", "SELECT * FROM no_such_table_here", "SELEC 1", "SELECT $1::int"):
            try:
                if "$1" in bad:
                    await conn.fetchval(bad, "not an int")
                else:
                    await conn.fetch(bad)
            except (asyncpg.PostgresError, asyncpg.DataError) as exc:
                seen.append((type(exc).__name__, getattr(exc, "sqlstate", None)))
            seen.append(await conn.fetchval("SELECT $1::int + 1", len(seen)))
        # A script of several statements in the simple protocol stops at the error.
        with pytest.raises(asyncpg.DivisionByZeroError):
            await conn.execute("SELECT 1; SELECT 1/0; SELECT 2")
        seen.append(await conn.fetchval("SELECT 'fine'"))
        seen.append(conn.is_in_transaction())
        return seen

    through, direct = through_and_direct(pg, gateway, scenario)
    assert through == direct
    assert through[0] == ("DivisionByZeroError", "22012")
    assert through[1] == 2
    assert through[2] == ("UndefinedTableError", "42P01")
    assert through[4] == ("PostgresSyntaxError", "42601")
    assert through[-2:] == ["fine", False]


def test_timeout_cancels_the_statement(gateway: RunningGateway) -> None:
    async def scenario() -> Any:
        conn = await asyncpg.connect(gateway.url(), ssl=False, timeout=10)
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await conn.fetchval("SELECT pg_sleep(30)", timeout=1)
            elapsed = time.monotonic() - started
            return elapsed, await conn.fetchval("SELECT 'usable'")
        finally:
            await conn.close()

    elapsed, value = asyncio.run(scenario())
    assert elapsed < 20
    assert value == "usable"


def test_listener(pg: EphemeralCluster, gateway: RunningGateway) -> None:
    channel = unique_name("apg_chan")

    async def scenario() -> list[tuple[str, str]]:
        received: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        listener = await asyncpg.connect(gateway.url(), ssl=False)
        sender = await asyncpg.connect(direct_url(pg))
        try:
            await listener.add_listener(
                channel, lambda _c, _pid, chan, payload: received.put_nowait((chan, payload))
            )
            await sender.execute(f"NOTIFY {channel}, 'one'")
            await sender.execute("SELECT pg_notify($1, $2)", channel, "two")
            return [await asyncio.wait_for(received.get(), 10) for _ in range(2)]
        finally:
            await listener.close()
            await sender.close()

    assert asyncio.run(scenario()) == [(channel, "one"), (channel, "two")]
