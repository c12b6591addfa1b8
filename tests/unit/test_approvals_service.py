"""ApprovalService: approvers, self-approval, waiting, grants, reuse, expiry and events."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from querywarden.approvals import (
    ApprovalService,
    ApprovalSettings,
    NotAnApprover,
    Review,
    ReviewConflict,
    ReviewDecision,
    ReviewNotFound,
    ReviewSummary,
    SelfApproval,
    SqliteReviewStore,
)
from querywarden.identity import Principal

T = TypeVar("T")

AGENT = Principal("agent-7", frozenset({"ai-agents"}), issuer="corp")
DBA = Principal("dba-1", frozenset({"dba-oncall"}), issuer="corp")
DBA_2 = Principal("dba-2", frozenset({"dba-oncall", "ai-agents"}), issuer="corp")
LEAD = Principal("lead", frozenset(), issuer="corp")
SUPPORT = Principal("carol", frozenset({"support"}), issuer="corp")
SUMMARY = ReviewSummary(operations=("delete",), writes=("public.orders",))
DELETE_5 = "DELETE FROM orders WHERE id = 5"

SETTINGS = ApprovalSettings.model_validate(
    {
        "approvers": {"groups": ["dba-oncall"], "users": ["lead"]},
        "hold": "60s",
        "grantTTL": "15m",
        "pendingTTL": "1h",
    }
)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 5, 1, 12, tzinfo=UTC).timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta.total_seconds()


class Harness:
    def __init__(self, path: Path, **settings: Any) -> None:
        self.clock = Clock()
        self.events: list[tuple[str, str]] = []
        self.store = SqliteReviewStore(path)
        self.service = ApprovalService(
            self.store,
            SETTINGS.model_copy(update=settings),
            clock=self.clock,
            on_event=lambda kind, review: self.events.append((kind, review.id)),
            poll_interval=0.1,
        )

    async def request(
        self, statement: str = DELETE_5, who: Principal = AGENT, database: str = "app"
    ) -> Review:
        return await self.service.request(
            who, database, statement, summary=SUMMARY, rule="agents", reason="DELETE needs approval"
        )


def run(tmp_path: Path, body: Callable[[Harness], Awaitable[T]], **settings: Any) -> T:
    async def scenario() -> T:
        harness = Harness(tmp_path / "reviews.sqlite", **settings)
        try:
            return await body(harness)
        finally:
            await harness.store.close()

    return asyncio.run(scenario())


# --- approvers ----------------------------------------------------------------------------


def test_nobody_approves_their_own_request(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        review = await h.request(who=DBA_2)  # an approver who is also an agent
        with pytest.raises(SelfApproval, match="may not approve it"):
            await h.service.decide(review.id, DBA_2, True, "mine")
        # Same subject from another issuer is another identity.
        other_issuer = Principal("dba-2", frozenset({"dba-oncall"}), issuer="other-idp")
        approved = await h.service.decide(review.id, other_issuer, True, "checked")
        assert approved.approver is not None and approved.approver.issuer == "other-idp"

    run(tmp_path, body)


def test_self_approval_is_allowed_when_the_policy_says_so(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        review = await h.request(who=DBA_2)
        approved = await h.service.decide(review.id, DBA_2, True, "mine")
        assert approved.decision is ReviewDecision.APPROVED

    run(tmp_path, body, require_distinct_approver=False)


def test_a_requester_may_deny_their_own_request(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        review = await h.request(who=DBA_2)
        denied = await h.service.decide(review.id, DBA_2, False, "never mind")
        assert denied.decision is ReviewDecision.DENIED

    run(tmp_path, body)


def test_approvers_must_match_the_policy_groups_or_users(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        review = await h.request()
        for outsider in (SUPPORT, AGENT):
            for approve in (True, False):
                with pytest.raises(NotAnApprover, match="members of dba-oncall or lead"):
                    await h.service.decide(review.id, outsider, approve, "let me")
        with pytest.raises(PermissionError):
            await h.service.decide(review.id, SUPPORT, True, "let me")
        assert (await h.service.get(review.id)).pending
        # A named user is an approver without the group.
        approved = await h.service.decide(review.id, LEAD, True, "ok")
        assert approved.approver is not None and approved.approver.subject == "lead"

    run(tmp_path, body)


def test_no_approvers_configured_means_nobody_can_approve(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        review = await h.request()
        with pytest.raises(NotAnApprover, match="names no approvers"):
            await h.service.decide(review.id, DBA, True, "ok")

    run(tmp_path, body, approvers=ApprovalSettings().approvers)


def test_only_pending_reviews_can_be_decided(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        review = await h.request()
        await h.service.decide(review.id, DBA, False, "no")
        with pytest.raises(ReviewConflict, match="already denied"):
            await h.service.decide(review.id, DBA_2, True, "yes")
        with pytest.raises(ReviewNotFound):
            await h.service.decide("unknown", DBA, True, "yes")

    run(tmp_path, body)


@pytest.mark.parametrize(("uses", "ttl"), [(0, None), (-2, None), (1, timedelta(0))])
def test_bad_grant_shapes_are_refused(tmp_path: Path, uses: int, ttl: timedelta | None) -> None:
    async def body(h: Harness) -> None:
        review = await h.request()
        with pytest.raises(ValueError, match=r"uses|ttl"):
            await h.service.decide(review.id, DBA, True, "ok", uses=uses, ttl=ttl)

    run(tmp_path, body)


# --- waiting ------------------------------------------------------------------------------


def test_wait_returns_as_soon_as_the_review_is_decided_here(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        # No polling to speak of: only the in-process wake-up can end the wait quickly.
        h.service._poll_interval = 30
        review = await h.request()
        waiter = asyncio.create_task(h.service.wait(review.id, timeout=20))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await h.service.decide(review.id, DBA, True, "ok")
        decided = await asyncio.wait_for(waiter, 5)
        assert time.monotonic() - started < 1
        assert decided.decision is ReviewDecision.APPROVED
        assert not h.service._watches  # nothing left behind

    run(tmp_path, body)


def test_wait_times_out_with_the_review_still_pending(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        review = await h.request()
        started = time.monotonic()
        waited = await h.service.wait(review.id, timeout=0.3)
        assert 0.25 < time.monotonic() - started < 2
        assert waited.pending
        assert (await h.service.wait(review.id, timeout=0)).pending

    run(tmp_path, body)


def test_cancelling_a_wait_leaves_the_review_pending(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        review = await h.request()
        waiter = asyncio.create_task(h.service.wait(review.id, timeout=10))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert (await h.service.get(review.id)).pending
        assert not h.service._watches

    run(tmp_path, body)


_DECIDE_ELSEWHERE = textwrap.dedent(
    """
    import asyncio, sys
    from datetime import UTC, datetime, timedelta
    from pathlib import Path
    from querywarden.approvals import Party, SqliteReviewStore

    async def main() -> None:
        store = SqliteReviewStore(Path(sys.argv[1]))
        approver = Party(subject="dba-1", issuer="corp", groups=("dba-oncall",))
        await store.decide(sys.argv[2], approver, True, "from another replica", uses=1,
                           ttl=timedelta(minutes=15), now=datetime.now(UTC))
        await store.close()

    asyncio.run(main())
    """
)


def test_a_decision_made_by_another_process_is_seen_by_polling(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        review = await h.request()
        waiter = asyncio.create_task(h.service.wait(review.id, timeout=30))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _DECIDE_ELSEWHERE, str(h.store.path), review.id
        )
        assert await process.wait() == 0
        # Polled every 0.5 s: well before the 30 s hold would end.
        decided = await asyncio.wait_for(waiter, 10)
        assert decided.decision is ReviewDecision.APPROVED
        assert decided.comment == "from another replica"
        # The waiter reports the decision it saw (its audit log holds the statement),
        # once, however many sessions wait on it.
        assert h.events == [("created", review.id), ("approved", review.id)]
        again = await h.service.wait(review.id, timeout=1)
        assert again.decision is ReviewDecision.APPROVED
        assert h.events == [("created", review.id), ("approved", review.id)]

    run(tmp_path, body)


def test_withdraw_wakes_the_waiters_and_ends_the_review(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.service._poll_interval = 30
        review = await h.request()
        waiters = [asyncio.create_task(h.service.wait(review.id, timeout=20)) for _ in range(2)]
        await asyncio.sleep(0.05)
        withdrawn = await h.service.withdraw(review.id, "the client cancelled")
        assert withdrawn.decision is ReviewDecision.WITHDRAWN
        for result in await asyncio.wait_for(asyncio.gather(*waiters), 5):
            assert result.decision is ReviewDecision.WITHDRAWN
        assert h.events == [("created", review.id), ("withdrawn", review.id)]

    run(tmp_path, body)


def test_withdraw_after_an_approval_keeps_the_grant(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        review = await h.request()
        await h.service.decide(review.id, DBA, True, "ok")
        kept = await h.service.withdraw(review.id, "the client went away")
        assert kept.decision is ReviewDecision.APPROVED
        assert await h.service.claim_grant(AGENT, "app", DELETE_5) is not None

    run(tmp_path, body)


# --- reviews and grants -------------------------------------------------------------------


def test_an_identical_pending_statement_reuses_its_review(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        first = await h.request()
        again = await h.request("delete from orders  where id=5 -- retry")
        assert again.id == first.id
        assert again.statement == DELETE_5  # the review keeps the text first seen
        other = await h.request("DELETE FROM orders WHERE id = 6")
        assert other.id != first.id
        elsewhere = await h.request(database="reporting")
        assert elsewhere.id != first.id
        assert [kind for kind, _ in h.events] == ["created", "created", "created"]
        assert len(await h.service.list(pending_only=True)) == 3

    run(tmp_path, body)


def test_a_review_records_what_the_gateway_knows(tmp_path: Path) -> None:
    async def body(h: Harness) -> Review:
        return await h.service.request(
            AGENT,
            "app",
            "SELECT * FROM events",
            summary=ReviewSummary(operations=("select",), reads=("public.events",)),
            rule="agents",
            reason="full scan of public.events (about 2500000 rows)",
            estimate=2_500_000,
        )

    review = run(tmp_path, body)
    assert review.requester.subject == "agent-7" and review.requester.groups == ("ai-agents",)
    assert review.requester.issuer == "corp"
    assert review.database == "app" and review.estimate == 2_500_000
    assert review.created == datetime(2026, 5, 1, 12, tzinfo=UTC)
    assert review.decision is ReviewDecision.PENDING and review.uses_left == 0


def test_a_grant_is_single_use_and_for_that_statement_only(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        review = await h.request()
        assert await h.service.grant_for(AGENT, "app", DELETE_5) is None
        await h.service.decide(review.id, DBA, True, "ok")
        assert await h.service.grant_for(AGENT, "app", "DELETE FROM orders WHERE id = 6") is None
        assert await h.service.grant_for(AGENT, "other", DELETE_5) is None
        assert await h.service.grant_for(DBA_2, "app", DELETE_5) is None
        grant = await h.service.grant_for(AGENT, "app", "delete from orders where id = 5;")
        assert grant is not None and grant.id == review.id
        used = await h.service.use(grant.id)
        assert used.uses_left == 0
        assert await h.service.grant_for(AGENT, "app", DELETE_5) is None
        with pytest.raises(ReviewConflict, match="used up"):
            await h.service.use(grant.id)
        assert [k for k, _ in h.events] == ["created", "approved", "used"]

    run(tmp_path, body)


def test_concurrent_claims_of_a_single_use_grant_give_one_run(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        review = await h.request()
        await h.service.decide(review.id, DBA, True, "ok")
        claims = await asyncio.gather(
            *(h.service.claim_grant(AGENT, "app", DELETE_5) for _ in range(5))
        )
        assert sum(c is not None for c in claims) == 1

    run(tmp_path, body)


def test_an_approver_can_widen_a_grant(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        three = await h.request("DELETE FROM orders WHERE id = 1")
        await h.service.decide(three.id, DBA, True, "batch", uses=3)
        for _ in range(3):
            assert await h.service.claim_grant(AGENT, "app", "DELETE FROM orders WHERE id = 1")
        assert await h.service.claim_grant(AGENT, "app", "DELETE FROM orders WHERE id = 1") is None

        window = await h.request("DELETE FROM orders WHERE id = 2")
        approved = await h.service.decide(
            window.id, DBA, True, "for the migration", uses=-1, ttl=timedelta(hours=2)
        )
        assert approved.grant_expires == h.service.now() + timedelta(hours=2)
        for _ in range(10):
            assert await h.service.claim_grant(AGENT, "app", "DELETE FROM orders WHERE id = 2")
        h.clock.advance(timedelta(hours=2))
        assert await h.service.claim_grant(AGENT, "app", "DELETE FROM orders WHERE id = 2") is None

    run(tmp_path, body)


def test_a_grant_lasts_grant_ttl(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        review = await h.request()
        approved = await h.service.decide(review.id, DBA, True, "ok")
        assert approved.grant_expires == h.service.now() + timedelta(minutes=15)
        h.clock.advance(timedelta(minutes=15))
        assert await h.service.grant_for(AGENT, "app", DELETE_5) is None

    run(tmp_path, body)


def test_a_pending_review_expires_after_pending_ttl(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        old = await h.request()
        stale = await h.request("DROP TABLE t")
        h.clock.advance(timedelta(minutes=59))
        assert len(await h.service.list(pending_only=True)) == 2
        h.clock.advance(timedelta(minutes=1))
        with pytest.raises(ReviewConflict, match="expired before it was decided"):
            await h.service.decide(old.id, DBA, True, "too late")
        assert (await h.service.get(old.id)).decision is ReviewDecision.EXPIRED
        # A re-run after that opens a new review instead of reusing the expired one.
        fresh = await h.request()
        assert fresh.id != old.id
        assert (await h.service.get(stale.id)).decision is ReviewDecision.EXPIRED
        assert ("expired", old.id) in h.events and ("expired", stale.id) in h.events
        assert h.events.count(("expired", old.id)) == 1

    run(tmp_path, body)


def test_a_failing_event_hook_does_not_undo_the_change(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        def broken(kind: str, review: Review) -> None:
            raise RuntimeError("audit is down")

        h.service._on_event = broken
        review = await h.request()
        approved = await h.service.decide(review.id, DBA, True, "ok")
        assert approved.decision is ReviewDecision.APPROVED

    run(tmp_path, body)


def test_settings_can_be_replaced_on_policy_reload(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        review = await h.request()
        h.service.settings = SETTINGS.model_copy(
            update={"approvers": SETTINGS.approvers.model_copy(update={"groups": ["support"]})}
        )
        with pytest.raises(NotAnApprover):
            await h.service.decide(review.id, DBA, True, "ok")
        assert (await h.service.decide(review.id, SUPPORT, True, "ok")).approver is not None

    run(tmp_path, body)


def test_a_grant_for_bound_parameters_is_for_those_values_only(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        text = "DELETE FROM orders WHERE id = $1"
        review = await h.service.request(
            AGENT, "app", text, summary=SUMMARY, rule="agents", reason="r", parameters=("5",)
        )
        await h.service.decide(review.id, DBA, True, "ok")
        assert await h.service.claim_grant(AGENT, "app", text, ("6",)) is None
        assert await h.service.claim_grant(AGENT, "app", text) is None
        assert await h.service.claim_grant(AGENT, "app", text, ("5",)) is not None

    run(tmp_path, body)


def test_ended_reviews_are_deleted_after_retention(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        denied = await h.request("DELETE FROM orders WHERE id = 1")
        await h.service.decide(denied.id, DBA, False, "no")
        approved = await h.request("DELETE FROM orders WHERE id = 2")
        await h.service.decide(approved.id, DBA, True, "ok", ttl=timedelta(days=3))
        pending = await h.request("DELETE FROM orders WHERE id = 3")
        assert {r.id for r in await h.service.list()} == {denied.id, approved.id, pending.id}

        # Two days on: the denial ended two days ago (retention 1 day); the approval's
        # grant still runs a day more; the pending one expires (pendingTTL) but only now.
        h.clock.advance(timedelta(days=2))
        remaining = {r.id: r.decision for r in await h.service.list()}
        assert remaining == {
            approved.id: ReviewDecision.APPROVED,
            pending.id: ReviewDecision.EXPIRED,
        }
        # An approval ends when its grant expires (day 3): kept until a day after that.
        h.clock.advance(timedelta(days=1, hours=23, minutes=59))
        assert approved.id in {r.id for r in await h.service.list()}
        h.clock.advance(timedelta(minutes=2))
        assert await h.service.list() == []

    run(tmp_path, body, retention=timedelta(days=1))
