"""A minimal blocking PostgreSQL client over a raw socket, for exact protocol checks.

Real drivers hide the message sequence; these tests need to see every message the
gateway sends (ErrorResponse, then exactly one ReadyForQuery per Sync, with the right
transaction status).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from querywarden import codec


@dataclass
class Msg:
    """One backend message."""

    type: str
    frame: bytes

    @property
    def fields(self) -> dict[str, str]:
        return codec.decode_fields(self.frame)

    @property
    def status(self) -> str:
        return self.frame[5:6].decode()


class WireClient:
    """Connects through the gateway with the cleartext password it asks for."""

    def __init__(self, host: str, port: int, user: str, password: str, database: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=15)
        self.buf = b""
        self.sock.sendall(codec.startup_message({"user": user, "database": database}))
        self.startup: list[Msg] = []
        while True:
            msg = self.recv()
            if msg.type == "R" and codec.decode_authentication(msg.frame)[0] == 3:
                self.send(codec.password_message(codec.cstr(password)))
                continue
            self.startup.append(msg)
            if msg.type in ("Z", "E"):
                break

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def recv(self) -> Msg:
        while True:
            if len(self.buf) >= 5:
                length = int.from_bytes(self.buf[1:5], "big")
                if len(self.buf) >= length + 1:
                    frame, self.buf = self.buf[: length + 1], self.buf[length + 1 :]
                    return Msg(chr(frame[0]), frame)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk

    def until_ready(self) -> list[Msg]:
        """Messages up to and including the next ReadyForQuery."""
        out = []
        while True:
            msg = self.recv()
            out.append(msg)
            if msg.type == "Z":
                return out

    def close(self) -> None:
        try:
            self.sock.sendall(codec.TERMINATE)
        finally:
            self.sock.close()


def bind(portal: str = "", statement: str = "") -> bytes:
    """Bind with no parameters and default (text) result formats."""
    return codec.message(b"B", codec.cstr(portal) + codec.cstr(statement) + b"\0\0\0\0\0\0")


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return codec.message(b"E", codec.cstr(portal) + max_rows.to_bytes(4, "big"))


def describe(kind: str, name: str = "") -> bytes:
    return codec.message(b"D", kind.encode() + codec.cstr(name))


SYNC = codec.message(b"S")
FLUSH = codec.message(b"H")


def types(messages: list[Msg]) -> str:
    return "".join(m.type for m in messages)
