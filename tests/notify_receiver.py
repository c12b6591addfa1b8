"""A webhook receiver for the notification tests: a real HTTP server on loopback.

It records every POST (when it arrived, its headers and body) and answers with the
status the test sets, as a team's own receiver, or Slack's or Teams' endpoint, would.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Post:
    """One request the receiver got."""

    at: float
    #: The same moment as POSIX time, to compare with the times a body carries.
    wall: float
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """``with Receiver() as r:`` serves on ``r.url`` until the block ends."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.posts: list[Post] = []
        self._lock = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                post = Post(
                    time.monotonic(), time.time(), self.path, dict(self.headers.items()), body
                )
                with receiver._lock:
                    receiver.posts.append(post)
                    receiver._lock.notify_all()
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, event: str, *, timeout: float = 10) -> Post:
        """The first post whose X-Querywarden-Event is ``event`` (AssertionError if none)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for post in self.posts:
                    if post.headers.get("X-Querywarden-Event") == event:
                        return post
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [p.headers.get("X-Querywarden-Event") for p in self.posts]
                    raise AssertionError(f"no {event} post in {timeout}s; got {seen}")
                self._lock.wait(left)
