"""The policy engine over real analyzer output: default deny, most restrictive wins."""

from __future__ import annotations

import pytest

from querywarden.analysis import Analyzer
from querywarden.identity import Principal
from querywarden.policy.engine import PolicyEngine, Verdict
from querywarden.policy.model import PolicyDocument

POLICY = PolicyDocument.model_validate(
    {
        "rules": [
            {
                "name": "ai-agents-read",
                "subjects": {"groups": ["ai-agents"]},
                "databases": ["app"],
                "allow": {
                    "operations": ["select", "explain", "transaction", "show"],
                    "tables": ["public.*", "pg_catalog.*"],
                },
                "deny": {"tables": ["public.secrets"], "functions": ["pg_sleep"]},
                "review": {"operations": ["update", "delete"]},
            },
            {
                "name": "dba-all",
                "subjects": {"groups": ["dba"]},
                "allow": {"operations": ["*"], "tables": ["*"]},
                "review": {"operations": ["ddl:drop", "truncate"], "unboundedWrite": True},
            },
        ]
    }
)

AGENT = Principal("agent-7", frozenset({"ai-agents"}))
DBA = Principal("carol", frozenset({"dba"}))
NOBODY = Principal("mallory", frozenset({"guests"}))

analyzer = Analyzer()
engine = PolicyEngine(POLICY)


def verdict(principal: Principal, sql: str, database: str = "app") -> Verdict:
    return engine.evaluate(principal, database, analyzer.analyze(sql))


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM orders",
        "SELECT * FROM public.orders o JOIN public.customers c ON c.id = o.customer_id",
        "SELECT relname FROM pg_class",
        "BEGIN",
        "EXPLAIN SELECT 1",
        "WITH x AS (SELECT id FROM orders) SELECT * FROM x",
    ],
)
def test_agent_reads_are_allowed(sql: str) -> None:
    result = verdict(AGENT, sql)
    assert result.outcome == "allow", result
    assert result.rule == "ai-agents-read"


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SELECT * FROM secrets", "public.secrets is denied by rule ai-agents-read"),
        ("SELECT * FROM orders WHERE id IN (SELECT 1 FROM secrets)", "public.secrets is denied"),
        ("INSERT INTO orders VALUES (1)", "INSERT is not allowed"),
        ("WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d", "needs approval"),
        ("EXPLAIN ANALYZE DELETE FROM orders", "not allowed"),
        ("SELECT pg_sleep(1)", "pg_sleep is denied"),
        ("SELECT * FROM other_schema.t", "read access to other_schema.t is not allowed"),
        ("COPY orders TO '/tmp/x'", "built-in protections"),
        ("SELECT pg_read_file('/etc/passwd')", "built-in protections"),
        ("SET ROLE postgres", "built-in protections"),
    ],
)
def test_agent_refusals_name_rule_and_reason(sql: str, reason: str) -> None:
    result = verdict(AGENT, sql)
    assert result.outcome in ("deny", "review"), result
    assert reason in result.reason, result
    assert result.hint is not None and "SELECT" in result.hint


def test_update_needs_review_for_agents() -> None:
    result = verdict(AGENT, "UPDATE orders SET amount = 0 WHERE id = 1")
    assert result.outcome == "review"
    assert result.reason == "UPDATE needs approval (rule ai-agents-read)"


def test_most_restrictive_wins_across_statements() -> None:
    assert verdict(AGENT, "SELECT 1; SELECT * FROM secrets").outcome == "deny"
    assert verdict(AGENT, "SELECT 1; UPDATE orders SET amount = 1 WHERE id = 2").outcome == (
        "review"
    )


def test_no_applicable_rule_is_default_deny() -> None:
    result = verdict(NOBODY, "SELECT 1")
    assert result.outcome == "deny"
    assert "no rule of the policy applies to mallory" in result.reason
    assert verdict(AGENT, "SELECT 1", database="other").outcome == "deny"


def test_dba_rules() -> None:
    assert verdict(DBA, "DELETE FROM orders WHERE id = 1").outcome == "allow"
    assert verdict(DBA, "DELETE FROM orders").outcome == "review"
    assert verdict(DBA, "TRUNCATE orders").outcome == "review"
    # Built-in denials hold even for a rule that allows everything, unless named explicitly.
    assert verdict(DBA, "COPY orders TO PROGRAM 'curl x'").outcome == "deny"


def test_unqualified_names_are_checked_on_every_candidate_schema() -> None:
    policy = PolicyDocument.model_validate(
        {
            "rules": [
                {
                    "name": "r",
                    "subjects": {"users": ["u"]},
                    "allow": {"operations": ["select"], "tables": ["public.*", "pg_catalog.*"]},
                    "deny": {"tables": ["app.secrets"]},
                }
            ]
        }
    )
    engine = PolicyEngine(policy)
    user = Principal("u")
    summaries = analyzer.analyze("SELECT * FROM secrets")
    assert engine.evaluate(user, "db", summaries).outcome == "allow"
    denied = engine.evaluate(user, "db", summaries, search_path=("app", "public"))
    assert denied.outcome == "deny"
    assert "app.secrets" in denied.reason


def test_whole_schema_objects_and_opaque_sql() -> None:
    policy = PolicyDocument.model_validate(
        {
            "rules": [
                {
                    "name": "r",
                    "subjects": {"users": ["u"]},
                    "allow": {"operations": ["select", "ddl"], "tables": ["public.*", "hr.pay*"]},
                    "deny": {"tables": ["hr.secrets"]},
                }
            ]
        }
    )
    engine = PolicyEngine(policy)
    user = Principal("u")
    # DROP SCHEMA hr touches every table in hr, the denied one included.
    dropped = engine.evaluate(user, "db", analyzer.analyze("DROP SCHEMA hr CASCADE"))
    assert dropped.outcome == "deny"
    assert "hr.*" in dropped.reason
    # Dynamic SQL passed as text cannot be inspected: refused.
    dynamic = engine.evaluate(
        user, "db", analyzer.analyze("SELECT query_to_xml(current_setting('x'), true, false, '')")
    )
    assert dynamic.outcome == "deny"
    assert "cannot inspect" in dynamic.reason
