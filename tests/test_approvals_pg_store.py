"""PostgresReviewStore against the real test cluster: the store contract, and its own.

The contract (review_store_contract.py) runs with every "process" a store of its own on
one schema. Besides: replicas creating the schema at once, a newer schema refused, a
decision through one store heard by another at once (LISTEN/NOTIFY), the listener coming
back after its connection is killed, and an unreachable database failing each call.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest

from querywarden.approvals import Review, ReviewStore
from querywarden.approvals.pg_store import SCHEMA_VERSION, PostgresReviewStore
from querywarden.devcluster import DATABASE, ROLE_PASSWORD, EphemeralCluster, free_port
from review_store_contract import DBA, MINUTE, NOW, ReviewStoreContract, review

pytestmark = pytest.mark.postgres


def store_url(pg: EphemeralCluster) -> str:
    """The test cluster's database as the store's URL (the password goes separately)."""
    return f"postgresql://qw_scram@127.0.0.1:{pg.port}/{DATABASE}"


@pytest.fixture
def schema(pg: EphemeralCluster) -> Iterator[str]:
    """A schema name of this test's own; dropped afterwards."""
    name = f"qw_test_{secrets.token_hex(4)}"
    yield name
    pg.psql(f"DROP SCHEMA IF EXISTS {name} CASCADE")


@pytest.fixture
def opener(pg: EphemeralCluster, schema: str) -> Callable[[], PostgresReviewStore]:
    return lambda: PostgresReviewStore(store_url(pg), schema=schema, password=ROLE_PASSWORD)


class TestPostgresReviewStore(ReviewStoreContract):
    """The contract every store keeps, for reviews in a PostgreSQL schema."""

    @pytest.fixture
    def opener(self, opener: Callable[[], PostgresReviewStore]) -> Callable[[], ReviewStore]:
        return opener


def test_replicas_starting_together_create_the_schema_once(
    opener: Callable[[], PostgresReviewStore], pg: EphemeralCluster, schema: str
) -> None:
    async def scenario() -> None:
        stores = [opener() for _ in range(6)]
        try:
            assert await asyncio.gather(*(s.list() for s in stores)) == [[]] * 6
        finally:
            for store in stores:
                await store.close()

    asyncio.run(scenario())
    assert pg.psql(f"SELECT version FROM {schema}.schema_version").strip() == str(SCHEMA_VERSION)
    tables = pg.psql(
        f"SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables "
        f"WHERE schemaname = '{schema}'"
    )
    assert tables.strip() == "reviews,schema_version"


def test_a_newer_schema_is_refused(
    opener: Callable[[], PostgresReviewStore], pg: EphemeralCluster, schema: str
) -> None:
    async def touch() -> None:
        store = opener()
        try:
            await store.list()
        finally:
            await store.close()

    asyncio.run(touch())
    pg.psql(f"UPDATE {schema}.schema_version SET version = 99")
    with pytest.raises(RuntimeError, match=r"version 99, newer than this gateway.*upgrade"):
        asyncio.run(touch())


def test_a_decision_through_another_store_is_heard_at_once(
    opener: Callable[[], PostgresReviewStore],
) -> None:
    async def scenario() -> float:
        held_on, decided_on = opener(), opener()
        heard: asyncio.Queue[Review] = asyncio.Queue()
        try:
            held_on.watch(heard.put_nowait)
            await asyncio.wait_for(held_on.listening.wait(), 10)
            r = (await held_on.create(review())).review
            started = time.monotonic()
            await decided_on.decide(r.id, DBA, True, "ok", uses=1, ttl=MINUTE, now=NOW)
            changed = await asyncio.wait_for(heard.get(), 5)
            elapsed = time.monotonic() - started
            assert changed.id == r.id and not changed.pending
            assert changed.approver == DBA
            return elapsed
        finally:
            await held_on.close()
            await decided_on.close()

    # Within a few milliseconds; far below the 0.5 s the polling stores take.
    assert asyncio.run(scenario()) < 0.25


