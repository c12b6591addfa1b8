"""The demo's notification receiver: where `querywarden demo` sends its review events.

A team would point ``approvals.notify`` at its own service, Slack or Teams; the demo has
none, so it runs this one: a webhook endpoint on loopback that checks each post's
signature (as docs/approvals.md tells a receiver to), keeps the post in
``notifications.jsonl`` and prints one line per event on the demo's terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from querywarden.approvals.notify import SIGNATURE_HEADER, verify

_MAX_BODY = 256 * 1024


class DemoReceiver:
    """Listens from construction (its port goes into the policy before the loop runs)."""

    def __init__(self, state_dir: Path) -> None:
        self.secret_file = state_dir / "notify.secret"
        if not self.secret_file.exists():
            fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))
        self.log = state_dir / "notifications.jsonl"
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/review-events"

    def destination(self) -> dict[str, str]:
        """The policy's ``approvals.notify`` entry for this receiver."""
        return {"name": "demo-receiver", "url": self.url, "secretFile": str(self.secret_file)}

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, sock=self._sock)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        else:
            self._sock.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            headers = _headers(head)
            length = int(headers.get("content-length", "0"))
            if length > _MAX_BODY:
                raise ValueError("body too large")
            body = await reader.readexactly(length)
            signed = verify(
                self.secret_file.read_text().strip().encode(),
                body,
                headers.get(SIGNATURE_HEADER.lower(), ""),
                now=time.time(),
            )
            self._keep(json.loads(body), signed)
            writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            writer.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
        finally:
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()

    def _keep(self, event: dict[str, Any], signed: bool) -> None:
        received = datetime.now(UTC).isoformat()
        with self.log.open("a") as out:
            out.write(json.dumps({"received": received, "signed": signed, "event": event}) + "\n")
        review = event.get("review") or {}
        requester = (review.get("requester") or {}).get("subject")
        approver = (review.get("approver") or {}).get("subject")
        what = {
            "review.created": f"{requester} waits for approval: {review.get('statement')}",
            "review.approved": f"approved by {approver}",
            "review.denied": f"denied by {approver}",
        }.get(str(event.get("type")), str(event.get("type")))
        check = "signature ok" if signed else "BAD SIGNATURE"
        print(f"[notification] review {review.get('id')}: {what} ({check})", flush=True)


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers
