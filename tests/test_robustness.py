"""Robustness through a real gateway: vanishing clients, failing upstreams, load, limits.

Each test runs against a real gateway in front of the real ephemeral PostgreSQL and
checks what a client sees (the SQLSTATE and message, not a hang) and that the gateway
keeps serving everyone else afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway_harness import RunningGateway, gateway_settings, start_gateway, token_for
from querywarden import codec
from querywarden.devcluster import ROLE_PASSWORD, EphemeralCluster, free_port
from querywarden.tlsutil import write_self_signed
from raw_client import (
    RawClient,
    assert_alive,
    assert_serves,
    backends_named,
    connect,
    data_rows,
    wait_until,
)
from robustness_fixtures import MakeGateway, bystander, make_gateway, no_gateway_crash  # noqa: F401


def _app() -> str:
    return f"qw-robust-{uuid.uuid4().hex[:10]}"


# --- clients that vanish -----------------------------------------------------------------


def test_client_disconnecting_mid_message_releases_its_backend(
    gateway: RunningGateway, pg: EphemeralCluster, bystander: psycopg.Connection
) -> None:
    app = _app()
    client = RawClient.to(gateway)
    try:
        client.login("alice", application_name=app)
        assert data_rows(client.simple_query("SELECT 1")) == [["1"]]
        assert backends_named(pg, app) == 1
        query = codec.query("SELECT 'this query never arrives whole'")
        client.send(query[: len(query) // 2])
    finally:
        client.close()
    wait_until(lambda: backends_named(pg, app) == 0, timeout=10, what="the upstream backend to end")
    assert_alive(bystander)
    assert_serves(gateway)


def test_client_disconnecting_during_startup_leaves_no_session(
    make_gateway: MakeGateway, pg: EphemeralCluster
) -> None:
    gw = make_gateway()
    app = _app()
    # Gone right after the StartupMessage, and gone right after the password.
    with RawClient.to(gw) as client:
        client.startup("alice", application_name=app)
        assert (auth := client.read_message()) is not None and auth.mtype == b"R"
    with RawClient.to(gw) as client:
        client.startup("alice", application_name=app)
        assert (auth := client.read_message()) is not None and auth.mtype == b"R"
        client.password(token_for("alice"))
    wait_until(lambda: gw.connection_count == 0, timeout=5, what="both connections to drop")
    wait_until(lambda: backends_named(pg, app) == 0, timeout=10, what="no upstream backend left")
    assert_serves(gw)


# --- the upstream fails ------------------------------------------------------------------


def test_upstream_unreachable(make_gateway: MakeGateway) -> None:
    port = free_port()
    gw = make_gateway(upstream={"port": port, "connectTimeout": "2s"})
    with RawClient.to(gw) as client:
        client.startup("alice")
        assert (auth := client.read_message()) is not None and auth.mtype == b"R"
        client.password(token_for("alice"))
        error = client.expect_fatal()
    assert error.sqlstate == "08001", error.fields
    assert error.fields["S"] == "FATAL"
    assert "could not connect to the upstream database" in error.text
    assert f"127.0.0.1:{port}" in error.text
    with pytest.raises(psycopg.OperationalError, match="could not connect to the upstream"):
        connect(gw)
    wait_until(lambda: gw.connection_count == 0, timeout=5, what="the sessions to drop")


def _terminate_when_running(pg: EphemeralCluster, app: str) -> None:
    """Wait for the session's pg_sleep to run upstream, then kill its backend directly."""
    active = (
        "SELECT count(*) FROM pg_stat_activity "
        f"WHERE application_name = '{app}' AND state = 'active' AND query LIKE '%pg_sleep%'"
    )
    wait_until(lambda: pg.psql(active) == "1", timeout=10, what="the query to run upstream")
    killed = pg.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        f"WHERE application_name = '{app}'"
    )
    assert killed == "1"


def test_upstream_backend_killed_mid_query_raw(
    gateway: RunningGateway, pg: EphemeralCluster, bystander: psycopg.Connection
) -> None:
    app = _app()
    with RawClient.to(gateway) as client:
        client.login("alice", application_name=app)
        client.send(codec.query("SELECT pg_sleep(10)"))
        _terminate_when_running(pg, app)
        errors = [m for m in client.read_to_close() if m.mtype == b"E"]
    # The server's own FATAL is relayed, and nothing is added: the client sees what it
    # would see directly (the gateway adds 08006 only when the upstream vanishes silently).
    assert [e.sqlstate for e in errors] == ["57P01"], [e.fields for e in errors]
    assert "administrator command" in errors[0].text
    assert_alive(bystander)
    assert_serves(gateway)


