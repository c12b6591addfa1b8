"""Protocol robustness through a real gateway in front of the real PostgreSQL.

Malformed messages are refused with 08P01 and a reason, never a traceback; PostgreSQL's
own limits hold (65535 parameter types); one misbehaving client never harms another
session; a CancelRequest is delivered however fast its sender leaves; a failure inside
the gateway ends only its own session, with XX000.
"""

from __future__ import annotations

import socket
import struct
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway_harness import RunningGateway
from querywarden import codec
from querywarden.audit.log import read_records
from querywarden.devcluster import EphemeralCluster
from raw_client import Message, RawClient, assert_alive, connect, wait_until
from robustness_fixtures import MakeGateway, make_gateway, no_gateway_crash  # noqa: F401

SYNC = codec.message(b"S")


def bind_declaring(declared: int, values: list[bytes]) -> bytes:
    """A Bind of the unnamed statement that declares ``declared`` parameters."""
    body = b"\0\0" + struct.pack("!H", 0) + struct.pack("!H", declared)
    for value in values:
        body += struct.pack("!i", len(value)) + value
    return codec.message(b"B", body + struct.pack("!H", 0))


def execute() -> bytes:
    return codec.message(b"E", b"\0" + struct.pack("!i", 0))


@pytest.fixture
def audited(make_gateway: MakeGateway, tmp_path: Path) -> RunningGateway:
    """An allow-all gateway with audit on (its default sampleRows: 5)."""
    gw = make_gateway(audit={"directory": str(tmp_path / "audit")})
    gw.extra["audit"] = tmp_path / "audit"
    return gw


# --- malformed messages ------------------------------------------------------------------


def test_bind_declaring_more_parameters_than_it_sends_gets_08p01(
    audited: RunningGateway,
) -> None:
    """A Bind that declares 5 parameters but sends 1 (the gateway reads it: audit is on)."""
    with connect(audited, application_name="neighbour") as neighbour:
        assert_alive(neighbour)
        with RawClient.to(audited) as client:
            client.login()
            client.send(codec.parse("", "SELECT $1::int", (23,)) + bind_declaring(5, [b"1"]) + SYNC)
            error = client.expect_fatal()
        assert error.sqlstate == "08P01", error.fields
        assert "insufficient data left in message" in error.text
        assert "Bind" in error.text
        assert_alive(neighbour)


def test_parse_with_40000_parameter_types_reaches_the_server(gateway: RunningGateway) -> None:
    """PostgreSQL reads the count unsigned: up to 65535 parameter types are valid."""
    types = (23,) * 40_000
    with RawClient.to(gateway) as client:
        client.login()
        client.send(codec.parse("", "SELECT $40000", types) + codec.describe("S", "") + SYNC)
        messages = client.read_until(b"Z")
    kinds = b"".join(m.mtype for m in messages)
    assert kinds == b"1tTZ", [m.fields for m in messages if m.mtype == b"E"]
    # ParameterDescription: the server saw every one of the 40,000 types.
    assert struct.unpack_from("!H", messages[1].frame, 5)[0] == 40_000


# --- audit samples of rows cut by reads ----------------------------------------------------


def _results(gw: RunningGateway) -> dict[str, dict[str, Any]]:
    """The audit's result records by the text of their request, once the session ended."""
    directory = gw.extra["audit"]
    wait_until(
        lambda: any(r["type"] == "session.end" for r in read_records(directory)),
        timeout=10,
        what="the session's end record",
    )
    records = list(read_records(directory))
    texts = {r["statement_id"]: r["text"] for r in records if r["type"] == "statement.request"}
    return {texts[r["statement_id"]]: r for r in records if r["type"] == "statement.result"}


def test_audit_samples_a_large_row_of_several_columns_whole(audited: RunningGateway) -> None:
    """A 100 kB value arrives over several reads; the session crashed on it (08006)."""
    wide = "SELECT repeat('x', 100000), 1"
    single = "SELECT repeat('y', 100000)"
    with connect(audited) as conn:
        assert conn.execute(wide).fetchone() == ("x" * 100_000, 1)
        assert conn.execute(single).fetchone() == ("y" * 100_000,)
        assert_alive(conn)
    results = _results(audited)
    assert results[wide]["sample"] == [["x" * 100_000, "1"]]
    assert results[single]["sample"] == [["y" * 100_000]]


# --- CancelRequest from a client that leaves at once ---------------------------------------


def _backend_key(messages: list[Message]) -> tuple[int, bytes]:
    key = next(m for m in messages if m.mtype == b"K")
    return codec.decode_backend_key_data(key.frame)


def _running(pg: EphemeralCluster, marker: str) -> bool:
    count = pg.psql(
        "SELECT count(*) FROM pg_stat_activity "
        f"WHERE state = 'active' AND query LIKE '%{marker}%' AND pid <> pg_backend_pid()"
    )
    return int(count) == 1


def test_cancel_request_is_delivered_when_its_sender_closes_at_once(
    gateway: RunningGateway, pg: EphemeralCluster
) -> None:
    """Every one of 20 CancelRequests, each closed right after sending, cancels its sleep.

    Each trial has its own session: PostgreSQL signals a backend twice per cancel (the
    process and its group), and a second signal landing after the error can cancel that
    backend's next statement; a fresh backend keeps the trials independent.
    """
    for trial in range(20):
        with RawClient.to(gateway, timeout=20) as sleeper:
            pid, secret = _backend_key(sleeper.login())
            marker = f"cancel_trial_{trial}_{uuid.uuid4().hex[:8]}"
            sleeper.send(codec.query(f"SELECT pg_sleep(30) /* {marker} */"))
            wait_until(
                lambda marker=marker: _running(pg, marker),  # type: ignore[misc]
                timeout=10,
                what="the sleep to start",
            )
            sock = socket.create_connection((gateway.host, gateway.port))
            sock.sendall(codec.cancel_request(pid, secret))
            sock.close()
            answer = sleeper.read_until(b"Z")
            errors = [m for m in answer if m.mtype == b"E"]
            assert errors, f"trial {trial}: the sleep was not cancelled"
            assert errors[0].sqlstate == "57014", (trial, errors[0].fields)
