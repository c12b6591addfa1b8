"""A tiny raw-socket PostgreSQL client for the bad-input and robustness tests.

It speaks just enough of the protocol (built on querywarden.codec's encoders) to send
arbitrary bytes, malformed messages and odd start-up packets, and to read back exactly
what the gateway answered, message by message. Every read is bounded by a socket timeout,
so a gateway that hangs fails the test instead of stalling it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from gateway_harness import RunningGateway, token_for
from querywarden import codec
from querywarden.devcluster import DATABASE, EphemeralCluster
from querywarden.server import ClientConnection

#: How long any single read may wait before the test is failed as a hang.
READ_TIMEOUT = 5.0

GSSENC_REQUEST = codec.INT32.pack(8) + codec.INT32.pack(codec.GSSENC_REQUEST_CODE)


def protocol_version(major: int, minor: int) -> int:
    """The 32-bit protocol version code of a StartupMessage."""
    return (major << 16) | minor


@dataclass(frozen=True)
class Message:
    """One typed backend message: the type byte and the whole frame (header included)."""

    mtype: bytes
    frame: bytes

    @property
    def fields(self) -> dict[str, str]:
        """The fields of an ErrorResponse / NoticeResponse."""
        assert self.mtype in (b"E", b"N"), f"not an error or notice: {self.mtype!r}"
        return codec.decode_fields(self.frame)

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")

    @property
    def text(self) -> str:
        return self.fields.get("M", "")


class RawClient:
    """A blocking socket to the gateway with PostgreSQL framing helpers."""

    def __init__(self, host: str, port: int, *, timeout: float = READ_TIMEOUT) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buf = bytearray()
        self.eof = False

    @classmethod
    def to(cls, gateway: RunningGateway, *, timeout: float = READ_TIMEOUT) -> RawClient:
        return cls(gateway.host, gateway.port, timeout=timeout)

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # sending ----------------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        """Send everything; False if the gateway closed the connection under us.

        The gateway may refuse a message as soon as its header arrives and close while we
        are still sending the rest; what it answered is still waiting to be read.
        """
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def shutdown_write(self) -> None:
        """Half-close: tell the gateway we will send nothing more."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def startup(self, user: str, *, database: str = DATABASE, **params: str) -> None:
        self.send(codec.startup_message({"user": user, "database": database, **params}))

    def password(self, secret: bytes | str) -> None:
        if isinstance(secret, str):
            secret = secret.encode()
        self.send(codec.password_message(secret + b"\0"))

    # reading ----------------------------------------------------------------------

    def _fill(self) -> bool:
        """Read more bytes; False at end of stream (a close, or a reset after the data)."""
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self._buf += chunk
        return True

    def read_byte(self) -> bytes:
        """One untyped byte (the answer to SSLRequest / GSSENCRequest); b'' at EOF."""
        while not self._buf:
            if not self._fill():
                return b""
        byte = bytes(self._buf[:1])
        del self._buf[:1]
        return byte

    def read_message(self) -> Message | None:
        """The next typed message, or None if the gateway closed the connection.

        Raises socket.timeout (TimeoutError) if nothing arrives in time: a hang.
        """
        while True:
            if len(self._buf) >= 5:
                mtype, length = codec.TYPE_AND_LENGTH.unpack_from(self._buf, 0)
                assert length >= 4, f"gateway sent an invalid length {length}"
                if len(self._buf) >= length + 1:
                    frame = bytes(self._buf[: length + 1])
                    del self._buf[: length + 1]
                    return Message(bytes([mtype]), frame)
            if not self._fill():
                assert not self._buf, f"connection closed inside a message: {bytes(self._buf)!r}"
                return None

    def read_until(self, *types: bytes) -> list[Message]:
        """Messages up to and including the first of ``types`` (or an ErrorResponse)."""
        out: list[Message] = []
        while True:
            msg = self.read_message()
            assert msg is not None, f"closed before {types!r}; got {[m.mtype for m in out]}"
            out.append(msg)
            if msg.mtype in types or msg.mtype == b"E":
                return out

    def read_to_close(self) -> list[Message]:
        """Every message until the gateway closes the connection."""
        out: list[Message] = []
        while (msg := self.read_message()) is not None:
            out.append(msg)
        return out

    def expect_fatal(self) -> Message:
        """Read to the close; exactly one ErrorResponse must have come, and it is returned."""
        messages = self.read_to_close()
        errors = [m for m in messages if m.mtype == b"E"]
        assert errors, f"expected an ErrorResponse, got {[m.mtype for m in messages]}"
        return errors[0]

    # whole exchanges --------------------------------------------------------------

    def login(
        self, user: str = "alice", password: str | None = None, **params: str
    ) -> list[Message]:
        """Start up and authenticate; return everything up to the first ReadyForQuery."""
        self.startup(user, **params)
        auth = self.read_message()
        assert auth is not None and auth.mtype == b"R", auth
        assert codec.decode_authentication(auth.frame)[0] == codec.AUTH_CLEARTEXT_PASSWORD
        self.password(password if password is not None else token_for(user))
        messages = self.read_until(b"Z")
        assert messages[-1].mtype == b"Z", [m.fields for m in messages if m.mtype == b"E"]
        return [auth, *messages]

    def simple_query(self, sql: str) -> list[Message]:
        """Run a simple Query; everything up to ReadyForQuery."""
        self.send(codec.query(sql))
        out: list[Message] = []
        while True:
            msg = self.read_message()
            assert msg is not None, f"closed during the query; got {[m.mtype for m in out]}"
            out.append(msg)
            if msg.mtype == b"Z":
                return out


