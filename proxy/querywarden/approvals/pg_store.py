"""Reviews in PostgreSQL: the :class:`ReviewStore` that gateway replicas on VMs share.

The gateway owns one schema (``querywarden`` unless configured) in a database the
operator names: it creates the schema, a ``schema_version`` row and the ``reviews`` table
at its first review, idempotently, under an advisory lock so that replicas starting
together do not trip over each other. A schema written by a newer gateway is refused.

Every state change is one conditional statement in one transaction, so PostgreSQL's row
locks make it atomic across processes: ``UPDATE ... WHERE id = $1 AND decision =
'pending'`` ends a review (of two deciders the second waits for the first's row lock,
re-checks the condition on the row the first wrote, and changes nothing), and ``UPDATE
... WHERE uses_left <> 0 AND grant_expires > now`` takes one use of a grant (so a
single-use grant is used once, whichever replicas race for it). A partial unique index
keeps one pending review per statement: two replicas opening the same review open one.

Decisions reach the other replicas through LISTEN/NOTIFY: ending a review notifies
``<schema>.reviews`` with its id in the same transaction (delivered at commit), and every
store listens on a connection of its own (:meth:`PostgresReviewStore.watch`), so a held
statement learns of a decision made through another replica within milliseconds. When
that connection drops, the store reconnects with backoff, then reads back the reviews
that ended while it was away (stamped with the database's clock in ``changed``); the
service's poll is the safety net meanwhile.

asyncpg is asynchronous: no threads, a small pool per process.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from querywarden.approvals.model import (
    UNLIMITED_USES,
    Party,
    Review,
    ReviewConflict,
    ReviewDecision,
    ReviewNotFound,
)
from querywarden.approvals.store import Opened, _unusable, review_from_row

__all__ = ["SCHEMA_VERSION", "PostgresReviewStore"]

log = logging.getLogger(__name__)

#: The version of the tables this gateway writes (the ``schema_version`` row).
SCHEMA_VERSION = 1

#: How often :meth:`PostgresReviewStore.create` tries again when the pending twin it
#: collided with ended before it could be read.
_ATTEMPTS = 20
#: The listening connection is checked this often (a dead peer sends no FIN).
_LISTEN_CHECK = 10.0
#: A listener that reconnects reads back the reviews that ended since this long before
#: it last knew it listened (a change is stamped a moment before its commit).
_CATCH_UP_MARGIN = timedelta(seconds=10)
#: Pauses before listening again after a failure: doubled up to the last.
_LISTEN_BACKOFF = (0.1, 0.5, 1.0, 2.0, 5.0)

_COLUMNS = (
    "id",
    "requester_subject",
    "requester_issuer",
    "requester_groups",
    "database",
    "statement",
    "normalized",
    "parameters",
    "summary",
    "rule",
    "reason",
    "estimate",
    "created",
    "decided",
    "approver",
    "decision",
    "comment",
    "grant_expires",
    "uses_left",
    "used_at",
)


def statement_key(
    requester: Party, database: str, normalized: str, parameters: tuple[str | None, ...]
) -> str:
    """What identifies "the same statement from the same requester" (a SHA-256, hex).

    Indexed, where the statement text could be longer than a B-tree entry may be.
    """
    text = json.dumps(
        [requester.subject, requester.issuer, database, normalized, list(parameters)],
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class _Queries:
    """The SQL of one schema, built once (the schema name is checked: no caller text)."""

    def __init__(self, schema: str) -> None:
        s = f'"{schema}"'
        t = f"{s}.reviews"
        cols = ", ".join(_COLUMNS)
        self.lock_key = int.from_bytes(
            hashlib.sha256(f"querywarden reviews {schema}".encode()).digest()[:8],
            "big",
            signed=True,
        )
        self.version_table = f"{s}.schema_version"
        self.ddl = (
            f"CREATE SCHEMA IF NOT EXISTS {s}",
            f"""CREATE TABLE IF NOT EXISTS {s}.schema_version (
                only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
                version integer NOT NULL)""",
            f"""CREATE TABLE IF NOT EXISTS {t} (
                id text PRIMARY KEY,
                statement_key text NOT NULL,
                requester_subject text NOT NULL,
                requester_issuer text NOT NULL,
                requester_groups jsonb NOT NULL,
                database text NOT NULL,
                statement text NOT NULL,
                normalized text NOT NULL,
                parameters jsonb NOT NULL,
                summary jsonb NOT NULL,
                rule text NOT NULL,
                reason text NOT NULL,
                estimate bigint,
                created timestamptz NOT NULL,
                decided timestamptz,
                approver jsonb,
                decision text NOT NULL CHECK (decision IN
                    ('pending', 'approved', 'denied', 'expired', 'withdrawn')),
                comment text NOT NULL,
                grant_expires timestamptz,
                uses_left integer NOT NULL,
                used_at timestamptz[] NOT NULL DEFAULT '{{}}',
                -- The database's clock when the review last ended or was created: what
                -- a listener that reconnects reads to catch up on what it missed.
                changed timestamptz NOT NULL DEFAULT clock_timestamp())""",
            # One pending review per statement: the arbiter of create's ON CONFLICT.
            f"CREATE UNIQUE INDEX IF NOT EXISTS reviews_one_pending ON {t} (statement_key) "
            "WHERE decision = 'pending'",
            f"CREATE INDEX IF NOT EXISTS reviews_statement ON {t} (statement_key, decision)",
            f"CREATE INDEX IF NOT EXISTS reviews_created ON {t} (created, id)",
            f"CREATE INDEX IF NOT EXISTS reviews_changed ON {t} (changed)",
            f"INSERT INTO {s}.schema_version (version) VALUES ({SCHEMA_VERSION}) "  # noqa: S608
            "ON CONFLICT (only_row) DO NOTHING",
        )
        self.version = f"SELECT version FROM {s}.schema_version"  # noqa: S608
        select = f"SELECT {cols} FROM {t}"  # noqa: S608
        same = (
            " WHERE statement_key = $1 AND requester_subject = $2 AND requester_issuer = $3 "
            "AND database = $4 AND normalized = $5 AND parameters = $6::jsonb"
        )
        self.insert = (
            f"INSERT INTO {t} (statement_key, {cols}) "  # noqa: S608
            f"VALUES ({', '.join(f'${i}' for i in range(1, len(_COLUMNS) + 2))}) "
            "ON CONFLICT (statement_key) WHERE decision = 'pending' DO NOTHING "
            f"RETURNING {cols}"
        )
        self.pending_twin = select + same + " AND decision = 'pending'"
        self.grant = (
            select + same + " AND decision = 'approved' AND grant_expires > $7 "
            "AND uses_left <> 0 ORDER BY grant_expires, id LIMIT 1"
        )
        self.by_id = select + " WHERE id = $1"
        self.all = select + " ORDER BY created, id"
        self.all_pending = select + " WHERE decision = 'pending' ORDER BY created, id"
        self.end = (
            f"UPDATE {t} SET decision = $2, decided = $3, comment = $4, "  # noqa: S608
            "approver = $5::jsonb, grant_expires = $6, uses_left = $7, "
            "changed = clock_timestamp() "
            f"WHERE id = $1 AND decision = 'pending' RETURNING {cols}"
        )
        self.use = (
            f"UPDATE {t} SET uses_left = CASE WHEN uses_left = {UNLIMITED_USES} "  # noqa: S608
            f"THEN {UNLIMITED_USES} ELSE uses_left - 1 END, "
            "used_at = array_append(used_at, $2::timestamptz) "
            "WHERE id = $1 AND decision = 'approved' AND grant_expires > $2 "
            f"AND uses_left <> 0 RETURNING {cols}"
        )
        self.ended_since = (
            select + " WHERE decision <> 'pending' AND changed >= $1 ORDER BY changed"
        )
        # Mirrors Review.ended_at: an approval ends when its grant expires, anything else
        # when it was decided.
        self.prune = (
            f"DELETE FROM {t} WHERE decision <> 'pending' AND CASE "  # noqa: S608
            "WHEN decision = 'approved' AND grant_expires IS NOT NULL "
            "THEN greatest(grant_expires, coalesce(decided, grant_expires)) "
            "ELSE coalesce(decided, created) END < $1"
        )


def _review(row: asyncpg.Record) -> Review:
    return review_from_row(row)  # timestamptz columns come back as datetimes


def _key_arguments(
    requester: Party, database: str, normalized: str, parameters: tuple[str | None, ...]
) -> tuple[str, str, str, str, str, str]:
    return (
        statement_key(requester, database, normalized, parameters),
        requester.subject,
        requester.issuer,
        database,
        normalized,
        _json(list(parameters)),
    )


class PostgresReviewStore:
    """Reviews in schema ``schema`` of the PostgreSQL database at ``dsn``.

    ``dsn``: a ``postgresql://`` URL (libpq's URL parameters, such as ``sslmode``).
    ``password``: the password, or a callable returning it at each connect (a file that
    rotates); None: the URL's, ``PGPASSWORD`` or ``~/.pgpass``. Nothing is opened until the
    first call (or :meth:`watch`); a store that cannot be reached raises on each call, and
    the next call tries again.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "querywarden",
        password: str | Callable[[], str | None] | None = None,
        pool_size: int = 4,
        connect_timeout: float = 5.0,
        command_timeout: float = 10.0,
    ) -> None:
        self._dsn = dsn
        self._schema = schema
        self._q = _Queries(schema)
        self._password = password
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()
        self._closed = False
        self._listener: asyncio.Task[None] | None = None
        self._on_change: Callable[[Review], None] | None = None
        self._fetches: set[asyncio.Task[None]] = set()
        #: The database's clock when the listener last knew it was listening.
        self._heard_until: datetime | None = None
        #: Set while the listening connection is up (tests wait on it).
        self.listening = asyncio.Event()

    @property
    def schema(self) -> str:
        """The schema the reviews live in."""
        return self._schema

    @property
    def channel(self) -> str:
        """The NOTIFY channel of ended reviews (the payload is the review id)."""
        return f"{self._schema}.reviews"

    def approve_command(self, review_id: str) -> str:
        """What an approver runs (against any replica's admin API) to approve the review."""
        return f"querywarden reviews approve {review_id} --comment ..."

    # -- plumbing ----------------------------------------------------------------------

    def _connect_arguments(self, application_name: str = "querywarden-reviews") -> dict[str, Any]:
        return {
            "password": self._password,
            "timeout": self._connect_timeout,
            "command_timeout": self._command_timeout,
            "server_settings": {"application_name": application_name},
        }

    async def _open(self) -> asyncpg.Pool:
        # An uncontended lock costs nothing next to the query that follows.
        async with self._opening:
            if self._pool is None:
                if self._closed:
                    raise RuntimeError("the review store is closed")
                self._pool = await self._new_pool()
            return self._pool

    async def _new_pool(self) -> asyncpg.Pool:
        pool = await asyncpg.create_pool(
            self._dsn, min_size=0, max_size=self._pool_size, **self._connect_arguments()
        )
        try:
            await self._prepare(pool)
        except BaseException:
            pool.terminate()
            raise
        return pool

    async def _prepare(self, pool: asyncpg.Pool) -> None:
        """Create the schema and tables unless they are there, and check their version."""
        async with pool.acquire(timeout=self._connect_timeout) as conn:
            async with conn.transaction():
                # Replicas starting together: one creates, the others wait and find it.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", self._q.lock_key)
                exists = await conn.fetchval(
                    "SELECT to_regclass($1) IS NOT NULL", self._q.version_table
                )
                version = await conn.fetchval(self._q.version) if exists else None
                if version is None:
                    # Only when something is missing, so that a role without CREATE on
                    # the database works in a schema its DBA created for it.
                    for statement in self._q.ddl:
                        await conn.execute(statement)
                    version = await conn.fetchval(self._q.version)
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"review store schema {self._schema!r} is at version {version}, newer "
                    f"than this gateway understands ({SCHEMA_VERSION}): upgrade this gateway "
                    "or give it a schema of its own (approvals.postgres.schema)"
                )

    async def _notify(self, conn: asyncpg.Connection, review_id: str) -> None:
        # In the changing transaction: delivered at commit, never for a rolled-back change.
        await conn.execute("SELECT pg_notify($1, $2)", self.channel, review_id)

    # -- the protocol ------------------------------------------------------------------

    async def create(self, review: Review) -> Opened:
        """See :meth:`ReviewStore.create`.

        The insert's ``ON CONFLICT`` on the one-pending-review-per-statement index makes
        two replicas opening the same review at once open one: the second waits for the
        first's commit, inserts nothing and returns the first's review.
        """
        pool = await self._open()
        key = _key_arguments(
            review.requester, review.database, review.normalized, review.parameters
        )
        row_values = (
            review.id,
            review.requester.subject,
            review.requester.issuer,
            _json(list(review.requester.groups)),
            review.database,
            review.statement,
            review.normalized,
            _json(list(review.parameters)),
            review.summary.model_dump_json(),
            review.rule,
            review.reason,
            review.estimate,
            review.created,
            review.decided,
            None if review.approver is None else review.approver.model_dump_json(),
            review.decision.value,
            review.comment,
            review.grant_expires,
            review.uses_left,
            list(review.used_at),
        )
        for _ in range(_ATTEMPTS):
            async with pool.acquire() as conn, conn.transaction():
                try:
                    row = await conn.fetchrow(self._q.insert, key[0], *row_values)
                except asyncpg.UniqueViolationError as exc:
                    raise ReviewConflict(f"a review {review.id!r} exists already") from exc
                if row is not None:
                    return Opened(_review(row), created=True)
                twin = await conn.fetchrow(self._q.pending_twin, *key)
                if twin is not None:
                    return Opened(_review(twin), created=False)
            # The pending twin we collided with ended before we read it: insert again.
        raise ReviewConflict("reviews of this statement keep changing; try again")

    async def get(self, review_id: str) -> Review:
        """See :meth:`ReviewStore.get`."""
        pool = await self._open()
        row = await pool.fetchrow(self._q.by_id, review_id)
        if row is None:
            raise ReviewNotFound(f"no review {review_id!r}")
        return _review(row)

    async def list(self, *, pending_only: bool = False) -> builtins.list[Review]:
        """See :meth:`ReviewStore.list`."""
        pool = await self._open()
        rows = await pool.fetch(self._q.all_pending if pending_only else self._q.all)
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
            return await self._end(
                review_id,
                ReviewDecision.APPROVED,
                now,
                comment,
                approver=approver,
                grant_expires=now + ttl,
                uses_left=uses,
            )
        return await self._end(review_id, ReviewDecision.DENIED, now, comment, approver=approver)

    async def withdraw(self, review_id: str, why: str, *, now: datetime) -> Review:
        """See :meth:`ReviewStore.withdraw`."""
        return await self._end(review_id, ReviewDecision.WITHDRAWN, now, why)

    async def expire(self, review_id: str, *, now: datetime) -> Review:
        """See :meth:`ReviewStore.expire`."""
        return await self._end(review_id, ReviewDecision.EXPIRED, now, "nobody decided in time")

    async def _end(
        self,
        review_id: str,
        decision: ReviewDecision,
        now: datetime,
        comment: str,
        *,
        approver: Party | None = None,
        grant_expires: datetime | None = None,
        uses_left: int = 0,
    ) -> Review:
        pool = await self._open()
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                self._q.end,
                review_id,
                decision.value,
                now,
                comment,
                None if approver is None else approver.model_dump_json(),
                grant_expires,
                uses_left,
            )
            if row is None:
                current = await conn.fetchrow(self._q.by_id, review_id)
                if current is None:
                    raise ReviewNotFound(f"no review {review_id!r}")
                raise ReviewConflict(f"review {review_id} is already {current['decision']}")
            await self._notify(conn, review_id)
            return _review(row)

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
        pool = await self._open()
        key = _key_arguments(requester, database, normalized, parameters)
        row = await pool.fetchrow(self._q.grant, *key, now)
        return None if row is None else _review(row)

    async def use(self, review_id: str, *, now: datetime) -> Review:
        """See :meth:`ReviewStore.use`.

        One conditional UPDATE: a second session racing for the last use waits for the
        first's row lock, then finds ``uses_left`` at 0 and changes nothing.
        """
        pool = await self._open()
        async with pool.acquire() as conn:
            row = await conn.fetchrow(self._q.use, review_id, now)
            if row is not None:
                return _review(row)
            current = await conn.fetchrow(self._q.by_id, review_id)
        if current is None:
            raise ReviewNotFound(f"no review {review_id!r}")
        raise ReviewConflict(_unusable(_review(current), now))

    async def prune(self, ended_before: datetime) -> int:
        """See :meth:`ReviewStore.prune`."""
        pool = await self._open()
        status = await pool.execute(self._q.prune, ended_before)
        return int(status.rsplit(" ", 1)[-1])

    # -- changes made elsewhere --------------------------------------------------------

    def watch(self, on_change: Callable[[Review], None]) -> None:
        """Call ``on_change`` with every review that ends, whichever replica ended it.

        Listens on a connection of its own, reconnecting with backoff when it drops; the
        service's poll covers the gap.
        """
        self._on_change = on_change
        if self._listener is None and not self._closed:
            self._listener = asyncio.get_running_loop().create_task(
                self._listen(), name="querywarden-reviews-listen"
            )

    async def _listen(self) -> None:
        failures = 0
        while not self._closed:
            try:
                conn = await asyncpg.connect(
                    self._dsn, **self._connect_arguments("querywarden-reviews-listen")
                )
            except Exception as exc:
                failures = self._listen_failed(failures, exc)
                await asyncio.sleep(_LISTEN_BACKOFF[min(failures, len(_LISTEN_BACKOFF)) - 1])
                continue
            try:
                await self._listen_on(conn, recovered=failures > 0)
            except Exception as exc:
                # Once it has listened, a drop is a new outage (logged again).
                failures = self._listen_failed(0 if self.listening.is_set() else failures, exc)
            finally:
                self.listening.clear()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), self._connect_timeout)
                if not conn.is_closed():
                    conn.terminate()
            if not self._closed:
                await asyncio.sleep(_LISTEN_BACKOFF[min(failures, len(_LISTEN_BACKOFF)) - 1])

    def _listen_failed(self, failures: int, exc: Exception) -> int:
        if failures == 0:
            log.warning(
                "approvals: cannot listen for review decisions on %s (%s: %s); retrying, "
                "and held statements poll the store meanwhile",
                self.channel,
                type(exc).__name__,
                exc,
            )
        return failures + 1

    async def _listen_on(self, conn: asyncpg.Connection, *, recovered: bool) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(self.channel, self._notified)
        # From here on every change is notified; what changed while nobody listened is
        # read back, from a little before the last moment this store knew it listened.
        heard_until, self._heard_until = self._heard_until, await self._clock(conn)
        # The tables exist from here on (the first listen creates them, at start).
        pool = await self._open()
        if heard_until is not None:
            await self._catch_up(pool, heard_until - _CATCH_UP_MARGIN)
        self.listening.set()
        if recovered:
            log.info("approvals: listening for review decisions on %s again", self.channel)
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), _LISTEN_CHECK)
            if not lost.is_set():
                # A peer that vanished without closing is found here.
                self._heard_until = await self._clock(conn)
        raise ConnectionError("the listening connection to the review store was lost")

    async def _clock(self, conn: asyncpg.Connection) -> datetime:
        now: datetime = await conn.fetchval(
            "SELECT clock_timestamp()", timeout=self._connect_timeout
        )
        return now

    async def _catch_up(self, pool: asyncpg.Pool, since: datetime) -> None:
        rows = await pool.fetch(self._q.ended_since, since)
        for row in rows:
            self._report(_review(row))

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        task = asyncio.get_running_loop().create_task(self._changed(str(payload)))
        self._fetches.add(task)
        task.add_done_callback(self._fetches.discard)

    async def _changed(self, review_id: str) -> None:
        try:
            review = await self.get(review_id)
        except ReviewNotFound:
            return
        except Exception:
            log.warning("approvals: could not read review %s after its change", review_id)
            return
        self._report(review)

    def _report(self, review: Review) -> None:
        if self._on_change is not None:
            try:
                self._on_change(review)
            except Exception:
                log.exception("approvals: handling the change of review %s failed", review.id)

    async def close(self) -> None:
        """Stop listening and close the pool."""
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(BaseException):
                await self._listener
            self._listener = None
        for task in builtins.list(self._fetches):
            task.cancel()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self._connect_timeout)
            except Exception:
                pool.terminate()
