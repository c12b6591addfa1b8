"""Wire-level transparency: backend identity, cancels, termination and reset.

A client of the gateway sees the server's own backend pid (BackendKeyData, the pid of its
own notifications and ``pg_backend_pid()`` agree, as they do directly), while the cancel
secret it holds is the gateway's, never the server's. A cancel takes effect about as fast
as directly, also in the middle of a COPY. A backend terminated by an administrator looks
to the client exactly as it does without the gateway, and libpq's PQreset reconnects.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors

from client_helpers import client_env, run_psql, unique_name
from gateway_harness import RunningGateway
from querywarden import codec
from querywarden.devcluster import EphemeralCluster
from raw_client import Message, RawClient, wait_until

# --- backend identity ----------------------------------------------------------------------


def test_psycopg_sees_the_servers_backend_pid(
    gateway: RunningGateway, pg: EphemeralCluster
) -> None:
    channel = unique_name("ident")
    app = unique_name("app")
    with psycopg.connect(gateway.dsn(application_name=app), autocommit=True) as conn:
        pid = conn.info.backend_pid
        assert conn.execute("SELECT pg_backend_pid()").fetchone() == (pid,)
        # The server knows the same process under the session's application_name.
        listed = pg.psql(f"SELECT pid FROM pg_stat_activity WHERE application_name = '{app}'")
        assert listed.strip() == str(pid)
        # Clients recognise their own notifications by this pid.
        conn.execute(f"LISTEN {channel}")
        conn.execute(f"NOTIFY {channel}, 'mine'")
        received = next(conn.notifies(timeout=5, stop_after=1))
        assert (received.channel, received.payload, received.pid) == (channel, "mine", pid)


def test_asyncpg_sees_the_servers_backend_pid(gateway: RunningGateway) -> None:
    channel = unique_name("ident")

    async def scenario() -> tuple[int, int, int]:
        conn = await asyncpg.connect(gateway.url(), timeout=10)
        try:
            heard: asyncio.Queue[int] = asyncio.Queue()
            await conn.add_listener(channel, lambda _c, pid, _ch, _p: heard.put_nowait(pid))
            await conn.execute(f"NOTIFY {channel}, 'mine'")
            notified = await asyncio.wait_for(heard.get(), 5)
            return conn.get_server_pid(), await conn.fetchval("SELECT pg_backend_pid()"), notified
        finally:
            await conn.close()

    told, actual, notified = asyncio.run(scenario())
    assert told == actual == notified


def test_each_session_is_told_its_own_backend_pid(gateway: RunningGateway) -> None:
    """BackendKeyData on the wire (not only what a driver reports) carries the real pid."""
    with RawClient.to(gateway, timeout=20) as one, RawClient.to(gateway, timeout=20) as two:
        key_one, key_two = _backend_key(one.login()), _backend_key(two.login())
        assert key_one[0] != key_two[0]
        assert _pid_of(one) == key_one[0] and _pid_of(two) == key_two[0]


# --- cancel keys ---------------------------------------------------------------------------


def test_a_cancel_with_a_wrong_secret_or_the_gateways_secret_at_the_server_does_nothing(
    gateway: RunningGateway, pg: EphemeralCluster
) -> None:
    with RawClient.to(gateway, timeout=20) as sleeper:
        pid, secret = _backend_key(sleeper.login())
        marker = unique_name("sleep")
        sleeper.send(codec.query(f"SELECT pg_sleep(1.5) /* {marker} */"))
        _wait_running(pg, marker)
        wrong = bytes([secret[0] ^ 0x01]) + secret[1:]
        _send_cancel((gateway.host, gateway.port), pid, wrong)
        # The key the client holds is the gateway's: the server itself ignores it.
        _send_cancel(("127.0.0.1", pg.port), pid, secret)
        answer = sleeper.read_until(b"Z")
        assert [m.mtype for m in answer if m.mtype == b"E"] == [], [m.fields for m in answer]
        assert b"D" in [m.mtype for m in answer]
        # The right key through the gateway does cancel.
        marker = unique_name("sleep")
        sleeper.send(codec.query(f"SELECT pg_sleep(30) /* {marker} */"))
        _wait_running(pg, marker)
        _send_cancel((gateway.host, gateway.port), pid, secret)
        errors_seen = [m for m in sleeper.read_until(b"Z") if m.mtype == b"E"]
        assert [e.sqlstate for e in errors_seen] == ["57014"]


def test_a_cancel_of_a_sleep_takes_effect_at_once(
    gateway: RunningGateway, pg: EphemeralCluster
) -> None:
    """From cancel_safe() to the error: well under two seconds (a bound, not a benchmark)."""
    marker = unique_name("sleep")
    with psycopg.connect(gateway.dsn(), autocommit=True) as conn:
        cancelled: list[float] = []

        def cancel_when_running() -> None:
            _wait_running(pg, marker)
            cancelled.append(time.monotonic())
            conn.cancel_safe()

        canceller = threading.Thread(target=cancel_when_running)
        canceller.start()
        try:
            with pytest.raises(errors.QueryCanceled, match="canceling statement due to user"):
                conn.execute(f"SELECT pg_sleep(30) /* {marker} */")
            took = time.monotonic() - cancelled[0]
        finally:
            canceller.join(15)
        assert took < 2.0, f"the cancel took {took:.2f} s"
        assert conn.execute("SELECT 'still usable'").fetchone() == ("still usable",)


@pytest.mark.parametrize("audited", [False, True], ids=["plain", "audited"])
def test_a_cancel_stops_a_running_copy_to_stdout(
    make_gateway: Any, tmp_path: Any, audited: bool
) -> None:
    """A COPY streaming out (about 11 GB if left alone) stops soon after the cancel."""
    gw = make_gateway(audit={"directory": str(tmp_path / "audit")}) if audited else make_gateway()
    # generate_series in the target list streams (in FROM it would be materialized first).
    copy = (
        "COPY (SELECT g, repeat('x', 100) FROM (SELECT generate_series(1, 100000000) AS g) s) "
        "TO STDOUT"
    )
    with psycopg.connect(gw.dsn(), autocommit=True) as conn:
        received = 0
        cancelled_at: float | None = None
        with (
            pytest.raises(errors.QueryCanceled, match="canceling statement due to user"),
            conn.cursor().copy(copy) as stream,
        ):
            for chunk in stream:
                received += len(chunk)
                if cancelled_at is None and received > 1_000_000:
                    cancelled_at = time.monotonic()
                    conn.cancel_safe()
                elif cancelled_at is not None:
                    assert time.monotonic() - cancelled_at < 5, "the COPY went on"
        assert cancelled_at is not None
        assert time.monotonic() - cancelled_at < 5
        assert received < 2_000_000_000
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --- termination and reset -----------------------------------------------------------------


def _terminate(pg: EphemeralCluster, pid: int) -> None:
    assert pg.psql(f"SELECT pg_terminate_backend({pid}, 10000)").strip() == "t"


def _after_termination(dsn: str, pg: EphemeralCluster, *, busy: bool) -> tuple[Any, ...]:
    """What a psycopg client sees when its backend is terminated (idle or mid-statement)."""
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        pid = conn.info.backend_pid
        if busy:
            threading.Timer(0.5, _terminate, (pg, pid)).start()
            statement = "SELECT pg_sleep(10)"
        else:
            _terminate(pg, pid)
            statement = "SELECT 1"
        with pytest.raises(psycopg.OperationalError) as raised:
            conn.execute(statement)
        error = raised.value
        return type(error).__name__, error.sqlstate, str(error), conn.closed, conn.broken
    finally:
        conn.close()


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "mid-statement"])
def test_an_administrators_termination_looks_as_it_does_directly(
    gateway: RunningGateway, pg: EphemeralCluster, busy: bool
) -> None:
    through = _after_termination(gateway.dsn(), pg, busy=busy)
    direct = _after_termination(pg.dsn(), pg, busy=busy)
    assert through == direct
    assert through == (
        "AdminShutdown",
        "57P01",
        "terminating connection due to administrator command",
        True,
        True,
    )


def _psql_terminated(dsn: str, pg: EphemeralCluster) -> tuple[int, str, str]:
    marker = unique_name("victim")
    done: list[Any] = []

    def run() -> None:
        done.append(run_psql(dsn, "-c", f"SELECT pg_sleep(10) /* {marker} */", "-c", "SELECT 1"))

    runner = threading.Thread(target=run)
    runner.start()
    _wait_running(pg, marker)
    pg.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE query LIKE '%{marker}%' AND pid <> pg_backend_pid()"
    )
    runner.join(30)
    result = done[0]
    return result.returncode, result.stdout, result.stderr


def test_psql_reports_a_termination_as_it_does_directly(
    gateway: RunningGateway, pg: EphemeralCluster
) -> None:
    # Both in plaintext: libpq's wording of the lost connection depends on TLS.
    through = _psql_terminated(gateway.dsn(sslmode="disable"), pg)
    direct = _psql_terminated(pg.dsn() + " sslmode=disable", pg)
    assert through == direct
    assert through[0] == 2
    assert "FATAL:  terminating connection due to administrator command" in through[2]
    assert "server closed the connection unexpectedly" in through[2]


#: PQreset in a client process of its own: libpq blocks in it holding the GIL, which would
#: also stop the in-process gateway the test talks to.
_RESET_CLIENT = """
import json, sys
import psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
old = conn.info.backend_pid
try:
    conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    conn.execute("SELECT 1")
    terminated = None
