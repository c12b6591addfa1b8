"""Every session configuration gives the same bytes and records however TCP cuts the input.

The exchange is replayed whole, then split at every byte boundary (and, by hypothesis, at
several), on plain, masked, row-limited and audited sessions; what the client receives and
what the audit records hold must be identical to the unsplit run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from querywarden import codec
from querywarden.audit.recorder import PendingStatement
from querywarden.hooks import AllowAll, Decision, StatementRequest
from querywarden.session import RowLimit, Session
from unit.test_session import INFO, RFQ_I, SYNC, command_complete, data_row, drain
from unit.test_session_masking import COLUMNS, MaskingGate, description


class MemoryAudit:
    """A SessionAudit that keeps its records in memory."""

    def __init__(self, sample_rows: int) -> None:
        self.sample_rows = sample_rows
        self.records: list[tuple[Any, ...]] = []
        self._count = 0

    def request(
        self, request: StatementRequest, decision: Decision, **fields: Any
    ) -> PendingStatement:
        self._count += 1
        self.records.append(("request", request.sql, fields.get("parameters")))
        return PendingStatement(str(self._count), 0.0)

    def finish(self, pending: PendingStatement, **fields: Any) -> None:
        self.records.append(
            ("finish", pending.command, pending.rows, pending.sqlstate, pending.sample)
        )

    def end(self, masking: dict[str, int]) -> None:
        self.records.append(("end", masking))


def plain() -> Session:
    return Session(INFO, AllowAll())


def masked() -> Session:
    return Session(INFO, MaskingGate(), masked=True)


def limited() -> Session:
    return Session(INFO, AllowAll(), row_limit=RowLimit(2, "r"))


def audited() -> Session:
    return Session(INFO, AllowAll(), audit=MemoryAudit(5))  # type: ignore[arg-type]


def audited_masked() -> Session:
    return Session(INFO, MaskingGate(), masked=True, audit=MemoryAudit(2))  # type: ignore[arg-type]


def audited_limited() -> Session:
    return Session(INFO, AllowAll(), row_limit=RowLimit(2, "r"), audit=MemoryAudit(1))  # type: ignore[arg-type]


SESSIONS: dict[str, Callable[[], Session]] = {
    "plain": plain,
    "masked": masked,
    "row-limit": limited,
    "audit": audited,
    "audit+masked": audited_masked,
    "audit+row-limit": audited_limited,
}

BIND = codec.message(
    b"B", b"\0\0" + b"\0\0" + b"\0\x02" + b"\0\0\0\x011" + b"\xff\xff\xff\xff" + b"\0\0"
)
EXECUTE = codec.message(b"E", b"\0\0\0\0\0")
#: A simple Query, then the extended protocol with two bound parameters.
REQUEST = (
    codec.query("SELECT id, ssn FROM t")
    + codec.parse("", "SELECT id, ssn FROM t WHERE $1 = $2")
    + BIND
    + codec.describe("P", "")
    + EXECUTE
    + SYNC
)
ROWS = (
    data_row(b"1", b"123-45-6789")
    + data_row(b"x" * 300, b"2")  # longer than most cuts: streamed when it may be
    + data_row(None, b"y" * 40)
)
REPLY = (
    description(*COLUMNS)
    + ROWS
    + command_complete("SELECT 3")
    + RFQ_I
    + codec.message(b"1")
    + codec.message(b"2")
    + description(*COLUMNS)
    + ROWS
    + command_complete("SELECT 3")
    + RFQ_I
)


def run(make: Callable[[], Session], request_cuts: list[int], reply_cuts: list[int]) -> Any:
    session = make()
    sent = _feed(session.receive_client, REQUEST, request_cuts, session.to_server)
    received = _feed(session.receive_server, REPLY, reply_cuts, session.to_client)
    session.close_audit()
    audit = session.auditing.audit if session.auditing is not None else None
    records = audit.records if isinstance(audit, MemoryAudit) else None
    return sent, received, records, session.transaction_status, session.expected_responses


def _feed(
    receive: Callable[[bytes], None], data: bytes, cuts: list[int], out: list[bytes]
) -> bytes:
    pos = 0
    produced = b""
    for cut in [*sorted(cuts), len(data)]:
        receive(data[pos:cut])
        produced += drain(out)
        pos = cut
    return produced


@pytest.mark.parametrize("name", sorted(SESSIONS))
def test_every_single_split_gives_the_unsplit_result(name: str) -> None:
    make = SESSIONS[name]
    whole = run(make, [], [])
    assert whole[1].endswith(RFQ_I)
    for cut in range(1, len(REQUEST)):
        assert run(make, [cut], []) == whole, f"request cut at {cut}"
    for cut in range(1, len(REPLY)):
        assert run(make, [], [cut]) == whole, f"reply cut at {cut}"


@pytest.mark.parametrize("name", sorted(SESSIONS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_splits_give_the_unsplit_result(name: str, data: st.DataObject) -> None:
    make = SESSIONS[name]
    request_cuts = data.draw(st.lists(st.integers(0, len(REQUEST)), max_size=8))
    reply_cuts = data.draw(st.lists(st.integers(0, len(REPLY)), max_size=12))
    assert run(make, request_cuts, reply_cuts) == run(make, [], [])


def test_audit_samples_whole_rows_of_several_columns() -> None:
    """A multi-column row cut by reads is sampled whole (it crashed the session before)."""
    records = run(audited, [], list(range(0, len(REPLY), 7)))[2]
    samples = [r[4] for r in records if r[0] == "finish" and r[1] == "SELECT 3"]
    expected = [["1", "123-45-6789"], ["x" * 300, "2"], [None, "y" * 40]]
    assert samples == [expected, expected]
