"""The policy as the gateway's decision point: analyze, evaluate, and explain refusals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from querywarden import codec, encodings
from querywarden.analysis import AnalysisError, Analyzer, StatementSummary
from querywarden.approvals.service import ApprovalService
from querywarden.hooks import ALLOW, Decision, SessionInfo, StatementRequest
from querywarden.masking.catalog import CatalogCache, SensitiveCatalog
from querywarden.masking.plan import Masker, MaskPlan, MaskRefusal
from querywarden.policy.engine import PolicyEngine
from querywarden.policy.model import PolicyDocument
from querywarden.policy.prechecks import HOLD, Check, Checked, check_before_hold

log = logging.getLogger(__name__)

_PREFIX = "querywarden: "
_PARAMETER = re.compile(r"\$[0-9]")

#: ``(session, statement text) -> rows of its largest sequential scan``.
ScanEstimator = Callable[[SessionInfo, str], Awaitable[int]]

#: ``(session, check) -> what the server would do``, asked before a statement is held.
ServerChecker = Callable[[SessionInfo, Check], Awaitable[Checked]]


#: Statements longer than this (characters) are analyzed in a worker thread, not on the
#: event loop: above it, parsing takes milliseconds that every other session would wait.
ANALYZED_ON_THE_LOOP = 256 * 1024


class PolicyGate:
    """A StatementGate that applies the policy's rules to every request."""

    def __init__(
        self,
        policy: PolicyDocument | PolicyEngine,
        analyzer: Analyzer | None = None,
        *,
        estimator: ScanEstimator | None = None,
        masker: Masker | None = None,
        catalogs: CatalogCache | None = None,
        approvals: ApprovalService | None = None,
        notify: Callable[[SessionInfo, bytes], None] | None = None,
        checker: ServerChecker | None = None,
    ) -> None:
        self.engine = policy if isinstance(policy, PolicyEngine) else PolicyEngine(policy)
        self.analyzer = analyzer or Analyzer()
        #: For the worker thread: a cache of its own would be written from two threads,
        #: and the shapes of megabyte statements are not worth keeping (no cache at all).
        self._large_analyzer = Analyzer(max_entries=0)
        #: Estimates full-table scans (EXPLAIN upstream) for fullTableScan reviews.
        self.estimator = estimator
        #: The policy's masking, and where it learns which columns are sensitive.
        self.masker = masker
        self.catalogs = catalogs
        #: Holds statements that need review until an approver decides (None: refuse).
        self.approvals = approvals
        #: Sends a message to a session's client at once (the "held" notice).
        self.notify = notify
        #: Asks the server whether a statement would run before a human is asked.
        self.checker = checker
        #: Counts policy reloads: sessions compare it with the generation their prepared
        #: statements, masking and row limit were decided under, and catch up.
        self.generation = 0

    def reload(self, engine: PolicyEngine, masker: Masker | None) -> None:
        """Apply a reloaded policy: to every request decided from now on, in every session."""
        self.engine = engine
        self.masker = masker
        self.generation += 1

    def masks(self, session: SessionInfo) -> bool:
        """Whether this session's results are masked (decisions then carry a plan)."""
        return self.masker is not None and self.masker.applies_to(session.principal)

    def decide(
        self, session: SessionInfo, request: StatementRequest
    ) -> Decision | Awaitable[Decision]:
        """Allow, or refuse with the rule, the reason and what is allowed instead."""
        if request.kind == "function_call":
            return Decision.refuse(
                _PREFIX + "FunctionCall messages (calling a function by OID) are refused: "
                "the policy cannot see what they do",
                hint="call the function in a SELECT statement instead",
                rule="built-in",
            )
        summaries = request.summaries
        if summaries is None:
            if len(request.sql) > ANALYZED_ON_THE_LOOP:
                # Parsing is linear but not cheap (pglast builds a node per token): a
                # statement of megabytes would hold the event loop, and every other
                # session with it, for a second or more. It is parsed in a worker thread;
                # the session holds this client's later input meanwhile, as for a hold.
                return self._analyzed_off_the_loop(session, request)
            try:
                summaries = self.analyzer.analyze(request.sql)
            except AnalysisError as exc:
                return _analysis_refusal(exc)
            request.summaries = summaries
        if not summaries:
            return ALLOW  # an empty query: the server answers EmptyQueryResponse
        prepared = session.prepared
        if prepared:
            # EXECUTE name runs the body PREPARE gave: decide on that body again now.
            bodies = [
                prepared[s.prepared_name]
                for s in summaries
                if s.prepared_name in prepared and "execute" in s.operations
            ]
            if bodies:
                summaries = (*summaries, *bodies)
        search_path = session.search_path
        added = [s for summary in summaries for s in summary.search_path]
        if added:
            # A statement after the SET in the same request already resolves with it.
            search_path = [*search_path, *(s for s in added if s not in search_path)]
        verdict = self.engine.evaluate(
            session.principal, session.database, summaries, search_path=search_path
        )
        if verdict.outcome != "deny":
            # Whatever the rules allow, nothing may change how the server reads text.
            refusal = _text_setting_refusal(session, summaries)
            if refusal is not None:
                return refusal
        if verdict.outcome == "allow" and added:
            unknown = {"*", "$user"} & set(added)
            if unknown:
                return Decision.refuse(
                    _PREFIX + "this statement sets search_path to a schema the gateway "
                    "cannot name (" + ", ".join(sorted(unknown)) + "), so it could not check "
                    "what unqualified names would mean; it was not run",
                    hint="name the schemas explicitly, e.g. SET search_path TO public, "
                    "or qualify table names (schema.table) instead",
                    rule="analysis",
                )
            session.search_path[:] = search_path
        if verdict.outcome == "allow":
            _note_prepared(session, summaries)
            return _by_rule(self._allowed(session, summaries, search_path), verdict.rule)
        if verdict.outcome == "review":
            held = _Review(
                request.sql,
                summaries,
                verdict.reason,
                verdict.hint,
                verdict.rule,
                kind=request.kind,
            )
            return self._review(session, held, search_path)
        return Decision.refuse(_PREFIX + verdict.reason, hint=verdict.hint, rule=verdict.rule)

    async def _analyzed_off_the_loop(
        self, session: SessionInfo, request: StatementRequest
    ) -> Decision:
        """:meth:`decide` for a large statement, analyzed in a worker thread."""
        try:
            request.summaries = await asyncio.to_thread(self._large_analyzer.analyze, request.sql)
        except AnalysisError as exc:
            return _analysis_refusal(exc)
        outcome = self.decide(session, request)
        return outcome if isinstance(outcome, Decision) else await outcome

    def _review(
        self, session: SessionInfo, review: _Review, search_path: Sequence[str]
    ) -> Decision | Awaitable[Decision]:
        """A statement that needs an approver: held on the wire, or refused without one."""
        if self.approvals is None or not self.approvals.has_approvers:
            return _needs_review(review.reason, hint=review.hint, rule=review.rule)
        if _PARAMETER.search(review.text):
            # Its values arrive later (Bind): an approval of the text alone would cover
            # every value, so approving "id = $1" would approve id = 6 as well as id = 5.
            return Decision.refuse(
                _PREFIX + f"{review.reason}; a statement that needs approval must carry its "
                "values as literals, so the approver sees exactly what will run",
                hint="send it without parameters ($1, ...), e.g. with the simple query "
                "protocol, and it will be held for an approver",
                rule=review.rule,
            )
        return self._held_then_allowed(session, review, search_path)

    async def _held_then_allowed(
        self, session: SessionInfo, review: _Review, search_path: Sequence[str]
    ) -> Decision:
        checked = await self._server_check(session, review, search_path)
        if checked.outcome == "refused" and checked.error is not None:
            return _server_refusal(checked.error)
        if checked.outcome == "no-op":
            allowed = self._allowed(session, review.summaries, search_path, reviewed=True)
            decision = allowed if isinstance(allowed, Decision) else await allowed
            if not decision.allowed:
                return decision
            # What let it run unreviewed, for the audit record.
            note: dict[str, object] = {
                "how": "not held",
                "why": "DROP IF EXISTS of objects that do not exist",
            }
            return Decision(True, rule=review.rule, mask=decision.mask, approval=note)
        held = await self._hold(session, review, search_path)
        if not held.allowed:
            return held
        # Approved: the statement still gets what any allowed statement gets (masking).
        allowed = self._allowed(session, review.summaries, search_path, reviewed=True)
        decision = allowed if isinstance(allowed, Decision) else await allowed
        if decision.allowed:
            return Decision(True, rule=held.rule, mask=decision.mask, approval=held.approval)
        return decision

    async def _server_check(
        self, session: SessionInfo, review: _Review, search_path: Sequence[str]
    ) -> Checked:
        """What the server would do with a statement about to be held (prechecks.py)."""
        checker = self.checker
        if checker is None:
            return HOLD
        check = check_before_hold(
            review.kind, review.text, review.summaries, session.wire, search_path
        )
        if check is None:
            return HOLD
        try:
            return await checker(session, check)
        except Exception as exc:
            # Fail closed: a statement the server could not check is held as before.
            log.warning("checks: could not check a statement before holding it: %r", exc)
            return HOLD

    async def _hold(
        self, session: SessionInfo, held: _Review, search_path: Sequence[str]
    ) -> Decision:
        """Wait for an approver's decision; a reload that denies the statement meanwhile wins.

        An approval covers the review it was asked for, not a denial that came after.
        """
        generation = self.generation
        decision = await self._ask_approver(session, held)
        if not decision.allowed:
            return decision
        return self._denied_since(session, generation, held.summaries, search_path) or decision

    async def _ask_approver(self, session: SessionInfo, held: _Review) -> Decision:
        """Wait for an approver's decision on this exact statement (or use a grant)."""
        from querywarden.approvals.model import ReviewSummary

        text, summaries, reason, hint, rule = (
            held.text,
            held.summaries,
            held.reason,
            held.hint,
            held.rule,
        )
        approvals = self.approvals
        assert approvals is not None
        principal, database = session.principal, session.database
        try:
            grant = await approvals.claim_grant(principal, database, text)
            if grant is not None:
                return Decision(True, rule=rule, approval=_approval(grant, "grant used"))
            review = await approvals.request(
                principal,
                database,
                text,
                summary=ReviewSummary.from_analysis(summaries),
                rule=rule or "",
                reason=reason,
                estimate=held.estimate,
            )
        except Exception as exc:
            # Fail closed: a statement that needs an approver never runs without one.
            log.exception("approvals: the review store failed")
            return Decision.refuse(
                _PREFIX + f"{reason}, and the gateway could not open a review for an approver "
                f"(its review store failed: {type(exc).__name__}); the statement was not run",
                sqlstate="58030",
                hint="retry shortly; if it persists, ask the gateway's operator to check "
                "the review store (docs/approvals.md)",
                rule=rule,
            )
        hold = approvals.settings.hold.total_seconds()
        if self.notify is not None:
            self.notify(
                session,
                codec.notice_response(
                    _PREFIX + f"{reason}: held for approval as review {review.id}; waiting up "
                    f"to {hold:g}s for an approver",
                    hint=f"an approver runs: {approvals.approve_command(review.id)}",
                ),
            )
        try:
            review = await approvals.wait(review.id, hold)
        except asyncio.CancelledError:
            # A CancelRequest or a disconnect: nobody waits for this review any more.
            with contextlib.suppress(Exception):
                await asyncio.shield(approvals.withdraw(review.id, "the client cancelled"))
            raise
        except Exception as exc:
            # Fail closed: the store failed for the whole hold, so the decision is unknown.
            log.exception("approvals: the review store failed while review %s was held", review.id)
            return Decision.refuse(
                _PREFIX + f"{reason}: review {review.id} was opened, but the gateway could "
                f"not read it from its review store (failed: {type(exc).__name__}) before "
                "the hold ended; the statement was not run",
                sqlstate="58030",
                hint="re-run the same statement once the review store is back: it runs if "
                "the review was approved; if this persists, ask the gateway's operator to "
                "check the review store (docs/approvals.md)",
                rule=rule,
            )
        decision = str(review.decision.value)
        if decision == "approved":
            try:
                used = await approvals.use(review.id)
            except Exception:
                used = None
            if used is not None:
                return Decision(True, rule=rule, approval=_approval(used, "approved"))
            return Decision.refuse(
                _PREFIX + f"review {review.id} was approved but its grant is used up or "
                "expired; the statement was not run",
                hint="ask the approver for a new approval",
                rule=rule,
            )
        if decision == "denied":
            approver = review.approver.subject if review.approver else "an approver"
            return Decision.refuse(
                _PREFIX + f"review {review.id} was denied by {approver}: "
                f"{review.comment or 'no reason given'}; the statement was not run",
                hint=hint,
                rule=rule,
            )
        if decision == "pending":
            return Decision.refuse(
                _PREFIX + f"review {review.id} is still pending after {hold:g}s; the "
                "statement was not run. Re-run the same statement after an approver has "
                "approved it and it will run",
                hint=hint,
                rule=rule,
            )
        return Decision.refuse(
            _PREFIX + f"review {review.id} was {decision}: {review.comment}; the statement "
            "was not run",
            hint=hint,
            rule=rule,
        )

    def _allowed(
        self,
        session: SessionInfo,
        summaries: Sequence[StatementSummary],
        search_path: Sequence[str],
        *,
        reviewed: bool = False,
    ) -> Decision | Awaitable[Decision]:
        """The policy allows the request: review scans and attach masking as needed."""
        masked = self.masks(session)
        if self.catalogs is not None and any(
            op.startswith("ddl") for s in summaries for op in s.operations
        ):
            # Views and columns may change, whoever changes them: every session's next
            # decision reads the catalog again.
            self.catalogs.invalidate(session.database)
        scans = None if reviewed else self.engine.scan_review(session.principal, session.database)
        touching = [s for s in summaries if s.reads or s.writes] if scans is not None else []
        if masked:
            catalog = self.catalogs.current(session.database) if self.catalogs else None
            if catalog is None or touching:
                return self._allowed_later(session, summaries, search_path, scans, touching)
            return self._mask(session, catalog, summaries, search_path)
        if scans is not None and touching:
            # Deciding needs the upstream's plan: the session holds the request.
            return self._review_scans(session, touching, *scans)
        return ALLOW

    async def _allowed_later(
        self,
        session: SessionInfo,
        summaries: Sequence[StatementSummary],
        search_path: Sequence[str],
        scans: tuple[int, str] | None,
        touching: Sequence[StatementSummary],
    ) -> Decision:
        if scans is not None and touching:
            decision = await self._review_scans(session, touching, *scans)
            if not decision.allowed:
                return decision
        if self.catalogs is None:
            return _catalog_unavailable("no catalog source is configured")
        try:
            catalog = await self.catalogs.get(session.database)
        except Exception as exc:
            # Fail closed: without the catalog, sensitive columns cannot be recognized.
            return _catalog_unavailable(type(exc).__name__)
        return self._mask(session, catalog, summaries, search_path)

    def plan_is_current(self, session: SessionInfo, plan: MaskPlan) -> bool:
        """Whether a plan was made with the catalog snapshot known to be current.

        A prepared statement's plan outlives its decision: when the catalog changed (or
        is due for its fingerprint check), the statement is decided again at its next
        Execute.
        """
        if self.catalogs is None or plan.catalog is None:
            return True
        return self.catalogs.current(session.database) is plan.catalog

    async def replan(self, session: SessionInfo, plan: MaskPlan) -> Decision:
        """Make a mask plan again with a catalog newer than the one it was made with.

        A result named a relation the plan's catalog does not know (DDL since): its rows
        wait until this returns. The new plan may refuse what the old one allowed.
        """
        if self.masker is None:
            return Decision(True)  # masking is gone (a reload): the session masks whole
        if self.catalogs is None:
            return _catalog_unavailable("no catalog source is configured")
        try:
            catalog = await self.catalogs.refresh(session.database, plan.catalog)
        except Exception as exc:
            return _catalog_unavailable(type(exc).__name__)
        return self._mask(session, catalog, plan.statements, plan.search_path)

    def _mask(
        self,
        session: SessionInfo,
        catalog: SensitiveCatalog,
        summaries: Sequence[StatementSummary],
        search_path: Sequence[str],
    ) -> Decision:
        assert self.masker is not None
        plan = self.masker.plan(session.principal, catalog, summaries, search_path)
        if isinstance(plan, MaskRefusal):
            return Decision.refuse(_PREFIX + plan.reason, hint=plan.hint, rule="masking")
        return Decision(True, mask=plan)

    async def _review_scans(
        self,
        session: SessionInfo,
        summaries: Sequence[StatementSummary],
        min_rows: int,
        rule: str,
    ) -> Decision:
        if self.estimator is None:
            return Decision.refuse(
                _PREFIX + f"rule {rule} reviews full-table scans, and this gateway has no "
                "way to estimate plans; the statement was not run",
                sqlstate="58000",
                rule=rule,
            )
        for summary in summaries:
            try:
                # Keyed by the exact text: a plan depends on the constants (id > 0 scans
                # the table where id > 149999 uses the index), so shapes are not enough.
                rows = await self.estimator(session, summary.text)
            except Exception as exc:
                # Fail closed: no estimate, no statement.
                return Decision.refuse(
                    _PREFIX + f"rule {rule} reviews full-table scans, and the gateway could "
                    f"not get this statement's plan ({type(exc).__name__}); it was not run",
                    hint="send the statement with literal values instead of parameters, "
                    "or retry shortly",
                    rule=rule,
                )
            if rows > min_rows:
                reason = (
                    f"this statement scans a table of about {rows} rows sequentially, more "
                    f"than the {min_rows} that rule {rule} allows without approval"
                )
                hint = (
                    "filter on an indexed column (e.g. the primary key) so PostgreSQL "
                    "does not read the whole table"
                )
                if self.approvals is None or not self.approvals.has_approvers:
                    return _needs_review(reason, hint=hint, rule=rule)
                return await self._hold(
                    session,
                    _Review(summary.text, summaries, reason, hint, rule, rows),
                    session.search_path,
                )
        return ALLOW

    def _denied_since(
        self,
        session: SessionInfo,
        generation: int,
        summaries: Sequence[StatementSummary],
        search_path: Sequence[str],
    ) -> Decision | None:
        """The refusal of a policy reloaded since ``generation``, if it denies the statement."""
        if generation == self.generation:
            return None
        verdict = self.engine.evaluate(
            session.principal, session.database, summaries, search_path=search_path
        )
        if verdict.outcome != "deny":
            return None
        return Decision.refuse(
            _PREFIX + f"{verdict.reason} (the policy was reloaded while the statement was "
            "held for approval; the approval does not lift a denial)",
            hint=verdict.hint,
            rule=verdict.rule,
        )


