"""A TCP tap between a client and the gateway that records what the client receives.

Leak tests must look at the bytes on the wire, not at what a driver decoded: a value a
driver could not decode, or one hidden in a field the driver drops, still reached the
client. The tap forwards both directions unchanged and keeps a copy of everything sent
towards the client.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class ByteTap:
    """Listens on a loopback port and relays each connection to ``(host, port)``."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._received = bytearray()
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def take(self) -> bytes:
        """Everything sent to clients since the last call."""
        with self._lock:
            data = bytes(self._received)
            self._received.clear()
        return data

    def close(self) -> None:
        """Stop listening and drop every relayed connection."""
        self._closed = True
        self._listener.close()
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if record:
                    # Recorded before it is sent: once the client has it, so does the tap.
                    with self._lock:
                        self._received += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
