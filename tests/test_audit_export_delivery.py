"""The audit log reaches an OTLP receiver at least once, through outages and restarts.

A simulated gateway writes sessions and statements with the real AuditLog while the
exporter runs; the receiver goes down mid-run and comes back, the exporter object is
replaced mid-run, an offset write is lost after a delivery; every statement's span
arrives in the end (deduplicated by span id), none missing.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otlp_receiver import OtlpReceiver, ReceivedSpan
from querywarden.audit import export
from querywarden.audit.export import (
    LogExporter,
    OffsetState,
    read_offset,
    session_span_id,
    statement_span_id,
)
from querywarden.audit.log import AuditLog

INTERVAL = 0.05


class Gateway:
    """Writes what a gateway would: sessions, requests, results, ends (the contract)."""

    def __init__(self, log: AuditLog) -> None:
        self.log = log
        self.counts: dict[str, int] = {}
        self.statements: list[str] = []
        self.ended: list[str] = []

    def connect(self, sid: str) -> None:
        self.counts[sid] = 0
        self.log.append(
            "session.connect",
            session_id=sid,
            principal={"subject": f"agent-{sid}", "issuer": "https://idp", "groups": ["ai"]},
            client_address="127.0.0.1:40000",
            database="shop",
            upstream_user="app",
            application_name="test",
            tls=None,
        )

    def request(self, sid: str, *, refuse: bool = False) -> str:
        self.counts[sid] += 1
        statement_id = f"{sid}-{self.counts[sid]}"
        self.log.append(
            "statement.request",
            session_id=sid,
            statement_id=statement_id,
            kind="query",
            text=f"SELECT * FROM orders WHERE id = {self.counts[sid]}",
            statement_name="",
            summary={
                "operations": ["select"],
                "reads": ["public.orders"],
                "writes": [],
                "functions": [],
            },
            decision={
                "outcome": "refuse" if refuse else "allow",
                "rule": "agents",
                "reason": "not today" if refuse else None,
                "sqlstate": "42501" if refuse else None,
            },
            approval=None,
        )
        self.statements.append(statement_id)
        return statement_id

    def result(self, sid: str, statement_id: str, *, error: bool = False) -> None:
        self.log.append(
            "statement.result",
            session_id=sid,
            statement_id=statement_id,
            duration_ms=0.4,
            rows=None if error else 1,
            command=None if error else "SELECT 1",
            sqlstate="57014" if error else None,
            error="canceled" if error else None,
            masking={"email": 1},
            response={"bytes": 64, "digest": "0" * 64},
            sample=[],
        )

    def statement(self, sid: str, n: int) -> None:
        """One request and its result; some refused, some failing upstream."""
        refuse = n % 7 == 3
        statement_id = self.request(sid, refuse=refuse)
        self.result(sid, statement_id, error=n % 11 == 5)

    def end(self, sid: str) -> None:
        self.log.append(
            "session.end",
            session_id=sid,
            duration_ms=5.0,
            statements=self.counts[sid],
            refused=0,
            masking={},
        )
        self.ended.append(sid)

    def traffic(self, start: int, count: int, sessions: list[str]) -> None:
        """``count`` statements spread over ``sessions``, interleaved."""
        for n in range(start, start + count):
            self.statement(sessions[n % len(sessions)], n)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture
def audit_dir(tmp_path: Path) -> Path:
    return tmp_path / "audit"


def statement_spans(receiver: OtlpReceiver) -> dict[str, ReceivedSpan]:
    return receiver.spans_by_attribute("querywarden.statement.id")


def has_all(receiver: OtlpReceiver, statement_ids: list[str]) -> bool:
    return set(statement_ids) <= set(statement_spans(receiver))


async def until(condition: Any, within: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


def check_complete(receiver: OtlpReceiver, gateway: Gateway) -> None:
    """Every statement and every ended session arrived, with the right ids and parents."""
    spans = statement_spans(receiver)
    missing = sorted(set(gateway.statements) - set(spans))
    assert not missing, f"{len(missing)} statement spans missing: {missing[:5]}"
    assert len(spans) == len(gateway.statements)
    for statement_id in gateway.statements:
        span = spans[statement_id]
        sid = statement_id.rsplit("-", 1)[0]
        assert span.span_id == statement_span_id(statement_id).hex()
        assert span.parent_span_id == session_span_id(sid).hex()
        assert span.attributes["querywarden.session.id"] == sid
    sessions = {
        s.attributes["querywarden.session.id"]
        for s in receiver.unique_spans().values()
        if s.name == "querywarden.session"
    }
    assert set(gateway.ended) <= sessions


def test_receiver_down_mid_run_then_back(audit_dir: Path, receiver: OtlpReceiver) -> None:
    log = AuditLog(audit_dir, fsync="batch")
    gateway = Gateway(log)
    exporter = LogExporter(audit_dir, receiver.endpoint, instance_id="gw-test", batch_max=16)
    offset_file = audit_dir / "otlp.offset"
    answered_late: list[str] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(exporter.run(interval=INTERVAL, stop=stop))
        sessions = [f"s{i}" for i in range(5)]
        for sid in sessions:
            gateway.connect(sid)
        gateway.traffic(0, 40, sessions)
        log.sync()
        await until(lambda: has_all(receiver, gateway.statements))

        # The Collector goes away; the gateway keeps serving and logging.
        receiver.stop()
        await asyncio.sleep(2 * INTERVAL)  # a pass that may still have been in flight
        before_outage = read_offset(offset_file)
        received_before = len(receiver.spans())
        gateway.end("s0")
        gateway.connect("s5")
        sessions[0] = "s5"
        pending = gateway.request("s1")  # answered only after the Collector is back
        answered_late.append(pending)
        gateway.traffic(40, 80, sessions)
        log.sync()
        await until(lambda: exporter.failures >= 3)
        assert read_offset(offset_file) == before_outage  # nothing acknowledged, no progress
        assert len(receiver.spans()) == received_before

        receiver.start()  # same port
        gateway.result("s1", pending)
        gateway.traffic(120, 20, sessions)
        for sid in ("s1", "s2"):
            gateway.end(sid)
        log.sync()
        await until(lambda: has_all(receiver, gateway.statements) and exporter.failures == 0)
        stop.set()
        await asyncio.wait_for(task, 10)

    try:
        asyncio.run(scenario())
    finally:
        log.close()
    check_complete(receiver, gateway)
    assert len(gateway.statements) == 141
    # Sessions s3, s4, s5 are still open: the offset stays before their connect records.
    state = read_offset(offset_file)
    assert state.offset < state.sent
    spans = statement_spans(receiver)
    assert spans["s3-1"].status_code == 2  # refused (n = 3)
    assert spans["s3-1"].status_message == "not today"
    assert spans["s0-2"].status_message == "SQLSTATE 57014"  # n = 5: failed upstream
    assert spans[answered_late[0]].attributes["db.response.returned_rows"] == 1


@pytest.mark.parametrize("drain", [0.0, 10.0])
def test_shutdown_drains_the_backlog_within_the_drain_time(
    audit_dir: Path, receiver: OtlpReceiver, drain: float
) -> None:
    # A pod deleted while its exporter is behind: the log on an emptyDir goes with the
    # pod, so what is not sent while the gateway stops is lost. The last pass used to
    # send one batch; it now keeps going for up to the drain time.
    log = AuditLog(audit_dir, fsync="batch")
    gateway = Gateway(log)
    sessions = ["d1", "d2", "d3"]
    for sid in sessions:
        gateway.connect(sid)
    gateway.traffic(0, 150, sessions)
    for sid in sessions:
        gateway.end(sid)
    log.sync()
    exporter = LogExporter(audit_dir, receiver.endpoint, instance_id="gw-test", batch_max=16)

    async def shutdown_before_the_first_pass() -> None:
        stop = asyncio.Event()
        stop.set()
        await asyncio.wait_for(exporter.run(interval=INTERVAL, stop=stop, drain=drain), 30)

    try:
        asyncio.run(shutdown_before_the_first_pass())
    finally:
        log.close()
    if drain:
        check_complete(receiver, gateway)
    else:  # no drain time: one batch, as before
        assert 0 < len(receiver.spans()) <= 16


def test_exporter_replaced_mid_run_loses_nothing(audit_dir: Path, receiver: OtlpReceiver) -> None:
    log = AuditLog(audit_dir, fsync="batch")
    gateway = Gateway(log)

    async def run_for(exporter: LogExporter, work: Any) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(exporter.run(interval=INTERVAL, stop=stop))
        await work()
        stop.set()
        await asyncio.wait_for(task, 10)

    sessions = ["a", "b", "c"]
    pending: list[tuple[str, str]] = []

    async def first_half() -> None:
        for sid in sessions:
            gateway.connect(sid)
        gateway.traffic(0, 30, sessions)
        # Requests in flight when this exporter (this gateway process) goes away.
        pending.extend((sid, gateway.request(sid)) for sid in ("a", "b"))
        log.sync()
        await until(lambda: has_all(receiver, gateway.statements[:30]))

    async def second_half() -> None:
        for sid, statement_id in pending:
            gateway.result(sid, statement_id)
        gateway.traffic(30, 30, sessions)
        gateway.end("a")
        log.sync()
        await until(lambda: has_all(receiver, gateway.statements))

    try:
        asyncio.run(run_for(LogExporter(audit_dir, receiver.endpoint), first_half))
        state = read_offset(audit_dir / "otlp.offset")
        assert state.offset == 0  # session a's connect is still needed
        assert state.sent > 30
        # A new exporter object, same offset file: it rebuilds the open sessions and
        # requests from the log and sends what completes after the watermark.
        asyncio.run(run_for(LogExporter(audit_dir, receiver.endpoint), second_half))
    finally:
        log.close()
    check_complete(receiver, gateway)
    # The watermark kept the first half from being sent twice.
    assert len(receiver.spans()) == len(receiver.unique_spans())


def test_lost_offset_write_resends_but_loses_nothing(
    audit_dir: Path, receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(audit_dir, fsync="batch")
    gateway = Gateway(log)
    try:
        gateway.connect("x")
        gateway.traffic(0, 10, ["x"])
        log.sync()
        exporter = LogExporter(audit_dir, receiver.endpoint)
        assert exporter.export_pending() == 10

        # A crash between the Collector's 200 and the offset reaching the disk.
        def crash(path: Path, state: OffsetState) -> None:
            raise OSError("disk gone")

        gateway.traffic(10, 10, ["x"])
        gateway.end("x")
        log.sync()
        monkeypatch.setattr(export, "write_offset", crash)
        with pytest.raises(OSError, match="disk gone"):
            exporter.export_pending()
        assert len(statement_spans(receiver)) == 20
        monkeypatch.undo()

        restarted = LogExporter(audit_dir, receiver.endpoint)
        assert restarted.export_pending() == 11  # the 10 statements and the session, again
    finally:
        log.close()
    check_complete(receiver, gateway)
    assert len(receiver.spans()) == 10 + 11 + 11
    assert read_offset(audit_dir / "otlp.offset") == OffsetState(42, 42)


def test_offset_file_is_json_next_to_the_log(audit_dir: Path, receiver: OtlpReceiver) -> None:
    log = AuditLog(audit_dir, fsync="always")
    try:
        Gateway(log).connect("y")
    finally:
        log.close()
    LogExporter(audit_dir, receiver.endpoint).export_pending()
    assert json.loads((audit_dir / "otlp.offset").read_text()) == {"offset": 0, "sent": 1}


def test_exporter_in_a_process_of_its_own(audit_dir: Path, receiver: OtlpReceiver) -> None:
    log = AuditLog(audit_dir, fsync="batch")
    gateway = Gateway(log)
    process = subprocess.Popen(
        [sys.executable, "-m", "querywarden.audit.export", str(audit_dir),
         "--endpoint", receiver.endpoint, "--interval", "0.05", "--instance-id", "gw-p"],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        gateway.connect("p")
        gateway.traffic(0, 20, ["p"])
        log.sync()
        receiver.wait_for(lambda _: has_all(receiver, gateway.statements))
        gateway.traffic(20, 5, ["p"])
        gateway.end("p")
        log.sync()
        receiver.wait_for(lambda _: has_all(receiver, gateway.statements))
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=15)
        log.close()
    assert process.returncode == 0, stderr.decode()
    check_complete(receiver, gateway)
    assert {s.resource["service.instance.id"] for s in receiver.spans()} == {"gw-p"}
