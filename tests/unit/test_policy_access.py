"""describe_access: the policy engine's outcomes and the masker's columns, per relation."""

from __future__ import annotations

import pytest

from querywarden.analysis import Analyzer
from querywarden.identity import Principal
from querywarden.masking.catalog import SensitiveCatalog
from querywarden.masking.plan import Masker
from querywarden.policy.access import AskedRelation, RelationAccess, describe_access
from querywarden.policy.engine import PolicyEngine
from querywarden.policy.model import PolicyDocument

POLICY = PolicyDocument.model_validate(
    {
        "rules": [
            {
                "name": "agents-read",
                "subjects": {"groups": ["ai-agents", "support"]},
                "databases": ["app"],
                "allow": {"operations": ["select", "update"], "tables": ["public.*"]},
                "deny": {"tables": ["public.secrets"]},
                "review": {"operations": ["delete"], "unboundedWrite": True},
            },
            {
                "name": "dba-all",
                "subjects": {"groups": ["dba"]},
                "allow": {"operations": ["*"], "tables": ["*"]},
            },
        ],
        "masking": {
            "columns": [
                {
                    "table": "public.customers",
                    "column": "ssn",
                    "strategy": "partial",
                    "keepLast": 4,
                },
                {
                    "table": "public.customers",
                    "column": "email",
                    "strategy": "hash",
                    "overrides": [
                        {"groups": ["support"], "strategy": "none"},
                        {"users": ["auditor"], "strategy": "email"},
                    ],
                },
                {"table": "customers", "column": "phone"},
            ],
            "detectors": ["ssn", "email"],
            "exempt": {"groups": ["dba"]},
        },
    }
)
KEY = b"k" * 32
AGENT = Principal("agent-7", frozenset({"ai-agents"}))
SUPPORT = Principal("sam", frozenset({"support"}))
AUDITOR = Principal("auditor", frozenset({"ai-agents"}))
DBA = Principal("carol", frozenset({"dba"}))
NOBODY = Principal("mallory", frozenset({"guests"}))

engine = PolicyEngine(POLICY)
masker = Masker(POLICY.masking, KEY)


def catalog() -> SensitiveCatalog:
    """customers (ssn, email, phone), its partition customers_eu, and a view over it."""
    return SensitiveCatalog.build(
        POLICY.masking.columns,
        attributes=[
            (100, "public", "customers", 1, "id"),
            (100, "public", "customers", 2, "ssn"),
            (100, "public", "customers", 3, "email"),
            (100, "public", "customers", 4, "phone"),
            (101, "public", "customers_eu", 1, "id"),
            (101, "public", "customers_eu", 2, "ssn"),
            (101, "public", "customers_eu", 3, "email"),
            (101, "public", "customers_eu", 4, "phone"),
        ],
        children=[(101, 100)],
        view_references=[(200, 100, 2)],
        view_columns=[
            (200, "public", "customer_ids", 1, "id"),
            (200, "public", "customer_ids", 2, "ssn"),
        ],
        view_definitions=[(200, "SELECT customers.id, customers.ssn FROM customers")],
    )


def ask(*relations: str) -> list[AskedRelation]:
    return [AskedRelation.parse(r) for r in relations]


def outcomes(relation: RelationAccess) -> dict[str, tuple[str, str | None]]:
    return {op: (found.outcome, found.rule) for op, found in relation.operations.items()}


def test_an_agent_sees_the_rules_outcomes_per_operation() -> None:
    report = describe_access(
        AGENT,
        "app",
        ask("public.customers", "public.secrets"),
        engine=engine,
        masker=masker,
        catalog=catalog(),
    )
    customers, secrets = report.relations
    assert outcomes(customers) == {
        "select": ("allow", "agents-read"),
        "insert": ("deny", "agents-read"),
        "update": ("allow", "agents-read"),
        "delete": ("review", "agents-read"),
    }
    assert "INSERT is not allowed for you by any rule" in customers.operations["insert"].reason
    assert "DELETE needs approval" in customers.operations["delete"].reason
    assert {op: found.outcome for op, found in secrets.operations.items()} == dict.fromkeys(
        ("select", "insert", "update", "delete"), "deny"
    )
    assert secrets.operations["select"].reason == "public.secrets is denied by rule agents-read"


def test_outcomes_are_the_engines_for_such_a_statement() -> None:
    analyzer = Analyzer()
    statements = {
        "select": "SELECT * FROM public.orders",
        "insert": "INSERT INTO public.orders VALUES (1)",
        "update": "UPDATE public.orders SET total = 0 WHERE id = 1",
        "delete": "DELETE FROM public.orders WHERE id = 1",
    }
    for who in (AGENT, DBA, NOBODY):
        (orders,) = describe_access(
            who, "app", ask("public.orders"), engine=engine, masker=masker, catalog=None
        ).relations
        for operation, sql in statements.items():
            verdict = engine.evaluate(who, "app", analyzer.analyze(sql))
            found = orders.operations[operation]
            assert (found.outcome, found.rule, found.reason) == (
                verdict.outcome,
                verdict.rule,
                verdict.reason,
            ), (who, operation)


