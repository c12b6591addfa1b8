"""Prepared statements meet a policy reload: bytes in, bytes out."""

from __future__ import annotations

import re

from querywarden import codec
from querywarden.hooks import Decision, SessionInfo, StatementRequest
from querywarden.session import SENTINEL_PREFIX, Session
from unit.test_session import INFO, RFQ_I, SYNC, bind, drain, execute, syntax_error_at


class ReloadingGate:
    """Refuses statements that mention a denied word; ``reload`` changes the word."""

    def __init__(self) -> None:
        self.generation = 0
        self.denied = "nothing"
        self.seen: list[str] = []

    def reload(self, denied: str) -> None:
        self.denied = denied
        self.generation += 1

    def decide(self, session: SessionInfo, request: StatementRequest) -> Decision:
        self.seen.append(request.sql)
        if self.denied in request.sql:
            return Decision.refuse(f"{self.denied} is denied", rule="test")
        return Decision(True)


def test_a_parse_that_fails_does_not_hide_the_statement_it_could_not_replace() -> None:
    gate = ReloadingGate()
    s = Session(INFO, gate)
    s.receive_client(codec.parse("s1", "SELECT secret FROM t") + SYNC)
    drain(s.to_server)
    s.receive_server(codec.message(b"1") + RFQ_I)
    drain(s.to_client)
    gate.reload("secret")
    # The same name again, harmless text: the server refuses the duplicate name and
    # keeps the old text, which the Execute then runs.
    s.receive_client(codec.parse("s1", "SELECT 1") + SYNC + bind("", "s1") + execute() + SYNC)
    upstream = drain(s.to_server)
    assert SENTINEL_PREFIX.encode() in upstream
    assert "SELECT secret FROM t" in gate.seen[1:]
    # The Execute's place holds the sentinel: the client gets the refusal.
    name_and_text = upstream[upstream.index(SENTINEL_PREFIX.encode()) :].split(b"\0")
    token = name_and_text[1].decode()  # the sentinel Parse's text
    s.receive_server(
        codec.error_response("42P05", 'prepared statement "s1" already exists')
        + RFQ_I
        + codec.message(b"2")
        + syntax_error_at(token)
        + RFQ_I
    )
    assert b"secret is denied" in drain(s.to_client)


def test_statements_are_decided_again_once_per_reload() -> None:
    gate = ReloadingGate()
    s = Session(INFO, gate)
    s.receive_client(codec.parse("s1", "SELECT a FROM t") + bind("", "s1") + execute() + SYNC)
    drain(s.to_server)
    assert gate.seen == ["SELECT a FROM t"]
    s.receive_client(bind("", "s1") + execute() + SYNC)
    assert gate.seen == ["SELECT a FROM t"]  # no reload: no new decision
    gate.reload("other")
    s.receive_client(bind("", "s1") + execute() + SYNC + bind("", "s1") + execute() + SYNC)
    assert gate.seen == ["SELECT a FROM t", "SELECT a FROM t"]
    assert SENTINEL_PREFIX.encode() not in drain(s.to_server)


def test_a_refusal_pipelined_behind_a_sync_keeps_its_own_error() -> None:
    gate = ReloadingGate()
    gate.reload("secret")
    s = Session(INFO, gate)
    s.receive_client(
        codec.parse("a", "SELECT secret") + SYNC + codec.parse("b", "SELECT secret") + SYNC
    )
    tokens = [t.decode() for t in re.findall(rb"querywarden_refused_\w+", drain(s.to_server))]
    s.receive_server(syntax_error_at(tokens[0]) + RFQ_I + syntax_error_at(tokens[1]) + RFQ_I)
    received = drain(s.to_client)
    assert received.count(b"secret is denied") == 2
    assert SENTINEL_PREFIX.encode() not in received


def test_a_parse_in_the_same_sync_decides_alone_what_the_execute_runs() -> None:
    gate = ReloadingGate()
    s = Session(INFO, gate)
    s.receive_client(codec.parse("", "SELECT old_secret") + bind() + execute() + SYNC)
    s.receive_server(codec.message(b"1") + codec.message(b"2") + RFQ_I)
    drain(s.to_server)
    gate.reload("old_secret")
    # The unnamed statement is replaced in the same Sync: the old text cannot run.
    s.receive_client(codec.parse("", "SELECT fine") + bind() + execute() + SYNC)
    assert SENTINEL_PREFIX.encode() not in drain(s.to_server)
    assert "SELECT old_secret" not in gate.seen[1:]
