"""The approvals hold: a request kept on the wire until its decision comes.

When the gate cannot decide at once (a rule says a human must approve the statement), it
returns an awaitable instead of a decision. The relay parks the request here, holds the
client's later input behind it, and the shell awaits :attr:`Hold.awaiting`, then hands
the decision back (``Session.resume``). Nothing else of the session waits: the server's
answers to earlier requests still flow to the client.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass

from querywarden import codec
from querywarden.hooks import Decision, StatementRequest


@dataclass(slots=True)
class HeldRequest:
    """A request waiting for its decision, as it will be forwarded if allowed."""

    mtype: int
    #: The message, or its chunks when it was large (they leave as they came).
    frame: bytes | list[bytes]
    request: StatementRequest
    parse: codec.Parse | None


class Hold:
    """At most one request held at a time (input behind it waits in the relay)."""

    def __init__(self) -> None:
        #: The decision the shell must await, then pass to ``Session.resume``.
        self.awaiting: Awaitable[Decision] | None = None
        self._held: HeldRequest | None = None

    def start(self, held: HeldRequest, outcome: Awaitable[Decision]) -> None:
        self._held = held
        self.awaiting = outcome

    def release(self) -> HeldRequest:
        """The held request, once its decision is in (the hold is over)."""
        held = self._held
        if held is None:
            raise RuntimeError("resume() without a held request")
        self._held = None
        self.awaiting = None
        return held
