"""The session's parts as plain objects: no Session, no I/O.

Each stage and record type of :mod:`querywarden.session` is driven here directly, the way
the relay calls it: what the server still owes (:class:`OwedQueue`), the statements and
portals with their PostgreSQL lifetimes (:class:`Records`), the row limit, the policy's
sentinels and reloads, the approvals hold, the audit records and the masking stage's
bookkeeping. The relay itself, bytes in and bytes out, is tested in ``test_session*.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Generator
from dataclasses import dataclass
from typing import Any

import pytest

from querywarden import codec
from querywarden.audit.recorder import AuditWriteError, PendingStatement, SessionAudit
from querywarden.codec import FieldDescription
from querywarden.hooks import ALLOW, AllowAll, Decision, SessionInfo, StatementRequest
from querywarden.identity import Principal
from querywarden.masking.plan import MaskPlan
from querywarden.session import SENTINEL_PREFIX, RowLimit
from querywarden.session.audit import AUDIT_REFUSAL, AuditStage, texts
from querywarden.session.hold import HeldRequest, Hold
from querywarden.session.masking import MASK_ALL, WITHHELD_PAYLOAD, MaskingStage, NeedsPlan
from querywarden.session.owed import B, C, D, E, F, H, Owed, OwedQueue, P, Q, S
from querywarden.session.policy import PolicyStage
from querywarden.session.records import Records
from querywarden.session.row_limit import RowLimitStage

INFO = SessionInfo("s1", Principal("alice"), "app", "127.0.0.1:1")
TABLE = 16384
PORTAL_SUSPENDED = ord("s")
COMMAND_COMPLETE = ord("C")
CANCELED = codec.error_response("57014", "canceling statement due to user request")
DIVISION_BY_ZERO = codec.error_response("22012", "division by zero")


def plan(relations: frozenset[int] | None = None) -> MaskPlan:
    """A mask plan of its own (plans are told apart by identity)."""
    return MaskPlan(origins={}, computed=None, scanner=None, scrub_errors=True, relations=relations)


def column(name: str, table: int = TABLE, attnum: int = 1) -> FieldDescription:
    return FieldDescription(name.encode(), table, attnum, 25, 0)


def syntax_error_at(token: str) -> bytes:
    return codec.error_response("42601", f'syntax error at or near "{token}"')


def queue(*entries: Owed) -> OwedQueue:
    return OwedQueue(entries)


def statement_and_portal(statement: str = "s1", portal: str = "p1") -> Records:
    """Records holding one statement and one portal bound to it."""
    records = Records()
    records.parsed(statement, "SELECT id FROM t")
    records.bound(portal, statement)
    return records


class Later:
    """A decision that comes later (a gate's answer when a human must approve)."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision

    def __await__(self) -> Generator[Any, None, Decision]:
        return asyncio.sleep(0, self.decision).__await__()


async def awaited(outcome: Awaitable[Decision]) -> Decision:
    return await outcome


class FakeGate:
    """Refuses the SQL that mentions ``refused``; allows the rest with ``mask``.

    ``masks`` gives some texts a plan of their own; ``later`` makes every decision an
    awaitable one; ``generation`` is what a reloading gate exposes.
    """

    def __init__(
        self, *, refused: str = "secret", mask: MaskPlan | None = None, later: bool = False
    ) -> None:
        self.refused = refused
        self.mask = mask
        self.masks: dict[str, MaskPlan] = {}
        self.later = later
        self.generation = 0
        self.seen: list[str] = []
        self.replanned: list[MaskPlan] = []

    def decide(
        self, session: SessionInfo, request: StatementRequest
    ) -> Decision | Awaitable[Decision]:
        self.seen.append(request.sql)
        if self.refused in request.sql:
            decision = Decision.refuse(f"{self.refused} is off limits", rule="r1")
        else:
            decision = Decision(True, rule="r0", mask=self.masks.get(request.sql, self.mask))
        return Later(decision) if self.later else decision

    def replan(self, session: SessionInfo, old: MaskPlan) -> Awaitable[Decision]:
        self.replanned.append(old)
        return Later(Decision(True, mask=plan()))


@dataclass
class Finished:
    """What a result record was written with."""

    pending: PendingStatement
    masking: dict[str, int] | None
    stream_digest: str
    stream_bytes: int


class MemoryAudit(SessionAudit):
    """A SessionAudit that keeps what it is given in memory; ``fail``: the log is full."""

    def __init__(self, sample_rows: int = 2) -> None:
        self.sample_rows = sample_rows
        self.fail = False
        self.requests: list[tuple[StatementRequest, Decision, list[str | None] | None]] = []
        self.results: list[Finished] = []
        self.ended: dict[str, int] | None = None

    def request(
        self,
        request: StatementRequest,
        decision: Decision,
        *,
        text: str | None = None,
        masking: dict[str, int] | None = None,
        parameters: list[str | None] | None = None,
    ) -> PendingStatement:
        if self.fail:
            raise AuditWriteError("the audit log is full")
        self.requests.append((request, decision, parameters))
        return PendingStatement(f"s1-{len(self.requests)}", 0.0, masking_before=masking or {})

    def finish(
        self,
        pending: PendingStatement,
        *,
        masking: dict[str, int] | None,
        stream_digest: str,
        stream_bytes: int,
        masked: bool = False,
    ) -> None:
        assert masked == (masking is not None)  # samples are shown only when masked
        self.results.append(Finished(pending, masking, stream_digest, stream_bytes))

    def end(self, masking: dict[str, int]) -> None:
        self.ended = masking


# --- OwedQueue ------------------------------------------------------------------------


def test_an_empty_queue_owes_nothing() -> None:
    owed = OwedQueue()
    assert owed.head() is None
    assert owed.pop_if(Q) is None
    assert not owed.extended_head()
    assert owed.until_sync() == []


def test_pop_if_pops_the_head_only_when_it_is_of_the_kind() -> None:
    parse, bind = Owed(P, "s1", "SELECT 1"), Owed(B, "p1", "s1")
    owed = queue(parse, bind)
    assert owed.head() is parse
    assert owed.pop_if(B) is None  # a BindComplete cannot answer a Parse
    assert list(owed) == [parse, bind]
    assert owed.pop_if(P) is parse
    assert owed.head() is bind


def test_in_flight_matches_kind_and_name() -> None:
    owed = queue(Owed(P, "s1", "SELECT 1"), Owed(B, "p1", "s1"), Owed(S))
    assert owed.in_flight(P, "s1")
    assert owed.in_flight(B, "p1")
    assert not owed.in_flight(P, "p1")
    assert not owed.in_flight(B, "s1")
    assert not owed.in_flight(P, "s2")


@pytest.mark.parametrize("kind", [P, B, D, E, C, S, H])
def test_every_head_but_query_and_function_call_is_extended(kind: int) -> None:
    assert queue(Owed(kind), Owed(Q)).extended_head()


@pytest.mark.parametrize("kind", [Q, F])
def test_query_and_function_call_heads_are_not_extended(kind: int) -> None:
    assert not queue(Owed(kind), Owed(E)).extended_head()


def test_until_sync_and_discard_until_sync_stop_at_the_first_sync() -> None:
    parse, execute, sync, query = Owed(P, "s1"), Owed(E, "p1"), Owed(S), Owed(Q)
    later_execute, later_sync = Owed(E, "p2"), Owed(S)
    owed = queue(parse, execute, sync, later_execute, later_sync, query)
    assert owed.until_sync() == [parse, execute]
    assert len(owed) == 6  # only looked at
    owed.discard_until_sync()
    assert list(owed) == [sync, later_execute, later_sync, query]
    owed.discard_until_sync()  # the Sync at the head stays
    assert owed.head() is sync


def test_discard_until_sync_without_a_sync_empties_the_queue() -> None:
    owed = queue(Owed(B, "p1"), Owed(E, "p1"))
    assert len(owed.until_sync()) == 2
    owed.discard_until_sync()
    assert not owed


# --- Records: statements ----------------------------------------------------------------


def test_parsed_again_keeps_the_record_and_clears_what_the_old_text_said() -> None:
    records = Records()
    first = records.parsed("s1", "SELECT id FROM t")
    first.fields = [column("id")]
    first.described = True
    first.plan = mask = plan()
    records.parse_complete("s1", "SELECT id FROM t")
    again = records.parsed("s1", "SELECT name FROM u")
    assert again is first
    assert again.text == "SELECT name FROM u"
    assert again.fields is None
    assert not again.described
    assert again.sql == "SELECT id FROM t"  # the server still has the old one
    assert again.plan is mask  # the relay sets the new plan itself


def test_parse_complete_confirms_the_text() -> None:
    records = Records()
    records.parsed("s1", "SELECT 1")
    assert records.confirmed_statements() == {}
    records.parse_complete("s1", "SELECT 1")
    assert records.statements["s1"].sql == "SELECT 1"
    assert records.confirmed_statements() == {"s1": "SELECT 1"}


def test_parse_complete_without_a_record_makes_one() -> None:
    records = Records()
    records.parse_complete("s1", "SELECT 1")
    assert records.statements["s1"].text == "SELECT 1"
    assert records.confirmed_statements() == {"s1": "SELECT 1"}


def test_statement_closed_deletes_the_record() -> None:
    records = Records()
    records.parsed("s1", "SELECT 1")
    records.parse_complete("s1", "SELECT 1")
    records.statement_closed("s1", queue(Owed(P, "s2", "SELECT 2")))
    assert "s1" not in records.statements
    records.statement_closed("s1", OwedQueue())  # closing an unknown name is harmless
    assert records.statements == {}


def test_statement_closed_with_a_parse_of_the_name_in_flight_only_unconfirms() -> None:
    records = Records()
    records.parsed("s1", "SELECT 1")
    records.parse_complete("s1", "SELECT 1")
    record = records.parsed("s1", "SELECT 2")
    records.statement_closed("s1", queue(Owed(P, "s1", "SELECT 2"), Owed(S)))
    assert records.statements["s1"] is record
    assert record.sql is None
    assert record.text == "SELECT 2"
    assert records.confirmed_statements() == {}


# --- Records: portals ---------------------------------------------------------------------


def test_bound_replaces_a_portal_of_the_name() -> None:
    records = Records()
    old = records.bound("p1", "s1")
    old.fields = [column("id")]
    old.described = True
    records.bind_complete("p1")
    new = records.bound("p1", "s2")
    assert new is not old
    assert records.portals["p1"] is new
    assert new.statement == "s2"
    assert new.fields is None
    assert not new.described
    assert not new.confirmed


def test_bind_complete_confirms_the_portal() -> None:
    records = Records()
    records.bound("p1", "s1")
    records.bound("p2", "s1")
    assert records.confirmed_portals() == {}
    records.bind_complete("p1")
    records.bind_complete("unknown")  # no record: nothing happens
    assert records.portals["p1"].confirmed
    assert not records.portals["p2"].confirmed
    assert records.confirmed_portals() == {"p1": "s1"}


def test_portal_closed_deletes_the_record() -> None:
    records = Records()
    records.bound("p1", "s1")
    records.bind_complete("p1")
    records.portal_closed("p1", queue(Owed(B, "p2", "s1")))
    assert records.portals == {}


def test_portal_closed_with_a_bind_of_the_name_in_flight_only_unconfirms() -> None:
    records = Records()
    records.bound("p1", "s1")
    records.bind_complete("p1")
    record = records.bound("p1", "s2")
    record.confirmed = True
    records.portal_closed("p1", queue(Owed(B, "p1", "s2"), Owed(S)))
    assert records.portals["p1"] is record
    assert not record.confirmed
    assert records.confirmed_portals() == {}


def test_transaction_end_with_nothing_owed_forgets_every_portal() -> None:
    records = Records()
    records.parsed("s1", "SELECT 1")
    records.bound("p1", "s1")
    records.bound("p2", "s1")
    records.transaction_ended(OwedQueue())
    assert records.portals == {}
    assert "s1" in records.statements  # statements outlive transactions


def test_transaction_end_keeps_only_portals_whose_bind_is_still_owed() -> None:
    records = Records()
    ended = records.bound("p1", "s1")
    ended.confirmed = True
    bound_since = records.bound("p2", "s1")
    bound_since.confirmed = True
    bound_since.suspended_rows = 7
    records.transaction_ended(queue(Owed(E, "p1"), Owed(B, "p2", "s1"), Owed(S)))
    assert records.portals == {"p2": bound_since}
    assert not bound_since.confirmed
    assert bound_since.suspended_rows == 0


def test_statement_of_follows_the_portal_to_its_statement() -> None:
    records = statement_and_portal("s1", "p1")
    records.bound("p2", "gone")
    assert records.statement_of("p1") is records.statements["s1"]
    assert records.statement_of("p2") is None  # its statement has no record
    assert records.statement_of("unknown") is None


# --- RowLimitStage --------------------------------------------------------------------------

LIMIT = RowLimit(2, "agents")


def count(stage: RowLimitStage, rows: int, owed: OwedQueue, records: Records) -> list[bool]:
    """Which of ``rows`` rows may go on to the client."""
    return [stage.count_row(owed, records) for _ in range(rows)]


def test_rows_up_to_the_limit_pass_and_every_row_past_it_is_cut() -> None:
    stage = RowLimitStage(LIMIT)
    stage.result_started()
    assert count(stage, 5, queue(Owed(Q)), Records()) == [True, True, False, False, False]
    assert stage.cut


def test_a_result_within_the_limit_ends_as_it_is() -> None:
    stage = RowLimitStage(LIMIT)
    records = Records()
    assert count(stage, 2, queue(Owed(Q)), records) == [True, True]
    assert stage.execute_done(COMMAND_COMPLETE, None, records) is None
    # The next result counts from zero.
    assert count(stage, 2, queue(Owed(Q)), records) == [True, True]


def test_a_cut_result_ends_with_the_limit_error_for_a_completed_statement() -> None:
    stage = RowLimitStage(LIMIT)
    records = Records()
    count(stage, 3, queue(Owed(Q)), records)
    error = stage.execute_done(COMMAND_COMPLETE, None, records)
    assert error == LIMIT.error(completed=True)
    fields = codec.decode_fields(error)
    assert fields["C"] == "54000"
    assert "more than 2 rows" in fields["M"]
    assert "agents" in fields["M"]
    assert "finished on the server" in fields["D"]
    assert not stage.cut
    assert stage.execute_done(COMMAND_COMPLETE, None, records) is None  # once only


def test_a_suspended_portal_counts_on_at_its_next_execute() -> None:
    stage = RowLimitStage(LIMIT)
    records = statement_and_portal("s1", "p1")
    owed = queue(Owed(E, "p1"), Owed(E, "p1"), Owed(S))
    assert count(stage, 1, owed, records) == [True]
    assert stage.execute_done(PORTAL_SUSPENDED, owed.popleft().name, records) is None
    portal = records.portals["p1"]
    assert portal.suspended_rows == 1
    assert count(stage, 2, owed, records) == [True, False]  # rows 2 and 3 of the portal
    assert portal.suspended_rows == 0


def test_a_completed_portal_saves_no_rows() -> None:
    stage = RowLimitStage(LIMIT)
    records = statement_and_portal("s1", "p1")
    count(stage, 2, queue(Owed(E, "p1")), records)
    assert stage.execute_done(COMMAND_COMPLETE, "p1", records) is None
    assert records.portals["p1"].suspended_rows == 0


def test_our_cancels_error_becomes_the_limit_error_for_a_statement_not_completed() -> None:
    stage = RowLimitStage(LIMIT)
    count(stage, 3, queue(Owed(Q)), Records())
    stage.cancelled = True
    error = stage.error_arrived(CANCELED)
    assert error == LIMIT.error(completed=False)
    assert error is not None
    fields = codec.decode_fields(error)
    assert fields["C"] == "54000"
    assert "cancelled on the server" in fields["D"]
    assert not stage.cut


def test_an_error_of_its_own_is_not_replaced() -> None:
    stage = RowLimitStage(LIMIT)
    count(stage, 3, queue(Owed(Q)), Records())
    stage.cancelled = True
    assert stage.error_arrived(DIVISION_BY_ZERO) is None
    assert not stage.cut


def test_a_cancel_error_without_our_cancel_is_not_replaced() -> None:
    cut = RowLimitStage(LIMIT)
    count(cut, 3, queue(Owed(Q)), Records())
    assert cut.error_arrived(CANCELED) is None
    assert not cut.cut
    untouched = RowLimitStage(LIMIT)
    assert untouched.error_arrived(CANCELED) is None


def test_ready_ends_the_request() -> None:
    stage = RowLimitStage(LIMIT)
    records = Records()
    count(stage, 3, queue(Owed(Q)), records)
    stage.cancelled = True
    stage.ready()
    assert not stage.cut
    assert not stage.cancelled
    assert count(stage, 2, queue(Owed(Q)), records) == [True, True]
    stage.ready()  # mid-result: the count starts over too
    assert count(stage, 2, queue(Owed(Q)), records) == [True, True]


def test_without_a_limit_every_row_passes() -> None:
    stage = RowLimitStage(None)
    records = statement_and_portal("s1", "p1")
    assert not stage.active
    assert all(count(stage, 1000, queue(Owed(E, "p1")), records))
    assert not stage.cut
    assert stage.execute_done(PORTAL_SUSPENDED, "p1", records) is None
    assert records.portals["p1"].suspended_rows == 0


def test_a_result_cut_by_another_stage_is_cut_without_a_limit() -> None:
    stage = RowLimitStage(None)
    refused = codec.error_response("0A000", "binary COPY cannot be masked")
    stage.cut_result(lambda completed: refused)
    assert stage.active
    assert count(stage, 1, queue(Owed(Q)), Records()) == [False]
    assert stage.execute_done(COMMAND_COMPLETE, None, Records()) == refused


# --- PolicyStage ----------------------------------------------------------------------------

REFUSAL = Decision.refuse(
    "querywarden: table secret is off limits",
    sqlstate="42501",
    detail="rule r1 refuses reads of secret",
    hint="select from public.orders instead",
    rule="r1",
)


def test_a_refused_query_becomes_a_query_of_the_token() -> None:
    stage = PolicyStage(INFO, FakeGate())
    sentinel = stage.sentinel(Q, "", REFUSAL)
    assert sentinel[0] == Q
    assert codec.decode_query(sentinel) == f"{SENTINEL_PREFIX}{stage.nonce}_1"


def test_a_refused_function_call_becomes_a_query_too() -> None:
    stage = PolicyStage(INFO, FakeGate())
    sentinel = stage.sentinel(F, "", REFUSAL)
    assert sentinel[0] == Q
    assert codec.decode_query(sentinel).startswith(SENTINEL_PREFIX)


def test_a_refused_parse_becomes_a_parse_of_the_token_under_its_name() -> None:
    stage = PolicyStage(INFO, FakeGate())
    first = codec.decode_query(stage.sentinel(Q, "", REFUSAL))
    sentinel = stage.sentinel(P, "s1", REFUSAL)
    assert sentinel[0] == P
    parse = codec.decode_parse(sentinel)
    assert parse.statement == "s1"
    assert parse.sql == f"{SENTINEL_PREFIX}{stage.nonce}_2"
    assert parse.sql != first


def test_sessions_use_tokens_of_their_own() -> None:
    one, other = PolicyStage(INFO, FakeGate()), PolicyStage(INFO, FakeGate())
    assert one.nonce != other.nonce
    assert one.sentinel(Q, "", REFUSAL) != other.sentinel(Q, "", REFUSAL)


def test_the_sentinels_syntax_error_becomes_the_refusal_once() -> None:
    stage = PolicyStage(INFO, FakeGate())
    token = codec.decode_query(stage.sentinel(Q, "", REFUSAL))
    error = stage.refusal_for(syntax_error_at(token))
    assert error is not None
    fields = codec.decode_fields(error)
    assert fields["C"] == "42501"
    assert fields["M"] == "querywarden: table secret is off limits"
    assert fields["D"] == "rule r1 refuses reads of secret"
    assert fields["H"] == "select from public.orders instead"
    assert stage.refusal_for(syntax_error_at(token)) is None


def test_each_token_gets_its_own_refusal() -> None:
    stage = PolicyStage(INFO, FakeGate())
    decisions = [Decision.refuse(f"refusal {n}", sqlstate=f"4250{n % 10}") for n in range(1, 11)]
    tokens = [codec.decode_query(stage.sentinel(Q, "", d)) for d in decisions]
    # From _10 down: the error quoting "..._10" must not be taken for _1's.
    for token, decision in reversed(list(zip(tokens, decisions, strict=True))):
        error = stage.refusal_for(syntax_error_at(token))
        assert error is not None
        fields = codec.decode_fields(error)
        assert (fields["C"], fields["M"]) == (decision.sqlstate, decision.message)


@pytest.mark.parametrize(
    "frame",
    [
        syntax_error_at("SELEC"),
        syntax_error_at(f"{SENTINEL_PREFIX}000000000000_1"),  # not this session's
        codec.error_response("22012", f'division by zero near "{SENTINEL_PREFIX}"'),
    ],
    ids=["genuine-syntax-error", "unknown-token", "other-sqlstate"],
)
def test_other_errors_are_left_alone(frame: bytes) -> None:
    stage = PolicyStage(INFO, FakeGate())
    token = codec.decode_query(stage.sentinel(Q, "", REFUSAL))
    assert stage.refusal_for(frame) is None
    assert stage.refusal_for(syntax_error_at(token)) is not None  # still waiting


def test_the_sentinels_token_under_another_sqlstate_is_left_alone() -> None:
    stage = PolicyStage(INFO, FakeGate())
    token = codec.decode_query(stage.sentinel(Q, "", REFUSAL))
    assert stage.refusal_for(codec.error_response("42P01", f'relation "{token}"')) is None


def test_settled_forgets_the_refusals() -> None:
    stage = PolicyStage(INFO, FakeGate())
    token = codec.decode_query(stage.sentinel(Q, "", REFUSAL))
    stage.settled()
    assert stage.refusal_for(syntax_error_at(token)) is None


def test_reloaded_follows_the_gates_generation() -> None:
    gate = FakeGate()
    gate.generation = 3
    stage = PolicyStage(INFO, gate)
    assert not stage.reloaded()
    gate.generation = 4
    assert stage.reloaded()
    assert not stage.reloaded()  # noticed once


def test_a_gate_without_a_generation_never_reloads() -> None:
    stage = PolicyStage(INFO, AllowAll())
    assert not stage.reloaded()
    assert not stage.reloaded()


def test_redecide_refuses_when_any_text_is_refused() -> None:
    gate = FakeGate()
    stage = PolicyStage(INFO, gate)
    request, decision = stage.redecide("s1", ["SELECT secret FROM t", "SELECT 1"])
    assert request.kind == "execute"
    assert request.sql == "SELECT 1"
    assert request.statement_name == "s1"
    assert isinstance(decision, Decision)
    assert not decision.allowed
    assert decision.message == "secret is off limits"


def test_redecide_allows_texts_with_the_same_mask_under_it() -> None:
    mask = plan()
    gate = FakeGate(mask=mask)
    stage = PolicyStage(INFO, gate)
    _, decision = stage.redecide("s1", ["SELECT 1", "SELECT 2", "SELECT 1"])
    assert isinstance(decision, Decision)
    assert decision.allowed
    assert decision.mask is mask
    assert gate.seen == ["SELECT 1", "SELECT 2"]  # each text decided once


def test_redecide_masks_whole_when_the_texts_masks_differ() -> None:
    gate = FakeGate(mask=plan())
    gate.masks["SELECT 2"] = plan()
    stage = PolicyStage(INFO, gate)
    _, decision = stage.redecide("s1", ["SELECT 1", "SELECT 2"])
    assert isinstance(decision, Decision)
    assert decision.allowed
    assert decision.mask is None
    assert decision.rule == "r0"


def test_redecide_with_a_gate_that_decides_later_is_awaited() -> None:
    stage = PolicyStage(INFO, FakeGate(later=True))
    _, outcome = stage.redecide("s1", ["SELECT 1", "SELECT secret FROM t"])
    assert not isinstance(outcome, Decision)
    decision = asyncio.run(awaited(outcome))
    assert not decision.allowed
    assert decision.rule == "r1"


# --- Hold -------------------------------------------------------------------------------------


def held_query(sql: str = "SELECT 1") -> HeldRequest:
    return HeldRequest(Q, codec.query(sql), StatementRequest("query", sql), None)


def test_a_hold_keeps_one_request_until_its_release() -> None:
    hold = Hold()
    held, outcome = held_query(), Later(ALLOW)
    hold.start(held, outcome)
    assert hold.awaiting is outcome
    assert hold.release() is held
    assert hold.awaiting is None


def test_release_without_a_hold_raises() -> None:
    hold = Hold()
    assert hold.awaiting is None
    with pytest.raises(RuntimeError, match="without a held request"):
        hold.release()
    hold.start(held_query(), Later(ALLOW))
    hold.release()
    with pytest.raises(RuntimeError):
        hold.release()


# --- AuditStage -------------------------------------------------------------------------------


def pending(statement_id: str) -> PendingStatement:
    return PendingStatement(statement_id, 0.0)


def test_a_request_is_recorded_before_it_is_forwarded() -> None:
    audit = MemoryAudit()
    stage = AuditStage(audit, "utf-8")
    request = StatementRequest("query", "SELECT 1")
    decision, written = stage.request(request, ALLOW, {"public.t.ssn": 2})
    assert decision is ALLOW
    assert written is not None
    assert written.masking_before == {"public.t.ssn": 2}
    assert audit.requests == [(request, ALLOW, None)]


def test_a_request_that_cannot_be_recorded_is_refused() -> None:
    audit = MemoryAudit()
    audit.fail = True
    stage = AuditStage(audit, "utf-8")
    decision, written = stage.request(StatementRequest("query", "SELECT 1"), ALLOW, None)
    assert decision is AUDIT_REFUSAL
    assert written is None
    assert not AUDIT_REFUSAL.allowed
    assert AUDIT_REFUSAL.sqlstate == "58030"


def test_an_execute_record_hides_values_when_asked() -> None:
    audit = MemoryAudit()
    stage = AuditStage(audit, "utf-8")
    records = statement_and_portal("s1", "p1")
    portal = records.portals["p1"]
    portal.values = ["123-45-6789", None]
    assert stage.execute(portal, records.statements["s1"], None, hide_values=True) is not None
    assert stage.execute(portal, records.statements["s1"], None, hide_values=False) is not None
    (hidden_request, _, hidden), (_, _, shown) = audit.requests
    assert hidden_request.sql == "SELECT id FROM t"
    assert hidden_request.statement_name == "s1"
    assert hidden == ["****", None]
    assert shown == ["123-45-6789", None]
    audit.fail = True
    assert stage.execute(portal, records.statements["s1"], None, hide_values=False) is None


def test_an_extended_protocol_error_ends_every_message_up_to_the_sync() -> None:
    audit = MemoryAudit()
    stage = AuditStage(audit, "utf-8")
    parse, execute, after_sync = pending("1"), pending("2"), pending("3")
    owed = queue(
        Owed(P, "s1", "SELECT nope FROM t", pending=parse),
        Owed(B, "p1", "s1"),
        Owed(E, "p1", pending=execute),
        Owed(S),
        Owed(Q, pending=after_sync),
    )
    stage.errored(owed, codec.error_response("42703", 'column "nope" does not exist'))
    assert parse.sqlstate == "42703"
    assert parse.error == 'column "nope" does not exist'
    assert execute.sqlstate is None
    assert execute.error is not None
    assert execute.error.startswith("not run")
    assert after_sync.error is None
    assert len(owed) == 5  # the relay discards them itself
    stage.sent([b"E..."], dict)
    assert [r.pending for r in audit.results] == [parse, execute]


def test_a_simple_query_error_is_noted_and_recorded_at_its_answer() -> None:
    audit = MemoryAudit()
    stage = AuditStage(audit, "utf-8")
    query = pending("1")
    stage.errored(queue(Owed(Q, pending=query)), DIVISION_BY_ZERO)
    assert query.sqlstate == "22012"
    assert query.error == "division by zero"
    stage.sent([b"E..."], dict)
    assert audit.results == []  # its ReadyForQuery hands it over (``answered``)


def test_an_error_with_nothing_owed_is_ignored() -> None:
    stage = AuditStage(MemoryAudit(), "utf-8")
    stage.errored(OwedQueue(), DIVISION_BY_ZERO)  # nothing to note, nothing raised


def test_sent_bytes_are_digested_and_answered_results_recorded_once() -> None:
    audit = MemoryAudit()
    stage = AuditStage(audit, "utf-8")
    asked: list[int] = []

    def masking() -> dict[str, int]:
        asked.append(1)
        return {"public.t.ssn": 3}

    stage.sent([b"T...", b"D..."], masking)
    assert asked == []  # nothing to record: masking is not asked
    first = pending("1")
    stage.answered(first)
    stage.sent([b"C...", b"Z..."], masking)
    (result,) = audit.results
    assert result.pending is first
    assert result.masking == {"public.t.ssn": 3}
    assert result.stream_digest == hashlib.sha256(b"T...D...C...Z...").hexdigest()
    assert result.stream_bytes == 16
    stage.sent([b"Z..."], masking)
    assert len(audit.results) == 1
    assert asked == [1]


def test_completed_notes_the_command_and_adds_up_rows() -> None:
    stage = AuditStage(MemoryAudit(), "utf-8")
    execute = pending("1")
    head = Owed(E, "p1", pending=execute)
    for tag in ("SELECT 2", "SELECT 3"):
        frame = codec.message(b"C", codec.cstr(tag))
        stage.completed(head, frame, 0, len(frame))
    assert execute.command == "SELECT 3"
    assert execute.rows == 5
    suspended = codec.message(b"s")
    stage.completed(head, suspended, 0, len(suspended))
    assert execute.command == "PORTAL SUSPENDED"


@pytest.mark.parametrize(
    ("values", "formats", "expected"),
    [
        ((b"caf\xc3\xa9", None), (), ["café", None]),
        ((b"\x00\x01", b"\xff"), (1,), ["\\x0001", "\\xff"]),
        ((b"abc", b"\x00\x2a"), (0, 1), ["abc", "\\x002a"]),
        ((b"\xff\xfe",), (), ["\\xfffe"]),
        ((b"a", b"b"), (0,), ["a", "b"]),
    ],
    ids=["text", "binary-for-all", "per-column", "undecodable", "text-for-all"],
)
def test_values_are_text_or_hex(
    values: tuple[bytes | None, ...], formats: tuple[int, ...], expected: list[str | None]
) -> None:
    assert texts(values, "utf-8", formats) == expected


def test_text_values_are_read_in_the_client_encoding() -> None:
    assert texts((b"caf\xe9",), "latin-1") == ["café"]
    assert texts((b"caf\xe9",), "utf-8") == ["\\x636166e9"]


# --- MaskingStage -----------------------------------------------------------------------------


def masking(gate: FakeGate | None = None) -> MaskingStage:
    return MaskingStage(INFO, gate or FakeGate(), "utf-8", masked=True)


def test_an_execute_nothing_describes_gets_an_internal_describe() -> None:
    stage = masking()
    records = statement_and_portal("s1", "p1")
    owed = queue(Owed(P, "s1", "SELECT id FROM t"), Owed(B, "p1", "s1"))
    assert stage.describe_before_execute("p1", records, owed) == codec.describe("P", "p1")
    describe = owed[-1]
    assert (describe.kind, describe.name, describe.extra) == (D, "p1", "internal")
    assert records.portals["p1"].described
    # Its answer will say it: the next Execute of the portal needs no other.
    assert stage.describe_before_execute("p1", records, owed) is None
    assert len(owed) == 3


def test_an_execute_of_an_unknown_portal_gets_a_describe_too() -> None:
    owed = OwedQueue()
    assert masking().describe_before_execute("p9", Records(), owed) == codec.describe("P", "p9")
    assert [(e.kind, e.name, e.extra) for e in owed] == [(D, "p9", "internal")]


@pytest.mark.parametrize(
    ("record", "attribute", "value"),
    [
        ("portal", "described", True),
        ("portal", "fields", []),  # NoData: known to have no columns
        ("statement", "described", True),
        ("statement", "fields", [column("id")]),
    ],
)
def test_no_describe_when_the_portal_or_its_statement_says_it(
    record: str, attribute: str, value: object
) -> None:
    records = statement_and_portal("s1", "p1")
    target = records.portals["p1"] if record == "portal" else records.statements["s1"]
    setattr(target, attribute, value)
    owed = queue(Owed(B, "p1", "s1"))
    assert masking().describe_before_execute("p1", records, owed) is None
    assert len(owed) == 1


def test_head_plan_of_a_query_is_its_entrys() -> None:
    mask = plan()
    assert masking().head_plan(Owed(Q, plan=mask), Records()) is mask


def test_head_plan_of_an_execute_is_its_portals_statements() -> None:
    records = statement_and_portal("s1", "p1")
    records.statements["s1"].plan = mask = plan()
    stage = masking()
    assert stage.head_plan(Owed(E, "p1", plan=plan()), records) is mask
    assert stage.head_plan(Owed(E, "p9"), records) is None  # unknown portal


@pytest.mark.parametrize("kind", [P, B, D, S])
def test_other_heads_have_no_plan(kind: int) -> None:
    records = statement_and_portal("", "")
    records.statements[""].plan = plan()
    assert masking().head_plan(Owed(kind, "", plan=plan()), records) is None


def test_no_head_has_no_plan() -> None:
    assert masking().head_plan(None, Records()) is None


def test_a_statement_description_is_kept_and_shown() -> None:
    records = statement_and_portal("s1", "p1")
    fields = [column("id"), column("ssn", attnum=2)]
    assert not masking().description(Owed(D, "s1", "S"), fields, records)
    assert records.statements["s1"].fields == fields
    assert records.portals["p1"].fields is None


def test_a_portal_description_the_client_asked_for_is_kept_and_shown() -> None:
    records = statement_and_portal("s1", "p1")
    fields = [column("id")]
    assert not masking().description(Owed(D, "p1", "P"), fields, records)
    assert records.portals["p1"].fields == fields
    assert records.statements["s1"].fields is None


def test_the_answer_to_an_internal_describe_is_kept_and_hidden() -> None:
    records = statement_and_portal("s1", "p1")
    fields = [column("id")]
    assert masking().description(Owed(D, "p1", "internal"), fields, records)
    assert records.portals["p1"].fields == fields


def test_a_notification_payload_is_withheld() -> None:
    stage = masking()
    frame = codec.notification_response(4242, b"customers", '{"ssn": "123-45-6789"}')
    replaced = stage.notification(frame)
    assert replaced is not None
    assert codec.decode_notification(replaced) == (
        4242,
        b"customers",
        WITHHELD_PAYLOAD.encode(),
    )
    assert stage.summary() == {"(notification payload)": 1}


def test_a_notification_without_a_payload_passes() -> None:
    stage = masking()
    assert stage.notification(codec.notification_response(4242, b"ping", "")) is None
    assert stage.summary() == {}


def test_a_result_from_a_relation_the_plan_does_not_know_needs_a_new_plan() -> None:
    gate = FakeGate()
    stage = masking(gate)
    old = plan(relations=frozenset({TABLE}))
    head = Owed(Q, plan=old)
    with pytest.raises(NeedsPlan):
        stage.start_result(head, [column("id", table=TABLE + 1)], Records())
    assert gate.replanned == [old]
    assert stage.awaiting is not None
    new = asyncio.run(awaited(stage.awaiting))
    assert stage.replanned(new, head, Records()) is new.mask
    assert head.plan is new.mask
    assert stage.awaiting is None


def test_a_refused_new_plan_masks_everything() -> None:
    records = statement_and_portal("s1", "p1")
    records.statements["s1"].plan = plan()
    stage = masking()
    assert stage.replanned(REFUSAL, Owed(E, "p1"), records) is MASK_ALL
    assert records.statements["s1"].plan is MASK_ALL
    assert MASK_ALL.mask_all
