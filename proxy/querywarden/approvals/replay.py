"""Sessions as the approvals console shows them, from audit records (pure: no I/O).

The console lists recent sessions and replays one: who connected, each statement with its
decision (and approval), and its answer (rows, command, error, timing, what masking did).
Nothing here is a value the console could leak:

* a statement is shown as its shape, every constant a ``$n`` (a literal may be personal
  data; the exact text stays in the audit log, for ``querywarden audit replay``);
* sample rows and error messages are shown only from sessions whose results were masked
  (the result record says so): they are then exactly what the masked client received,
  scrubbed. An exempt identity's samples and errors can hold real values: the console
  shows their row counts and SQLSTATEs only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from querywarden.analysis import sanitized_text

__all__ = ["recent_sessions", "replay"]


def recent_sessions(records: Iterable[dict[str, Any]], *, limit: int) -> list[dict[str, Any]]:
    """The last ``limit`` sessions that connected, newest first, with their counts."""
    sessions: dict[str, dict[str, Any]] = {}
    for record in records:
        kind = record.get("type")
        session_id = record.get("session_id")
        if not isinstance(session_id, str):
            continue
        if kind == "session.connect":
            principal = record.get("principal") or {}
            sessions[session_id] = {
                "id": session_id,
                "connected": record.get("ts"),
                "subject": principal.get("subject"),
                "database": record.get("database"),
                "application": record.get("application_name"),
                "statements": 0,
                "refused": 0,
                "ended": None,
            }
            continue
        session = sessions.get(session_id)
        if session is None:
            continue
        if kind == "statement.request":
            session["statements"] += 1
            if (record.get("decision") or {}).get("outcome") == "refuse":
                session["refused"] += 1
        elif kind == "session.end":
            session["ended"] = record.get("ts")
    return list(reversed(list(sessions.values())))[:limit]


def replay(records: Iterable[dict[str, Any]], session_id: str) -> dict[str, Any] | None:
    """One session's statements and answers, in order (None: not in the log)."""
    connect: dict[str, Any] | None = None
    statements: dict[str, dict[str, Any]] = {}
    ended: dict[str, Any] | None = None
    found = False
    for record in records:
        if record.get("session_id") != session_id:
            continue
        found = True
        kind = record.get("type")
        if kind == "session.connect":
            principal = record.get("principal") or {}
            connect = {
                "connected": record.get("ts"),
                "subject": principal.get("subject"),
                "issuer": principal.get("issuer"),
                "groups": principal.get("groups") or [],
                "database": record.get("database"),
                "application": record.get("application_name"),
                "clientAddress": record.get("client_address"),
            }
        elif kind == "statement.request":
            decision = record.get("decision") or {}
            approval = record.get("approval") or None
            statements[str(record.get("statement_id"))] = {
                "id": record.get("statement_id"),
                "at": record.get("ts"),
                "kind": record.get("kind"),
                "text": _shape(record.get("text")),
                "outcome": decision.get("outcome"),
                "rule": decision.get("rule"),
                "reason": decision.get("reason"),
                "sqlstate": decision.get("sqlstate"),
                "approval": approval,
                "result": None,
            }
        elif kind == "statement.result":
            statement = statements.get(str(record.get("statement_id")))
            if statement is not None:
                statement["result"] = _result(record)
        elif kind == "session.end":
            ended = {
                "ended": record.get("ts"),
                "durationMs": record.get("duration_ms"),
                "masking": record.get("masking") or {},
            }
    if not found:
        return None
    return {
        "id": session_id,
        "session": connect,
        "statements": list(statements.values()),
        "end": ended,
    }


def _result(record: dict[str, Any]) -> dict[str, Any]:
    masked = record.get("masked") is True
    return {
        "durationMs": record.get("duration_ms"),
        "rows": record.get("rows"),
        "command": record.get("command"),
        "sqlstate": record.get("sqlstate"),
        "error": record.get("error") if masked else None,
        "masking": record.get("masking") or {},
        "masked": masked,
        # Samples of an unmasked session are real values: never shown here.
        "sample": (record.get("sample") or []) if masked else None,
    }


def _shape(text: object) -> str:
    if not isinstance(text, str) or not text:
        return ""
    shape = sanitized_text(text)
    return shape if shape is not None else "(not shown: the statement does not parse)"
