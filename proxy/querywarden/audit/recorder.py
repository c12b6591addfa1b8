"""What the gateway writes to the audit log, per session and per statement.

The :class:`Auditor` belongs to the gateway and owns the :class:`AuditLog`; each session
gets a :class:`SessionAudit`, which the session calls at the two moments that matter:

* :meth:`SessionAudit.request`, *before* a request is forwarded upstream (write-ahead):
  the exact statement, what the analyzer saw and the decision. If the record cannot be
  written, :class:`AuditWriteError` propagates and the session refuses the request
  instead of forwarding it (unless the settings say ``failOpen``).
* :meth:`SessionAudit.finish`, when the server has answered it: rows, command tag or
  error, what masking did, a digest of the bytes the client received and the first rows
  as the client saw them (masked).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from querywarden.analysis import StatementSummary
from querywarden.approvals.model import ReviewSummary, SummaryParts
from querywarden.audit.log import AuditLog, AuditWriteError
from querywarden.hooks import Decision, SessionInfo, StatementRequest

log = logging.getLogger(__name__)

__all__ = ["AuditWriteError", "Auditor", "PendingStatement", "SessionAudit", "pool_name"]

#: The search path the gateway pins at start-up (server.py).
_PINNED_SEARCH_PATH = ["public"]


class Metrics(Protocol):
    """What the recorder reports live (querywarden.audit.metrics.GatewayMetrics)."""

    def decision(self, outcome: str, rule: str | None) -> None: ...
    def masked(self, count: int) -> None: ...
    def auth_refused(self, reason_kind: str) -> None: ...
    def operation_duration(
        self, seconds: float, key: tuple[str, str, int | None, str, str | None]
    ) -> None: ...
    def connection_opened(self, pool: str) -> None: ...
    def connection_closed(self, pool: str) -> None: ...


@dataclass(slots=True)
class PendingStatement:
    """A request written to the log whose answer has not been recorded yet."""

    statement_id: str
    started: float
    outcome: str = "allow"
    rows: int | None = None
    command: str | None = None
    sqlstate: str | None = None
    error: str | None = None
    sample: list[list[str | None]] = field(default_factory=list)
    masking_before: dict[str, int] = field(default_factory=dict)


class Auditor:
    """The gateway's audit writer: one log, shared by every session."""

    def __init__(
        self,
        directory: Path,
        *,
        fsync: str = "batch",
        fsync_interval: float = 0.05,
        max_segment_bytes: int = 64 * 1024 * 1024,
        max_segment_age: float = 3600.0,
        retention: float = 30 * 86400.0,
        sample_rows: int = 5,
        fail_open: bool = False,
        redact_parameters: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        self.directory = directory
        self.metrics = metrics
        self.log = AuditLog(
            directory,
            fsync=fsync,  # type: ignore[arg-type]
            fsync_interval=fsync_interval,
            max_segment_bytes=max_segment_bytes,
            max_segment_age=max_segment_age,
            retention=retention,
        )
        self.sample_rows = sample_rows
        self.fail_open = fail_open
        self.redact_parameters = redact_parameters

    def write(self, type_: str, **fields: Any) -> None:
        """Append one record; raises AuditWriteError unless the settings fail open."""
        try:
            self.log.append_record(type_, fields)
        except AuditWriteError:
            if not self.fail_open:
                raise
            log.error("audit record %s could not be written (failOpen: going on)", type_)

    def write_deferred(self, type_: str, **fields: Any) -> None:
        """Append a record that nothing waits on.

        It goes out with the next record written (or at the log's next sync, within
        ``fsyncInterval``): one ``write`` for both.
        """
        self.log.append_record(type_, fields, defer=True)

    def auth_failed(
        self, *, client_address: str, user: str, database: str, reason: str, sqlstate: str
    ) -> None:
        """A refused connection (never the token itself)."""
        if self.metrics is not None:
            self.metrics.auth_refused(sqlstate)
        self.write(
            "session.auth_failed",
            client_address=client_address,
            user=user,
            database=database,
            reason=reason,
            sqlstate=sqlstate,
        )

    def session(
        self,
        info: SessionInfo,
        *,
        upstream_user: str,
        tls: dict[str, str] | None,
        server_address: str = "",
    ) -> SessionAudit:
        """Record a connection and return its recorder (raises AuditWriteError).

        ``server_address`` is the upstream database's ``host:port`` (or socket path).
        """
        principal = info.principal
        self.write(
            "session.connect",
            session_id=info.session_id,
            principal={
                "subject": principal.subject,
                "issuer": principal.issuer,
                "groups": sorted(principal.groups),
                "name": principal.display_name,
            },
            client_address=info.client_address,
            database=info.database,
            upstream_user=upstream_user,
            application_name=info.application_name,
            tls=tls,
            server_address=server_address,
        )
        return SessionAudit(
            self,
            info.session_id,
            info.search_path,
            database=info.database,
            server_address=server_address,
        )

    def close(self) -> None:
        """Flush and close the log (and the metrics exporter)."""
        self.log.close()
        if self.metrics is not None:
            shutdown = getattr(self.metrics, "shutdown", None)
            if shutdown is not None:
                shutdown()


class SessionAudit:
    """One session's records (see the module docstring)."""

    def __init__(
        self,
        auditor: Auditor,
        session_id: str,
        search_path: list[str] | None = None,
        *,
        database: str = "",
        server_address: str = "",
    ) -> None:
        self._auditor = auditor
        self.session_id = session_id
        # What every duration of this session is labelled with, and its connection's pool.
        host, _, port = server_address.rpartition(":")
        if not port.isdigit():
            host, port = server_address, ""
        self._database = database
        self._host = host
        self._port = int(port) if port else None
        self.pool = pool_name(database, host, self._port)
        self._connected = False
        # The session's own list, which the gate widens in place when a SET may change it.
        self._search_path = search_path if search_path is not None else ["public"]
        self.sample_rows = auditor.sample_rows
        self._count = 0
        self._refused = 0
        self._opened = time.monotonic()

    def request(
        self,
        request: StatementRequest,
        decision: Decision,
        *,
        text: str | None = None,
        masking: dict[str, int] | None = None,
        parameters: list[str | None] | None = None,
    ) -> PendingStatement:
        """Write a request record before the request is forwarded (or refused)."""
        self._count += 1
        statement_id = f"{self.session_id}-{self._count}"
        if not decision.allowed:
            self._refused += 1
        summaries: Sequence[StatementSummary] = request.summaries or ()
        self._auditor.write(
            "statement.request",
            session_id=self.session_id,
            statement_id=statement_id,
            kind=request.kind,
            text=request.sql if text is None else text,
            statement_name=request.statement_name,
            summary=_summary(summaries) if summaries else None,
            decision={
                "outcome": "allow" if decision.allowed else "refuse",
                "rule": decision.rule,
                "reason": None if decision.allowed else decision.message,
                "sqlstate": None if decision.allowed else decision.sqlstate,
            },
            approval=decision.approval,
            parameters=(
                None
                if parameters is None
                else (["****"] * len(parameters) if self._auditor.redact_parameters else parameters)
            ),
            # Only when it is not the pinned one: how the export qualifies relation names.
            **(
                {}
                if self._search_path == _PINNED_SEARCH_PATH
                else {"search_path": list(self._search_path)}
            ),
        )
        outcome = "allow" if decision.allowed else "refuse"
        metrics = self._auditor.metrics
        if metrics is not None:
            metrics.decision(outcome, decision.rule)
        return PendingStatement(
            statement_id, time.monotonic(), outcome=outcome, masking_before=masking or {}
        )

    def finish(
        self,
        pending: PendingStatement,
        *,
        masking: dict[str, int] | None,
        stream_digest: str,
        stream_bytes: int,
        masked: bool = False,
    ) -> None:
        """Write the result record of a request the server has answered.

        ``masked`` says whether the session's results were masked: the sample rows are
        then what a masked client saw, which the approvals console may show.
        """
        before = pending.masking_before
        delta = {k: v - before.get(k, 0) for k, v in (masking or {}).items()}
        elapsed = time.monotonic() - pending.started
        duration_ms = round(elapsed * 1000, 3)
        metrics = self._auditor.metrics
        if metrics is not None:
            metrics.operation_duration(
                elapsed,
                (self._database, self._host, self._port, pending.outcome, pending.sqlstate),
            )
            values = sum(delta.values())
            if values:
                metrics.masked(values)
        try:
            # Not write-ahead (the client has the result already): it rides with the
            # next request record, which saves a write per statement.
            self._auditor.write_deferred(
                "statement.result",
                session_id=self.session_id,
                statement_id=pending.statement_id,
                duration_ms=duration_ms,
                rows=pending.rows,
                command=pending.command,
                sqlstate=pending.sqlstate,
                error=pending.error,
                masking={k: v for k, v in delta.items() if v},
                response={"stream_bytes": stream_bytes, "stream_digest": stream_digest},
                sample=pending.sample,
                masked=masked,
            )
        except AuditWriteError:
            # The statement has run: there is nothing left to refuse. The next request's
            # record will fail the same way, and that request is refused.
            log.error("audit: the result of %s could not be recorded", pending.statement_id)

    def upstream_connected(self) -> None:
        """The session now holds its upstream connection (counted until :meth:`end`)."""
        metrics = self._auditor.metrics
        if metrics is not None and not self._connected:
            self._connected = True
            metrics.connection_opened(self.pool)

    def end(self, masking: dict[str, int]) -> None:
        """Write the session's end record (best effort: the client is gone)."""
        metrics = self._auditor.metrics
        if metrics is not None and self._connected:
            self._connected = False
            metrics.connection_closed(self.pool)
        try:
            self._auditor.write(
                "session.end",
                session_id=self.session_id,
                duration_ms=round((time.monotonic() - self._opened) * 1000, 3),
                statements=self._count,
                refused=self._refused,
                masking=masking,
            )
        except AuditWriteError:
            log.error("audit: the end of session %s could not be recorded", self.session_id)


def pool_name(database: str, host: str, port: int | None) -> str:
    """``db.client.connection.pool.name`` of a session's upstream connection.

    The gateway has no pool (a session holds its connection), so, as the conventions
    advise then: ``server.address:server.port/db.namespace``.
    """
    where = f"{host}:{port}" if port is not None else host
    return f"{where}/{database}"


def _summary(summaries: Sequence[StatementSummary]) -> dict[str, list[str]]:
    # Keyed by what the summary is made of, not by the summaries themselves: they carry
    # their statement's text, which differs with every constant.
    return _merged(tuple((s.operations, s.reads, s.writes, s.functions) for s in summaries))


@functools.lru_cache(maxsize=1024)
def _merged(parts: tuple[SummaryParts, ...]) -> dict[str, list[str]]:
    """The request record's ``summary``, once per statement shape.

    Clients repeat their statements with other constants, and merging builds a pydantic
    model: about 8 µs a request record, saved. The dict is only ever encoded, never
    changed.
    """
    merged = ReviewSummary.merge(parts)
    return {
        "operations": list(merged.operations),
        "reads": list(merged.reads),
        "writes": list(merged.writes),
        "functions": list(merged.functions),
    }
