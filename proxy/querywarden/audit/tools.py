"""``querywarden audit verify | replay | tail``: the command implementations.

Each command is a plain function that prints to the stream it is given and returns the exit
code, so tests call it directly; :func:`add_audit_commands` wires them into an argparse tree.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from querywarden.audit.log import AuditFormatError, read_records, verify

# Imported under another name: tail_command's ``follow`` flag would shadow it.
from querywarden.audit.log import follow as _follow_records

__all__ = ["add_audit_commands", "replay_command", "tail_command", "verify_command"]

_TEXT_WIDTH = 100  # statement text in a tail line
_CELL_WIDTH = 40  # a sampled value in a replay table


#: ``audit verify`` exit codes: intact, broken, nothing there to verify.
VERIFY_OK, VERIFY_BROKEN, VERIFY_NOTHING = 0, 1, 2


def verify_command(directory: Path, out: TextIO) -> int:
    """Check the chain and HEAD of the log in ``directory``.

    Exit code 0 when intact, 1 when broken, 2 when there is no log to check: a missing
    directory or one without records is most likely the wrong path, and "ok" would let a
    script believe a log was verified that was never there.
    """
    directory = Path(directory)
    if not directory.exists():
        print(f"no audit log: {directory} does not exist", file=out)
        return VERIFY_NOTHING
    if not directory.is_dir():
        print(f"no audit log: {directory} is not a directory", file=out)
        return VERIFY_NOTHING
    report = verify(directory)
    if report.ok and report.records == 0:
        print(
            f"no audit records in {directory}: nothing to verify "
            "(is it the gateway's audit.directory, and has anyone connected yet?)",
            file=out,
        )
        return VERIFY_NOTHING
    span = (
        f"seq {report.first_seq}..{report.last_seq}" if report.first_seq is not None else "no seq"
    )
    if report.ok:
        print(
            f"ok: {report.records} records, {span}, chain and HEAD intact ({directory})", file=out
        )
        return VERIFY_OK
    print(f"FAILED: {report.problem}", file=out)
    print(f"  checked before the problem: {report.records} records, {span}", file=out)
    return VERIFY_BROKEN


# --- replay -------------------------------------------------------------------------------


def replay_command(directory: Path, session_id: str, out: TextIO) -> int:
    """Print one session as its client experienced it; 1 when the log has no such session.

    The sampled rows are the values the client received (masked where masking applied):
    the log never holds anything else.
    """
    try:
        records = [r for r in read_records(directory) if r.get("session_id") == session_id]
    except (OSError, AuditFormatError) as exc:
        print(f"cannot read the audit log {directory}: {exc}", file=out)
        return 1
    if not records:
        print(f"no session {session_id} in {directory}", file=out)
        return 1
    if records[0]["type"] != "session.connect":
        print(f"(the start of session {session_id} is no longer in the log)", file=out)
    requests: dict[str, dict[str, Any]] = {}
    for record in records:
        kind = record["type"]
        if kind == "session.connect":
            _replay_connect(record, out)
        elif kind == "statement.request":
            requests[str(record.get("statement_id"))] = record
            _replay_request(record, session_id, out)
        elif kind == "statement.result":
            _replay_result(record, session_id, requests, out)
        elif kind == "session.end":
            _replay_end(record, out)
        else:
            print(f"{record['ts']}  {kind}  {_compact(_extra(record, set()))}", file=out)
    return 0


def _replay_connect(record: dict[str, Any], out: TextIO) -> None:
    principal = record.get("principal") or {}
    groups = ", ".join(principal.get("groups") or []) or "-"
    tls = record.get("tls")
    tls_text = f"TLS {tls.get('version')} {tls.get('cipher')}" if tls else "no TLS"
    print(f"session {record.get('session_id')}  connected {record['ts']}", file=out)
    name = principal.get("name")
    named = f"{name}; " if name and name != principal.get("subject") else ""
    print(
        f"  identity: {principal.get('subject')} ({named}issuer {principal.get('issuer')}; "
        f"groups {groups})",
        file=out,
    )
    server = record.get("server_address")
    print(
        f"  from {record.get('client_address')} to database {record.get('database')}"
        f"{f' at {server}' if server else ''} as "
        f"{record.get('upstream_user')}, application {record.get('application_name') or '-'}, "
        f"{tls_text}",
        file=out,
    )
    _print_extra(record, _CONNECT_FIELDS, out)


_CONNECT_FIELDS = {
    "session_id",
    "principal",
    "client_address",
    "database",
    "upstream_user",
    "application_name",
    "tls",
    "server_address",
}
_REQUEST_FIELDS = {
    "session_id",
    "statement_id",
    "kind",
    "text",
    "statement_name",
    "summary",
    "decision",
    "approval",
}
_RESULT_FIELDS = {
    "session_id",
    "statement_id",
    "duration_ms",
    "rows",
    "command",
    "sqlstate",
    "error",
    "masking",
    "response",
    "sample",
    "masked",
}
_END_FIELDS = {"session_id", "duration_ms", "statements", "refused", "masking"}


def _statement_label(record: dict[str, Any], session_id: str) -> str:
    statement_id = str(record.get("statement_id"))
    prefix = f"{session_id}-"
    return "#" + statement_id[len(prefix) :] if statement_id.startswith(prefix) else statement_id


def _replay_request(record: dict[str, Any], session_id: str, out: TextIO) -> None:
    label = _statement_label(record, session_id)
    kind = record.get("kind") or "query"
    name = record.get("statement_name")
    named = f" (prepared statement {name!r})" if name else ""
    print(f"\n{label}  {record['ts']}  {kind}{named}", file=out)
    for line in str(record.get("text", "")).splitlines() or [""]:
        print(f"    {line}", file=out)
    decision = record.get("decision") or {}
    rule = decision.get("rule")
    if decision.get("outcome") == "allow":
        print(f"  decision: allow (rule {rule or '-'})", file=out)
    else:
        sqlstate = f" [{decision['sqlstate']}]" if decision.get("sqlstate") else ""
        print(
            f"  decision: REFUSED by rule {rule or '-'}: {decision.get('reason')}{sqlstate}",
            file=out,
        )
    if record.get("approval"):
        print(f"  approval: {_compact(record['approval'])}", file=out)
    _print_extra(record, _REQUEST_FIELDS, out)


def _replay_result(
    record: dict[str, Any], session_id: str, requests: dict[str, dict[str, Any]], out: TextIO
) -> None:
    label = _statement_label(record, session_id)
    if str(record.get("statement_id")) not in requests:
        print(f"\n{label}  (request not in the log)", file=out)
    parts: list[str] = []
    if record.get("sqlstate") or record.get("error"):
        parts.append(f"error {record.get('sqlstate')}: {record.get('error')}")
    if record.get("command"):
        parts.append(str(record["command"]))
    if record.get("rows") is not None:
        parts.append(f"{record['rows']} rows")
    if record.get("duration_ms") is not None:
        parts.append(f"{record['duration_ms']} ms")
    response = record.get("response") or {}
    if response:
        digest = str(response.get("digest", ""))[:16]
        parts.append(f"{response.get('bytes')} bytes sent (sha256 {digest}…)")
    print(f"  result {record['ts']}: {', '.join(parts) or '-'}", file=out)
    masking = record.get("masking") or {}
    if masking:
        print(f"  masked: {_masking_text(masking)}", file=out)
    sample = record.get("sample") or []
    if sample:
        print(f"  rows as sent ({len(sample)} sampled):", file=out)
        for line in _table(sample):
            print(f"    {line}", file=out)
    _print_extra(record, _RESULT_FIELDS, out)


def _replay_end(record: dict[str, Any], out: TextIO) -> None:
    text = (
        f"\nend {record['ts']}: {record.get('duration_ms')} ms, "
        f"{record.get('statements')} statements, {record.get('refused')} refused"
    )
    masking = record.get("masking") or {}
    if masking:
        text += f", masked {_masking_text(masking)}"
    print(text, file=out)
    _print_extra(record, _END_FIELDS, out)


def _masking_text(masking: dict[str, Any]) -> str:
    return ", ".join(f"{name} x{count}" for name, count in masking.items())


def _table(rows: Iterable[Any]) -> list[str]:
    """Rows of values (strings or None) as aligned ``| a | b |`` lines."""
    cells = [[_cell(value) for value in row] for row in rows if isinstance(row, list)]
    width = max((len(row) for row in cells), default=0)
    widths = [max((len(row[i]) for row in cells if i < len(row)), default=0) for i in range(width)]
    return [
        "| "
        + " | ".join(row[i].ljust(widths[i]) if i < len(row) else "" for i in range(width))
        + " |"
        for row in cells
    ]


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    text = str(value).replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= _CELL_WIDTH else text[: _CELL_WIDTH - 1] + "…"


def _extra(record: dict[str, Any], known: set[str]) -> dict[str, Any]:
    base = {"seq", "ts", "type", "prev"}
    return {k: v for k, v in record.items() if k not in base and k not in known}


def _print_extra(record: dict[str, Any], known: set[str], out: TextIO) -> None:
    # Fields added after this tool was written are shown rather than silently dropped.
    for key, value in _extra(record, known).items():
        print(f"  {key}: {_compact(value)}", file=out)


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# --- tail ---------------------------------------------------------------------------------


def tail_command(
    directory: Path,
    out: TextIO,
    *,
    follow: bool,
    after_seq: int,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Print one line per record with ``seq > after_seq``; with ``follow``, keep waiting for more.

    Following ends when ``stop()`` is true (the command line stops it with Ctrl-C).
    """
    directory = Path(directory)
    if not follow and not directory.is_dir():
        print(f"{directory} is not a directory", file=out)
        return 1
    records = (
        _follow_records(directory, after_seq=after_seq, stop=stop)
        if follow
        else read_records(directory, after_seq=after_seq)
    )
    try:
        for record in records:
            print(tail_line(record), file=out, flush=follow)
    except AuditFormatError as exc:
        print(f"cannot read the audit log: {exc}", file=out)
        return 1
    return 0