#: The plain allowed decision of each rule, made once (the audit record names the rule).
_ALLOWED_BY: dict[str, Decision] = {}


def _by_rule(
    outcome: Decision | Awaitable[Decision], rule: str | None
) -> Decision | Awaitable[Decision]:
    """``outcome`` naming ``rule``, the rule that allowed it, unless it names one already.

    Every decision names its rule (POLICY.md): the audit record and the exported span of an
    allowed statement say which rule let it through.
    """
    if rule is None:
        return outcome
    if not isinstance(outcome, Decision):
        return _named_later(outcome, rule)
    if not outcome.allowed or outcome.rule is not None:
        return outcome
    if outcome.mask is None and outcome.approval is None:
        named = _ALLOWED_BY.get(rule)
        if named is None:
            named = _ALLOWED_BY[rule] = Decision(True, rule=rule)
        return named
    return Decision(True, rule=rule, mask=outcome.mask, approval=outcome.approval)


async def _named_later(outcome: Awaitable[Decision], rule: str) -> Decision:
    decided = _by_rule(await outcome, rule)
    assert isinstance(decided, Decision)
    return decided


def _analysis_refusal(exc: AnalysisError) -> Decision:
    # Fail closed: what the gateway cannot understand does not run.
    return Decision.refuse(
        _PREFIX + f"{exc.message}; the statement was not run",
        sqlstate=exc.sqlstate,
        hint="send one valid PostgreSQL statement; querywarden parses it as PostgreSQL does",
        rule="analysis",
    )


