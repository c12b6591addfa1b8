"""What every :class:`ReviewStore` must do: one suite, run against each implementation.

A test module subclasses :class:`ReviewStoreContract` (as ``Test...``) and provides the
``opener`` fixture: a callable that opens a new store on the same reviews each time it is
called, as another gateway process (a restart, a replica) would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest

from querywarden.approvals import (
    Party,
    Review,
    ReviewConflict,
    ReviewDecision,
    ReviewNotFound,
    ReviewStore,
    normalize_statement,
)
from querywarden.approvals.model import new_review_id

T = TypeVar("T")

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
AGENT = Party(subject="agent-7", issuer="corp", groups=("ai-agents",))
DBA = Party(subject="dba-1", issuer="corp", groups=("dba-oncall",))
DBA2 = Party(subject="dba-2", issuer="corp", groups=("dba-oncall",))
MINUTE = timedelta(minutes=1)

#: Opens a new store on the same reviews.
Opener = Callable[[], ReviewStore]


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


def run_with(opener: Opener, body: Callable[[ReviewStore], Awaitable[T]]) -> T:
    """Run ``body`` with a fresh store (a gateway process's lifetime)."""

    async def scenario() -> T:
        store = opener()
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(scenario())


def run_with_two(opener: Opener, body: Callable[[ReviewStore, ReviewStore], Awaitable[T]]) -> T:
    """Run ``body`` with two stores on the same reviews (two gateway processes)."""

    async def scenario() -> T:
        a, b = opener(), opener()
        try:
            return await body(a, b)
        finally:
            await a.close()
            await b.close()

    return asyncio.run(scenario())


class ReviewStoreContract:
    """The behaviour the service relies on, whatever holds the reviews."""

    def test_create_get_list(self, opener: Opener) -> None:
        async def body(store: ReviewStore) -> None:
            first = (await store.create(review())).review
            second = (
                await store.create(review("DROP TABLE t", created=NOW + timedelta(seconds=1)))
            ).review
            assert await store.get(first.id) == first
            assert [r.id for r in await store.list()] == [first.id, second.id]
            await store.decide(second.id, DBA, False, "no", uses=1, ttl=MINUTE, now=NOW)
            assert [r.id for r in await store.list(pending_only=True)] == [first.id]
            with pytest.raises(ReviewNotFound):
                await store.get("nope")

        run_with(opener, body)

    def test_an_identical_pending_review_is_returned_instead_of_a_second_one(
        self, opener: Opener
    ) -> None:
        async def body(store: ReviewStore) -> None:
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
            await store.decide(first.id, DBA, False, "no", uses=1, ttl=MINUTE, now=NOW)
            reopened, created = await store.create(review())
            assert created and reopened.id != first.id

        run_with(opener, body)

    def test_a_review_id_is_never_reused(self, opener: Opener) -> None:
        async def body(store: ReviewStore) -> None:
            first = (await store.create(review("DROP TABLE a"))).review
            with pytest.raises(ReviewConflict, match="exists already"):
                await store.create(review("DROP TABLE b", id=first.id))

        run_with(opener, body)

    def test_a_pending_review_and_a_grant_survive_a_restart(self, opener: Opener) -> None:
        pending = review("DROP TABLE a")
        granted = review("DROP TABLE b")

        async def before(store: ReviewStore) -> None:
            await store.create(pending)
            await store.create(granted)
            ttl = timedelta(minutes=15)
            await store.decide(granted.id, DBA, True, "ok", uses=1, ttl=ttl, now=NOW)

        async def after(store: ReviewStore) -> None:
            assert await store.get(pending.id) == pending
            key = normalize_statement("drop table b")
            grant = await store.find_grant(AGENT, "app", key, now=NOW)
            assert grant is not None and grant.id == granted.id
            assert grant.approver == DBA and grant.comment == "ok"
            assert grant.grant_expires == NOW + timedelta(minutes=15)
            used = await store.use(grant.id, now=NOW + timedelta(seconds=1))
            assert used.uses_left == 0 and used.used_at == (NOW + timedelta(seconds=1),)

        run_with(opener, before)
        run_with(opener, after)  # a new store on the same reviews: the gateway restarted

    def test_decide_only_once(self, opener: Opener) -> None:
        async def body(store: ReviewStore) -> None:
            r = (await store.create(review())).review
            approved = await store.decide(r.id, DBA, True, "ok", uses=2, ttl=MINUTE, now=NOW)
            assert approved.decision is ReviewDecision.APPROVED and approved.uses_left == 2
            assert approved.decided == NOW
            with pytest.raises(ReviewConflict, match="already approved"):
                await store.decide(r.id, DBA, False, "changed my mind", uses=1, ttl=MINUTE, now=NOW)
            with pytest.raises(ReviewConflict):
                await store.withdraw(r.id, "client went away", now=NOW)
            with pytest.raises(ReviewConflict):
                await store.expire(r.id, now=NOW)
            assert (await store.get(r.id)).decision is ReviewDecision.APPROVED
            with pytest.raises(ReviewNotFound):
                await store.decide("nope", DBA, True, "ok", uses=1, ttl=MINUTE, now=NOW)

        run_with(opener, body)

    def test_withdraw_and_expire_end_a_pending_review(self, opener: Opener) -> None:
        async def body(store: ReviewStore) -> None:
            a = (await store.create(review("DROP TABLE a"))).review
            b = (await store.create(review("DROP TABLE b"))).review
            withdrawn = await store.withdraw(a.id, "cancelled by the client", now=NOW)
            assert withdrawn.decision is ReviewDecision.WITHDRAWN
            assert withdrawn.comment == "cancelled by the client"
            expired = await store.expire(b.id, now=NOW)
            assert expired.decision is ReviewDecision.EXPIRED and expired.decided == NOW
            with pytest.raises(ReviewConflict, match="already expired"):
                await store.decide(b.id, DBA, True, "late", uses=1, ttl=MINUTE, now=NOW)

        run_with(opener, body)

    def test_grants_match_the_exact_statement_requester_and_database(self, opener: Opener) -> None:
        async def body(store: ReviewStore) -> None:
            r = (await store.create(review())).review
            await store.decide(r.id, DBA, True, "ok", uses=1, ttl=MINUTE, now=NOW)
            same = normalize_statement("DELETE FROM orders WHERE id = 5")
            assert await store.find_grant(AGENT, "app", same, now=NOW) is not None
            id6 = normalize_statement("DELETE FROM orders WHERE id = 6")
            assert await store.find_grant(AGENT, "app", id6, now=NOW) is None
            assert await store.find_grant(AGENT, "other", same, now=NOW) is None
            stranger = Party(subject="agent-7", issuer="other-idp")
            assert await store.find_grant(stranger, "app", same, now=NOW) is None

        run_with(opener, body)

    def test_a_grant_expires(self, opener: Opener) -> None:
        async def body(store: ReviewStore) -> None:
            r = (await store.create(review())).review
            await store.decide(r.id, DBA, True, "ok", uses=-1, ttl=timedelta(minutes=15), now=NOW)
            key = r.normalized
            later = NOW + timedelta(minutes=15)
            assert await store.find_grant(AGENT, "app", key, now=later - timedelta(seconds=1))
            assert await store.find_grant(AGENT, "app", key, now=later) is None
            with pytest.raises(ReviewConflict, match="expired"):
                await store.use(r.id, now=later)

        run_with(opener, body)

    def test_uses_count_down_and_unlimited_stays_unlimited(self, opener: Opener) -> None:
        async def body(store: ReviewStore) -> None:
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
            with pytest.raises(ReviewNotFound):
                await store.use("nope", now=NOW)

        run_with(opener, body)

    def test_bound_parameters_are_part_of_the_statement(self, opener: Opener) -> None:
        async def body(store: ReviewStore) -> None:
            text = "DELETE FROM orders WHERE id = $1"
            five = (await store.create(review(text, parameters=("5",)))).review
            assert (await store.create(review(text, parameters=("5",)))).review.id == five.id
            six = (await store.create(review(text, parameters=("6",)))).review
            null = (await store.create(review(text, parameters=(None,)))).review
            assert len({five.id, six.id, null.id}) == 3
            await store.decide(five.id, DBA, True, "ok", uses=1, ttl=MINUTE, now=NOW)
            key = normalize_statement(text)
            grant = await store.find_grant(AGENT, "app", key, parameters=("5",), now=NOW)
            assert grant is not None and grant.parameters == ("5",)
            for other in [("6",), (None,), (), ("5", "6")]:
                assert await store.find_grant(AGENT, "app", key, parameters=other, now=NOW) is None

        run_with(opener, body)

    def test_prune_deletes_what_ended_before_the_retention(self, opener: Opener) -> None:
        async def body(store: ReviewStore) -> None:
            pending = (await store.create(review("DROP TABLE a"))).review
            denied = (await store.create(review("DROP TABLE b"))).review
            await store.decide(denied.id, DBA, False, "no", uses=1, ttl=MINUTE, now=NOW)
            granted = (await store.create(review("DROP TABLE c"))).review
            ttl = timedelta(hours=1)
            await store.decide(granted.id, DBA, True, "ok", uses=1, ttl=ttl, now=NOW)
            # Nothing ended before NOW; the denial ended at NOW, the grant ends at NOW + 1h.
            assert await store.prune(NOW) == 0
            assert await store.prune(NOW + timedelta(minutes=30)) == 1
            assert {r.id for r in await store.list()} == {pending.id, granted.id}
            assert await store.prune(NOW + timedelta(hours=2)) == 1
            assert [r.id for r in await store.list()] == [pending.id]

        run_with(opener, body)

    # -- two processes at once ---------------------------------------------------------

    def test_two_stores_cannot_both_use_a_single_use_grant(self, opener: Opener) -> None:
        async def body(a: ReviewStore, b: ReviewStore) -> None:
            for n in range(20):
                r = (await a.create(review(f"DELETE FROM t WHERE id = {n}"))).review
                await a.decide(r.id, DBA, True, "ok", uses=1, ttl=MINUTE, now=NOW)
                results = await asyncio.gather(
                    a.use(r.id, now=NOW), b.use(r.id, now=NOW), return_exceptions=True
                )
                assert sum(isinstance(x, Review) for x in results) == 1, results
                assert sum(isinstance(x, ReviewConflict) for x in results) == 1, results
                assert (await b.get(r.id)).used_at == (NOW,)

        run_with_two(opener, body)

    def test_of_two_stores_deciding_at_once_exactly_one_wins(self, opener: Opener) -> None:
        async def body(a: ReviewStore, b: ReviewStore) -> None:
            for n in range(20):
                r = (await a.create(review(f"DELETE FROM t WHERE id = {n}"))).review
                results = await asyncio.gather(
                    a.decide(r.id, DBA, True, "yes", uses=1, ttl=MINUTE, now=NOW),
                    b.decide(r.id, DBA2, False, "no", uses=1, ttl=MINUTE, now=NOW),
                    return_exceptions=True,
                )
                won = [x for x in results if isinstance(x, Review)]
                assert len(won) == 1, results
                assert sum(isinstance(x, ReviewConflict) for x in results) == 1, results
                assert await a.get(r.id) == won[0]

        run_with_two(opener, body)

    def test_two_stores_opening_the_same_review_at_once_open_one(self, opener: Opener) -> None:
        async def body(a: ReviewStore, b: ReviewStore) -> None:
            for n in range(20):
                text = f"DELETE FROM t WHERE id = {n}"
                results = await asyncio.gather(a.create(review(text)), b.create(review(text)))
                assert sorted(created for _, created in results) == [False, True], results
                assert results[0].review == results[1].review
                assert len(await a.list(pending_only=True)) == n + 1

        run_with_two(opener, body)
