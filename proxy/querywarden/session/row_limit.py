"""The row limit stage: counts the rows of each result and cuts one that runs over.

A rule's ``maxRows`` is enforced on the wire: past the limit the rest of the result is
withheld, the relay asks the shell to cancel the statement upstream, and the client gets
an ErrorResponse instead of the result's end. PostgreSQL then fails the statement and
rolls back what it did, exactly as that error implies. Other stages cut a result the same
way when they cannot let the rest of it through (masking: a binary COPY row it cannot
mask, a statement refused under a newer catalog).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from querywarden import codec
from querywarden.session.owed import E, OwedQueue
from querywarden.session.records import Records

_QUERY_CANCELED: Final = b"C57014\0"
_PORTAL_SUSPENDED: Final = ord("s")


@dataclass(frozen=True, slots=True)
class RowLimit:
    """The most rows one result may carry to the client, and the rule that says so."""

    rows: int
    rule: str

    def error(self, *, completed: bool) -> bytes:
        """The ErrorResponse a client gets instead of the end of an oversized result."""
        if completed:
            detail = (
                f"the first {self.rows} rows were withheld with the rest: the statement "
                "finished on the server before the gateway could cancel it, so its effects, "
                "if any, stand"
            )
        else:
            detail = (
                "the statement was cancelled on the server, so it had no effect; "
                "no rows of its result were delivered"
            )
        return codec.error_response(
            "54000",
            f"querywarden: the result has more than {self.rows} rows, the limit of rule "
            f"{self.rule} (maxRows)",
            detail=detail,
            hint=(
                f"ask for at most {self.rows} rows: add LIMIT {self.rows}, a narrower WHERE, "
                "or aggregate (count(*), GROUP BY) instead of reading every row"
            ),
        )


class RowLimitStage:
    """Counts rows against the limit; withholds the rest of a result that is cut."""

    def __init__(self, limit: RowLimit | None) -> None:
        self.limit = limit
        #: The current result passed the limit (or was cut otherwise): drop the rest.
        self.cut = False
        #: A cancel was sent for the request now running.
        self.cancelled = False
        self._rows = 0  # rows of the current result so far
        self._error: Callable[[bool], bytes] = _no_cut_error  # what replaces its end

    @property
    def active(self) -> bool:
        """Whether rows must be looked at one by one (a limit, or a result being cut)."""
        return self.limit is not None or self.cut or self.cancelled

    def result_started(self) -> None:
        self._rows = 0

    def count_row(self, owed: OwedQueue, records: Records) -> bool:
        """Count a row of the current result; False when it must be dropped."""
        if self.cut:
            return False
        limit = self.limit
        if limit is None:
            return True
        rows = self._rows
        if rows == 0:
            head = owed.head()
            if head is not None and head.kind == E:
                portal = records.portals.get(head.name)
                if portal is not None and portal.suspended_rows:
                    # The portal goes on from where its last Execute suspended it.
                    rows, portal.suspended_rows = portal.suspended_rows, 0
        rows += 1
        self._rows = rows
        if rows <= limit.rows:
            return True
        self.cut_result(lambda completed: limit.error(completed=completed))
        return False

    def cut_result(self, error: Callable[[bool], bytes]) -> None:
        """Withhold the rest of the current result; it ends with ``error`` instead.

        ``error(completed)`` builds the ErrorResponse: ``completed`` says whether the
        statement finished on the server (else the gateway's cancel stopped it).
        """
        self.cut = True
        self._error = error

    def execute_done(self, tag: int, portal: str | None, records: Records) -> bytes | None:
        """A CommandComplete, PortalSuspended or EmptyQueryResponse: the error, if cut."""
        if self.limit is not None:
            rows, self._rows = self._rows, 0
            if tag == _PORTAL_SUSPENDED and portal is not None:
                record = records.portals.get(portal)
                if record is not None:
                    record.suspended_rows = rows
        if not self.cut:
            return None
        self.cut = False
        return self._error(True)

    def error_arrived(self, frame: bytes) -> bytes | None:
        """An ErrorResponse ends the result; our own cancel's error becomes the cut's."""
        if not (self.cut or self.cancelled):
            return None
        self.cut = False
        self._rows = 0
        if self.cancelled and _QUERY_CANCELED in frame:
            # Our own cancel (or the statement timeout, past the cut all the same).
            return self._error(False)
        return None

    def ready(self) -> None:
        """ReadyForQuery: the request is over."""
        self._rows = 0
        self.cut = self.cancelled = False


def _no_cut_error(completed: bool) -> bytes:
    raise AssertionError("a result was cut without an error to end it")
