"""A fault inside the gateway ends only its own session, with XX000, never a bare 08006.

Faults are injected through the public seams a deployment can plug in (a statement gate,
a result hook); the client must get an ErrorResponse naming its session, the log a
traceback with that session id, the audit log a record, and the other sessions nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from gateway_harness import RunningGateway
from querywarden.audit.log import read_records
from querywarden.hooks import ALLOW, Decision, SessionInfo, StatementRequest
from raw_client import assert_alive, connect, wait_until


class BrokenGate:
    """Allows everything, but fails on statements that mention 'boom'."""

    def decide(self, session: SessionInfo, request: StatementRequest) -> Decision:
        if "boom" in request.sql:
            raise RuntimeError("the gate broke")
        return ALLOW


class BrokenHook:
    """Fails on the first DataRow whose value is 'boom'."""

    def on_result(self, session: SessionInfo, mtype: int, frame: bytes) -> bytes | None:
        if mtype == ord("D") and frame.endswith(b"boom"):
            raise KeyError("the result hook broke")
        return None


def _assert_internal_error(gw: RunningGateway, sql: str, caplog: pytest.LogCaptureFixture) -> None:
    with connect(gw, application_name="neighbour") as neighbour:
        with connect(gw) as victim, pytest.raises(psycopg.Error) as info:
            victim.execute(sql)
        assert info.value.sqlstate == "XX000", info.value
        message = str(info.value.diag.message_primary)
        assert message.startswith("internal error in the gateway (session ")
        session_id = message.removeprefix("internal error in the gateway (session ").rstrip(")")
        assert_alive(neighbour)
    logged = [
        r
        for r in caplog.records
        if r.name == "querywarden.server" and session_id in r.getMessage() and r.exc_info
    ]
    assert logged, "no log line with the traceback and the session id"
    assert logged[0].levelno == logging.ERROR


def test_a_failing_gate_ends_only_its_session_with_xx000(
    make_gateway: Callable[..., RunningGateway], caplog: pytest.LogCaptureFixture
) -> None:
    gw = make_gateway(gate=BrokenGate())
    _assert_internal_error(gw, "SELECT 'boom'", caplog)


def test_a_failing_result_hook_ends_only_its_session_with_xx000(
    make_gateway: Callable[..., RunningGateway],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    directory = tmp_path / "audit"
    gw = make_gateway(result_hook=BrokenHook(), audit={"directory": str(directory)})
    _assert_internal_error(gw, "SELECT 'boom'", caplog)
    wait_until(
        lambda: any(r["type"] == "session.error" for r in read_records(directory)),
        timeout=10,
        what="the audit record of the internal error",
    )
    error = next(r for r in read_records(directory) if r["type"] == "session.error")
    assert error["sqlstate"] == "XX000"
    assert "KeyError" in error["error"]
