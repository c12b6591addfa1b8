"""What the server still owes the client: one entry per forwarded request, oldest first.

PostgreSQL answers every message in order. The relay notes each message it forwards
(a Parse, a Bind, an Execute, a Sync...) as an :class:`Owed` entry; each answer pops the
entry it belongs to, which is how a DataRow is matched with the statement that produced
it, an ErrorResponse with the pipeline it ends, and a refusal with its sentinel.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from querywarden.audit.recorder import PendingStatement
    from querywarden.masking.plan import MaskPlan

# One-byte message types as ints (frame[0] is an int).
Q, P, B, D, E, C, S, H, F, X = (ord(c) for c in "QPBDECSHFX")

#: The name a sentinel Parse's entry carries: no statement comes of it.
REFUSED: Final = "\0refused"


class Owed:
    """One forwarded message the server has yet to answer (fully).

    ``name`` is the statement (Parse, Describe S, Close S) or portal (Bind, Execute,
    Describe P, Close P) it names; ``extra`` the Parse's SQL, the Bind's statement, or a
    Describe's / Close's target kind (``"internal"``: a Describe the gateway added, whose
    answer the client never sees). ``pending`` is the request's audit record and ``plan``
    a simple Query's mask plan.
    """

    __slots__ = ("extra", "kind", "name", "pending", "plan")

    def __init__(
        self,
        kind: int,
        name: str = "",
        extra: str = "",
        pending: PendingStatement | None = None,
        plan: MaskPlan | None = None,
    ) -> None:
        self.kind = kind
        self.name = name
        self.extra = extra
        self.pending = pending
        self.plan = plan

    def __repr__(self) -> str:
        return f"Owed({chr(self.kind)}, {self.name!r}, {self.extra!r})"


class OwedQueue(deque[Owed]):
    """The entries in the order the server answers them."""

    def head(self) -> Owed | None:
        return self[0] if self else None

    def pop_if(self, kind: int) -> Owed | None:
        """The head, popped, when it is of ``kind`` (an answer with no request: None)."""
        if self and self[0].kind == kind:
            return self.popleft()
        return None

    def in_flight(self, kind: int, name: str) -> bool:
        """Whether a message of ``kind`` for ``name`` still waits for its answer."""
        return any(e.kind == kind and e.name == name for e in self)

    def extended_head(self) -> bool:
        """Whether the server is answering an extended-protocol message (not Q or F)."""
        return bool(self) and self[0].kind not in (Q, F)

    def until_sync(self) -> list[Owed]:
        """The entries an extended-protocol error ends: those before the next Sync."""
        found = []
        for entry in self:
            if entry.kind == S:
                break
            found.append(entry)
        return found

    def discard_until_sync(self) -> None:
        """After an ErrorResponse the server skips everything up to the Sync."""
        while self and self[0].kind != S:
            self.popleft()