except psycopg.OperationalError as exc:
    terminated = exc.sqlstate
pgconn = conn.pgconn
pgconn.reset()
new = int(pgconn.exec_(b"SELECT pg_backend_pid()").get_value(0, 0))
print(json.dumps({
    "terminated": terminated,
    "status": psycopg.pq.ConnStatus(pgconn.status).name,
    "new_backend": new != old,
    "told_pid_is_backend": new == pgconn.backend_pid,
    "works": pgconn.exec_(b"SELECT 'ok'").get_value(0, 0).decode(),
}))
"""


def _reset_after_termination(dsn: str) -> dict[str, Any]:
    """A libpq client resets (PQreset) after its backend was terminated."""
    done = subprocess.run(
        [sys.executable, "-c", _RESET_CLIENT, dsn],
        capture_output=True,
        text=True,
        timeout=60,
        env=client_env(),
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_pqreset_reconnects_as_it_does_directly(
    gateway: RunningGateway, pg: EphemeralCluster
) -> None:
    through = _reset_after_termination(gateway.dsn())
    direct = _reset_after_termination(pg.dsn())
    assert through == direct
    assert through == {
        "terminated": "57P01",
        "status": "OK",
        "new_backend": True,
        "told_pid_is_backend": True,
        "works": "ok",
    }


# --- helpers -------------------------------------------------------------------------------


def _backend_key(messages: list[Message]) -> tuple[int, bytes]:
    key = next(m for m in messages if m.mtype == b"K")
    return codec.decode_backend_key_data(key.frame)


def _pid_of(client: RawClient) -> int:
    rows = [m for m in client.simple_query("SELECT pg_backend_pid()") if m.mtype == b"D"]
    assert len(rows) == 1
    (value,) = codec.decode_data_row(rows[0].frame)
    assert value is not None
    return int(value)


def _send_cancel(address: tuple[str, int], pid: int, secret: bytes) -> None:
    """Send a CancelRequest and wait until the other end closes (it never answers)."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(codec.cancel_request(pid, secret))
        while sock.recv(64):
            pass


def _wait_running(pg: EphemeralCluster, marker: str) -> None:
    def running() -> bool:
        count = pg.psql(
            "SELECT count(*) FROM pg_stat_activity "
            f"WHERE state = 'active' AND query LIKE '%{marker}%' AND pid <> pg_backend_pid()"
        )
        return int(count) == 1

    wait_until(running, timeout=10, what="the statement to start")
