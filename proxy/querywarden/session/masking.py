"""The masking stage: sensitive values are replaced in the bytes the client receives.

The gate attaches a :class:`MaskPlan` to every decision of a masked session: which result
columns come from which table columns, and what content detectors look for. This stage
keeps each plan with its request (a simple Query's on its owed entry, a prepared
statement's on its record), learns each result's description (its RowDescription, or a
Describe the stage sends before an Execute when nothing else will say it), and masks the
rows through a :class:`RowLayout` made once per statement shape. Rows it cannot attribute
to a plan are masked whole; errors, notices and notification payloads are scrubbed too.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Final

import orjson

from querywarden import codec
from querywarden.codec import FieldDescription
from querywarden.hooks import Decision, SessionInfo, StatementGate
from querywarden.masking.plan import MaskPlan
from querywarden.masking.rows import MaskCounts, RowLayout, scan_copy_row, scrub_fields
from querywarden.session.owed import D, E, Owed, OwedQueue, Q
from querywarden.session.records import Records

#: Masks every value: for rows whose statement or layout the stage does not know.
MASK_ALL: Final = MaskPlan(
    origins={}, computed=None, scanner=None, scrub_errors=True, mask_all=True
)
#: Row layouts a session keeps for the statement shapes it repeats.
_LAYOUT_CACHE: Final = 64
#: What a masked session receives as a notification's payload.
WITHHELD_PAYLOAD: Final = "querywarden: payload withheld (masked identity)"


class NeedsPlan(Exception):
    """The result names a relation its plan's catalog does not know.

    The plan is being made again (:attr:`MaskingStage.awaiting`); the result waits for it.
    """


class MaskingStage:
    """Mask plans, result descriptions and row layouts for one session."""

    def __init__(
        self, info: SessionInfo, gate: StatementGate, encoding: str, *, masked: bool
    ) -> None:
        self.info = info
        self.gate = gate
        self.encoding = encoding
        #: Whether results are masked (a policy reload may change it).
        self.masked = masked
        #: What masking did, for the audit record.
        self.counts = MaskCounts()
        #: The layout of the result now arriving (None: its rows pass as they are).
        self.layout: RowLayout | None = None
        #: Whether :attr:`layout` was worked out for the current result.
        self.layout_known = False
        self._layouts: dict[tuple[object, ...], tuple[MaskPlan, RowLayout]] = {}
        #: A plan being made again; the shell awaits it (``Session.resume_result``).
        self.awaiting: Awaitable[Decision] | None = None
        self._replanned: MaskPlan | None = None  # the last plan made again

    # What the client sends

    def describe_forwarded(self, kind: str, name: str, records: Records) -> None:
        record = (records.statements if kind == "S" else records.portals).get(name)
        if record is not None:
            record.described = True

    def describe_before_execute(
        self, portal: str, records: Records, owed: OwedQueue
    ) -> bytes | None:
        """A Describe of the portal, when nothing else will say what its rows hold.

        The server answers it before the Execute's rows; the stage keeps the answer and
        the client never sees it.
        """
        bound = records.portals.get(portal)
        if bound is not None:
            if bound.described or bound.fields is not None:
                return None
            statement = records.statements.get(bound.statement)
            if statement is not None and (statement.described or statement.fields is not None):
                return None
            bound.described = True
        owed.append(Owed(D, portal, "internal"))
        return codec.describe("P", portal)

    # What the server answers

    def head_plan(self, head: Owed | None, records: Records) -> MaskPlan | None:
        """The plan of the request the server is answering now."""
        if head is None:
            return None
        if head.kind == Q:
            return head.plan
        if head.kind == E:
            statement = records.statement_of(head.name)
            return statement.plan if statement is not None else None
        return None

    def result_plan(self, head: Owed | None, records: Records) -> MaskPlan | None:
        """The plan for what answers the request now running (rows, errors, notices).

        A Query or Execute with no plan of its own (decided before a reload turned masking
        on, or a statement name that may run either of two texts with different plans)
        gets :data:`MASK_ALL`: nothing says which of its values are safe. Other requests
        (a Parse, a Bind) have no result to mask: None.
        """
        if head is None or head.kind not in (Q, E):
            return None
        plan = self.head_plan(head, records)
        return MASK_ALL if plan is None else plan

    def description(
        self, head: Owed | None, fields: list[FieldDescription], records: Records
    ) -> bool:
        """A Describe's answer: kept on its record. True when the client must not see it."""
        assert head is not None and head.kind == D
        if head.extra == "S":
            statement = records.statements.get(head.name)
            if statement is not None:
                statement.fields = fields
            return False
        portal = records.portals.get(head.name)
        if portal is not None:
            portal.fields = fields
        return head.extra == "internal"

    def start_result(
        self, head: Owed | None, fields: list[FieldDescription] | None, records: Records
    ) -> bytes | None:
        """Work out the layout of the result now arriving (raises NeedsPlan).

        Returns the NoticeResponse that goes before the result when the client asked for
        ``querywarden.annotations=masking`` and something in it is masked.
        """
        self.layout = layout = self._result_layout(head, fields, records)
        self.layout_known = True
        if layout is None or "masking" not in self.info.annotations:
            return None
        return masking_annotation(layout, self.encoding)

    def _result_layout(
        self, head: Owed | None, fields: list[FieldDescription] | None, records: Records
    ) -> RowLayout | None:
        plan = self.head_plan(head, records)
        formats: tuple[int, ...] = ()
        if fields is None and head is not None and head.kind == E:
            portal = records.portals.get(head.name)
            if portal is not None:
                fields = portal.fields
                if fields is None:
                    statement = records.statements.get(portal.statement)
                    fields = statement.fields if statement is not None else None
                    formats = portal.formats
        if plan is None or fields is None:
            # Rows the stage cannot attribute: send none of their values.
            plan, fields = MASK_ALL, None
        elif plan.relations is not None and _unknown_relation(fields, plan.relations):
            # The result comes from a relation created (or replaced) after the plan's
            # catalog was read: the plan is made again before any row leaves.
            if plan is not self._replanned and self._replan(plan):
                raise NeedsPlan
            # Unknown even to the newest catalog (the session's own uncommitted DDL):
            # nothing says what its columns carry.
            plan, fields = MASK_ALL, None
        # The same statement shape gets the same plan object (plans are cached) and the
        # same description: its layout (maskers, compiled ops) is made once per session.
        # A layout keeps nothing of a result once flushed, so it serves the next one.
        key = (id(plan), tuple(fields) if fields is not None else None, formats, self.encoding)
        cached = self._layouts.get(key)
        if cached is not None and cached[0] is plan:
            layout = cached[1]
        else:
            layout = RowLayout(fields, formats, plan, self.encoding, self.counts)
            if len(self._layouts) >= _LAYOUT_CACHE:
                self._layouts.clear()
            self._layouts[key] = (plan, layout)  # the plan kept alive: its id stays its own
        return layout if layout.needed else None

    def _replan(self, plan: MaskPlan) -> bool:
        """Ask the gate for the plan again, with a newer catalog (False: it cannot)."""
        replan = getattr(self.gate, "replan", None)
        if replan is None:
            return False
        self.awaiting = replan(self.info, plan)
        return True

    def replanned(self, decision: Decision, head: Owed | None, records: Records) -> MaskPlan:
        """The plan made again is in: it replaces the head request's plan."""
        self.awaiting = None
        plan = decision.mask if decision.allowed else MASK_ALL
        if plan is None:
            plan = MASK_ALL
        self._replanned = plan
        if head is not None and head.kind == Q:
            head.plan = plan
        elif head is not None and head.kind == E:
            statement = records.statement_of(head.name)
            if statement is not None:
                statement.plan = plan
        return plan

    def copy_row(self, frame: bytes, plan: MaskPlan) -> bytes | None:
        """A COPY TO STDOUT row with detector matches replaced (None: as it is)."""
        return scan_copy_row(frame, plan, self.encoding, self.counts)

    def scrub(self, frame: bytes, plan: MaskPlan | None) -> bytes | None:
        """An ErrorResponse or NoticeResponse with what may carry values masked."""
        return scrub_fields(frame, plan, self.encoding, self.counts)

    def notification(self, frame: bytes) -> bytes | None:
        """A masked session gets a NOTIFY's process id and channel, not its payload.

        Another session may notify anything (``pg_notify('customers', row_to_json(NEW))``
        in an application's trigger), and the payload is free text: it cannot be masked
        column by column, so it is withheld; the notification still arrives as a signal.
        """
        pid, channel, payload = codec.decode_notification(frame)
        if not payload:
            return None
        self.counts.values["(notification payload)"] += 1
        return codec.notification_response(pid, channel, WITHHELD_PAYLOAD)

    def end_result(self) -> None:
        """The current result ended: count what its layout masked, forget the layout."""
        if self.layout is not None:
            self.layout.flush()
            self.layout = None
        self.layout_known = False

    def summary(self) -> dict[str, int]:
        """What masking did in this session so far: values masked per column/detector."""
        if self.layout is not None:
            self.layout.flush()
        return self.counts.summary()

    def switched(self, masked: bool, records: Records, owed: OwedQueue) -> None:
        """A reload turned masking on or off; requests in flight were decided without a plan."""
        self.end_result()
        if masked:
            for entry in owed:
                entry.plan = None
            for statement in records.statements.values():
                statement.plan = None
        self.masked = masked


