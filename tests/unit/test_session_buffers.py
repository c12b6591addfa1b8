"""A large message costs the session O(its size), however it is cut by TCP.

Received chunks are kept and joined once when the message is complete; the buffers count
the bytes they copy, so linear cost is asserted exactly, not timed. One CPU-time check
(process time, not wall time) compares a message with one eight times its size.
"""

from __future__ import annotations

import time

from querywarden import codec
from querywarden.hooks import ALLOW, AllowAll, Decision, SessionInfo, StatementRequest
from querywarden.session import SENTINEL_PREFIX, Session
from unit.test_session import (
    INFO,
    RFQ_I,
    SELECT_REPLY,
    SYNC,
    Refuse,
    command_complete,
    data_row,
    drain,
)
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


# A Query or Parse over session.LARGE_MESSAGE is collected as its chunks: never joined,
# its text decoded as it comes, forwarded (as the chunks received) only once decided.

LARGE = 4 * 1024 * 1024
SYNC_AND_QUERY = SYNC + codec.query("SELECT 2")


def test_a_large_query_is_never_joined_and_leaves_as_its_chunks() -> None:
    session = Session(INFO, AllowAll())
    query = big_query(LARGE)
    for i in range(0, len(query) - CHUNK, CHUNK):
        session.receive_client(query[i : i + CHUNK])
        assert session.to_server == []  # nothing leaves before the decision
    session.receive_client(query[len(query) // CHUNK * CHUNK :] + SYNC_AND_QUERY)
    sent = drain(session.to_server)
    assert sent == query + SYNC_AND_QUERY
    assert session._client_buf.copied == 0


def test_a_large_refused_query_leaves_none_of_its_bytes() -> None:
    session = Session(INFO, Refuse())
    query = codec.query("SELECT 'forbidden" + "x" * LARGE + "'")
    feed(session.receive_client, query + codec.query("SELECT 2"))
    sent = drain(session.to_server)
    assert b"forbidden" not in sent and b"xxxx" not in sent
    token = codec.decode_query(sent[: -len(codec.query("SELECT 2"))])
    assert token.startswith(SENTINEL_PREFIX)
    assert sent.endswith(codec.query("SELECT 2"))


def test_a_large_parse_is_decided_on_its_whole_text() -> None:
    seen: list[StatementRequest] = []

    class Record:
        def decide(self, session: SessionInfo, request: StatementRequest) -> Decision:
            seen.append(request)
            return ALLOW

    session = Session(INFO, Record())
    sql = "SELECT $1::text || '" + "é" * LARGE + "'"
    message = codec.parse("big", sql, (25,))
    feed(session.receive_client, message)
    assert drain(session.to_server) == message
    assert [(r.kind, r.statement_name, r.sql) for r in seen] == [("parse", "big", sql)]


def test_a_large_query_held_for_a_decision_waits_whole() -> None:
    pending: list[object] = []

    class Later:
        def decide(self, session: SessionInfo, request: StatementRequest) -> object:
            pending.append(request.sql)
            return object()

    session = Session(INFO, Later())  # type: ignore[arg-type]
    query = big_query(LARGE)
    feed(session.receive_client, query + codec.query("SELECT 2"))
    assert session.awaiting is not None and session.to_server == []
    session.resume(ALLOW)
    assert drain(session.to_server) == query  # the next Query is decided on its own
    assert pending[-1] == "SELECT 2"


def test_a_large_invalid_query_is_refused_as_a_small_one_is() -> None:
    session = Session(INFO, AllowAll())
    query = codec.message(b"Q", b"SELECT '" + b"\xff" * LARGE + b"'\0")
    feed(session.receive_client, query)
    sent = drain(session.to_server)
    assert b"\xff" not in sent
    assert codec.decode_query(sent).startswith(SENTINEL_PREFIX)


def test_a_large_unusual_query_behind_a_running_one_waits_for_its_answer() -> None:
    session = Session(INFO, AllowAll())
    session.receive_client(codec.query("SELECT 1"))
    drain(session.to_server)
    query = codec.query("SELECT '" + "é" * LARGE + "'")
    feed(session.receive_client, query)
    assert session.to_server == []  # read once the ReadyForQuery says how
    session.receive_server(SELECT_REPLY)
    assert session.input_released
    session.input_released = False
    session.receive_client(b"")
    assert drain(session.to_server) == query
