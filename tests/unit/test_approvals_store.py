"""SqliteReviewStore: persistence across restarts, atomic uses and decisions, expiry."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest

from querywarden.approvals import (
    Party,
    Review,
    ReviewConflict,
    ReviewDecision,
    ReviewNotFound,
    SqliteReviewStore,
    normalize_statement,
)
from querywarden.approvals.model import new_review_id

T = TypeVar("T")

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
AGENT = Party(subject="agent-7", issuer="corp", groups=("ai-agents",))
DBA = Party(subject="dba-1", issuer="corp", groups=("dba-oncall",))


def review(statement: str = "DELETE FROM orders WHERE id = 5", **fields: object) -> Review:
    data: dict[str, object] = {
        "id": new_review_id(),
        "requester": AGENT,
        "database": "app",
        "statement": statement,
        "normalized": normalize_statement(statement),
        "rule": "agents",
        "reason": "DELETE needs approval",
        "created": NOW,
    }
    data.update(fields)
    return Review.model_validate(data)


def run_with(path: Path, body: Callable[[SqliteReviewStore], Awaitable[T]]) -> T:
    """Run ``body`` with a fresh store on ``path`` (a gateway process's lifetime)."""

    async def scenario() -> T:
        store = SqliteReviewStore(path)
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(scenario())


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "reviews.sqlite"


def test_create_get_list(db: Path) -> None:
    async def body(store: SqliteReviewStore) -> None:
        first = (await store.create(review())).review
        second = (
            await store.create(review("DROP TABLE t", created=NOW + timedelta(seconds=1)))
        ).review
        assert await store.get(first.id) == first
        assert [r.id for r in await store.list()] == [first.id, second.id]
        await store.decide(second.id, DBA, False, "no", uses=1, ttl=timedelta(minutes=1), now=NOW)
        assert [r.id for r in await store.list(pending_only=True)] == [first.id]
        with pytest.raises(ReviewNotFound):
            await store.get("nope")

    run_with(db, body)


def test_the_file_is_private(db: Path) -> None:
    async def body(store: SqliteReviewStore) -> None:
        await store.create(review())

    run_with(db, body)
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_an_identical_pending_review_is_returned_instead_of_a_second_one(db: Path) -> None:
    async def body(store: SqliteReviewStore) -> None:
        first, created = await store.create(review())
        assert created
        again, created = await store.create(review("delete  from orders where id=5;"))
        assert again == first and not created
        # Anything else that differs makes another review.
        others = [
            review("DELETE FROM orders WHERE id = 6"),
            review(database="other"),
            review(requester=Party(subject="agent-7", issuer="other-idp")),
            review(requester=Party(subject="agent-8", issuer="corp")),
        ]
        for other in others:
            assert await store.create(other) == (other, True)
        # Once decided, the same statement opens a new review.
        await store.decide(first.id, DBA, False, "no", uses=1, ttl=timedelta(minutes=1), now=NOW)
        reopened, created = await store.create(review())
        assert created and reopened.id != first.id

    run_with(db, body)


def test_a_pending_review_and_a_grant_survive_a_restart(db: Path) -> None:
    pending = review("DROP TABLE a")
    granted = review("DROP TABLE b")

    async def before(store: SqliteReviewStore) -> None:
        await store.create(pending)
        await store.create(granted)
        await store.decide(granted.id, DBA, True, "ok", uses=1, ttl=timedelta(minutes=15), now=NOW)

    async def after(store: SqliteReviewStore) -> None:
        assert await store.get(pending.id) == pending
        grant = await store.find_grant(AGENT, "app", normalize_statement("drop table b"), now=NOW)
        assert grant is not None and grant.id == granted.id
        assert grant.approver == DBA and grant.comment == "ok"
        assert grant.grant_expires == NOW + timedelta(minutes=15)
        used = await store.use(grant.id, now=NOW + timedelta(seconds=1))
        assert used.uses_left == 0 and used.used_at == (NOW + timedelta(seconds=1),)

    run_with(db, before)
    run_with(db, after)  # a new store on the same file: the gateway restarted


def test_decide_only_once(db: Path) -> None:
    async def body(store: SqliteReviewStore) -> None:
        r = (await store.create(review())).review
        ttl = timedelta(minutes=1)
        approved = await store.decide(r.id, DBA, True, "ok", uses=2, ttl=ttl, now=NOW)
        assert approved.decision is ReviewDecision.APPROVED and approved.uses_left == 2
        assert approved.decided == NOW
        with pytest.raises(ReviewConflict, match="already approved"):
            await store.decide(r.id, DBA, False, "changed my mind", uses=1, ttl=ttl, now=NOW)
        with pytest.raises(ReviewConflict):
            await store.withdraw(r.id, "client went away", now=NOW)
        with pytest.raises(ReviewConflict):
            await store.expire(r.id, now=NOW)
        assert (await store.get(r.id)).decision is ReviewDecision.APPROVED

    run_with(db, body)


def test_withdraw_and_expire_end_a_pending_review(db: Path) -> None:
    async def body(store: SqliteReviewStore) -> None:
        a = (await store.create(review("DROP TABLE a"))).review
        b = (await store.create(review("DROP TABLE b"))).review
        withdrawn = await store.withdraw(a.id, "cancelled by the client", now=NOW)
        assert withdrawn.decision is ReviewDecision.WITHDRAWN
        assert withdrawn.comment == "cancelled by the client"
        expired = await store.expire(b.id, now=NOW)
        assert expired.decision is ReviewDecision.EXPIRED and expired.decided == NOW
        ttl = timedelta(minutes=1)
        with pytest.raises(ReviewConflict, match="already expired"):
            await store.decide(b.id, DBA, True, "late", uses=1, ttl=ttl, now=NOW)

    run_with(db, body)


def test_grants_match_the_exact_statement_requester_and_database(db: Path) -> None:
    async def body(store: SqliteReviewStore) -> None:
        r = (await store.create(review())).review
        await store.decide(r.id, DBA, True, "ok", uses=1, ttl=timedelta(minutes=1), now=NOW)
        same = normalize_statement("DELETE FROM orders WHERE id = 5")
        assert await store.find_grant(AGENT, "app", same, now=NOW) is not None
        id6 = normalize_statement("DELETE FROM orders WHERE id = 6")
        assert await store.find_grant(AGENT, "app", id6, now=NOW) is None
        assert await store.find_grant(AGENT, "other", same, now=NOW) is None
        stranger = Party(subject="agent-7", issuer="other-idp")
        assert await store.find_grant(stranger, "app", same, now=NOW) is None

    run_with(db, body)


def test_a_grant_expires(db: Path) -> None:
    async def body(store: SqliteReviewStore) -> None:
        r = (await store.create(review())).review
        await store.decide(r.id, DBA, True, "ok", uses=-1, ttl=timedelta(minutes=15), now=NOW)
        key = r.normalized
        later = NOW + timedelta(minutes=15)
        assert await store.find_grant(AGENT, "app", key, now=later - timedelta(seconds=1))
        assert await store.find_grant(AGENT, "app", key, now=later) is None
        with pytest.raises(ReviewConflict, match="expired"):
            await store.use(r.id, now=later)

    run_with(db, body)


def test_uses_count_down_and_unlimited_stays_unlimited(db: Path) -> None:
    async def body(store: SqliteReviewStore) -> None:
        ttl = timedelta(minutes=15)
        two = (await store.create(review("DROP TABLE a"))).review
        await store.decide(two.id, DBA, True, "ok", uses=2, ttl=ttl, now=NOW)
        assert (await store.use(two.id, now=NOW)).uses_left == 1
        assert (await store.use(two.id, now=NOW)).uses_left == 0
        with pytest.raises(ReviewConflict, match="used up"):
            await store.use(two.id, now=NOW)
        assert await store.find_grant(AGENT, "app", two.normalized, now=NOW) is None

        unlimited = (await store.create(review("DROP TABLE b"))).review
        await store.decide(unlimited.id, DBA, True, "ok", uses=-1, ttl=ttl, now=NOW)
        for i in range(5):
            used = await store.use(unlimited.id, now=NOW + timedelta(seconds=i))
        assert used.uses_left == -1 and len(used.used_at) == 5

        pending = (await store.create(review("DROP TABLE c"))).review
        with pytest.raises(ReviewConflict, match="pending, not approved"):
            await store.use(pending.id, now=NOW)

    run_with(db, body)


def test_two_stores_on_one_file_cannot_both_use_a_single_use_grant(db: Path) -> None:
    """Two gateway processes' stores (own connections and threads) race for one use."""

    async def scenario() -> None:
        a, b = SqliteReviewStore(db), SqliteReviewStore(db)
        try:
            for n in range(20):
                r = (await a.create(review(f"DELETE FROM t WHERE id = {n}"))).review
                await a.decide(r.id, DBA, True, "ok", uses=1, ttl=timedelta(minutes=1), now=NOW)
                results = await asyncio.gather(
                    a.use(r.id, now=NOW), b.use(r.id, now=NOW), return_exceptions=True
                )
                assert sum(isinstance(x, Review) for x in results) == 1, results
                assert sum(isinstance(x, ReviewConflict) for x in results) == 1, results
                assert (await b.get(r.id)).used_at == (NOW,)
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


_USER = textwrap.dedent(
    """
    import asyncio, sys
    from datetime import UTC, datetime
    from pathlib import Path
    from querywarden.approvals import ReviewConflict, SqliteReviewStore

    async def main() -> None:
        store = SqliteReviewStore(Path(sys.argv[1]))
        # Start together: wait for the go file the test creates once all are ready.
        go = Path(sys.argv[3])
        while not go.exists():
            await asyncio.sleep(0.005)
        try:
            await store.use(sys.argv[2], now=datetime.fromisoformat(sys.argv[4]))
            print("used")
        except ReviewConflict:
            print("refused")
        finally:
            await store.close()

    asyncio.run(main())
    """
)


def test_processes_racing_for_a_single_use_grant_get_exactly_one_use(
    db: Path, tmp_path: Path
) -> None:
    async def setup(store: SqliteReviewStore) -> str:
        r = (await store.create(review())).review
        await store.decide(r.id, DBA, True, "ok", uses=1, ttl=timedelta(minutes=1), now=NOW)
        return r.id

    review_id = run_with(db, setup)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _USER, str(db), review_id, str(go), NOW.isoformat()],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    go.touch()
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outcomes == ["refused", "refused", "refused", "used"]


def test_a_newer_schema_is_refused(db: Path) -> None:
    run_with(db, lambda store: store.list())
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        run_with(db, lambda store: store.list())


def test_bound_parameters_are_part_of_the_statement(db: Path) -> None:
    async def body(store: SqliteReviewStore) -> None:
        text = "DELETE FROM orders WHERE id = $1"
        five = (await store.create(review(text, parameters=("5",)))).review
        assert (await store.create(review(text, parameters=("5",)))).review.id == five.id
        six = (await store.create(review(text, parameters=("6",)))).review
        null = (await store.create(review(text, parameters=(None,)))).review
        assert len({five.id, six.id, null.id}) == 3
        await store.decide(five.id, DBA, True, "ok", uses=1, ttl=timedelta(minutes=1), now=NOW)
        key = normalize_statement(text)
        grant = await store.find_grant(AGENT, "app", key, parameters=("5",), now=NOW)
        assert grant is not None and grant.parameters == ("5",)
        for other in [("6",), (None,), (), ("5", "6")]:
            assert await store.find_grant(AGENT, "app", key, parameters=other, now=NOW) is None

    run_with(db, body)
