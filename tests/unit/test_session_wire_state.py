"""What the session tells the gate of its connection, and the server's own errors.

The session keeps :class:`WireState` current from what it relays, for a gate that asks a
side connection about a statement; a refusal carrying the server's ErrorResponse fields
reaches the client through the policy stage's sentinel, in the session's encoding.
"""

from __future__ import annotations

from querywarden import codec
from querywarden.hooks import ALLOW, Decision, SessionInfo, StatementRequest
from querywarden.identity import Principal
from querywarden.session import Session
from querywarden.session.owed import Q
from querywarden.session.policy import PolicyStage


def test_the_servers_error_reaches_the_client_in_its_encoding() -> None:
    info = SessionInfo("s1", Principal("alice"), "app", "127.0.0.1:1", client_encoding="LATIN1")
    stage = PolicyStage(info, _Gate())
    fields = {"S": "ERROR", "C": "42703", "M": 'column "naïve" does not exist', "P": "27"}
    refusal = Decision(False, "42703", fields["M"], rule="server-check", server_error=fields)
    token = codec.decode_query(stage.sentinel(Q, "", refusal))
    error = stage.refusal_for(codec.error_response("42601", f'syntax error at or near "{token}"'))
    assert error is not None
    assert 'column "na\xefve"'.encode("latin-1") in error
    assert codec.decode_fields(error)["P"] == "27"


class _Gate:
    def __init__(self) -> None:
        self.wires: list[tuple[bytes, bool]] = []

    def decide(self, session: SessionInfo, request: StatementRequest) -> Decision:
        self.wires.append((session.wire.transaction_status, session.wire.in_flight))
        return ALLOW


def test_the_session_keeps_the_wire_state_the_gate_reads() -> None:
    gate = _Gate()
    info = SessionInfo("s1", Principal("alice"), "app", "127.0.0.1:1")
    session = Session(info, gate)
    session.receive_client(codec.query("BEGIN"))
    session.receive_server(codec.message(b"C", codec.cstr("BEGIN")) + codec.ready_for_query(b"T"))
    session.receive_client(codec.query("SELECT 1") + codec.query("SELECT 2"))
    assert gate.wires == [(b"I", False), (b"T", False), (b"T", True)]
    assert not info.wire.settled
