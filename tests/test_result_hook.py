"""The result hook sees every result message on its way back, and can replace it."""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable

import psycopg
import pytest

from gateway_harness import RunningGateway
from querywarden import codec
from querywarden.hooks import SessionInfo


class Recorder:
    """Counts the message types shown to the hook; forwards everything untouched."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self.subjects: set[str] = set()

    def on_result(self, session: SessionInfo, mtype: int, frame: bytes) -> bytes | None:
        self.seen[chr(mtype)] += 1
        self.subjects.add(session.principal.subject)
        assert frame[0] == mtype
        assert int.from_bytes(frame[1:5], "big") == len(frame) - 1
        return None


class ReplaceFirstColumn:
    """Rewrites the first column of every DataRow to the text 'masked'."""

    def on_result(self, session: SessionInfo, mtype: int, frame: bytes) -> bytes | None:
        if mtype != ord("D"):
            return None
        (count,) = struct.unpack_from("!h", frame, 5)
        pos = 7
        values: list[bytes | None] = []
        for _ in range(count):
            (size,) = struct.unpack_from("!i", frame, pos)
            pos += 4
            values.append(None if size < 0 else frame[pos : pos + size])
            pos += max(size, 0)
        values[0] = b"masked"
        body = struct.pack("!h", count)
        for value in values:
            body += (
                struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
            )
        return codec.message(b"D", body)


def test_hook_sees_every_result_message_type(make_gateway: Callable[..., RunningGateway]) -> None:
    recorder = Recorder()
    gw = make_gateway(result_hook=recorder)
    with psycopg.connect(gw.dsn(), autocommit=True) as conn:
        rows = conn.execute("SELECT g FROM generate_series(1, 50) g").fetchall()
        assert len(rows) == 50
        with conn.cursor().copy("COPY (SELECT g FROM generate_series(1, 7) g) TO STDOUT") as copy:
            copied = list(copy)
        assert len(copied) >= 1
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hello from the server'; END $$")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
    assert recorder.seen["D"] == 50
    assert recorder.seen["d"] == 7
    assert recorder.seen["T"] >= 1
    assert recorder.seen["C"] >= 3
    assert recorder.seen["N"] == 1
    assert recorder.seen["E"] == 1
    assert recorder.subjects == {"alice"}


def test_hook_can_replace_result_bytes(make_gateway: Callable[..., RunningGateway]) -> None:
    gw = make_gateway(result_hook=ReplaceFirstColumn())
    with psycopg.connect(gw.dsn(), autocommit=True) as conn:
        rows = conn.execute("SELECT 'secret-' || g, g FROM generate_series(1, 3) g").fetchall()
    assert rows == [("masked", 1), ("masked", 2), ("masked", 3)]


def test_pass_through_gateway_changes_nothing(gateway: RunningGateway, pg: object) -> None:
    query = "SELECT g, repeat(chr(65 + g % 26), g) FROM generate_series(1, 2000) g"
    with psycopg.connect(gateway.dsn(), autocommit=True) as conn:
        through = conn.execute(query).fetchall()
    from querywarden.devcluster import EphemeralCluster

    assert isinstance(pg, EphemeralCluster)
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        direct = conn.execute(query).fetchall()
    assert through == direct