def test_masked_columns_with_their_strategies_after_overrides() -> None:
    snapshot = catalog()
    relations = ask(
        "public.customers", "public.customers_eu", "public.customer_ids", "public.orders"
    )
    agent = describe_access(AGENT, "app", relations, engine=engine, masker=masker, catalog=snapshot)
    assert agent.masked and agent.detectors == ("ssn", "email") and agent.scans_text
    masked = {r.relation: dict(r.masked) for r in agent.relations}
    assert masked == {
        "public.customers": {"email": "hash", "phone": "redact", "ssn": "partial"},
        # A partition has its parent's masked columns; a view's column carries its source.
        "public.customers_eu": {"email": "hash", "phone": "redact", "ssn": "partial"},
        "public.customer_ids": {"ssn": "partial"},
        "public.orders": {},
    }
    support = describe_access(
        SUPPORT, "app", relations[:1], engine=engine, masker=masker, catalog=snapshot
    )
    assert dict(support.relations[0].masked) == {"phone": "redact", "ssn": "partial"}
    auditor = describe_access(
        AUDITOR, "app", relations[:1], engine=engine, masker=masker, catalog=snapshot
    )
    assert auditor.relations[0].masked["email"] == "email"


def test_an_exempt_identity_has_nothing_masked_and_nothing_scanned() -> None:
    report = describe_access(
        DBA, "app", ask("public.customers"), engine=engine, masker=masker, catalog=catalog()
    )
    assert not report.masked and not report.scans_text and report.detectors == ()
    assert dict(report.relations[0].masked) == {}
    assert outcomes(report.relations[0])["delete"] == ("allow", "dba-all")


def test_without_masking_nothing_is_masked() -> None:
    report = describe_access(
        AGENT, "app", ask("public.customers"), engine=engine, masker=None, catalog=None
    )
    assert not report.masked and report.detectors == ()
    assert dict(report.relations[0].masked) == {}


def test_without_a_catalog_the_configured_columns_are_used() -> None:
    report = describe_access(
        AGENT,
        "app",
        ask("public.customers", "public.customers_eu"),
        engine=engine,
        masker=masker,
        catalog=None,
    )
    assert dict(report.relations[0].masked) == {
        "email": "hash",
        "phone": "redact",
        "ssn": "partial",
    }
    assert dict(report.relations[1].masked) == {}  # a child is known only from the catalog


def test_asked_columns_limit_the_masked_ones() -> None:
    asked = [AskedRelation.parse("public.customers", ["id", "ssn", "nope"])]
    report = describe_access(AGENT, "app", asked, engine=engine, masker=masker, catalog=catalog())
    assert dict(report.relations[0].masked) == {"ssn": "partial"}


def test_no_rule_for_the_database_denies_everything() -> None:
    report = describe_access(
        AGENT, "other", ask("public.customers"), engine=engine, masker=masker, catalog=catalog()
    )
    found = report.relations[0].operations["select"]
    assert found.outcome == "deny" and found.rule is None
    assert "no rule of the policy applies to agent-7" in found.reason


def test_the_json_shape() -> None:
    report = describe_access(
        AGENT, "app", ask("public.customer_ids"), engine=engine, masker=masker, catalog=catalog()
    )
    assert report.to_json() == {
        "subject": "agent-7",
        "database": "app",
        "masked": True,
        "detectors": ["ssn", "email"],
        "relations": [
            {
                "relation": "public.customer_ids",
                "operations": {
                    "select": {"outcome": "allow", "rule": "agents-read", "reason": "allowed"},
                    "insert": {
                        "outcome": "deny",
                        "rule": "agents-read",
                        "reason": report.relations[0].operations["insert"].reason,
                    },
                    "update": {"outcome": "allow", "rule": "agents-read", "reason": "allowed"},
                    "delete": {
                        "outcome": "review",
                        "rule": "agents-read",
                        "reason": "DELETE needs approval (rule agents-read)",
                    },
                },
                "masked": {"ssn": "partial"},
            }
        ],
    }


@pytest.mark.parametrize(
    ("relation", "columns", "message"),
    [
        ("customers", None, "schema-qualified"),
        (".customers", None, "schema-qualified"),
        ("public.", None, "schema-qualified"),
        ("public.*", None, "one table"),
        ("public.a\x00b", None, "one table"),
        (42, None, "must be a string"),
        ("public." + "x" * 200, None, "longer than"),
        ("public.t", "ssn", "must be a list"),
        ("public.t", ["ok", ""], "non-empty strings"),
        ("public.t", [1], "non-empty strings"),
    ],
)
def test_bad_relations_are_refused(relation: object, columns: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AskedRelation.parse(relation, columns)
