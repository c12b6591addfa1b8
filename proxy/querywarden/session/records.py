"""The prepared statements and portals of a session: one record each, by name.

A record is made when the client's Parse (Bind) is forwarded, so what the client sends
next can be checked against it at once, and is confirmed when the server answers
ParseComplete (BindComplete). Every stage keeps what it needs of a statement or portal on
its record (the masking plan, the result's description, the audit text and values, the
rows a suspended portal already sent), so a Close, or the end of the transaction for
portals, forgets all of it in one step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from querywarden.session.owed import B, OwedQueue, P

if TYPE_CHECKING:
    from querywarden.codec import FieldDescription
    from querywarden.masking.plan import MaskPlan


@dataclass(slots=True, eq=False)
class Statement:
    """A prepared statement ("" is the unnamed one)."""

    #: The SQL of the last Parse forwarded under the name.
    text: str
    #: The SQL the server confirmed (ParseComplete); None before that.
    sql: str | None = None
    #: How its results are masked (masked sessions).
    plan: MaskPlan | None = None
    #: Its result's description, from a Describe the server answered.
    fields: list[FieldDescription] | None = None
    #: Whether a Describe of it was sent since its Parse.
    described: bool = False
    #: Decided under a policy since reloaded: decided again at its next Execute.
    stale: bool = False


class Portal:
    """A bound portal ("" is the unnamed one).

    A plain class rather than a dataclass: one is made for every Bind, and the relay's
    per-message cost is what this saves.
    """

    __slots__ = (
        "confirmed",
        "described",
        "fields",
        "formats",
        "statement",
        "suspended_rows",
        "values",
    )

    def __init__(self, statement: str) -> None:
        #: The statement its Bind named.
        self.statement = statement
        #: The Bind's result format codes (masked sessions).
        self.formats: tuple[int, ...] = ()
        #: The Bind's parameter values, as text, for the audit record (audited sessions).
        self.values: Sequence[str | None] = ()
        #: Its result's description, from a Describe the server answered.
        self.fields: list[FieldDescription] | None = None
        #: Whether a Describe of it was sent since its Bind.
        self.described = False
        #: Whether the server confirmed the Bind (BindComplete).
        self.confirmed = False
        #: Rows it sent before it was suspended (an Execute with a row count): a row
        #: limit counts on from there at its next Execute.
        self.suspended_rows = 0


class Records:
    """Statements and portals by name, with PostgreSQL's lifetimes."""

    def __init__(self) -> None:
        self.statements: dict[str, Statement] = {}
        self.portals: dict[str, Portal] = {}

    # statements

    def parsed(self, name: str, sql: str) -> Statement:
        """A Parse of ``name`` is being forwarded: its record, with what it said cleared."""
        record = self.statements.get(name)
        if record is None:
            record = self.statements[name] = Statement(sql)
        else:
            record.text = sql
            record.fields = None
            record.described = False
        return record

    def parse_complete(self, name: str, sql: str) -> None:
        record = self.statements.get(name)
        if record is None:
            record = self.statements[name] = Statement(sql)
        record.sql = sql

    def statement_closed(self, name: str, owed: OwedQueue) -> None:
        """The server closed the statement; a Parse of the name sent since keeps its record."""
        record = self.statements.get(name)
        if record is None:
            return
        if owed.in_flight(P, name):
            record.sql = None
        else:
            del self.statements[name]

    def confirmed_statements(self) -> dict[str, str]:
        return {n: r.sql for n, r in self.statements.items() if r.sql is not None}

    # portals

    def bound(self, name: str, statement: str) -> Portal:
        """A Bind of ``name`` is being forwarded: a new portal replaces any of that name."""
        record = self.portals[name] = Portal(statement)
        return record

    def bind_complete(self, name: str) -> None:
        record = self.portals.get(name)
        if record is not None:
            record.confirmed = True

    def portal_closed(self, name: str, owed: OwedQueue) -> None:
        """The server closed the portal; a Bind of the name sent since keeps its record."""
        record = self.portals.get(name)
        if record is None:
            return
        if owed.in_flight(B, name):
            record.confirmed = False
        else:
            del self.portals[name]

    def transaction_ended(self, owed: OwedQueue) -> None:
        """Portals live no longer than their transaction (those bound since live on)."""
        if not self.portals:
            return
        if not owed:
            self.portals.clear()
            return
        bound_since = {e.name for e in owed if e.kind == B}
        for name in [n for n in self.portals if n not in bound_since]:
            del self.portals[name]
        for record in self.portals.values():
            record.confirmed = False
            record.suspended_rows = 0

    def confirmed_portals(self) -> dict[str, str]:
        return {n: r.statement for n, r in self.portals.items() if r.confirmed}

    def statement_of(self, portal: str) -> Statement | None:
        """The statement a portal runs, as the client last bound it."""
        record = self.portals.get(portal)
        return self.statements.get(record.statement) if record is not None else None
