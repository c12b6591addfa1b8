"""One socket, as an asyncio Protocol with two modes.

During a handshake the owner reads with ``await read()``; once the connection is relaying,
the owner installs ``on_data`` and bytes are handed over from ``data_received`` directly,
with no task switch per message. Flow control is passed to the peer through
``on_pause_writing`` / ``on_resume_writing``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import cast

from querywarden.errors import UpstreamError


class ConnectionClosed(Exception):
    """The peer closed the connection (or it failed) while a handshake was reading."""


class Endpoint(asyncio.Protocol):
    """A socket endpoint: buffered reads for handshakes, callbacks for relaying."""

    def __init__(self) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast below.
        self.transport: asyncio.Transport | None = None
        self.on_data: Callable[[bytes], None] | None = None
        self.on_lost: Callable[[Exception | None], None] | None = None
        self.on_pause_writing: Callable[[], None] | None = None
        self.on_resume_writing: Callable[[], None] | None = None
        self.closed = False
        self._buffer = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._lost_exc: Exception | None = None
        self._lost: asyncio.Future[None] | None = None

    # asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        handler = self.on_data
        if handler is not None:
            handler(data)
            return
        self._buffer += data
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._lost_exc = exc
        self._wake()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        if self.on_lost is not None:
            self.on_lost(exc)

    def pause_writing(self) -> None:
        if self.on_pause_writing is not None:
            self.on_pause_writing()

    def resume_writing(self) -> None:
        if self.on_resume_writing is not None:
            self.on_resume_writing()

    # handshake reads --------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes:
        """Return the bytes received so far, waiting for at least one."""
        while not self._buffer:
            if self.closed:
                raise ConnectionClosed(str(self._lost_exc or "connection closed"))
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    async def wait_closed(self) -> None:
        """Return once the socket is really closed (connection_lost has run)."""
        if self.closed:
            return
        if self._lost is None:
            self._lost = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._lost)

    def start_relay(self, on_data: Callable[[bytes], None]) -> bytes:
        """Switch to callback mode; return what was buffered but not yet read."""
        self.on_data = on_data
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    # writing ----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write unless the connection is gone."""
        transport = self.transport
        if transport is not None and not self.closed and not transport.is_closing():
            transport.write(data)

    def writelines(self, chunks: list[bytes]) -> None:
        """Write several chunks in one call."""
        transport = self.transport
        if transport is not None and not self.closed and not transport.is_closing():
            transport.writelines(chunks)

    def close(self) -> None:
        """Close after flushing what is buffered."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping anything unsent."""
        if self.transport is not None:
            self.transport.abort()

    async def start_tls(
        self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        """Upgrade this connection to TLS in place."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self.transport,
                self,
                context,
                server_side=server_side,
                server_hostname=server_hostname,
            )
        except (ssl.SSLError, OSError, ConnectionError) as exc:
            # The socket is gone, and this protocol may never hear connection_lost: during
            # the handshake the transport belonged to the loop's SSL protocol.
            self.closed = True
            self.transport.abort()
            if server_side:
                raise ConnectionClosed(f"TLS handshake with the client failed: {exc}") from exc
            raise UpstreamError(f"TLS handshake failed: {exc}", sqlstate="08006") from exc
        if transport is None:
            self.closed = True
            raise ConnectionClosed("connection closed during the TLS handshake")
        self.transport = transport

    def peer_address(self) -> str:
        """The peer's address as ``host:port`` (or the socket path)."""
        if self.transport is None:
            return ""
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            return f"{peer[0]}:{peer[1]}"
        return str(peer or "")
