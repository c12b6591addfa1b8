"""The thin I/O shell of ``querywarden mcp``: one wire-protocol connection to the gateway.

Each tool call opens a connection with the caller's own token as the password (the
gateway's only credential), asks for the masking annotation at start-up, runs one
:class:`~querywarden.mcp.wire.Exchange` and closes. Nothing is pooled across calls: a
connection belongs to one identity and one statement, so a token that expires or a
statement that fails leaves nothing behind for the next call.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

from querywarden import codec
from querywarden.endpoint import ConnectionClosed, Endpoint
from querywarden.mcp.wire import Exchange, Outcome
from querywarden.upstream import client_tls_context

#: The largest message accepted from the gateway (a row of text values, an error).
MAX_MESSAGE = 64 * 1024 * 1024
#: Sent at start-up: who is calling, and the masking annotation (docs/mcp.md).
APPLICATION_NAME = "querywarden-mcp"


class GatewayError(Exception):
    """The gateway could not be reached, or refused the connection itself."""

    def __init__(self, message: str, sqlstate: str = "08001", hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.hint = hint


@dataclass(frozen=True, slots=True)
class GatewayAddress:
    """Where the gateway listens, and how to reach it."""

    host: str = "127.0.0.1"
    port: int = 6432
    database: str = "postgres"
    #: ``disable``, ``prefer``, ``require``, ``verify-ca`` or ``verify-full``, as in libpq.
    sslmode: str = "verify-full"
    sslrootcert: Path | None = None
    connect_timeout: float = 10.0

    def describe(self) -> str:
        return f"{self.host}:{self.port}/{self.database}"


class GatewayConnection:
    """An authenticated connection to the gateway, for one statement at a time."""

    def __init__(self, endpoint: Endpoint, address: GatewayAddress) -> None:
        self.endpoint = endpoint
        self.address = address
        self.backend_pid = 0
        self.backend_secret = b""
        self._reader = codec.FrameReader(MAX_MESSAGE)

    @classmethod
    async def open(
        cls,
        address: GatewayAddress,
        user: str,
        token: str,
        application_name: str = APPLICATION_NAME,
    ) -> GatewayConnection:
        """Connect, negotiate TLS, authenticate with ``token``, wait for ReadyForQuery."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(address.connect_timeout):
                _, endpoint = await loop.create_connection(Endpoint, address.host, address.port)
        except (OSError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            raise GatewayError(
                f"could not connect to the querywarden gateway at {address.host}:"
                f"{address.port}: {reason}",
                hint="check that the gateway is running and --gateway names it",
            ) from exc
        connection = cls(endpoint, address)
        try:
            async with asyncio.timeout(address.connect_timeout):
                await connection._handshake(user, token, application_name)
        except TimeoutError as exc:
            endpoint.abort()
            raise GatewayError("the gateway did not complete start-up in time") from exc
        except ConnectionClosed as exc:
            endpoint.abort()
            raise GatewayError(
                "the gateway closed the connection during start-up", sqlstate="08006"
            ) from exc
        except BaseException:
            endpoint.abort()
            raise
        return connection

    async def _handshake(self, user: str, token: str, application_name: str) -> None:
        address = self.address
        endpoint = self.endpoint
        if address.sslmode != "disable":
            endpoint.write(codec.ssl_request())
            answer = await endpoint.read()
            if answer == b"N" and address.sslmode == "prefer":
                pass  # as libpq's prefer: no TLS offered, none used
            elif answer != b"S":
                raise GatewayError(
                    f"the gateway does not offer TLS, which sslmode={address.sslmode} requires",
                    hint="use --sslmode disable only for a gateway on loopback",
                )
            else:
                await endpoint.start_tls(
                    client_tls_context(address.sslmode, address.sslrootcert),
                    server_side=False,
                    server_hostname=address.host,
                )
        endpoint.write(
            codec.startup_message(
                {
                    "user": user,
                    "database": address.database,
                    "application_name": application_name,
                    "querywarden.annotations": "masking,decisions",
                }
            )
        )
        while True:
            mtype, frame = await self._next_frame()
            if mtype == ord("R"):
                code, _ = codec.decode_authentication(frame)
                if code == codec.AUTH_CLEARTEXT_PASSWORD:
                    endpoint.write(codec.password_message(codec.cstr(token)))
                elif code != codec.AUTH_OK:
                    raise GatewayError(
                        f"the gateway asked for an authentication this client does not "
                        f"speak ({code}); is {address.host}:{address.port} a querywarden gateway?"
                    )
            elif mtype == ord("K"):
                self.backend_pid, self.backend_secret = codec.decode_backend_key_data(frame)
            elif mtype == ord("E"):
                fields = codec.decode_fields(frame)
                raise GatewayError(
                    fields.get("M", "the gateway refused the connection"),
                    sqlstate=fields.get("C", "08006"),
                    hint=fields.get("H"),
                )
            elif mtype == ord("Z"):
                return
            # ParameterStatus, NoticeResponse, NegotiateProtocolVersion: nothing to do.

    async def _next_frame(self) -> tuple[int, bytes]:
        reader = self._reader
        while True:
            frame = reader.next_frame()
            if frame is not None:
                return frame
            reader.feed(await self.endpoint.read())

    async def run(self, exchange: Exchange) -> Outcome:
        """Send the exchange's request and read until its ReadyForQuery."""
        self.endpoint.write(exchange.request())
        try:
            while True:
                mtype, frame = await self._next_frame()
                if exchange.receive(mtype, frame):
                    return exchange.outcome
        except ConnectionClosed as exc:
            raise GatewayError(
                "the gateway closed the connection before the statement's answer ended",
                sqlstate="08006",
            ) from exc

    async def cancel(self) -> None:
        """Ask the gateway to cancel the running statement, as libpq's PQcancel does.

        A CancelRequest on a connection of its own; a held statement's review is withdrawn.
        """
        address = self.address
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, TimeoutError, ConnectionClosed):
            async with asyncio.timeout(address.connect_timeout):
                _, endpoint = await loop.create_connection(Endpoint, address.host, address.port)
                try:
                    if address.sslmode != "disable":
                        endpoint.write(codec.ssl_request())
                        answer = await endpoint.read()
                        if answer == b"S":
                            await endpoint.start_tls(
                                client_tls_context(address.sslmode, address.sslrootcert),
                                server_side=False,
                                server_hostname=address.host,
                            )
                        elif address.sslmode != "prefer":
                            return
                    endpoint.write(codec.cancel_request(self.backend_pid, self.backend_secret))
                    await endpoint.wait_closed()
                finally:
                    endpoint.close()

    def close(self) -> None:
        """Send Terminate and close."""
        self.endpoint.write(codec.message(b"X"))
        self.endpoint.close()