def tail_line(record: dict[str, Any]) -> str:
    """One compact human-readable line for a record."""
    kind = record["type"]
    head = f"{record['seq']:>8} {record['ts']} {kind:<18}"
    get = record.get
    if kind == "session.connect":
        principal = get("principal") or {}
        body = (
            f"{get('session_id')} {principal.get('subject')} ({principal.get('issuer')}) "
            f"from {get('client_address')} db={get('database')} as={get('upstream_user')}"
        )
    elif kind == "session.auth_failed":
        body = (
            f"{get('client_address')} user={get('user')} db={get('database')} "
            f"{get('sqlstate')} {get('reason')}"
        )
    elif kind == "session.end":
        body = (
            f"{get('session_id')} {get('duration_ms')} ms statements={get('statements')} "
            f"refused={get('refused')}"
        )
    elif kind == "statement.request":
        decision = get("decision") or {}
        outcome = decision.get("outcome")
        rule = f" rule={decision.get('rule')}" if decision.get("rule") else ""
        body = f"{get('statement_id')} {outcome}{rule} {_short(str(get('text', '')))}"
    elif kind == "statement.result":
        outcome_text = (
            f"error {get('sqlstate')}" if get("sqlstate") or get("error") else get("command")
        )
        masked = sum(v for v in (get("masking") or {}).values() if isinstance(v, int))
        body = (
            f"{get('statement_id')} {outcome_text} rows={_dash(get('rows'))} "
            f"{get('duration_ms')} ms masked={masked}"
        )
    else:
        body = _short(_compact(_extra(record, set())), quote=False)
    return f"{head} {body}"