def _catalog_unavailable(why: str) -> Decision:
    return Decision.refuse(
        _PREFIX + f"the gateway could not read the database catalog to know which columns "
        f"are masked ({why}); the statement was not run",
        sqlstate="58000",
        hint="retry shortly; if it persists, tell the gateway's operator",
        rule="masking",
    )


def _note_prepared(session: SessionInfo, summaries: Sequence[StatementSummary]) -> None:
    """Remember allowed PREPAREs (and forget deallocated ones) for later EXECUTEs."""
    prepared = session.prepared
    for summary in summaries:
        command = summary.command
        if command == "prepare" and summary.prepared_name is not None:
            prepared[summary.prepared_name] = summary
        elif command == "deallocate":
            if summary.prepared_name is None:
                prepared.clear()
            else:
                prepared.pop(summary.prepared_name, None)
        elif command == "discard" and "all" in summary.set_parameters:
            prepared.clear()


@dataclass(frozen=True, slots=True)
class _Review:
    """A statement that needs an approver, and why."""

    text: str
    summaries: Sequence[StatementSummary]
    reason: str
    hint: str | None
    rule: str | None
    estimate: int | None = None
    #: The request's protocol path (StatementRequest.kind).
    kind: str = "query"


def _approval(review: Any, how: str) -> dict[str, object]:
    """What the audit record keeps of the review that let a statement run."""
    return {
        "review_id": review.id,
        "how": how,
        "approver": review.approver.subject if review.approver else None,
        "comment": review.comment,
        "decided": review.decided.isoformat() if review.decided else None,
        "grant_expires": review.grant_expires.isoformat() if review.grant_expires else None,
    }


