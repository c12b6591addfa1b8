"""The policy as the gateway's decision point: analyze, evaluate, and explain refusals."""

from __future__ import annotations

from querywarden.analysis import AnalysisError, Analyzer
from querywarden.hooks import ALLOW, Decision, SessionInfo, StatementRequest
from querywarden.policy.engine import PolicyEngine
from querywarden.policy.model import PolicyDocument

_PREFIX = "querywarden: "


class PolicyGate:
    """A StatementGate that applies the policy's rules to every request."""

    def __init__(
        self, policy: PolicyDocument | PolicyEngine, analyzer: Analyzer | None = None
    ) -> None:
        self.engine = policy if isinstance(policy, PolicyEngine) else PolicyEngine(policy)
        self.analyzer = analyzer or Analyzer()

    def decide(self, session: SessionInfo, request: StatementRequest) -> Decision:
        """Allow, or refuse with the rule, the reason and what is allowed instead."""
        if request.kind == "function_call":
            return Decision.refuse(
                _PREFIX + "FunctionCall messages (calling a function by OID) are refused: "
                "the policy cannot see what they do",
                hint="call the function in a SELECT statement instead",
                rule="built-in",
            )
        try:
            summaries = self.analyzer.analyze(request.sql)
        except AnalysisError as exc:
            # Fail closed: what the gateway cannot understand does not run.
            return Decision.refuse(
                _PREFIX + f"{exc.message}; the statement was not run",
                sqlstate=exc.sqlstate,
                hint="send one valid PostgreSQL statement; querywarden parses it as "
                "PostgreSQL does",
                rule="analysis",
            )
        if not summaries:
            return ALLOW  # an empty query: the server answers EmptyQueryResponse
        verdict = self.engine.evaluate(session.principal, session.database, summaries)
        if verdict.outcome == "allow":
            return ALLOW
        if verdict.outcome == "review":
            return Decision.refuse(
                _PREFIX + f"{verdict.reason}; this gateway cannot hold statements for an "
                "approver yet, so it was not run",
                hint=verdict.hint,
                rule=verdict.rule,
            )
        return Decision.refuse(_PREFIX + verdict.reason, hint=verdict.hint, rule=verdict.rule)
