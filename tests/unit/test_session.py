"""The session state machine, bytes in and bytes out, no sockets.

Server replies are scripted here the way PostgreSQL sends them; every exchange is also
replayed split at every byte boundary, because TCP may cut anywhere.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from querywarden import codec
from querywarden.codec import MessageTooLarge
from querywarden.errors import ProtocolViolation
from querywarden.hooks import ALLOW, AllowAll, Decision, SessionInfo, StatementRequest
from querywarden.identity import Principal
from querywarden.session import SENTINEL_PREFIX, Session

INFO = SessionInfo("s1", Principal("alice"), "app", "127.0.0.1:1")


def data_row(*values: bytes | None) -> bytes:
    body = struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return codec.message(b"D", body)


def row_description(*names: str) -> bytes:
    body = struct.pack("!h", len(names))
    for name in names:
        body += codec.cstr(name) + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0)
    return codec.message(b"T", body)


def command_complete(tag: str) -> bytes:
    return codec.message(b"C", codec.cstr(tag))


def syntax_error_at(token: str) -> bytes:
    return codec.error_response("42601", f'syntax error at or near "{token}"')


RFQ_I = codec.ready_for_query(b"I")
RFQ_T = codec.ready_for_query(b"T")
RFQ_E = codec.ready_for_query(b"E")
SYNC = codec.message(b"S")
SELECT_REPLY = row_description("x") + data_row(b"1") + command_complete("SELECT 1") + RFQ_I


def bind(portal: str = "", statement: str = "") -> bytes:
    return codec.message(b"B", codec.cstr(portal) + codec.cstr(statement) + b"\0\0\0\0\0\0")


def execute(portal: str = "") -> bytes:
    return codec.message(b"E", codec.cstr(portal) + b"\0\0\0\0")


class Refuse:
    def __init__(self, word: str = "forbidden") -> None:
        self.word = word

    def decide(self, session: SessionInfo, request: StatementRequest) -> Decision:
        if self.word in request.sql:
            return Decision.refuse("refused by rule r1", hint="select from another table")
        return ALLOW


def feed_split(feed: object, data: bytes, cut: int) -> None:
    assert callable(feed)
    feed(data[:cut])
    feed(data[cut:])


def drain(chunks: list[bytes]) -> bytes:
    out = b"".join(chunks)
    chunks.clear()
    return out


def test_simple_query_passes_through_untouched_at_every_split() -> None:
    query = codec.query("SELECT 1")
    for cut in range(len(SELECT_REPLY) + 1):
        session = Session(INFO, AllowAll())
        feed_split(session.receive_client, query, min(cut, len(query)))
        assert drain(session.to_server) == query
        feed_split(session.receive_server, SELECT_REPLY, cut)
        assert drain(session.to_client) == SELECT_REPLY
        assert session.transaction_status == b"I"
        assert session.expected_responses == 0


def test_untouched_runs_leave_as_one_slice() -> None:
    session = Session(INFO, AllowAll())
    session.receive_client(codec.query("SELECT 1"))
    session.receive_server(SELECT_REPLY)
    assert session.to_client == [SELECT_REPLY]


def test_transaction_status_follows_ready_for_query() -> None:
    session = Session(INFO, AllowAll())
    session.receive_client(codec.query("BEGIN"))
    session.receive_server(command_complete("BEGIN") + RFQ_T)
    assert session.transaction_status == b"T"
    session.receive_client(codec.query("SELECT 1/0"))
    session.receive_server(codec.error_response("22012", "division by zero") + RFQ_E)
    assert session.transaction_status == b"E"


def test_refused_query_becomes_a_sentinel_and_the_error_is_swapped() -> None:
    for cut in range(0, 120, 7):
        session = Session(INFO, Refuse())
        session.receive_client(codec.query("DROP TABLE forbidden"))
        sent = drain(session.to_server)
        assert b"forbidden" not in sent
        token = codec.decode_query(sent)
        assert token.startswith(SENTINEL_PREFIX)
        reply = syntax_error_at(token) + RFQ_I
        feed_split(session.receive_server, reply, min(cut, len(reply)))
        out = drain(session.to_client)
        assert out.endswith(RFQ_I)
        fields = codec.decode_fields(out[: -len(RFQ_I)])
        assert fields["C"] == "42501"
        assert fields["M"] == "refused by rule r1"
        assert fields["H"] == "select from another table"


def test_a_real_syntax_error_is_not_mistaken_for_a_refusal() -> None:
    session = Session(INFO, Refuse())
    session.receive_client(codec.query("SELECT 'forbidden'"))
    session.receive_client(codec.query("SELEC 1"))
    drain(session.to_server)
    genuine = codec.error_response("42601", 'syntax error at or near "SELEC"')
    # The sentinel's error arrives first, then the genuine one, each with its own RFQ.
    token = f"{SENTINEL_PREFIX}{session.policy.nonce}_1"
    session.receive_server(syntax_error_at(token) + RFQ_I + genuine + RFQ_I)
    out = drain(session.to_client)
    assert out.endswith(genuine + RFQ_I)
    assert b"refused by rule r1" in out


def test_refused_parse_keeps_its_statement_name() -> None:
    session = Session(INFO, Refuse())
    session.receive_client(
        codec.parse("s1", "SELECT forbidden") + bind("", "s1") + execute() + SYNC
    )
    sent = drain(session.to_server)
    first = codec.FrameReader(1 << 20)
    first.feed(sent)
    frame = first.next_frame()
    assert frame is not None
    parse = codec.decode_parse(frame[1])
    assert parse.statement == "s1"
    assert parse.sql.startswith(SENTINEL_PREFIX)
    # Bind, Execute and Sync still go: the server discards them after the error.
    assert sent.endswith(bind("", "s1") + execute() + SYNC)
    session.receive_server(syntax_error_at(parse.sql) + RFQ_I)
    assert "s1" not in session.statements
    assert session.expected_responses == 0


def test_statements_and_portals_are_tracked_as_the_server_confirms_them() -> None:
    session = Session(INFO, AllowAll())
    session.receive_client(codec.parse("s1", "SELECT 1") + bind("p1", "s1") + execute("p1") + SYNC)
    assert session.statements == {}
    session.receive_server(codec.message(b"1") + codec.message(b"2"))
    assert session.statements == {"s1": "SELECT 1"}
    assert session.portals == {"p1": "s1"}
    session.receive_server(data_row(b"1") + command_complete("SELECT 1") + RFQ_I)
    assert session.portals == {}  # the implicit transaction ended
    assert session.expected_responses == 0
    close = codec.message(b"C", b"S" + codec.cstr("s1"))
    session.receive_client(close + SYNC)
    session.receive_server(codec.message(b"3") + RFQ_I)
    assert session.statements == {}


def test_error_in_pipeline_drops_expectations_until_sync() -> None:
    session = Session(INFO, AllowAll())
    batch = codec.parse("a", "SELECT 1/0") + bind("", "a") + execute() + SYNC
    session.receive_client(batch + codec.parse("b", "SELECT 2") + SYNC)
    assert session.expected_responses == 6
    session.receive_server(codec.message(b"1") + codec.message(b"2"))
    session.receive_server(codec.error_response("22012", "division by zero") + RFQ_I)
    assert session.expected_responses == 2
    session.receive_server(codec.message(b"1") + RFQ_I)
    assert session.expected_responses == 0
    assert set(session.statements) == {"a", "b"}


def test_copy_in_ignores_pipelined_sync_and_streams_large_rows() -> None:
    session = Session(INFO, AllowAll(), max_client_message=1024)
    session.receive_client(codec.parse("", "COPY t FROM STDIN") + bind() + execute() + SYNC)
    drain(session.to_server)
    session.receive_server(codec.message(b"1") + codec.message(b"2"))
    session.receive_server(codec.message(b"G", b"\0\0\0"))
    assert session.mode == "copy_in"
    big = codec.message(b"d", b"x" * 100_000)  # far over max_client_message: it streams
    for i in range(0, len(big), 4096):
        session.receive_client(big[i : i + 4096])
    session.receive_client(codec.message(b"c") + SYNC)
    assert drain(session.to_server) == big + codec.message(b"c") + SYNC
    session.receive_server(command_complete("COPY 1") + RFQ_I)
    assert session.mode == "ready"
    assert session.expected_responses == 0


def test_large_data_row_streams_without_buffering() -> None:
    session = Session(INFO, AllowAll())
    session.receive_client(codec.query("SELECT big"))
    row = data_row(b"y" * 1_000_000)
    reply = row_description("big") + row + command_complete("SELECT 1") + RFQ_I
    forwarded = 0
    for i in range(0, len(reply), 65536):
        session.receive_server(reply[i : i + 65536])
        forwarded += len(drain(session.to_client))
        # Nothing waits in the session for the row to complete.
        assert len(session._server_buf) < 5 + 65536
    assert forwarded == len(reply)


def test_oversized_client_message_is_refused() -> None:
    session = Session(INFO, AllowAll(), max_client_message=1000)
    with pytest.raises(MessageTooLarge) as info:
        session.receive_client(codec.query("x" * 2000))
    assert info.value.sqlstate == "54000"


@pytest.mark.parametrize(
    "frame",
    [
        b"Q\x00\x00\x00\x02",  # length below 4
        b"?\x00\x00\x00\x04",  # not a frontend message type
        codec.message(b"Q", b"no terminator"),
        codec.message(b"P", b"s\0SELECT 1\0\xff\xff"),  # 65535 types announced, none sent
        codec.message(b"B"),  # no portal name: was read past the frame (IndexError)
        codec.message(b"E"),  # likewise
        codec.message(b"E", b"\0"),  # no row count
        codec.message(b"F", b"\0\0\0\x01\0\0\0\x02"),  # 2 arguments announced, none sent
    ],
)
def test_malformed_client_messages_are_protocol_violations(frame: bytes) -> None:
    session = Session(INFO, AllowAll())
    with pytest.raises(ProtocolViolation) as info:
        session.receive_client(frame)
    assert info.value.sqlstate == "08P01"


def test_terminate_marks_the_session() -> None:
    session = Session(INFO, AllowAll())
    session.receive_client(codec.TERMINATE)
    assert session.terminated
    assert drain(session.to_server) == codec.TERMINATE


def test_awaited_decision_holds_the_rest_of_the_pipeline() -> None:
    pending: list[object] = []

    class Later:
        def decide(self, session: SessionInfo, request: StatementRequest) -> object:
            marker = object()
            pending.append(marker)
            return marker

    session = Session(INFO, Later())  # type: ignore[arg-type]
    session.receive_client(codec.query("SELECT 1") + codec.query("SELECT 2"))
    assert session.awaiting is pending[0]
    assert session.to_server == []
    session.resume(ALLOW)
    assert drain(session.to_server) == codec.query("SELECT 1")
    assert session.awaiting is pending[1]
    session.resume(Decision.refuse("no"))
    assert codec.decode_query(drain(session.to_server)).startswith(SENTINEL_PREFIX)
    assert session.awaiting is None


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=20), st.data())
def test_any_split_of_any_message_sequence_reassembles(
    payloads: list[bytes], data: st.DataObject
) -> None:
    """Server messages of any size, cut anywhere, reach the client byte for byte."""
    session = Session(INFO, AllowAll())
    session.receive_client(codec.query("SELECT 1"))
    stream = b"".join(codec.message(b"D", p) for p in payloads) + RFQ_I
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    pos = 0
    for cut in [*cuts, len(stream)]:
        session.receive_server(stream[pos:cut])
        pos = cut
    assert drain(session.to_client) == stream
    assert session.transaction_status == b"I"