def test_upstream_backend_killed_mid_query_psycopg(
    gateway: RunningGateway, pg: EphemeralCluster, bystander: psycopg.Connection
) -> None:
    app = _app()
    with connect(gateway, application_name=app) as conn, ThreadPoolExecutor(1) as pool:
        running = pool.submit(conn.execute, "SELECT pg_sleep(10)")
        _terminate_when_running(pg, app)
        with pytest.raises(psycopg.OperationalError) as failure:
            running.result(timeout=5)
        assert failure.value.sqlstate in ("57P01", "08006"), failure.value
        assert conn.closed
    assert_alive(bystander)
    assert_serves(gateway)


def test_wrong_upstream_password_is_hidden_from_the_client(make_gateway: MakeGateway) -> None:
    gw = make_gateway(upstream={"password": "wrong"})
    with RawClient.to(gw) as client:
        client.startup("alice")
        assert (auth := client.read_message()) is not None and auth.mtype == b"R"
        client.password(token_for("alice"))
        error = client.expect_fatal()
    assert error.sqlstate == "08004", error.fields
    assert "could not authenticate to the upstream" in error.text
    assert "qw_scram" not in str(error.fields)
    assert "wrong" not in str(error.fields)
    with pytest.raises(psycopg.OperationalError) as failure:
        connect(gw)
    assert "qw_scram" not in str(failure.value)


@pytest.fixture(scope="module")
def foreign_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA certificate that did not sign the upstream's certificate."""
    cert, _ = write_self_signed(tmp_path_factory.mktemp("foreign-ca"), "ca", hostname="localhost")
    return cert


def _upstream_ca(pg: EphemeralCluster) -> str:
    return str(pg.datadir / "server.crt")  # the cluster's self-signed (CA) certificate


@pytest.mark.parametrize(
    ("upstream", "expect_ssl"),
    [
        pytest.param({"user": "qw_scram", "sslmode": "disable"}, False, id="scram-disable"),
        pytest.param({"user": "qw_scram", "sslmode": "prefer"}, True, id="scram-prefer"),
        pytest.param({"user": "qw_scram", "sslmode": "require"}, True, id="scram-require"),
        pytest.param({"user": "qw_scram", "sslmode": "verify-ca"}, True, id="scram-verify-ca"),
        pytest.param({"user": "qw_scram", "sslmode": "verify-full"}, True, id="scram-verify-full"),
        pytest.param({"user": "qw_md5"}, True, id="md5"),
        pytest.param({"user": "qw_md5", "sslmode": "disable"}, False, id="md5-disable"),
        pytest.param({"user": "qw_clear"}, True, id="cleartext"),
        pytest.param({"user": "qw_trust", "password": None}, True, id="trust-no-password"),
    ],
)
def test_upstream_auth_methods_that_work(
    make_gateway: MakeGateway, pg: EphemeralCluster, upstream: dict[str, Any], expect_ssl: bool
) -> None:
    if upstream.get("sslmode", "").startswith("verify"):
        upstream = {**upstream, "sslrootcert": _upstream_ca(pg)}
    gw = make_gateway(upstream=upstream)
    with connect(gw) as conn:
        row = conn.execute(
            "SELECT current_user, session_user, "
            "(SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())"
        ).fetchone()
    assert row == (upstream["user"], upstream["user"], expect_ssl)


@pytest.mark.parametrize(
    ("upstream", "sqlstate", "text"),
    [
        pytest.param(
            {"sslmode": "verify-ca", "sslrootcert": "FOREIGN"},
            "08006",
            "certificate verify failed",
            id="verify-ca-wrong-ca",
        ),
        pytest.param(
            {"sslmode": "verify-full", "sslrootcert": "FOREIGN"},
            "08006",
            "certificate verify failed",
            id="verify-full-wrong-ca",
        ),
        pytest.param(
            {"user": "qw_md5", "password": None}, "08004", "none is configured", id="md5-no-pw"
        ),
        pytest.param(
            {"user": "qw_scram", "password": None}, "08004", "none is configured", id="scram-no-pw"
        ),
        pytest.param(
            {"user": "qw_clear", "password": "wrong"},
            "08004",
            "could not authenticate to the upstream",
            id="cleartext-wrong-pw",
        ),
        pytest.param(
            {"user": "qw_md5", "password": "wrong"},
            "08004",
            "could not authenticate to the upstream",
            id="md5-wrong-pw",
        ),
    ],
)
def test_upstream_auth_failures(
    make_gateway: MakeGateway,
    foreign_ca: Path,
    upstream: dict[str, Any],
    sqlstate: str,
    text: str,
) -> None:
    if upstream.get("sslrootcert") == "FOREIGN":
        upstream = {**upstream, "sslrootcert": str(foreign_ca)}
    gw = make_gateway(upstream=upstream)
    with RawClient.to(gw) as client:
        client.startup("alice")
        assert (auth := client.read_message()) is not None and auth.mtype == b"R"
        client.password(token_for("alice"))
        error = client.expect_fatal()
    assert error.sqlstate == sqlstate, error.fields
    assert text in error.text
    assert ROLE_PASSWORD not in str(error.fields)


