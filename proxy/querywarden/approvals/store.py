"""Where reviews live: the :class:`ReviewStore` protocol and its SQLite implementation.

The store owns every state change of a review and makes each one atomic, because the
gateway may run as several processes (replicas, or a restarted gateway beside a CLI)
sharing one store: two approvers cannot both decide a review, two sessions cannot both
use a single-use grant, and an expired review cannot be approved. Policy (who may decide,
how long a grant lasts) is the service's business; the store only keeps the rules that
must hold under concurrency.

The other implementations: :mod:`querywarden.approvals.kube_store` (a ``QueryReview``
custom resource per review, optimistic concurrency through ``resourceVersion``) and
:mod:`querywarden.approvals.pg_store` (tables in a PostgreSQL schema that gateway
replicas share, row locks and LISTEN/NOTIFY). ``tests/review_store_contract.py`` is the
behaviour they all keep.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

from querywarden.approvals.model import (
    UNLIMITED_USES,
    Party,
    Review,
    ReviewConflict,
    ReviewDecision,
    ReviewNotFound,
    ReviewSummary,
)

__all__ = ["Opened", "ReviewStore", "SqliteReviewStore", "WatchedReviewStore"]

T = TypeVar("T")


class Opened(NamedTuple):
    """What :meth:`ReviewStore.create` did: the review, and whether it is a new one."""

    review: Review
    created: bool


class ReviewStore(Protocol):
    """Persistent reviews. Every method that changes a review is atomic.

    Methods that depend on the time take it as ``now`` (timezone-aware), so that the
    service's clock is the only clock.
    """

    async def create(self, review: Review) -> Opened:
        """Store a new pending review, unless an identical one is pending.

        Identical: same requester (subject and issuer), database, normalized text and
        parameters. Then that review is returned instead (``created`` False), so a
        statement re-run while it waits for a decision shares the one review. A store
        may name the new review itself (the returned review's ``id``).
        """
        ...

    async def get(self, review_id: str) -> Review:
        """The review, or :class:`ReviewNotFound`."""
        ...

    async def list(self, *, pending_only: bool = False) -> builtins.list[Review]:
        """All reviews (or only the pending ones), oldest first."""
        ...

    async def decide(
        self,
        review_id: str,
        approver: Party,
        approve: bool,
        comment: str,
        *,
        uses: int,
        ttl: timedelta,
        now: datetime,
    ) -> Review:
        """Approve (a grant of ``uses`` until ``now + ttl``) or deny a pending review.

        :class:`ReviewConflict` when it is no longer pending.
        """
        ...

    async def find_grant(
        self,
        requester: Party,
        database: str,
        normalized: str,
        *,
        parameters: tuple[str | None, ...] = (),
        now: datetime,
    ) -> Review | None:
        """An approved, unexpired review with uses left for exactly this statement.

        When there are several, the one that expires first.
        """
        ...

    async def use(self, review_id: str, *, now: datetime) -> Review:
        """Take one use of the grant (recorded in ``usedAt``).

        :class:`ReviewConflict` when it is not approved, expired or used up: of two
        sessions using a single-use grant at once, exactly one succeeds.
        """
        ...

    async def withdraw(self, review_id: str, why: str, *, now: datetime) -> Review:
        """End a pending review because its requester gave up.

        :class:`ReviewConflict` when it is no longer pending.
        """
        ...

    async def expire(self, review_id: str, *, now: datetime) -> Review:
        """End a pending review nobody decided in time.

        :class:`ReviewConflict` when it is no longer pending.
        """
        ...

    async def prune(self, ended_before: datetime) -> int:
        """Delete the reviews that ended before ``ended_before``; returns how many.

        Ended: see :meth:`Review.ended_at`. A store whose reviews another party prunes
        returns 0.
        """
        ...

    async def close(self) -> None:
        """Release connections and threads."""
        ...


@runtime_checkable
class WatchedReviewStore(ReviewStore, Protocol):
    """A store that reports changes made by others (kubectl, another replica) as they happen."""

    def watch(self, on_change: Callable[[Review], None]) -> None:
        """Call ``on_change`` on the running loop with every review that changes, until close."""
        ...

    def approve_command(self, review_id: str) -> str:
        """The command an approver runs to approve ``review_id``."""
        ...


# --- SQLite -------------------------------------------------------------------------------

_SCHEMA_VERSION = 1

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS reviews (
    id TEXT PRIMARY KEY,
    requester_subject TEXT NOT NULL,
    requester_issuer TEXT NOT NULL,
    requester_groups TEXT NOT NULL,
    database TEXT NOT NULL,
    statement TEXT NOT NULL,
    normalized TEXT NOT NULL,
    parameters TEXT NOT NULL,
    summary TEXT NOT NULL,
    rule TEXT NOT NULL,
    reason TEXT NOT NULL,
    estimate INTEGER,
    created INTEGER NOT NULL,
    decided INTEGER,
    approver TEXT,
    decision TEXT NOT NULL,
    comment TEXT NOT NULL,
    grant_expires INTEGER,
    uses_left INTEGER NOT NULL,
    used_at TEXT NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS reviews_statement "
    "ON reviews (requester_subject, requester_issuer, database, normalized, decision)",
    "CREATE INDEX IF NOT EXISTS reviews_pending ON reviews (decision, created)",
)

_COLUMNS = (
    "id, requester_subject, requester_issuer, requester_groups, database, statement, "
    "normalized, parameters, summary, rule, reason, estimate, created, decided, approver, "
    "decision, comment, grant_expires, uses_left, used_at"
)

# The queries, built once from the column list (constants only: no caller text reaches
# the SQL, every value is a parameter).
_SELECT = f"SELECT {_COLUMNS} FROM reviews"  # noqa: S608
_BY_ID = _SELECT + " WHERE id = ?"
_SAME_STATEMENT = (
    _SELECT + " WHERE requester_subject = ? AND requester_issuer = ? AND database = ? "
    "AND normalized = ? AND parameters = ?"
)
_PENDING_TWIN = _SAME_STATEMENT + " AND decision = 'pending' ORDER BY created, id LIMIT 1"
_GRANT = (
    _SAME_STATEMENT + " AND decision = 'approved' AND grant_expires > ? AND uses_left != 0 "
    "ORDER BY grant_expires, id LIMIT 1"
)
_ALL = _SELECT + " ORDER BY created, id"
_ALL_PENDING = _SELECT + " WHERE decision = 'pending' ORDER BY created, id"
# Mirrors Review.ended_at: an approval ends when its grant expires, anything else when it
# was decided.
_PRUNE = (
    "DELETE FROM reviews WHERE decision != 'pending' AND CASE WHEN decision = 'approved' "
    "THEN max(COALESCE(grant_expires, decided, created), COALESCE(decided, created)) "
    "ELSE COALESCE(decided, created) END < ?"
)
_UPSERT = (
    f"INSERT OR REPLACE INTO reviews ({_COLUMNS}) "  # noqa: S608
    f"VALUES ({', '.join('?' * len(_COLUMNS.split(',')))})"
)

#: How long a writer waits for another process's transaction before giving up.
_BUSY_TIMEOUT_MS = 10_000


def _micros(value: datetime) -> int:
    # Integer microseconds since the epoch: exact, and ordered by SQLite like the times.
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _time(value: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=value)


def _parameters(values: tuple[str | None, ...]) -> str:
    # Compact, deterministic JSON: the column is compared for equality.
    return json.dumps(list(values), separators=(",", ":"), ensure_ascii=False)


def _row(review: Review) -> tuple[Any, ...]:
    return (
        review.id,
        review.requester.subject,
        review.requester.issuer,
        json.dumps(list(review.requester.groups)),
        review.database,
        review.statement,
        review.normalized,
        _parameters(review.parameters),
        review.summary.model_dump_json(),
        review.rule,
        review.reason,
        review.estimate,
        _micros(review.created),
        None if review.decided is None else _micros(review.decided),
        None if review.approver is None else review.approver.model_dump_json(),
        review.decision.value,
        review.comment,
        None if review.grant_expires is None else _micros(review.grant_expires),
        review.uses_left,
        json.dumps([_micros(t) for t in review.used_at]),
    )


def review_from_row(
    row: Any,
    *,
    time: Callable[[Any], datetime] = lambda value: value,
    used_at: Callable[[Any], Iterable[datetime]] = tuple,
) -> Review:
    """A Review from a stored row (``row["column"]``), of either store.

    The SQLite and PostgreSQL stores keep the same columns and differ only in how times
    are stored: ``time`` turns one back into a datetime, ``used_at`` the column of use
    times into datetimes.
    """
    approver = row["approver"]
    decided, grant_expires = row["decided"], row["grant_expires"]
    return Review(
        id=row["id"],
        requester=Party(
            subject=row["requester_subject"],
            issuer=row["requester_issuer"],
            groups=tuple(json.loads(row["requester_groups"])),
        ),
        database=row["database"],
        statement=row["statement"],
        normalized=row["normalized"],
        parameters=tuple(json.loads(row["parameters"])),
        summary=ReviewSummary.model_validate_json(row["summary"]),
        rule=row["rule"],
        reason=row["reason"],
        estimate=row["estimate"],
        created=time(row["created"]),
        decided=None if decided is None else time(decided),
        approver=None if approver is None else Party.model_validate_json(approver),
        decision=ReviewDecision(row["decision"]),
        comment=row["comment"],
        grant_expires=None if grant_expires is None else time(grant_expires),
        uses_left=row["uses_left"],
        used_at=tuple(used_at(row["used_at"])),
    )


def _review(row: sqlite3.Row) -> Review:
    return review_from_row(
        row, time=_time, used_at=lambda stored: (_time(t) for t in json.loads(stored))
    )


class SqliteReviewStore:
    """Reviews in one SQLite file (the gateway's state directory), for standalone use.

    The file survives restarts and may be shared by several processes on one host: every
    change runs in a ``BEGIN IMMEDIATE`` transaction (one writer at a time, waiting up to
    10 s for another), in WAL mode with full sync, so a decision or a use is on disk when
    the call returns. The blocking sqlite3 calls run on one private thread, which also
    serializes this process's own calls. The file is created readable by its owner only:
    it holds statement text.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qw-reviews")
        self._connection: sqlite3.Connection | None = None

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    # -- plumbing (on the store's thread) ------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def _connect(self) -> sqlite3.Connection:
        if self._connection is not None:
            return self._connection
        # Private: the reviews hold statement text.
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        # isolation_level=None: we issue BEGIN ourselves, so that writers take the write
        # lock up front (IMMEDIATE) instead of failing to upgrade a read lock mid-way.
        conn = sqlite3.connect(
            self._path,
            timeout=_BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        _use_wal(conn)
        conn.execute("PRAGMA synchronous = FULL")
        with _transaction(conn):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self._path}: review store schema {version} is newer than this "
                    f"gateway understands ({_SCHEMA_VERSION})"
                )
            # Not executescript: it would commit the transaction that serializes two
            # processes creating the schema at once.
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        self._connection = conn
        return conn

    def _fetch(self, conn: sqlite3.Connection, review_id: str) -> Review:
        row = conn.execute(_BY_ID, (review_id,)).fetchone()
        if row is None:
            raise ReviewNotFound(f"no review {review_id!r}")
        return _review(row)

    def _replace(self, conn: sqlite3.Connection, review: Review) -> None:
        conn.execute(_UPSERT, _row(review))

    # -- the protocol ---------------------------------------------------------------------

    async def create(self, review: Review) -> Opened:
        """See :meth:`ReviewStore.create`."""
        return await self._run(self._create, review)

    def _create(self, review: Review) -> Opened:
        conn = self._connect()
        with _transaction(conn):
            row = conn.execute(
                _PENDING_TWIN,
                (
                    review.requester.subject,
                    review.requester.issuer,
                    review.database,
                    review.normalized,
                    _parameters(review.parameters),
                ),
            ).fetchone()
            if row is not None:
                return Opened(_review(row), created=False)
            if conn.execute("SELECT 1 FROM reviews WHERE id = ?", (review.id,)).fetchone():
                raise ReviewConflict(f"a review {review.id!r} exists already")
            self._replace(conn, review)
            return Opened(review, created=True)

    async def get(self, review_id: str) -> Review:
        """See :meth:`ReviewStore.get`."""
        return await self._run(self._get, review_id)

    def _get(self, review_id: str) -> Review:
        return self._fetch(self._connect(), review_id)

    async def list(self, *, pending_only: bool = False) -> builtins.list[Review]:
        """See :meth:`ReviewStore.list`."""
        return await self._run(self._list, pending_only)

    def _list(self, pending_only: bool) -> builtins.list[Review]:
        rows = self._connect().execute(_ALL_PENDING if pending_only else _ALL)
        return [_review(row) for row in rows]

    async def decide(
        self,
        review_id: str,
        approver: Party,
        approve: bool,
        comment: str,
        *,
        uses: int,
        ttl: timedelta,
        now: datetime,
    ) -> Review:
        """See :meth:`ReviewStore.decide`."""
        if approve:
            update: dict[str, Any] = {
                "decision": ReviewDecision.APPROVED,
                "grant_expires": now + ttl,
                "uses_left": uses,
            }
        else:
            update = {"decision": ReviewDecision.DENIED}
        update |= {"decided": now, "approver": approver, "comment": comment}
        return await self._run(self._end_pending, review_id, update)

    async def withdraw(self, review_id: str, why: str, *, now: datetime) -> Review:
        """See :meth:`ReviewStore.withdraw`."""
        update = {"decision": ReviewDecision.WITHDRAWN, "decided": now, "comment": why}
        return await self._run(self._end_pending, review_id, update)

    async def expire(self, review_id: str, *, now: datetime) -> Review:
        """See :meth:`ReviewStore.expire`."""
        update = {
            "decision": ReviewDecision.EXPIRED,
            "decided": now,
            "comment": "nobody decided in time",
        }
        return await self._run(self._end_pending, review_id, update)

    def _end_pending(self, review_id: str, update: dict[str, Any]) -> Review:
        conn = self._connect()
        with _transaction(conn):
            review = self._fetch(conn, review_id)
            if not review.pending:
                raise ReviewConflict(f"review {review_id} is already {review.decision.value}")
            changed = review.model_copy(update=update)
            self._replace(conn, changed)
            return changed

    async def prune(self, ended_before: datetime) -> int:
        """See :meth:`ReviewStore.prune`."""
        return await self._run(self._prune, _micros(ended_before))

    def _prune(self, ended_before: int) -> int:
        conn = self._connect()
        with _transaction(conn):
            return conn.execute(_PRUNE, (ended_before,)).rowcount

    async def find_grant(
        self,
        requester: Party,
        database: str,
        normalized: str,
        *,
        parameters: tuple[str | None, ...] = (),
        now: datetime,
    ) -> Review | None:
        """See :meth:`ReviewStore.find_grant`."""
        key = (requester.subject, requester.issuer, database, normalized, _parameters(parameters))
        return await self._run(self._find_grant, key, now)

    def _find_grant(self, key: tuple[str, ...], now: datetime) -> Review | None:
        row = self._connect().execute(_GRANT, (*key, _micros(now))).fetchone()
        return None if row is None else _review(row)

    async def use(self, review_id: str, *, now: datetime) -> Review:
        """See :meth:`ReviewStore.use`."""
        return await self._run(self._use, review_id, now)

    def _use(self, review_id: str, now: datetime) -> Review:
        conn = self._connect()
        # The read and the decrement are one IMMEDIATE transaction: another process that
        # reads the same grant waits for our commit and then sees it used up.
        with _transaction(conn):
            review = self._fetch(conn, review_id)
            if not review.grant_usable(now):
                raise ReviewConflict(_unusable(review, now))
            left = review.uses_left if review.uses_left == UNLIMITED_USES else review.uses_left - 1
            used = review.model_copy(update={"uses_left": left, "used_at": (*review.used_at, now)})
            self._replace(conn, used)
            return used

    async def close(self) -> None:
        """Close the connection and stop the store's thread."""
        if self._connection is not None:
            await self._run(self._connection.close)
            self._connection = None
        self._executor.shutdown(wait=True)


def _use_wal(conn: sqlite3.Connection) -> None:
    """Put the file in WAL mode (it stays so), waiting for another process doing it too.

    Changing the journal mode needs the file to itself, and SQLite answers "database is
    locked" at once, without its busy handler, when another connection has it open: two
    gateways starting together on a new file would fail. Tried again until the busy
    timeout; only the first process ever changes it.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _unusable(review: Review, now: datetime) -> str:
    if review.decision is not ReviewDecision.APPROVED:
        return f"review {review.id} is {review.decision.value}, not approved"
    if review.grant_expires is None or now >= review.grant_expires:
        return f"the grant of review {review.id} has expired"
    return f"the grant of review {review.id} is used up"
