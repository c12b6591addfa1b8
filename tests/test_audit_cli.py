"""``querywarden audit verify | replay | tail`` on real log directories."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from querywarden.audit.log import AuditLog
from querywarden.audit.tools import (
    add_audit_commands,
    replay_command,
    tail_command,
    verify_command,
)

REAL_SSN = "123-45-6789"  # never written: the gateway logs what the client received


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 30, 3, tzinfo=UTC).timestamp()

    def __call__(self) -> float:
        return self.now


def request(
    session: str, n: int, text: str, outcome: str = "allow", **decision: Any
) -> dict[str, Any]:
    return {
        "session_id": session,
        "statement_id": f"{session}-{n}",
        "kind": "query",
        "text": text,
        "statement_name": None,
        "summary": {"operations": ["select"], "reads": ["public.customers"]},
        "decision": {"outcome": outcome, "rule": None, "reason": None, "sqlstate": None} | decision,
        "approval": None,
    }


def result(session: str, n: int, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "session_id": session,
        "statement_id": f"{session}-{n}",
        "duration_ms": 1.5,
        "rows": None,
        "command": None,
        "sqlstate": None,
        "error": None,
        "masking": {},
        "response": {"bytes": 120, "digest": "ab" * 32},
        "sample": [],
    }
    return base | fields


def write_sessions(directory: Path) -> None:
    """Session s-1 (a masked read, a refused write) interleaved with session s-2."""
    clock = Clock()
    with AuditLog(directory, clock=clock, max_segment_bytes=1500) as log:

        def add(type_: str, **fields: Any) -> None:
            clock.now += 0.25  # each record a quarter second after the previous one
            log.append(type_, **fields)

        add(
            "session.connect",
            session_id="s-1",
            principal={
                "subject": "alice",
                "issuer": "https://idp.example.com",
                "groups": ["analysts", "eng"],
            },
            client_address="10.0.0.5:53422",
            database="app",
            upstream_user="app_ro",
            application_name="psql",
            tls={"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"},
        )
        add(
            "session.auth_failed",
            client_address="10.0.0.9:40000",
            user="mallory",
            database="app",
            reason="token expired",
            sqlstate="28000",
        )
        add(
            "session.connect",
            session_id="s-2",
            principal={"subject": "bob", "issuer": "https://idp.example.com", "groups": []},
            client_address="10.0.0.6:1000",
            database="app",
            upstream_user="app_ro",
            application_name=None,
            tls=None,
        )
        add(
            "statement.request",
            **request(
                "s-1",
                1,
                "SELECT name, ssn\nFROM customers\nLIMIT 2",
                rule="analysts-read",
            ),
        )
        add("statement.request", **request("s-2", 1, "SELECT secret_of_bob"))
        add(
            "statement.result",
            **result(
                "s-1",
                1,
                rows=2,
                command="SELECT 2",
                masking={"ssn": 2},
                sample=[["Alice", "***-**-6789"], ["Bob", None]],
            ),
        )
        add(
            "statement.request",
            **request(
                "s-1",
                2,
                "DELETE FROM customers",
                outcome="refuse",
                rule="no-writes",
                reason="writes are not allowed",
                sqlstate="42501",
            ),
        )
        add(
            "statement.result",
            **result(
                "s-1", 2, sqlstate="42501", error="querywarden: writes are not allowed", rows=None
            ),
        )
        add(
            "session.end",
            session_id="s-1",
            duration_ms=2250,
            statements=2,
            refused=1,
            masking={"ssn": 2},
        )


@pytest.fixture
def audit_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "audit"
    write_sessions(directory)
    return directory


def test_verify_command_ok_and_broken(audit_dir: Path) -> None:
    out = io.StringIO()
    assert verify_command(audit_dir, out) == 0
    assert out.getvalue() == (f"ok: 9 records, seq 1..9, chain and HEAD intact ({audit_dir})\n")
    first = sorted(audit_dir.glob("audit-*.jsonl"))[0]
    first.write_bytes(first.read_bytes().replace(b"alice", b"alicf"))
    out = io.StringIO()
    assert verify_command(audit_dir, out) == 1
    assert out.getvalue().splitlines() == [
        f"FAILED: {first.name} line 2 (seq 2): prev does not match the hash of seq 1 "
        f"({first.name} line 1): seq 1 was altered",
        "  checked before the problem: 1 records, seq 1..1",
    ]


def test_verify_says_when_there_is_nothing_to_verify(tmp_path: Path) -> None:
    # Run as a user runs it: a wrong path must not read as a verified log.
    opened = tmp_path / "opened"
    with AuditLog(opened):
        pass  # the gateway opened its log, nobody connected yet
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    cases = {
        tmp_path / "missing": f"no audit log: {tmp_path / 'missing'} does not exist",
        tmp_path / "file": f"no audit log: {tmp_path / 'file'} is not a directory",
        tmp_path / "empty": f"no audit records in {tmp_path / 'empty'}: nothing to verify",
        opened: f"no audit records in {opened}: nothing to verify",
    }
    for directory, expected in cases.items():
        result = subprocess.run(
            [sys.executable, "-m", "querywarden", "audit", "verify", str(directory)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, (directory, result.stdout, result.stderr)
        assert result.stdout.startswith(expected), result.stdout
        assert "ok" not in result.stdout.split()


def test_replay_shows_the_session_as_the_client_saw_it(audit_dir: Path) -> None:
    out = io.StringIO()
    assert replay_command(audit_dir, "s-1", out) == 0
    text = out.getvalue()
    assert text == (
        "session s-1  connected 2026-11-30T03:00:00.250000Z\n"
        "  identity: alice (issuer https://idp.example.com; groups analysts, eng)\n"
        "  from 10.0.0.5:53422 to database app as app_ro, application psql, "
        "TLS TLSv1.3 TLS_AES_256_GCM_SHA384\n"
        "\n"
        "#1  2026-11-30T03:00:01.000000Z  query\n"
        "    SELECT name, ssn\n"
        "    FROM customers\n"
        "    LIMIT 2\n"
        "  decision: allow (rule analysts-read)\n"
        "  result 2026-11-30T03:00:01.500000Z: SELECT 2, 2 rows, 1.5 ms, "
        "120 bytes sent (sha256 abababababababab…)\n"
        "  masked: ssn x2\n"
        "  rows as sent (2 sampled):\n"
        "    | Alice | ***-**-6789 |\n"
        "    | Bob   | NULL        |\n"
        "\n"
        "#2  2026-11-30T03:00:01.750000Z  query\n"
        "    DELETE FROM customers\n"
        "  decision: REFUSED by rule no-writes: writes are not allowed [42501]\n"
        "  result 2026-11-30T03:00:02.000000Z: error 42501: querywarden: writes are not "
        "allowed, 1.5 ms, 120 bytes sent (sha256 abababababababab…)\n"
        "\n"
        "end 2026-11-30T03:00:02.250000Z: 2250 ms, 2 statements, 1 refused, masked ssn x2\n"
    )
    assert "secret_of_bob" not in text  # the other session stays out
    assert REAL_SSN not in text


def test_replay_of_an_unknown_session(audit_dir: Path) -> None:
    out = io.StringIO()
    assert replay_command(audit_dir, "s-404", out) == 1
    assert out.getvalue() == f"no session s-404 in {audit_dir}\n"


def test_tail_prints_one_line_per_record(audit_dir: Path) -> None:
    out = io.StringIO()
    assert tail_command(audit_dir, out, follow=False, after_seq=0) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 9
    assert lines[0] == (
        "       1 2026-11-30T03:00:00.250000Z session.connect    s-1 alice "
        "(https://idp.example.com) from 10.0.0.5:53422 db=app as=app_ro"
    )
    assert lines[1].endswith(
        "session.auth_failed 10.0.0.9:40000 user=mallory db=app 28000 token expired"
    )
    assert lines[3].endswith(
        "statement.request  s-1-1 allow rule=analysts-read "
        '"SELECT name, ssn FROM customers LIMIT 2"'
    )
    assert lines[5].endswith("statement.result   s-1-1 SELECT 2 rows=2 1.5 ms masked=2")
    assert lines[7].endswith("statement.result   s-1-2 error 42501 rows=- 1.5 ms masked=0")
    out = io.StringIO()
    assert tail_command(audit_dir, out, follow=False, after_seq=7) == 0
    assert [line.split()[0] for line in out.getvalue().splitlines()] == ["8", "9"]


def test_tail_follow_prints_records_as_they_come(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    out = io.StringIO()
    with AuditLog(directory, max_segment_bytes=600) as log:
        log.append("custom.event", note="before")

        def writer() -> None:
            for n in range(20):
                log.append("custom.event", n=n)
                time.sleep(0.005)

        thread = threading.Thread(target=writer)
        thread.start()
        deadline = time.monotonic() + 10
        rc = tail_command(
            directory,
            out,
            follow=True,
            after_seq=0,
            stop=lambda: out.getvalue().count("\n") >= 21 or time.monotonic() > deadline,
        )
        thread.join()
    assert rc == 0
    lines = out.getvalue().splitlines()
    assert [int(line.split()[0]) for line in lines] == list(range(1, 22))
    assert lines[0].endswith('custom.event       {"note":"before"}')
    assert lines[-1].endswith('custom.event       {"n":19}')


def test_tail_of_a_missing_directory(tmp_path: Path) -> None:
    out = io.StringIO()
    assert tail_command(tmp_path / "nope", out, follow=False, after_seq=0) == 1


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="querywarden")
    commands = parser.add_subparsers(dest="command", required=True)
    add_audit_commands(commands)
    return parser.parse_args(argv)


def test_commands_dispatch_through_argparse(
    audit_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse(["audit", "verify", str(audit_dir)])
    assert args.handler(args) == 0
    assert capsys.readouterr().out.startswith("ok: 9 records")

    args = parse(["audit", "replay", str(audit_dir), "s-2"])
    assert args.handler(args) == 0
    assert "SELECT secret_of_bob" in capsys.readouterr().out

    args = parse(["audit", "replay", str(audit_dir), "s-9"])
    assert args.handler(args) == 1
    capsys.readouterr()

    args = parse(["audit", "tail", str(audit_dir), "--after-seq", "8"])
    assert (args.follow, args.after_seq) == (False, 8)
    assert args.handler(args) == 0
    assert capsys.readouterr().out.split()[0] == "9"

    args = parse(["audit", "tail", str(audit_dir), "--follow"])
    assert args.follow is True

    with pytest.raises(SystemExit):
        parse(["audit"])


def test_records_are_json_lines(audit_dir: Path) -> None:
    # What the docs show: one JSON object per line, seq/ts/type/prev first.
    first = sorted(audit_dir.glob("audit-*.jsonl"))[0]
    record = json.loads(first.read_bytes().split(b"\n")[0])
    assert list(record)[:5] == ["seq", "ts", "type", "prev", "session_id"]