# --- load and limits ---------------------------------------------------------------------


def test_many_concurrent_sessions(make_gateway: MakeGateway) -> None:
    sessions = 50
    gw = make_gateway()
    assert gw.connection_count == 0
    all_connected = threading.Barrier(sessions + 1, timeout=30)
    release = threading.Event()

    def session(i: int) -> tuple[int, int]:
        try:
            with connect(gw, connect_timeout=20) as conn:
                row = conn.execute("SELECT %s::int * 2, pg_backend_pid()", [i]).fetchone()
                assert row is not None
                all_connected.wait()
                assert release.wait(30)
                assert_alive(conn)
                return row[0], row[1]
        except BaseException:
            all_connected.abort()
            raise

    with ThreadPoolExecutor(sessions) as pool:
        futures = [pool.submit(session, i) for i in range(sessions)]
        try:
            all_connected.wait()
            peak = gw.connection_count  # all 50 are connected at this moment
        except threading.BrokenBarrierError:
            peak = -1  # a session failed: its own error surfaces from its future below
        finally:
            release.set()
        results = [f.result(timeout=60) for f in futures]
    assert peak == sessions
    assert [r[0] for r in results] == [2 * i for i in range(sessions)]
    assert len({r[1] for r in results}) == sessions  # one upstream backend per session
    wait_until(lambda: gw.connection_count == 0, timeout=10, what="the count back to 0")
    assert_serves(gw)


def test_max_connections(make_gateway: MakeGateway) -> None:
    gw = make_gateway(limits={"maxConnections": 2})
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(connect(gw))
        second = stack.enter_context(connect(gw))
        assert gw.connection_count == 2
        with RawClient.to(gw) as client:
            client.startup("alice")
            error = client.expect_fatal()
        assert error.sqlstate == "53300", error.fields
        assert "too many clients" in error.text
        # libpq (sslmode=prefer, the default) must be told why, not "error during SSL".
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            connect(gw)
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            connect(gw, sslmode="disable")
        assert_alive(first)
        assert_alive(second)
        assert gw.connection_count == 2  # the refused ones never counted
        second.close()
        wait_until(lambda: gw.connection_count == 1, timeout=5, what="a slot to free up")
        assert_serves(gw)
        assert_alive(first)


# --- shutting the gateway down ------------------------------------------------------------


def test_gateway_close_ends_every_session_before_returning(pg: EphemeralCluster) -> None:
    """Gateway.close() must not return while sessions still hold sockets.

    Otherwise the process's event loop closes under half-closed sockets: clients may never
    get the 57P01 message, upstream TLS connections are cut without close_notify, and
    uvloop fails with "Event loop is closed" / EBUSY.
    """
    running = start_gateway(gateway_settings(pg))
    app = _app()
    clients = [RawClient.to(running) for _ in range(3)]
    try:
        for client in clients:
            client.login("alice", application_name=app)
        assert backends_named(pg, app) == 3

        async def close_and_look() -> list[tuple[bool, bool]]:
            sessions = list(running.gateway.connections)
            await running.gateway.close()
            return [(s.closed, s.upstream is not None and s.upstream.closed) for s in sessions]

        states = running.call(close_and_look())
        for client in clients:
            errors = [m for m in client.read_to_close() if m.mtype == b"E"]
            assert [e.sqlstate for e in errors] == ["57P01"], [e.fields for e in errors]
            assert "shutting down" in errors[0].text
        assert states == [(True, True)] * 3, "close() returned before the sessions were closed"
        wait_until(lambda: backends_named(pg, app) == 0, timeout=10, what="upstream backends")
    finally:
        for client in clients:
            client.close()
        # Let the closes finish before the loop is stopped, whatever happened above.
        running.call(asyncio.sleep(0.5))
        running.stop()
