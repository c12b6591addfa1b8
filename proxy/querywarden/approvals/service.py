"""The approval service: opens reviews, waits for decisions, checks approvers, hands out grants.

The gateway's session calls :meth:`ApprovalService.request` when the policy says
``review``, then :meth:`~ApprovalService.wait` for at most the ``hold``; the admin API
calls :meth:`~ApprovalService.decide`. A decision made in this process wakes the waiter at
once; one made elsewhere (another replica, kubectl) is seen at once when the store reports
changes (:class:`~querywarden.approvals.store.WatchedReviewStore`, after :meth:`start`),
and otherwise by polling the store every ``poll_interval``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from querywarden.approvals.model import (
    UNLIMITED_USES,
    ApprovalSettings,
    NotAnApprover,
    Party,
    Review,
    ReviewConflict,
    ReviewSummary,
    SelfApproval,
    new_review_id,
    normalize_statement,
)
from querywarden.approvals.store import ReviewStore, WatchedReviewStore
from querywarden.identity.principal import Principal

__all__ = ["EVENTS", "ApprovalService", "EventHook"]

log = logging.getLogger(__name__)

#: ``on_event(kind, review)``: called after each review event is stored.
EventHook = Callable[[str, Review], None]

#: The event kinds passed to the hook.
EVENTS = ("created", "approved", "denied", "expired", "withdrawn", "used")

#: Attempts of :meth:`ApprovalService.claim_grant` when other sessions keep winning the race.
_CLAIM_ATTEMPTS = 3
#: How many (review, outcome) events the service remembers having reported.
_REPORTED = 4096
#: How soon a wait reads a review again after reading it failed.
_RETRY_FAILED_READ = 0.5
#: How often ended reviews past their retention are deleted.
_PRUNE_EVERY = timedelta(minutes=1)


class _Watch:
    """The waiters of one review in this process, and the event that wakes them."""

    __slots__ = ("event", "waiters")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.waiters = 0


class ApprovalService:
    """Reviews for held statements, over a :class:`ReviewStore`.

    ``clock`` returns POSIX seconds (as :class:`~querywarden.identity.TokenAuthenticator`'s
    does). ``on_event`` receives ``created``, ``approved``, ``denied``, ``expired``,
    ``withdrawn`` and ``used`` with the review as stored; it runs on the event loop, so it
    must not block, and an exception it raises is logged, never propagated (the change it
    reports is already stored).
    """

    def __init__(
        self,
        store: ReviewStore,
        settings: ApprovalSettings,
        *,
        clock: Callable[[], float] = time.time,
        on_event: EventHook | None = None,
        poll_interval: float = 0.5,
    ) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock
        self._on_event = on_event
        self._poll_interval = poll_interval
        self._watches: dict[str, _Watch] = {}
        # Outcomes already reported to ``on_event``, so that a decision made elsewhere
        # (kubectl) is reported once, by the first wait that sees it, and one made here
        # is not reported twice.
        self._reported: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._pruned: datetime | None = None

    def start(self) -> None:
        """Follow the store's changes, if it reports them (call on the running loop)."""
        if isinstance(self._store, WatchedReviewStore):
            self._store.watch(self.observe)

    def observe(self, review: Review) -> None:
        """A review changed in the store (a watch event): wake the sessions holding it."""
        if not review.pending:
            self._notify(review)

    def approve_command(self, review_id: str) -> str:
        """What an approver runs to approve the review, for the requester's notice."""
        if isinstance(self._store, WatchedReviewStore):
            return self._store.approve_command(review_id)
        return f"querywarden reviews approve {review_id} --comment ..."

    @property
    def settings(self) -> ApprovalSettings:
        """The approvals section in force; assign a new one when the policy reloads."""
        return self._settings

    @settings.setter
    def settings(self, value: ApprovalSettings) -> None:
        self._settings = value

    @property
    def has_approvers(self) -> bool:
        """Whether the policy names anyone who can decide (else nothing is held)."""
        approvers = self._settings.approvers
        return bool(approvers.groups or approvers.users)

    @property
    def store(self) -> ReviewStore:
        """The store the reviews live in."""
        return self._store

    def now(self) -> datetime:
        """The service clock as a UTC datetime."""
        return datetime.fromtimestamp(self._clock(), UTC)

    # --- the requester's side ------------------------------------------------------------

    async def request(
        self,
        requester: Principal,
        database: str,
        statement: str,
        *,
        summary: ReviewSummary,
        rule: str,
        reason: str,
        estimate: int | None = None,
        parameters: tuple[str | None, ...] = (),
    ) -> Review:
        """Open a review of ``statement``, or return the identical one already pending.

        Identical means same requester, database, normalized text and ``parameters`` (the
        bound values of an extended-protocol statement, as text, None for NULL): an agent
        re-running a statement after its hold ran out waits on the same review (and the
        approver sees one entry, not one per attempt).
        """
        await self.expire_stale()
        candidate = Review(
            id=new_review_id(),
            requester=Party.from_principal(requester),
            database=database,
            statement=statement,
            normalized=normalize_statement(statement),
            parameters=parameters,
            summary=summary,
            rule=rule,
            reason=reason,
            estimate=estimate,
            created=self.now(),
        )
        stored, created = await self._store.create(candidate)
        if created:
            self._emit("created", stored)
        return stored

    # The timeout is not a deadline for cancelling work: reaching it is a normal outcome
    # (the review, still pending), which asyncio.timeout would turn into an exception.
    async def wait(self, review_id: str, timeout: float) -> Review:  # noqa: ASYNC109
        """The review once it is decided, or as it stands (pending) after ``timeout`` s.

        Cancelling the wait (the client sent a CancelRequest or went away) leaves the
        review as it is: call :meth:`withdraw` to end it. When the store cannot be read,
        the wait tries again until ``timeout`` and then raises the store's error.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        watch = self._watches.setdefault(review_id, _Watch())
        watch.waiters += 1
        failing = False
        try:
            while True:
                # Taken before reading the store: a decision stored after the read sets
                # this very event, so it cannot slip between the read and the wait.
                event = watch.event
                poll = self._poll_interval
                try:
                    review: Review | None = await self._store.get(review_id)
                except Exception as exc:
                    # A store that fails for a moment (its database restarting) does not
                    # end the hold: read again soon, and raise only once the hold is over.
                    if loop.time() >= deadline:
                        raise
                    if not failing:
                        log.warning(
                            "approvals: reading review %s failed (%s); trying again until "
                            "its hold ends",
                            review_id,
                            type(exc).__name__,
                        )
                    failing, review, poll = True, None, min(poll, _RETRY_FAILED_READ)
                remaining = deadline - loop.time()
                if review is not None:
                    if not review.pending:
                        # Decided elsewhere (kubectl, another replica): this process
                        # reports it too, since its audit log holds the statement the
                        # decision is about.
                        self._emit(review.decision.value, review)
                        return review
                    if remaining <= 0:
                        return review
                # The event wakes us for decisions of this process; the timeout is the poll
                # that notices decisions of other processes.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), max(0.0, min(poll, remaining)))
                if event.is_set() and watch.event is event:
                    # Re-arm, so a wake-up that finds the review still pending (it cannot
                    # today, but a store might lag) does not turn the loop into a spin.
                    watch.event = asyncio.Event()
        finally:
            watch.waiters -= 1
            if watch.waiters == 0 and self._watches.get(review_id) is watch:
                del self._watches[review_id]

    async def grant_for(
        self,
        requester: Principal,
        database: str,
        statement: str,
        parameters: tuple[str | None, ...] = (),
    ) -> Review | None:
        """An approved, unexpired grant with uses left for this very statement, or None.

        The grant is not used yet: call :meth:`use` before running the statement (or use
        :meth:`claim_grant`, which does both).
        """
        return await self._store.find_grant(
            Party.from_principal(requester),
            database,
            normalize_statement(statement),
            parameters=parameters,
            now=self.now(),
        )

    async def use(self, review_id: str) -> Review:
        """Take one use of an approved review's grant; do it right before running the statement.

        :class:`ReviewConflict` when the grant expired or another session took its last use.
        """
        review = await self._store.use(review_id, now=self.now())
        self._emit("used", review)
        return review

    async def claim_grant(
        self,
        requester: Principal,
        database: str,
        statement: str,
        parameters: tuple[str | None, ...] = (),
    ) -> Review | None:
        """Find a grant for this statement and use it, or None when there is none left."""
        for _ in range(_CLAIM_ATTEMPTS):
            grant = await self.grant_for(requester, database, statement, parameters)
            if grant is None:
                return None
            try:
                return await self.use(grant.id)
            except ReviewConflict:
                continue  # another session took the last use: look for another grant
        return None

    async def withdraw(self, review_id: str, why: str) -> Review:
        """End a pending review because the requester gave up (cancel, disconnect).

        A review decided meanwhile is left as it is and returned: an approval that raced
        the disconnect stays a grant the requester can use by re-running the statement.
        Every session waiting on the review sees it withdrawn.
        """
        try:
            review = await self._store.withdraw(review_id, why, now=self.now())
        except ReviewConflict:
            return await self._store.get(review_id)
        self._notify(review)
        self._emit("withdrawn", review)
        return review

    # --- the approver's side -------------------------------------------------------------

    def is_approver(self, principal: Principal) -> bool:
        """Whether the policy's ``approvers`` include this Principal."""
        approvers = self._settings.approvers
        return principal.subject in approvers.users or not principal.groups.isdisjoint(
            approvers.groups
        )

    def require_approver(self, principal: Principal) -> None:
        """Raise :class:`NotAnApprover` unless the Principal is one of the approvers."""
        if not self.is_approver(principal):
            approvers = self._settings.approvers
            raise NotAnApprover(
                f"{principal.subject} may not decide reviews: approvers are "
                f"{_describe(approvers.groups, approvers.users)}"
            )

    def may_see(self, principal: Principal, review: Review) -> bool:
        """Approvers see every review; anyone else only their own."""
        return self.is_approver(principal) or review.requester.same_identity(
            Party.from_principal(principal)
        )

    async def get(self, review_id: str) -> Review:
        """The review (:class:`~querywarden.approvals.model.ReviewNotFound` if none)."""
        return await self._store.get(review_id)

    async def list(self, *, pending_only: bool = False) -> builtins.list[Review]:
        """Reviews, oldest first (stale pending ones are expired first)."""
        await self.expire_stale()
        return await self._store.list(pending_only=pending_only)

    async def decide(
        self,
        review_id: str,
        approver: Principal,
        approve: bool,
        comment: str,
        *,
        uses: int = 1,
        ttl: timedelta | None = None,
    ) -> Review:
        """Approve or deny a pending review.

        ``uses`` (approve only): 1 for a single run, N, or -1 for any number of runs until
        the grant expires after ``ttl`` (default: the policy's ``grantTTL``).

        Raises :class:`NotAnApprover` (a PermissionError) when ``approver`` is not in the
        policy's approvers, :class:`SelfApproval` when they approve their own statement
        under ``requireDistinctApprover`` (denying it is allowed), ``ReviewNotFound``,
        ``ReviewConflict`` when it is no longer pending, and ValueError for bad ``uses`` or
        ``ttl``.
        """
        self.require_approver(approver)
        if uses != UNLIMITED_USES and uses < 1:
            raise ValueError("uses must be a positive number, or -1 for unlimited until expiry")
        grant_ttl = self._settings.grant_ttl if ttl is None else ttl
        if grant_ttl <= timedelta(0):
            raise ValueError("ttl must be positive")
        review = await self._store.get(review_id)
        if review.pending and self._stale(review, self.now()):
            await self._expire(review)
            raise ReviewConflict(f"review {review_id} expired before it was decided")
        who = Party.from_principal(approver)
        if (
            approve
            and self._settings.require_distinct_approver
            and review.requester.same_identity(who)
        ):
            raise SelfApproval(
                f"{approver.subject} requested review {review_id} and may not approve it: "
                "another approver must (requireDistinctApprover)"
            )
        decided = await self._store.decide(
            review_id, who, approve, comment, uses=uses, ttl=grant_ttl, now=self.now()
        )
        self._notify(decided)
        self._emit(decided.decision.value, decided)
        return decided

    # --- expiry --------------------------------------------------------------------------

    async def expire_stale(self) -> builtins.list[Review]:
        """Expire pending reviews older than ``pendingTTL``; returns those this call ended.

        Once a minute it also deletes the reviews that ended more than ``retention`` ago.
        """
        now = self.now()
        if self._pruned is None or now - self._pruned >= _PRUNE_EVERY:
            self._pruned = now
            try:
                pruned = await self._store.prune(now - self._settings.retention)
            except Exception:
                log.exception("approvals: pruning ended reviews failed")
            else:
                if pruned:
                    log.info("approvals: deleted %d reviews ended before retention", pruned)
        expired: builtins.list[Review] = []
        for review in await self._store.list(pending_only=True):
            if self._stale(review, now):
                ended = await self._expire(review)
                if ended is not None:
                    expired.append(ended)
        return expired

    def _stale(self, review: Review, now: datetime) -> bool:
        return now >= review.created + self._settings.pending_ttl

    async def _expire(self, review: Review) -> Review | None:
        try:
            ended = await self._store.expire(review.id, now=self.now())
        except ReviewConflict:
            return None  # decided (or expired by another process) in the meantime
        self._notify(ended)
        self._emit("expired", ended)
        return ended

    # --- plumbing ------------------------------------------------------------------------

    def _notify(self, review: Review) -> None:
        watch = self._watches.get(review.id)
        if watch is not None:
            watch.event.set()

    def _emit(self, kind: str, review: Review) -> None:
        if self._on_event is None:
            return
        if kind != "used":
            # Each outcome of a review once; uses are events of their own, one per run.
            key = (review.id, kind)
            if key in self._reported:
                return
            self._reported[key] = None
            if len(self._reported) > _REPORTED:
                self._reported.popitem(last=False)
        try:
            self._on_event(kind, review)
        except Exception:
            log.exception("approvals: the event hook failed on %s of review %s", kind, review.id)


def _describe(groups: builtins.list[str], users: builtins.list[str]) -> str:
    parts = []
    if groups:
        parts.append("members of " + ", ".join(groups))
    if users:
        parts.append(", ".join(users))
    return " or ".join(parts) if parts else "nobody (the policy names no approvers)"