def _server_refusal(fields: dict[str, str]) -> Decision:
    """The server's own error for a statement it would refuse at once (nothing was held)."""
    return Decision(
        False,
        fields.get("C", "XX000"),
        fields.get("M", ""),
        fields.get("D"),
        fields.get("H"),
        rule="server-check",
        server_error=fields,
    )


def _needs_review(reason: str, *, hint: str | None, rule: str | None) -> Decision:
    """A statement that needs an approver: the one place approvals will hold it instead."""
    return Decision.refuse(
        _PREFIX + f"{reason}; this gateway cannot hold statements for an approver yet, so it "
        "was not run",
        hint=hint,
        rule=rule,
    )


def _text_setting_refusal(
    session: SessionInfo, summaries: Sequence[StatementSummary]
) -> Decision | None:
    """Refuse a change to how the server reads statement text, whatever the rules say.

    The gateway's decisions hold only while it reads each statement as the server does:
    same client_encoding, standard_conforming_strings on. A setting named by a value the
    gateway cannot see (``set_config($1, ...)``, UPDATE pg_settings) might be either.
    """
    for summary in summaries:
        reason = None
        if "*" in summary.set_parameters:
            reason = (
                "this statement changes a setting the gateway cannot name, which could be "
                "client_encoding or standard_conforming_strings"
            )
        for name, value in summary.text_settings:
            reason = reason or encodings.setting_refusal(name, value, session.client_encoding)
        if reason is not None:
            return Decision.refuse(
                _PREFIX + reason + "; the statement was not run",
                sqlstate="0A000",
                hint=encodings.SETTING_HINT,
                rule="built-in",
            )
    return None