def _dash(value: Any) -> Any:
    return "-" if value is None else value


def _short(text: str, *, quote: bool = True) -> str:
    """``text`` on one line, cut at the tail width; quoted (JSON) when it is SQL text."""
    flat = " ".join(text.split())
    cut = flat if len(flat) <= _TEXT_WIDTH else flat[: _TEXT_WIDTH - 1] + "…"
    return json.dumps(cut, ensure_ascii=False) if quote else cut


# --- argparse -----------------------------------------------------------------------------


def add_audit_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit verify DIR``, ``audit replay DIR SESSION_ID`` and ``audit tail DIR``.

    Each leaf sets ``handler`` (``Callable[[argparse.Namespace], int]``) to run it.
    """
    audit = subparsers.add_parser("audit", help="inspect the durable audit log")
    commands = audit.add_subparsers(dest="audit_command", required=True)
    check = commands.add_parser("verify", help="check the hash chain and report the first break")
    check.add_argument("directory", type=Path, help="the audit directory")
    check.set_defaults(handler=_handle_verify)
    replay = commands.add_parser("replay", help="print a session as its client experienced it")
    replay.add_argument("directory", type=Path, help="the audit directory")
    replay.add_argument("session_id", help="the session id (audit tail shows them)")
    replay.set_defaults(handler=_handle_replay)
    tail = commands.add_parser("tail", help="print records, one per line")
    tail.add_argument("directory", type=Path, help="the audit directory")
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    tail.add_argument(
        "--after-seq", type=int, default=0, metavar="N", help="start after record N (default 0)"
    )
    tail.set_defaults(handler=_handle_tail)


def _handle_verify(args: argparse.Namespace) -> int:
    return verify_command(args.directory, sys.stdout)


def _handle_replay(args: argparse.Namespace) -> int:
    return replay_command(args.directory, args.session_id, sys.stdout)


def _handle_tail(args: argparse.Namespace) -> int:
    try:
        return tail_command(
            args.directory, sys.stdout, follow=args.follow, after_seq=args.after_seq
        )
    except KeyboardInterrupt:
        return 0
