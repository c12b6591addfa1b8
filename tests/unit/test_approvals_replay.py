"""What the console's session views make of audit records, and what they never show."""

from __future__ import annotations

from typing import Any

from querywarden.approvals.replay import recent_sessions, replay


def records(*, masked: bool) -> list[dict[str, Any]]:
    return [
        {
            "type": "session.connect",
            "ts": "t0",
            "session_id": "s1",
            "principal": {"subject": "agent-7", "issuer": "dev", "groups": ["ai"]},
            "database": "app",
            "client_address": "127.0.0.1",
        },
        {
            "type": "statement.request",
            "ts": "t1",
            "session_id": "s1",
            "statement_id": "s1-1",
            "kind": "query",
            "text": "SELECT ssn FROM people WHERE name = 'Ada Lovelace'",
            "decision": {"outcome": "allow", "rule": "r", "reason": None},
        },
        {
            "type": "statement.result",
            "ts": "t2",
            "session_id": "s1",
            "statement_id": "s1-1",
            "rows": 1,
            "command": "SELECT 1",
            "sqlstate": "22P02",
            "error": 'invalid input syntax: "219-09-9999"',
            "sample": [["219-09-9999"]],
            "masked": masked,
        },
        {"type": "session.connect", "ts": "t3", "session_id": "s2", "principal": {}},
        {
            "type": "statement.request",
            "session_id": "s2",
            "statement_id": "s2-1",
            "decision": {"outcome": "refuse"},
        },
        {"type": "session.end", "ts": "t4", "session_id": "s1", "duration_ms": 5.0},
    ]


def test_an_unmasked_session_shows_no_sample_no_error_text_and_no_constants() -> None:
    view = replay(records(masked=False), "s1")
    assert view is not None
    (statement,) = view["statements"]
    assert statement["text"] == "SELECT ssn FROM people WHERE name = $1"
    assert statement["result"]["sample"] is None
    assert statement["result"]["error"] is None and statement["result"]["sqlstate"] == "22P02"
    assert "219-09-9999" not in repr(view) and "Ada" not in repr(view)


def test_a_masked_session_shows_what_its_client_received() -> None:
    view = replay(records(masked=True), "s1")
    assert view is not None
    result = view["statements"][0]["result"]
    assert result["sample"] == [["219-09-9999"]] and result["error"] is not None
    assert view["session"]["subject"] == "agent-7" and view["end"]["durationMs"] == 5.0


def test_sessions_are_listed_newest_first_with_their_counts() -> None:
    listed = recent_sessions(records(masked=True), limit=10)
    assert [s["id"] for s in listed] == ["s2", "s1"]
    assert listed[0]["refused"] == 1 and listed[1]["statements"] == 1
    assert listed[1]["ended"] == "t4" and listed[0]["ended"] is None
    assert recent_sessions(records(masked=True), limit=1)[0]["id"] == "s2"
    assert replay(records(masked=True), "nope") is None