def _unknown_relation(fields: list[FieldDescription], relations: frozenset[int]) -> bool:
    """Whether a column comes from a relation outside ``relations`` (0: no relation)."""
    return any(f.table_oid and f.table_oid not in relations for f in fields)


def masking_annotation(layout: RowLayout, encoding: str) -> bytes:
    """A NoticeResponse naming what masking does to a result's columns.

    The message is for people; the detail is JSON for programs (``querywarden mcp``):
    ``{"all": bool, "columns": [{"index", "name", "source", "strategy"}]}``, where
    ``strategy`` is the configured strategy, or ``detectors`` for a text column whose
    values are masked where a content detector matches, and ``source`` the configured
    ``schema.table.column`` (null for detectors).
    """
    if layout.masks_all:
        return codec.notice_response(
            "querywarden: every value in this result is withheld (sent as NULL): the "
            "gateway cannot tell which of its values are safe",
            detail=orjson.dumps({"all": True, "columns": []}).decode(),
        )
    columns = [
        {
            "index": index,
            "name": name.decode(encoding, "replace"),
            "source": source or None,
            "strategy": strategy,
        }
        for index, name, source, strategy in layout.masked_columns
    ]
    said = ", ".join(f"{c['name']} ({c['strategy']})" for c in columns)
    return codec.notice_response(
        f"querywarden: masked in this result: {said}",
        detail=orjson.dumps({"all": False, "columns": columns}).decode(),
    )
