"""Bad input through a real gateway: garbage, odd start-ups, bad credentials, broken frames.

Every test speaks to a real gateway in front of the real ephemeral PostgreSQL, mostly
with the raw-socket client (so it can send what no driver would, and read the exact
SQLSTATE back), and checks that the gateway answers cleanly and keeps serving.
"""

from __future__ import annotations

import asyncio
import gc
import random
import socket
import ssl
import struct
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from gateway_harness import RunningGateway, token_for
from querywarden import codec
from querywarden.devcluster import EphemeralCluster
from querywarden.identity import MAX_SECRET_BYTES
from querywarden.tlsutil import write_self_signed
from raw_client import (
    GSSENC_REQUEST,
    RawClient,
    assert_alive,
    assert_serves,
    backends_named,
    connect,
    data_rows,
    gateway_errors,
    protocol_version,
    wait_until,
)
from robustness_fixtures import MakeGateway, bystander, make_gateway, no_gateway_crash  # noqa: F401


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for the gateway (valid for localhost and 127.0.0.1)."""
    return write_self_signed(tmp_path, "gateway", hostname="localhost")


def _tls(files: tuple[Path, Path]) -> dict[str, str]:
    return {"certFile": str(files[0]), "keyFile": str(files[1])}


# --- garbage before start-up -------------------------------------------------------------


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", "length", id="http-request"),
        pytest.param(codec.INT32.pack(4) + b"\0\0\0\0", "length", id="length-4"),
        pytest.param(codec.INT32.pack(0), "length", id="length-0"),
        pytest.param(codec.INT32.pack(7) + b"\0\3\0", "length", id="length-7"),
        pytest.param(codec.INT32.pack(10001) + b"\0\3\0\0", "length", id="length-10001"),
        pytest.param(codec.UINT32.pack(0xFFFFFFFF) + b"\0" * 8, "length", id="length-4G"),
        pytest.param(
            codec.INT32.pack(16) + codec.INT32.pack(12345678) + b"\0" * 8,
            "unsupported frontend protocol",
            id="unknown-request-code",
        ),
        pytest.param(
            codec.startup_message({"database": "app"}), "no PostgreSQL user name", id="no-user"
        ),
        pytest.param(
            codec.INT32.pack(17) + codec.INT32.pack(codec.PROTOCOL_3_0) + b"user\0alice",
            "NUL-terminated",
            id="startup-not-nul-terminated",
        ),
    ],
)
def test_garbage_before_startup_is_refused(
    make_gateway: MakeGateway, garbage: bytes, reason: str
) -> None:
    gw = make_gateway()
    with RawClient.to(gw) as client:
        client.send(garbage)
        error = client.expect_fatal()
    assert error.sqlstate == "08P01", error.fields
    assert error.fields["S"] == "FATAL"
    assert reason in error.text
    wait_until(lambda: gw.connection_count == 0, timeout=5, what="the connection to be dropped")
    assert_serves(gw)


def test_a_terminate_before_startup_is_closed_silently_as_postgresql_does(
    make_gateway: MakeGateway, pg: EphemeralCluster
) -> None:
    # node-postgres ends a client that has not started up yet by sending Terminate first.
    # PostgreSQL hangs up without a word; an ErrorResponse would reach the client as an
    # unhandled error. Other bad first packets still get a FATAL (above).
    gw = make_gateway()
    for address in ((gw.host, gw.port), ("127.0.0.1", pg.port)):
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(codec.TERMINATE)
            received = b""
            while chunk := sock.recv(4096):
                received += chunk
        assert received == b"", (address, received)
    wait_until(lambda: gw.connection_count == 0, timeout=5, what="the connection to be dropped")
    assert_serves(gw)


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_before_startup(make_gateway: MakeGateway, seed: int) -> None:
    """Random bytes then end of input: an 08P01 error or a clean close, never a hang."""
    gw = make_gateway()
    garbage = random.Random(seed).randbytes(300)
    with RawClient.to(gw) as client:
        client.send(garbage)
        client.shutdown_write()
        messages = client.read_to_close()
    assert len(messages) <= 1, [m.mtype for m in messages]
    if messages:
        assert messages[0].mtype == b"E"
        assert messages[0].sqlstate == "08P01", messages[0].fields
    wait_until(lambda: gw.connection_count == 0, timeout=5, what="the connection to be dropped")
    assert_serves(gw)


def test_truncated_startup_then_close(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    packet = codec.startup_message({"user": "alice", "database": "app"})
    with RawClient.to(gw) as client:
        client.send(packet[: len(packet) // 2])
        wait_until(lambda: gw.connection_count == 1, timeout=5, what="the gateway to see us")
        client.shutdown_write()
        assert client.read_to_close() == []  # a clean close: nothing to answer
    # And a client that vanishes outright (no half-close) mid-packet.
    with RawClient.to(gw) as client:
        client.send(packet[:6])
    wait_until(lambda: gw.connection_count == 0, timeout=5, what="both connections dropped")
    assert_serves(gw)


def test_silent_client_after_connect_is_closed_by_startup_timeout(
    make_gateway: MakeGateway,
) -> None:
    gw = make_gateway(limits={"startupTimeout": "1s"})
    started = time.monotonic()
    with RawClient.to(gw) as client:
        error = client.expect_fatal()
    elapsed = time.monotonic() - started
    assert error.sqlstate == "08006", error.fields
    assert "timed out" in error.text
    assert 0.8 <= elapsed < 4, elapsed


# --- protocol versions -------------------------------------------------------------------


# (1234.5678, .5679 and .5680 are the request codes: cancel, SSL and GSS encryption.)
@pytest.mark.parametrize(("major", "minor"), [(2, 0), (1, 0), (4, 0), (1234, 5677)])
def test_unsupported_protocol_version(make_gateway: MakeGateway, major: int, minor: int) -> None:
    gw = make_gateway()
    with RawClient.to(gw) as client:
        client.send(
            codec.startup_message(
                {"user": "alice", "database": "app"}, version=protocol_version(major, minor)
            )
        )
        error = client.expect_fatal()
    assert error.sqlstate == "08P01", error.fields
    assert f"unsupported frontend protocol {major}.{minor}" in error.text
    assert "3.0" in error.text
    assert_serves(gw)


def _negotiation(msg: bytes) -> tuple[int, list[str]]:
    newest = codec.INT32.unpack_from(msg, 5)[0]
    count = codec.INT32.unpack_from(msg, 9)[0]
    names = msg[13:].split(b"\0")[:count]
    return newest, [n.decode() for n in names]


def _server_negotiation(pg: EphemeralCluster, startup: bytes) -> bytes:
    """What PostgreSQL itself answers to this StartupMessage (as a trust role)."""
    with RawClient("127.0.0.1", pg.port) as direct:
        direct.send(startup)
        answer = direct.read_message()
    assert answer is not None and answer.mtype == b"v", answer
    return answer.frame


@pytest.mark.parametrize(
    ("minor", "options"),
    [
        pytest.param(2, {"_pq_.something": "on"}, id="3.2-with-option"),
        pytest.param(2, {}, id="3.2"),
        pytest.param(0, {"_pq_.something": "on", "_pq_.other": "x"}, id="3.0-with-options"),
    ],
)
def test_newer_protocol_is_negotiated_down(
    gateway: RunningGateway, pg: EphemeralCluster, minor: int, options: dict[str, str]
) -> None:
    startup = {"database": "app", **options}
    version = protocol_version(3, minor)
    with RawClient.to(gateway) as client:
        client.send(codec.startup_message({"user": "alice", **startup}, version=version))
        negotiate = client.read_message()
        assert negotiate is not None and negotiate.mtype == b"v", negotiate
        # NegotiateProtocolVersion names the newest version the server speaks, as PostgreSQL
        # sends it (the whole version code, 3.0 = 196608), and every option it ignored.
        direct = _server_negotiation(
            pg, codec.startup_message({"user": "qw_trust", **startup}, version=version)
        )
        assert _negotiation(negotiate.frame) == (codec.PROTOCOL_3_0, list(options))
        assert negotiate.frame == direct
        auth = client.read_message()
        assert auth is not None and auth.mtype == b"R"
        assert codec.decode_authentication(auth.frame)[0] == codec.AUTH_CLEARTEXT_PASSWORD
        client.password(token_for("alice"))
        messages = client.read_until(b"Z")
        types = [m.mtype for m in messages]
        assert types[0] == b"R" and types[-1] == b"Z" and b"E" not in types, types
        assert codec.decode_authentication(messages[0].frame)[0] == codec.AUTH_OK
        (key,) = [m for m in messages if m.mtype == b"K"]
        assert len(key.frame) == 13  # a protocol 3.0 key: 4-byte pid, 4-byte secret
        answer = client.simple_query("SELECT current_setting('server_version_num')::int > 0")
        assert data_rows(answer) == [["t"]]
        client.send(codec.TERMINATE)
        assert client.read_to_close() == []


def test_libpq_asking_for_the_latest_protocol_gets_3_0(gateway: RunningGateway) -> None:
    if psycopg.pq.version() < 180000:
        pytest.fail("this test needs libpq 18 (max_protocol_version); psycopg[binary] has it")
    with connect(gateway, max_protocol_version="latest") as conn:
        assert conn.pgconn.full_protocol_version == 30000
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --- encryption requests -----------------------------------------------------------------


def test_gssenc_request_is_refused_and_startup_continues(gateway: RunningGateway) -> None:
    with RawClient.to(gateway) as client:
        client.send(GSSENC_REQUEST)
        assert client.read_byte() == b"N"
        client.login("alice")
        assert data_rows(client.simple_query("SELECT current_user")) == [["qw_scram"]]


def test_ssl_request_refused_without_tls(gateway: RunningGateway) -> None:
    with RawClient.to(gateway) as client:
        client.send(codec.ssl_request())
        assert client.read_byte() == b"N"
        client.login("alice")
        assert data_rows(client.simple_query("SELECT 7")) == [["7"]]
    with connect(gateway, sslmode="prefer") as conn:
        assert conn.pgconn.ssl_in_use is False
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        connect(gateway, sslmode="require")


def test_tls_is_offered_when_configured(
    make_gateway: MakeGateway, tls_files: tuple[Path, Path]
) -> None:
    gw = make_gateway(tls=_tls(tls_files))
    with connect(gw, sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use is True
        assert conn.execute("SELECT current_user").fetchone() == ("qw_scram",)
    # The certificate verifies for the address the client dialled.
    with connect(gw, sslmode="verify-full", sslrootcert=str(tls_files[0])) as conn:
        assert conn.pgconn.ssl_in_use is True
        assert_alive(conn)


@pytest.mark.parametrize("how", ["close", "reset", "not-tls"])
def test_client_abandoning_the_tls_handshake(
    make_gateway: MakeGateway,
    tls_files: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    """SSLRequest answered 'S', then the client hangs up or speaks plaintext instead of TLS.

    A port scanner or a load balancer's health check does exactly this; the gateway must
    drop the connection quietly, not crash the session's task (an ERROR in its log).
    """
    gw = make_gateway(tls=_tls(tls_files), limits={"maxConnections": 2})
    for _ in range(3):  # more than maxConnections: nothing may leak a slot
        with RawClient.to(gw) as client:
            client.send(codec.ssl_request())
            assert client.read_byte() == b"S"
            if how == "reset":
                client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif how == "not-tls":
                client.send(codec.startup_message({"user": "alice", "database": "app"}))
                client.read_to_close()
        wait_until(lambda: gw.connection_count == 0, timeout=5, what="the connection to drop")
    gw.call(asyncio.sleep(0.1))
    gc.collect()  # a task that died with an exception logs it when it is collected
    try:
        assert not gateway_errors(caplog.get_records("call"))
    finally:
        caplog.clear()  # reported here; no need for no_gateway_crash to say it again
    assert_serves(gw)


def test_plaintext_never_refuses_clients_without_tls(
    make_gateway: MakeGateway, tls_files: tuple[Path, Path]
) -> None:
    gw = make_gateway(listen={"plaintext": "never"}, tls=_tls(tls_files))
    with RawClient.to(gw) as client:
        client.startup("alice")
        error = client.expect_fatal()
    assert error.sqlstate == "28000", error.fields
    assert "TLS" in error.text
    with pytest.raises(psycopg.OperationalError, match="TLS"):
        connect(gw, sslmode="disable")
    with connect(gw, sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use is True
        assert_alive(conn)


@pytest.mark.parametrize("with_tls", [True, False], ids=["tls", "no-tls"])
def test_bytes_pipelined_after_ssl_request_are_refused(
    make_gateway: MakeGateway, tls_files: tuple[Path, Path], with_tls: bool
) -> None:
    """CVE-2021-23214: plaintext sent before the answer to SSLRequest could be injected."""
    gw = make_gateway(tls=_tls(tls_files)) if with_tls else make_gateway()
    with RawClient.to(gw) as client:
        client.send(codec.ssl_request() + codec.startup_message({"user": "alice"}))
        error = client.expect_fatal()
    assert error.sqlstate == "08P01", error.fields
    assert "unencrypted data" in error.text
    assert_serves(gw)


def test_second_ssl_request_inside_tls_is_refused(
    make_gateway: MakeGateway, tls_files: tuple[Path, Path]
) -> None:
    gw = make_gateway(tls=_tls(tls_files))
    with RawClient.to(gw) as client:
        client.send(codec.ssl_request())
        assert client.read_byte() == b"S"
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
        client.send(codec.ssl_request())
        error = client.expect_fatal()
    assert error.sqlstate == "08P01", error.fields
    assert "already uses TLS" in error.text


def test_cancel_request_with_an_unknown_key_is_ignored(
    gateway: RunningGateway, bystander: psycopg.Connection
) -> None:
    with RawClient.to(gateway) as client:
        client.send(codec.cancel_request(12345, b"\x01\x02\x03\x04"))
        assert client.read_to_close() == []  # closed without an answer, like PostgreSQL
    assert_alive(bystander)


def test_truncated_cancel_request_is_refused(gateway: RunningGateway) -> None:
    with RawClient.to(gateway) as client:
        client.send(codec.INT32.pack(12) + codec.INT32.pack(codec.CANCEL_REQUEST_CODE) + b"1234")
        error = client.expect_fatal()
    assert error.sqlstate == "08P01", error.fields
    assert "CancelRequest is truncated" in error.text


# --- client authentication ---------------------------------------------------------------


def _refused_login(gw: RunningGateway, user: str, password: bytes) -> tuple[RawClient, float]:
    client = RawClient.to(gw)
    started = time.monotonic()
    client.startup(user)
    auth = client.read_message()
    assert auth is not None and auth.mtype == b"R"
    client.send(codec.password_message(password + b"\0"))
    return client, started


@pytest.mark.parametrize(
    ("user", "password", "reason"),
    [
        ("alice", b"not-a-token", "malformed token"),
        ("mallory", b"alice-pw", "malformed token"),
        ("alice", b"e30.e30.e30", "malformed token"),
    ],
    ids=["garbage", "a-static-password", "empty-jwt"],
)
def test_bad_credentials_are_refused(
    gateway: RunningGateway, user: str, password: bytes, reason: str
) -> None:
    client, _ = _refused_login(gateway, user, password)
    with client:
        error = client.expect_fatal()
    assert error.sqlstate == "28P01", error.fields
    assert reason in error.text
    assert password.decode() not in str(error.fields)


def test_bad_credentials_through_libpq(gateway: RunningGateway) -> None:
    with pytest.raises(psycopg.OperationalError, match="malformed token"):
        psycopg.connect(gateway.dsn("alice", password="nope", connect_timeout=5))
    with pytest.raises(psycopg.OperationalError, match="malformed token"):
        psycopg.connect(gateway.dsn("eve", connect_timeout=5))
    assert_serves(gateway)


def test_empty_password_is_refused(gateway: RunningGateway) -> None:
    client, _ = _refused_login(gateway, "alice", b"")
    with client:
        error = client.expect_fatal()
    assert error.sqlstate == "28P01", error.fields
    assert "empty password" in error.text


def test_huge_password_is_refused_quickly(gateway: RunningGateway) -> None:
    client, started = _refused_login(gateway, "alice", b"A" * (1024 * 1024))
    with client:
        error = client.expect_fatal()
    assert time.monotonic() - started < 3
    assert error.sqlstate in ("28000", "28P01"), error.fields
    assert "over the limit" in error.text
    assert str(MAX_SECRET_BYTES) in error.text
    assert "AAAA" not in str(error.fields)
    assert_serves(gateway)


def test_password_message_of_the_wrong_type_is_refused(gateway: RunningGateway) -> None:
    with RawClient.to(gateway) as client:
        client.startup("alice")
        assert (auth := client.read_message()) is not None and auth.mtype == b"R"
        client.send(codec.query("SELECT 1"))
        error = client.expect_fatal()
    assert error.sqlstate == "08P01", error.fields
    assert "expected a password message" in error.text


def test_client_that_never_sends_the_password_times_out(make_gateway: MakeGateway) -> None:
    gw = make_gateway(limits={"startupTimeout": "1s"})
    with RawClient.to(gw) as client:
        client.startup("alice")
        auth = client.read_message()
        assert auth is not None and auth.mtype == b"R"
        started = time.monotonic()
        error = client.expect_fatal()
    elapsed = time.monotonic() - started
    assert error.sqlstate == "08006", error.fields
    assert error.fields["S"] == "FATAL"
    assert "timed out" in error.text
    assert 0.5 <= elapsed < 4, elapsed
    wait_until(lambda: gw.connection_count == 0, timeout=5, what="the session to be dropped")
    assert_serves(gw)


# --- malformed typed messages after authentication ---------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(b"Q" + codec.INT32.pack(3), "invalid message length 3", id="length-3"),
        pytest.param(b"Q" + codec.INT32.pack(0), "invalid message length 0", id="length-0"),
        pytest.param(codec.message(b"?", b"SELECT 1\0"), "message type", id="unknown-type"),
        pytest.param(codec.message(b"\0"), "message type", id="type-nul"),
        pytest.param(codec.message(b"p", b"a-token\0"), "message type", id="late-password"),
        pytest.param(codec.message(b"Q", b"SELECT 1"), "NUL-terminated", id="query-no-nul"),
        pytest.param(codec.message(b"P", b"\0SELECT 1\0\0\5"), "parameter", id="parse-bad-types"),
        pytest.param(codec.message(b"P", b"\0SELECT 1\0"), "truncated", id="parse-truncated"),
        pytest.param(codec.message(b"B", b"portal"), "NUL-terminated", id="bind-no-nul"),
        pytest.param(codec.message(b"D", b"X\0"), "'S' or 'P'", id="describe-bad-kind"),
        pytest.param(codec.message(b"F", b"\0\0"), "truncated", id="function-call-truncated"),
    ],
)
def test_malformed_message_ends_only_that_session(
    gateway: RunningGateway,
    pg: EphemeralCluster,
    bystander: psycopg.Connection,
    payload: bytes,
    reason: str,
) -> None:
    app = f"qw-malformed-{uuid.uuid4().hex[:8]}"
    with RawClient.to(gateway) as client:
        client.login("alice", application_name=app)
        client.send(payload)
        messages = client.read_to_close()
    errors = [m for m in messages if m.mtype == b"E"]
    assert len(errors) == 1, [m.mtype for m in messages]
    assert errors[0].sqlstate == "08P01", errors[0].fields
    assert errors[0].fields["S"] == "FATAL"
    assert reason.lower() in errors[0].text.lower()
    assert_alive(bystander)
    wait_until(
        lambda: backends_named(pg, app) == 0,
        timeout=10,
        what="the session's upstream backend to end",
    )
    assert_serves(gateway)


def test_message_over_the_limit_is_refused(make_gateway: MakeGateway) -> None:
    gw = make_gateway(limits={"maxClientMessage": 65536})
    with connect(gw) as other:
        with RawClient.to(gw) as client:
            client.login("alice")
            # A query just under the limit still runs.
            small = "SELECT length('" + "x" * 60000 + "')"
            assert data_rows(client.simple_query(small)) == [["60000"]]
            big = "SELECT '" + "x" * 100_000 + "'"
            client.send(codec.query(big))
            messages = client.read_to_close()
        errors = [m for m in messages if m.mtype == b"E"]
        assert len(errors) == 1, [m.mtype for m in messages]
        assert errors[0].sqlstate == "54000", errors[0].fields
        assert "65536" in errors[0].text
        assert_alive(other)
    wait_until(lambda: gw.connection_count == 0, timeout=5, what="sessions to end")
    assert_serves(gw)


@pytest.mark.parametrize("encoding", ["LATIN1", "WIN1252"])
def test_query_in_a_non_utf8_client_encoding_is_not_a_protocol_violation(
    gateway: RunningGateway, encoding: str
) -> None:
    """Text in the client's declared encoding is valid input, not a broken frame.

    PostgreSQL accepts a Query in any client_encoding; the gateway must not kill the
    session because the bytes are not UTF-8.
    """
    with connect(gateway, client_encoding=encoding) as conn:
        assert conn.execute("SHOW client_encoding").fetchone() == (encoding,)
        assert conn.execute("SELECT 'caf\u00e9', %s::text", ["na\u00efve"]).fetchone() == (
            "caf\u00e9",
            "na\u00efve",
        )


def test_large_statements_are_collected_and_run_whole(gateway: RunningGateway) -> None:
    """A Query or Parse of megabytes (collected by the read, not joined) runs as sent.

    Text split across reads, multi-byte characters cut by a read, a parameterized Parse,
    and text that is not valid UTF-8 (refused with 22021; the session goes on).
    """
    with connect(gateway) as conn:
        sql = "SELECT length('" + "é" * 2_000_000 + "')"
        assert conn.execute(sql).fetchone() == (2_000_000,)
        sql = "SELECT length(%s::text || '" + "ü" * 1_500_000 + "')"
        assert conn.execute(sql, ["ab"], prepare=True).fetchone() == (1_500_002,)
    with RawClient.to(gateway) as client:
        client.login("alice")
        client.send(codec.message(b"Q", b"SELECT '" + b"\xff" * 2_000_000 + b"'\0"))
        messages = client.read_until(b"Z")
        errors = [m for m in messages if m.mtype == b"E"]
        assert [e.sqlstate for e in errors] == ["22021"], [m.mtype for m in messages]
        if messages[-1].mtype != b"Z":
            messages += client.read_until(b"Z")  # read_until stops at an error too
        assert data_rows(client.simple_query("SELECT 1")) == [["1"]]
