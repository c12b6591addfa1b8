"""Cancel keys and their delivery: the client's CancelRequest, routed to its backend.

A client sees the upstream backend's real process id (so ``pg_backend_pid()``, the pid in
a ``NotificationResponse`` for its own ``NOTIFY`` and the BackendKeyData agree, as they
do directly) next to a secret the gateway made up: the upstream's secret never leaves
the gateway. A CancelRequest is routed by the pair (pid, secret). Pids are unique per
server only, so two sessions on different upstream servers may share one; each session
still gets its own secret, and a secret is never handed out twice for one pid.

:class:`CancelKeys` is the registry (no I/O). :class:`CancelCourier` delivers the
upstream CancelRequest from threads of its own, with blocking sockets: a cancel is most
wanted while the event loop is busiest (relaying the very result the client wants to
stop), and waiting for loop turns there made a cancel take up to a second.
"""

from __future__ import annotations

import concurrent.futures
import hmac
import logging
import secrets
import threading
from dataclasses import dataclass
from typing import Generic, TypeVar

from querywarden.errors import QuerywardenError
from querywarden.upstream import UpstreamTarget, deliver_cancel

log = logging.getLogger(__name__)

#: The secret's length: 4 bytes, what protocol 3.0 carries (the gateway speaks 3.0).
SECRET_BYTES = 4

#: CancelRequests queued or being delivered upstream at once, at most.
MAX_IN_FLIGHT = 256

#: Threads delivering cancels (each delivery takes a connect and a TLS handshake).
_COURIER_THREADS = 4

Owner = TypeVar("Owner")


@dataclass(frozen=True, slots=True)
class CancelKey(Generic[Owner]):
    """What the gateway keeps behind the key it handed one client session."""

    pid: int
    secret: bytes
    #: Where the session's backend runs, and with which TLS settings to reach it.
    target: UpstreamTarget
    upstream_secret: bytes
    #: The session, so a cancel can also end what the gateway holds (a statement on hold).
    owner: Owner


class CancelKeys(Generic[Owner]):
    """Keys handed out to client sessions, looked up by (pid, secret)."""

    def __init__(self) -> None:
        # Almost always one key per pid; a list for the rare pid shared by two servers.
        self._by_pid: dict[int, list[CancelKey[Owner]]] = {}

    def issue(
        self, target: UpstreamTarget, upstream_pid: int, upstream_secret: bytes, owner: Owner
    ) -> CancelKey[Owner]:
        """A new key for a session whose backend is ``upstream_pid`` on ``target``."""
        keys = self._by_pid.setdefault(upstream_pid, [])
        while True:
            secret = secrets.token_bytes(SECRET_BYTES)
            if all(key.secret != secret for key in keys):
                break
        key = CancelKey(upstream_pid, secret, target, upstream_secret, owner)
        keys.append(key)
        return key

    def find(self, pid: int, secret: bytes) -> CancelKey[Owner] | None:
        """The key a CancelRequest names, if the secret matches (compared in constant time)."""
        found = None
        for key in self._by_pid.get(pid, ()):
            # Every candidate is compared, so the time taken says nothing about which matched.
            if hmac.compare_digest(key.secret, secret):
                found = key
        return found

    def forget(self, key: CancelKey[Owner]) -> None:
        """Drop a key when its session ends."""
        keys = self._by_pid.get(key.pid)
        if keys is None:
            return
        keys[:] = [k for k in keys if k is not key]
        if not keys:
            del self._by_pid[key.pid]

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._by_pid.values())


class CancelCourier:
    """Delivers upstream CancelRequests from its own threads, off the event loop.

    Best effort, as in PostgreSQL: a delivery that fails is logged and the statement
    runs to its end. Past :data:`MAX_IN_FLIGHT` queued deliveries one is dropped, as
    PostgreSQL drops a cancel it cannot serve.
    """

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=_COURIER_THREADS, thread_name_prefix="querywarden-cancel"
        )
        self._lock = threading.Lock()
        self._in_flight = 0

    def deliver(
        self, target: UpstreamTarget, pid: int, secret: bytes
    ) -> concurrent.futures.Future[None] | None:
        """Start delivering; None when dropped (too many in flight, or shut down)."""
        with self._lock:
            if self._in_flight >= MAX_IN_FLIGHT:
                log.warning("dropped a CancelRequest: %d cancels already in flight", MAX_IN_FLIGHT)
                return None
            self._in_flight += 1
        try:
            future = self._pool.submit(self._deliver, target, pid, secret)
        except RuntimeError:  # shut down: the gateway is closing
            self._done(None)
            return None
        future.add_done_callback(self._done)
        return future

    def _done(self, _future: concurrent.futures.Future[None] | None) -> None:
        with self._lock:
            self._in_flight -= 1

    @staticmethod
    def _deliver(target: UpstreamTarget, pid: int, secret: bytes) -> None:
        try:
            deliver_cancel(target, pid, secret)
        except (OSError, QuerywardenError) as exc:
            log.warning("could not deliver a CancelRequest upstream: %s", exc)

    def close(self) -> None:
        """Stop taking cancels; those queued are dropped, those being sent finish alone."""
        self._pool.shutdown(wait=False, cancel_futures=True)
