"""A large message costs the session O(its size), however it is cut by TCP.

Received chunks are kept and joined once when the message is complete; the buffers count
the bytes they copy, so linear cost is asserted exactly, not timed. One CPU-time check
(process time, not wall time) compares a message with one eight times its size.
"""

from __future__ import annotations

import time

from querywarden import codec
from querywarden.hooks import AllowAll
from querywarden.session import Session
from unit.test_session import INFO, RFQ_I, command_complete, data_row, drain
from unit.test_session_masking import COLUMNS, MaskingGate, description

CHUNK = 64 * 1024


def feed(receive: object, data: bytes) -> None:
    assert callable(receive)
    for i in range(0, len(data), CHUNK):
        receive(data[i : i + CHUNK])


def big_query(size: int) -> bytes:
    return codec.query("SELECT '" + "x" * size + "'")


def test_a_large_query_is_joined_once() -> None:
    session = Session(INFO, AllowAll())
    query = big_query(60 * 1024 * 1024)
    feed(session.receive_client, query)
    assert drain(session.to_server) == query
    # Every byte copied at most once (the join), not once per read.
    assert session._client_buf.copied <= len(query)


def test_a_large_masked_row_is_joined_once() -> None:
    session = Session(INFO, MaskingGate(), masked=True)
    session.receive_client(codec.query("SELECT id, ssn FROM t"))
    drain(session.to_server)
    row = data_row(b"1", b"y" * (32 * 1024 * 1024))
    reply = description(*COLUMNS) + row + command_complete("SELECT 1") + RFQ_I
    feed(session.receive_server, reply)
    out = drain(session.to_client)
    assert out.endswith(command_complete("SELECT 1") + RFQ_I)
    assert b"y" * 100 not in out  # the row was masked whole
    assert session._server_buf.copied <= len(reply)


def test_small_messages_split_by_reads_copy_only_what_was_cut() -> None:
    session = Session(INFO, AllowAll())
    session.receive_client(codec.query("SELECT 1"))
    reply = b"".join(data_row(str(i).encode()) for i in range(10_000)) + RFQ_I
    feed(session.receive_server, reply)
    assert drain(session.to_client) == reply
    # A read that completes a cut message joins that read once: no byte twice.
    assert session._server_buf.copied <= len(reply)


def _cpu_to_feed(size: int) -> float:
    session = Session(INFO, AllowAll())
    query = big_query(size)
    started = time.process_time()
    feed(session.receive_client, query)
    spent = time.process_time() - started
    assert drain(session.to_server) == query
    return spent


def test_cpu_grows_linearly_with_message_size() -> None:
    """Eight times the bytes cost about eight times the CPU (cache effects allowed for).

    Copying the partial message on every read made it about 400 times here.
    """
    small = _cpu_to_feed(4 * 1024 * 1024)
    large = _cpu_to_feed(32 * 1024 * 1024)
    assert large < 50 * max(small, 0.005), (small, large)
