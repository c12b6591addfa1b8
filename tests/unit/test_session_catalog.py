"""A result from a relation the mask plan's catalog does not know waits for a new plan."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from querywarden import codec
from querywarden.hooks import Decision, SessionInfo, StatementRequest
from querywarden.masking.plan import ColumnMask, MaskPlan
from querywarden.masking.strategies import MaskSpec
from querywarden.session import Session
from unit.test_session import INFO, RFQ_I, command_complete, data_row, drain
from unit.test_session_masking import description

KNOWN, NEW = 16384, 16999
OLD_PLAN = MaskPlan(
    origins={}, computed=None, scanner=None, scrub_errors=False, relations=frozenset({KNOWN})
)
NEW_PLAN = MaskPlan(
    origins={(NEW, 2): ColumnMask(MaskSpec("redact"), "public.v.note")},
    computed=None,
    scanner=None,
    scrub_errors=True,
    relations=frozenset({KNOWN, NEW}),
)
SECRET = b"123-45-6789"
REPLY = (
    description(("id", NEW, 1, 25, 0), ("note", NEW, 2, 25, 0))
    + data_row(b"1", SECRET)
    + command_complete("SELECT 1")
    + RFQ_I
)


class Pending:
    """An awaitable the test never awaits: it resolves the hold itself."""

    def __await__(self) -> Generator[Any, None, Decision]:
        yield
        raise AssertionError("not awaited in these tests")


class ReplanningGate:
    def __init__(self) -> None:
        self.replanned: list[MaskPlan] = []

    def decide(self, session: SessionInfo, request: StatementRequest) -> Decision:
        return Decision(True, mask=OLD_PLAN)

    def replan(self, session: SessionInfo, plan: MaskPlan) -> Pending:
        self.replanned.append(plan)
        return Pending()


def test_rows_wait_for_the_new_plan_at_every_split() -> None:
    for cut in range(len(REPLY) + 1):
        gate = ReplanningGate()
        s = Session(INFO, gate, masked=True)
        s.receive_client(codec.query("SELECT id, note FROM v"))
        drain(s.to_server)
        s.receive_server(REPLY[:cut])
        s.receive_server(REPLY[cut:])
        held = drain(s.to_client)
        assert SECRET not in held and b"D" not in held[5:], cut
        assert s.awaiting_result is not None and gate.replanned == [OLD_PLAN]
        s.resume_result(Decision(True, mask=NEW_PLAN))
        received = held + drain(s.to_client)
        assert SECRET not in received
        assert received.endswith(command_complete("SELECT 1") + RFQ_I)
        assert s.awaiting_result is None


def test_a_refused_new_plan_withholds_the_rows_and_ends_with_the_refusal() -> None:
    gate = ReplanningGate()
    s = Session(INFO, gate, masked=True)
    s.receive_client(codec.query("SELECT id FROM v WHERE note = 'x'"))
    s.receive_server(REPLY)
    s.resume_result(Decision.refuse("masked column v.note may not be used in WHERE"))
    received = drain(s.to_client)
    assert SECRET not in received and command_complete("SELECT 1") not in received
    assert b"may not be used in WHERE" in received and received.endswith(RFQ_I)
    assert s.cancel_wanted  # the statement is stopped upstream if it still runs


def test_a_relation_unknown_to_the_new_catalog_too_is_masked_whole() -> None:
    gate = ReplanningGate()
    s = Session(INFO, gate, masked=True)
    s.receive_client(codec.query("SELECT id, note FROM v"))
    s.receive_server(REPLY)
    s.resume_result(Decision(True, mask=OLD_PLAN))  # still does not know NEW
    received = drain(s.to_client)
    assert SECRET not in received and received.endswith(RFQ_I)
    assert gate.replanned == [OLD_PLAN]  # asked once, not in a loop
