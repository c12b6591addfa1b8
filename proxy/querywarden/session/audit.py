"""The audit stage: a record of every request before it is forwarded, and of its answer.

No record, no statement: when a request's record cannot be written, the request is
refused instead of forwarded (``AUDIT_REFUSAL``). Once the server has answered, the
result record carries the rows or error, what masking did, the first rows as the client
got them (masked), and a digest of every byte the client received so far.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Final

from querywarden import codec
from querywarden.audit.recorder import AuditWriteError, PendingStatement, SessionAudit
from querywarden.hooks import Decision, StatementRequest
from querywarden.session.owed import Owed, OwedQueue
from querywarden.session.records import Portal, Statement

AUDIT_REFUSAL: Final = Decision.refuse(
    "querywarden: the statement was not run because the gateway could not write its audit "
    "record (the audit log is full or unwritable)",
    sqlstate="58030",
    hint="retry later; nothing runs unrecorded, so tell the gateway's operator if it persists",
    rule="audit",
)
_EXECUTE_ALLOWED: Final = Decision(True, rule="prepared")
_PORTAL_SUSPENDED: Final = ord("s")


class AuditStage:
    """One session's audit records, written through its :class:`SessionAudit`."""

    def __init__(self, audit: SessionAudit, encoding: str) -> None:
        self.audit = audit
        self.encoding = encoding
        #: How many rows of each result go into its record (0: none).
        self.sample_rows = audit.sample_rows
        self._finished: list[PendingStatement] = []  # answered, result not yet recorded
        self._stream_hash = hashlib.sha256()  # of every byte sent to the client
        self._stream_bytes = 0

    # Requests (before they are forwarded)

    def request(
        self, request: StatementRequest, decision: Decision, masking: dict[str, int] | None
    ) -> tuple[Decision, PendingStatement | None]:
        """Write the request record first; no record, no statement (fail closed)."""
        try:
            pending = self.audit.request(request, decision, masking=masking)
        except AuditWriteError:
            return AUDIT_REFUSAL, None
        return decision, pending

    def execute(
        self,
        portal: Portal | None,
        statement: Statement | None,
        masking: dict[str, int] | None,
        *,
        hide_values: bool,
    ) -> PendingStatement | None:
        """Write an Execute's request record; None when it cannot be written.

        ``hide_values``: the values may be masked ones (``WHERE id = $1`` is fine, but a
        value compared with or stored into a masked column is as sensitive as the column).
        """
        name, values = (portal.statement, list(portal.values)) if portal is not None else ("", [])
        request = StatementRequest(
            "execute", statement.text if statement is not None else "", statement_name=name
        )
        if hide_values:
            values = ["****" if v is not None else None for v in values]
        try:
            return self.audit.request(request, _EXECUTE_ALLOWED, masking=masking, parameters=values)
        except AuditWriteError:
            return None

    def bind_values(
        self, values: tuple[bytes | None, ...], formats: tuple[int, ...]
    ) -> list[str | None]:
        return texts(values, self.encoding, formats)

    # Answers

    def samples(self, head: Owed | None) -> bool:
        """Whether the DataRow now arriving goes into the sample (so it must be whole)."""
        pending = head.pending if head is not None else None
        return pending is not None and len(pending.sample) < self.sample_rows

    def sample(self, head: Owed | None, frame: bytes) -> None:
        """Keep the first rows of the current request, as the client gets them."""
        if frame[:1] != b"D" or not self.samples(head):
            return
        assert head is not None and head.pending is not None
        head.pending.sample.append(texts(codec.decode_data_row(frame), self.encoding))

    def completed(self, head: Owed | None, data: bytes, pos: int, end: int) -> None:
        """Add a CommandComplete's rows (or a PortalSuspended / EmptyQuery) to a record."""
        pending = head.pending if head is not None else None
        if pending is None:
            return
        kind = data[pos]
        if kind == ord("C"):
            tag = data[pos + 5 : end - 1].decode("ascii", "replace")
            pending.command = tag
            last = tag.rsplit(" ", 1)[-1]
            if last.isdigit():
                pending.rows = (pending.rows or 0) + int(last)
        elif kind == _PORTAL_SUSPENDED:
            pending.command = "PORTAL SUSPENDED"
        else:
            pending.command = pending.command or "EMPTY"

    def errored(self, owed: OwedQueue, error: bytes) -> None:
        """An ErrorResponse (``error``, as the client gets it) ends the head request.

        In the extended protocol it ends every message up to the Sync too: each of those
        is recorded as not run.
        """
        head = owed.head()
        if head is None:
            return
        if head.pending is not None:
            fields = codec.decode_fields(error)
            head.pending.sqlstate = fields.get("C")
            head.pending.error = fields.get("M")
        if not owed.extended_head():
            return
        for entry in owed.until_sync():
            pending = entry.pending
            if pending is None:
                continue
            if entry is not head:
                pending.error = "not run: an earlier message of the same pipeline failed"
            self._finished.append(pending)

    def answered(self, pending: PendingStatement) -> None:
        self._finished.append(pending)

    def sent(self, chunks: list[bytes], masking: Callable[[], dict[str, int] | None]) -> None:
        """Bytes went to the client: into the digest; then the answered results' records.

        ``masking`` gives what masking did so far (asked only when a record is written).
        """
        stream = self._stream_hash
        for chunk in chunks:
            stream.update(chunk)
            self._stream_bytes += len(chunk)
        if self._finished:
            self._record_results(masking())

    def _record_results(self, masking: dict[str, int] | None) -> None:
        digest = self._stream_hash.hexdigest()
        finished, self._finished = self._finished, []
        for pending in finished:
            self.audit.finish(
                pending,
                masking=masking,
                stream_digest=digest,
                stream_bytes=self._stream_bytes,
                masked=masking is not None,
            )

    def close(self, owed: OwedQueue, masking: dict[str, int] | None) -> None:
        """The session ended: record what was still unanswered, then the end."""
        for entry in owed:
            if entry.pending is not None:
                entry.pending.error = entry.pending.error or "the session ended before the answer"
                self._finished.append(entry.pending)
        owed.clear()
        if self._finished:
            self._record_results(masking)
        self.audit.end(masking if masking is not None else {})


def texts(
    values: tuple[bytes | None, ...], encoding: str, formats: tuple[int, ...] = ()
) -> list[str | None]:
    """Bind or DataRow values for the audit record: text, or a backslash-x hex string.

    Text values are read in the session's client encoding, as the server reads them;
    binary ones (Bind's ``formats``: none, all text; one, for all) are recorded in hex.
    """
    out: list[str | None] = []
    for i, raw in enumerate(values):
        if raw is None:
            out.append(None)
            continue
        code = formats[0] if len(formats) == 1 else formats[i] if i < len(formats) else 0
        if code != 1:
            try:
                out.append(raw.decode(encoding))
                continue
            except UnicodeDecodeError:
                pass
        out.append("\\x" + raw.hex())
    return out
