"""The gateway's plug-in points: the decision point and the result hook.

Every statement passes :class:`StatementGate` before it can reach the database, and every
result message passes :class:`ResultHook` on its way back. Policy, approvals, masking and
audit plug in here. The gateway's default gate is the policy's
(:class:`querywarden.policy.gate.PolicyGate`); :class:`AllowAll` and no result hook give
a pure pass-through relay.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from querywarden.identity import Principal

if TYPE_CHECKING:
    from querywarden.analysis import StatementSummary
    from querywarden.masking.plan import MaskPlan


@dataclass(slots=True)
class WireState:
    """Where the session's server connection stands as a request is decided.

    The session keeps it current; a gate reads it to know whether what the session did
    before is settled: committed, and so visible to another connection.
    """

    #: The transaction status of the server's last ReadyForQuery: b"I", b"T" or b"E".
    transaction_status: bytes = b"I"
    #: Whether requests before this one are still in flight (their effects are unknown).
    in_flight: bool = False

    @property
    def settled(self) -> bool:
        """Outside a transaction block with nothing in flight.

        Every earlier change is then committed (temporary objects and settings aside).
        """
        return self.transaction_status == b"I" and not self.in_flight


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What the hooks know about the connection a statement came from."""

    session_id: str
    principal: Principal
    database: str
    client_address: str
    application_name: str = ""
    #: Every schema the session's search_path may hold (the gateway pins ``public`` at
    #: start-up). Only ever grows: a SET that is rolled back or local to a transaction
    #: still counts, so unqualified names are checked against every schema they could
    #: resolve to.
    search_path: list[str] = field(default_factory=lambda: ["public"])
    #: SQL-level prepared statements (PREPARE name AS ...) by name, as the gate allowed
    #: them: an EXECUTE is checked again by its body, under the policy of the moment.
    prepared: dict[str, StatementSummary] = field(default_factory=dict)
    #: The session's client_encoding (PostgreSQL's name), fixed for the whole session.
    client_encoding: str = "UTF8"
    #: Where its server connection stands (see :class:`WireState`).
    wire: WireState = field(default_factory=WireState)
    #: What the client asked the gateway to say about its results (start-up setting
    #: ``querywarden.annotations``): ``masking`` names the masked columns of each result,
    #: ``decisions`` the rule behind each refusal.
    annotations: frozenset[str] = frozenset()


RequestKind = Literal["query", "parse", "function_call", "execute"]


class StatementRequest:
    """One request to run SQL, as the client sent it.

    ``kind`` says which protocol path it came by: a simple ``query`` (which may hold
    several statements, see :attr:`statements`), an extended-protocol ``parse``, or a
    legacy ``function_call`` by OID (``sql`` is then empty).
    """

    __slots__ = ("_statements", "function_oid", "kind", "sql", "statement_name", "summaries")

    def __init__(
        self, kind: RequestKind, sql: str, *, statement_name: str = "", function_oid: int = 0
    ) -> None:
        self.kind = kind
        self.sql = sql
        self.statement_name = statement_name
        self.function_oid = function_oid
        self._statements: tuple[str, ...] | None = None
        #: What the analyzer made of :attr:`sql`, when a gate analyzed it (for audit).
        self.summaries: tuple[StatementSummary, ...] | None = None

    @property
    def statements(self) -> tuple[str, ...]:
        """The statements in :attr:`sql` (computed once); see :func:`split_statements`."""
        if self._statements is None:
            self._statements = split_statements(self.sql)
        return self._statements

    def __repr__(self) -> str:
        return f"StatementRequest({self.kind!r}, {self.sql!r})"


def split_statements(sql: str) -> tuple[str, ...]:
    """Split SQL text into statements as PostgreSQL's parser delimits them.

    Text the parser cannot split is returned whole, as one statement, so a hook that
    parses each statement sees it and can refuse it.
    """
    # Imported here: pass-through sessions never pay for the parser.
    from querywarden.analysis import AnalysisError, split_text

    try:
        return tuple(split_text(sql))
    except AnalysisError:
        return (sql,)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one request: allowed, or refused with a message an agent can act on.

    A refusal names the rule and the reason, and says what is allowed instead (``hint``),
    because the reader is often an AI agent that adapts its next query.
    """

    allowed: bool
    sqlstate: str = "42501"
    message: str = ""
    detail: str | None = None
    hint: str | None = None
    rule: str | None = None
    #: For an allowed request of a masked identity: how its results are masked.
    mask: MaskPlan | None = None
    #: For a statement an approver allowed: the review (for the audit record).
    approval: dict[str, object] | None = None
    #: For a refusal the server itself made (the gateway checked the statement on a side
    #: connection): its ErrorResponse fields by code, sent to the client as they are.
    server_error: dict[str, str] | None = None

    @classmethod
    def refuse(
        cls,
        message: str,
        *,
        sqlstate: str = "42501",
        detail: str | None = None,
        hint: str | None = None,
        rule: str | None = None,
    ) -> Decision:
        """A refusal."""
        return cls(False, sqlstate, message, detail, hint, rule)


ALLOW = Decision(True)


class StatementGate(Protocol):
    """The decision point: sees every request before it is forwarded upstream.

    Return a :class:`Decision` at once, or an awaitable of one when deciding needs I/O
    (an EXPLAIN on the upstream, a human approver); the session holds the request, and
    everything the client pipelines after it, until the awaitable resolves.
    """

    def decide(
        self, session: SessionInfo, request: StatementRequest
    ) -> Decision | Awaitable[Decision]:
        """Decide on one request."""
        ...


class ResultHook(Protocol):
    """The result hook: sees every result message on its way to the client.

    That is RowDescription, DataRow, CopyData, CommandComplete, ErrorResponse and
    NoticeResponse.

    ``frame`` is the whole message (type byte, length, payload). Return ``None`` to
    forward it untouched, or the bytes to send instead (zero, one or more messages).
    """

    def on_result(self, session: SessionInfo, mtype: int, frame: bytes) -> bytes | None:
        """Inspect one backend message."""
        ...


class AllowAll:
    """The pass-through gate: allows every request."""

    def decide(self, session: SessionInfo, request: StatementRequest) -> Decision:
        """Allow."""
        return ALLOW


#: Backend message types the result hook is shown.
RESULT_MESSAGE_TYPES = frozenset(b"TDdCEN")
