"""Row limits (a rule's maxRows) in the session state machine, bytes in and bytes out."""

from __future__ import annotations

from pathlib import Path

import pytest

from querywarden import codec
from querywarden.hooks import AllowAll
from querywarden.session import RowLimit, Session
from unit.test_session import (
    INFO,
    RFQ_I,
    RFQ_T,
    SYNC,
    bind,
    command_complete,
    data_row,
    drain,
    row_description,
)
from wire_client import execute

LIMIT = RowLimit(2, "agents")
CANCELED = codec.error_response("57014", "canceling statement due to user request")


def limited() -> Session:
    return Session(INFO, AllowAll(), row_limit=LIMIT)


def frames(out: bytes) -> list[bytes]:
    found, pos = [], 0
    while pos < len(out):
        length = int.from_bytes(out[pos + 1 : pos + 5], "big")
        found.append(out[pos : pos + 1 + length])
        pos += 1 + length
    return found


def types(out: bytes) -> str:
    return "".join(chr(frame[0]) for frame in frames(out))


def errors_in(out: bytes) -> list[dict[str, str]]:
    return [codec.decode_fields(f) for f in frames(out) if f[:1] == b"E"]


def rows(n: int) -> bytes:
    return b"".join(data_row(str(i).encode()) for i in range(n))


def test_rows_up_to_the_limit_pass_untouched() -> None:
    session = limited()
    session.receive_client(codec.query("SELECT"))
    reply = row_description("x") + rows(2) + command_complete("SELECT 2") + RFQ_I
    session.receive_server(reply)
    assert drain(session.to_client) == reply
    assert not session.cancel_wanted


@pytest.mark.parametrize("cut", [0, 3, 17, 40, 61])
def test_past_the_limit_the_statement_is_cancelled_and_input_waits(cut: int) -> None:
    session = limited()
    session.receive_client(codec.query("SELECT big"))
    drain(session.to_server)
    reply = row_description("x") + rows(5)
    session.receive_server(reply[:cut])
    session.receive_server(reply[cut:])
    out = drain(session.to_client)
    assert out == row_description("x") + rows(2)
    assert session.cancel_wanted
    # The client's next request waits until the cancel is delivered upstream.
    session.receive_client(codec.query("SELECT next"))
    assert session.to_server == []
    session.cancel_delivered()
    assert drain(session.to_server) == codec.query("SELECT next")
    # The server's cancellation error becomes the row-limit error.
    session.receive_server(rows(3) + CANCELED + RFQ_I)
    out = drain(session.to_client)
    assert out.endswith(RFQ_I)
    [error] = errors_in(out)
    assert error["C"] == "54000"
    assert "more than 2 rows, the limit of rule agents" in error["M"]
    assert "cancelled" in error["D"]
    assert types(out) == "EZ"
    # The next result is counted afresh.
    session.receive_server(row_description("x") + rows(2) + command_complete("SELECT 2") + RFQ_I)
    assert errors_in(drain(session.to_client)) == []


def test_a_statement_that_finished_first_reports_it() -> None:
    session = limited()
    session.receive_client(codec.query("SELECT big"))
    session.receive_server(row_description("x") + rows(3) + command_complete("SELECT 3") + RFQ_I)
    out = drain(session.to_client)
    [error] = errors_in(out)
    assert "finished on the server" in error["D"]
    assert types(out) == "TDDEZ"


def test_no_cancel_when_a_later_request_is_already_upstream() -> None:
    session = limited()
    session.receive_client(codec.query("SELECT big") + codec.query("SELECT small"))
    session.receive_server(row_description("x") + rows(3))
    assert not session.cancel_wanted
    session.receive_server(command_complete("SELECT 3") + RFQ_I)
    session.receive_server(row_description("x") + rows(1) + command_complete("SELECT 1") + RFQ_I)
    out = drain(session.to_client)
    assert len(errors_in(out)) == 1
    assert out.endswith(command_complete("SELECT 1") + RFQ_I)


def test_extended_protocol_cancel_is_safe_up_to_the_sync_only() -> None:
    session = limited()
    session.receive_client(codec.parse("", "SELECT big") + bind() + execute() + SYNC)
    session.receive_server(codec.message(b"1") + codec.message(b"2") + rows(3))
    assert session.cancel_wanted
    session.receive_server(CANCELED + RFQ_I)
    assert errors_in(drain(session.to_client))[0]["C"] == "54000"

    pipelined = limited()
    pipelined.receive_client(
        codec.parse("", "SELECT big") + bind() + execute() + SYNC + codec.query("SELECT 1")
    )
    pipelined.receive_server(codec.message(b"1") + codec.message(b"2") + rows(3))
    assert not pipelined.cancel_wanted


def test_a_portal_is_counted_across_executes() -> None:
    session = limited()
    session.receive_client(codec.query("BEGIN"))
    session.receive_server(command_complete("BEGIN") + RFQ_T)
    suspended = codec.message(b"s")
    session.receive_client(codec.parse("", "SELECT") + bind("p") + execute("p", 1) + SYNC)
    session.receive_server(codec.message(b"1") + codec.message(b"2") + rows(1) + suspended)
    session.receive_server(RFQ_T)
    session.receive_client(execute("p", 1) + SYNC)
    session.receive_server(rows(1) + suspended + RFQ_T)
    assert errors_in(drain(session.to_client)) == []
    session.receive_client(execute("p", 1) + SYNC)
    session.receive_server(rows(1) + suspended)
    [error] = errors_in(drain(session.to_client))
    assert error["C"] == "54000"
    assert "finished on the server" in error["D"]
    session.receive_server(RFQ_T)
    assert drain(session.to_client) == RFQ_T


def test_copy_out_rows_are_counted_and_copy_done_withheld() -> None:
    session = limited()
    session.receive_client(codec.query("COPY t TO STDOUT"))
    copy_out = codec.message(b"H", b"\0\0\0")
    data = b"".join(codec.message(b"d", f"{i}\n".encode()) for i in range(4))
    session.receive_server(copy_out + data + codec.message(b"c") + command_complete("COPY 4"))
    out = drain(session.to_client)
    assert types(out) == "HddE"
    assert errors_in(out)[0]["C"] == "54000"


def test_a_streamed_row_past_the_limit_is_dropped_whole() -> None:
    session = limited()
    session.receive_client(codec.query("SELECT big"))
    big = data_row(b"x" * 100_000)
    session.receive_server(row_description("x") + rows(2) + big[:1000])
    session.receive_server(big[1000:50_000])
    session.receive_server(big[50_000:] + CANCELED + RFQ_I)
    out = drain(session.to_client)
    assert types(out) == "TDDEZ"
    assert errors_in(out)[0]["C"] == "54000"


def test_the_audit_record_of_a_cut_result_carries_the_error(tmp_path: Path) -> None:
    from querywarden.audit.log import read_records
    from querywarden.audit.recorder import Auditor

    auditor = Auditor(tmp_path / "audit", sample_rows=1)
    session = Session(INFO, AllowAll(), row_limit=LIMIT, audit=auditor.session(
        INFO, upstream_user="u", tls=None
    ))  # fmt: skip
    session.receive_client(codec.query("SELECT big") + codec.query("SELECT 1"))
    session.receive_server(row_description("x") + rows(3) + command_complete("SELECT 3") + RFQ_I)
    auditor.close()
    [result] = [r for r in read_records(tmp_path / "audit") if r["type"] == "statement.result"]
    assert result["sqlstate"] == "54000"
    assert result["sample"] == [["0"]]