def test_the_listener_comes_back_after_its_connection_is_killed(
    opener: Callable[[], PostgresReviewStore], pg: EphemeralCluster
) -> None:
    listeners = (
        "SELECT coalesce(string_agg(pid::text, ','), '') FROM pg_stat_activity "
        "WHERE application_name = 'querywarden-reviews-listen'"
    )

    async def scenario() -> None:
        held_on, decided_on = opener(), opener()
        heard: asyncio.Queue[Review] = asyncio.Queue()
        try:
            held_on.watch(heard.put_nowait)
            await asyncio.wait_for(held_on.listening.wait(), 10)
            before = await asyncio.to_thread(pg.psql, listeners)
            assert before.strip(), "no listening connection"
            await asyncio.to_thread(pg.psql, f"SELECT pg_terminate_backend({before.strip()})")
            deadline = time.monotonic() + 10
            while True:
                now = (await asyncio.to_thread(pg.psql, listeners)).strip()
                if now and now != before.strip() and held_on.listening.is_set():
                    break
                assert time.monotonic() < deadline, "the listener did not come back"
                await asyncio.sleep(0.05)
            r = (await held_on.create(review())).review
            await decided_on.decide(r.id, DBA, False, "no", uses=1, ttl=MINUTE, now=NOW)
            assert (await asyncio.wait_for(heard.get(), 5)).id == r.id
        finally:
            await held_on.close()
            await decided_on.close()

    asyncio.run(scenario())


def test_an_unreachable_database_fails_each_call_quickly() -> None:
    async def scenario() -> None:
        store = PostgresReviewStore(
            f"postgresql://qw_scram@127.0.0.1:{free_port()}/{DATABASE}",
            password=ROLE_PASSWORD,
            connect_timeout=2.0,
        )
        try:
            for _ in range(2):  # the second call tries again
                started = time.monotonic()
                with pytest.raises(OSError):
                    await store.create(review())
                assert time.monotonic() - started < 3
            with pytest.raises(OSError):
                await store.decide(
                    "any", DBA, True, "ok", uses=1, ttl=timedelta(minutes=1), now=NOW
                )
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_decision_made_while_the_listener_was_away_is_read_back(
    opener: Callable[[], PostgresReviewStore], pg: EphemeralCluster
) -> None:
    """The listener's connection is killed and it cannot reconnect for a while (the role
    may open no new connection); a decision made meanwhile reaches it once it is back."""
    listener = (
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'querywarden-reviews-listen'"
    )

    async def scenario() -> None:
        held_on, decided_on = opener(), opener()
        heard: asyncio.Queue[Review] = asyncio.Queue()
        try:
            held_on.watch(heard.put_nowait)
            await asyncio.wait_for(held_on.listening.wait(), 10)
            r = (await held_on.create(review())).review
            await decided_on.list()  # its pool holds a connection from before the limit
            pid = (await asyncio.to_thread(pg.psql, listener)).strip()
            await asyncio.to_thread(
                pg.psql,
                f"ALTER ROLE qw_scram CONNECTION LIMIT 0; SELECT pg_terminate_backend({pid})",
            )
            try:
                deadline = time.monotonic() + 10
                while held_on.listening.is_set():
                    assert time.monotonic() < deadline, "the listener did not notice"
                    await asyncio.sleep(0.02)
                await decided_on.decide(r.id, DBA, True, "ok", uses=1, ttl=MINUTE, now=NOW)
                await asyncio.sleep(0.5)
                assert heard.empty(), "heard while the listener could not connect?"
            finally:
                await asyncio.to_thread(pg.psql, "ALTER ROLE qw_scram CONNECTION LIMIT -1")
            changed = await asyncio.wait_for(heard.get(), 15)
            assert changed.id == r.id and not changed.pending
        finally:
            await held_on.close()
            await decided_on.close()

    asyncio.run(scenario())