def data_rows(messages: list[Message]) -> list[list[str | None]]:
    """Decode the text-format DataRows of a simple query's answer."""
    rows: list[list[str | None]] = []
    for msg in messages:
        if msg.mtype != b"D":
            continue
        frame = msg.frame
        (count,) = codec.INT16.unpack_from(frame, 5)
        pos = 7
        row: list[str | None] = []
        for _ in range(count):
            (size,) = codec.INT32.unpack_from(frame, pos)
            pos += 4
            if size < 0:
                row.append(None)
            else:
                row.append(frame[pos : pos + size].decode())
                pos += size
        rows.append(row)
    return rows


def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def connect(gateway: RunningGateway, user: str = "alice", **params: Any) -> psycopg.Connection:
    """A psycopg connection through the gateway, bounded in time."""
    params.setdefault("connect_timeout", 5)
    return psycopg.connect(gateway.dsn(user, **params), autocommit=True)


def assert_serves(gateway: RunningGateway) -> None:
    """A fresh psycopg connection through the gateway runs a query."""
    with connect(gateway) as conn:
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)


def assert_alive(conn: psycopg.Connection) -> None:
    """An already open connection still answers."""
    assert conn.execute("SELECT 'still here'").fetchone() == ("still here",)


def backends_named(pg: EphemeralCluster, application_name: str) -> int:
    """Upstream backends with this application_name, seen directly in pg_stat_activity."""
    out = pg.psql(
        "SELECT count(*) FROM pg_stat_activity "
        f"WHERE application_name = '{application_name}' AND backend_type = 'client backend'"
    )
    return int(out)


def open_sessions(running: RunningGateway) -> int:
    """Sessions of this gateway that still hold their client or their upstream socket.

    A session leaves ``gateway.connections`` as soon as its client is gone, but its
    upstream socket (a TLS one needs a close_notify exchange) may still be closing; this
    looks at every ClientConnection object, on the gateway's own loop.
    """
    gateway = running.gateway

    async def count() -> int:
        found = 0
        for obj in gc.get_objects():
            if isinstance(obj, ClientConnection) and obj.gateway is gateway:
                upstream = obj.upstream
                if not obj.closed or (upstream is not None and not upstream.closed):
                    found += 1
        return found

    return running.call(count())


def wait_for_released_sessions(started: list[RunningGateway]) -> None:
    """Every session the test ended must have released its client and upstream sockets."""
    for running in started:
        wait_until(
            lambda running=running: open_sessions(running) == 0,  # type: ignore[misc]
            timeout=5,
            what="every ended session to release its sockets",
        )


def gateway_errors(records: list[logging.LogRecord]) -> list[str]:
    """ERROR (or worse) records from the gateway or its event loop: a crash, not a refusal."""
    return [
        f"{r.name}: {r.getMessage()}"
        for r in records
        if r.levelno >= logging.ERROR and r.name.split(".")[0] in ("querywarden", "asyncio")
    ]
