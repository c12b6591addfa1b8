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


# --- functions with side effects, and relations that expose other relations' data ------


def _engine(**rule: object) -> PolicyEngine:
    base = {
        "name": "reader",
        "subjects": {"groups": ["ai-agents"]},
        "allow": {"operations": ["select"], "tables": ["public.*", "pg_catalog.*"]},
    }
    return PolicyEngine(PolicyDocument.model_validate({"rules": [{**base, **rule}]}))


def _decide(engine_: PolicyEngine, sql: str) -> Verdict:
    return engine_.evaluate(AGENT, "app", analyzer.analyze(sql))


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT pg_stat_reset()",
        "SELECT pg_catalog.pg_logical_emit_message(false, 'x', 'y')",
        "SELECT pg_advisory_lock(1)",
        "SELECT 1 FROM orders WHERE pg_try_advisory_lock(id)",
        "SELECT * FROM pg_stat_reset_shared('bgwriter')",
        "SELECT public.transfer(1, 2)",  # not PostgreSQL's: what it does is unseen
        "SELECT my_function()",
        "SELECT \"LOWER\"('a')",  # a quoted name keeps its case: not pg_catalog.lower
        "SELECT txid_current()",  # stable, but assigns a transaction ID
    ],
)
def test_functions_with_side_effects_need_the_operation(sql: str) -> None:
    result = verdict(AGENT, sql)
    assert result.outcome == "deny"
    assert "a function with side effects" in result.reason
    assert "side_effects" in result.reason
    assert result.hint is not None and "allow.functions" in result.hint
    assert verdict(DBA, sql).outcome == "allow"  # '*' covers side_effects


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT now(), random(), clock_timestamp(), gen_random_uuid()",
        "SELECT lower(name), count(*) FROM orders GROUP BY 1",
        "SELECT pg_catalog.format_type(23, NULL), pg_table_size('orders')",
        "SELECT * FROM orders TABLESAMPLE bernoulli (10)",
        "SELECT currval('s')",
        "SELECT information_schema._pg_char_max_length(23, -1)",
    ],
)
def test_functions_without_side_effects_are_reads(sql: str) -> None:
    assert verdict(AGENT, sql).outcome == "allow"


def test_side_effects_can_be_reviewed_denied_or_vouched_for() -> None:
    reviewed = _decide(_engine(review={"operations": ["side_effects"]}), "SELECT pg_stat_reset()")
    assert reviewed.outcome == "review"
    assert "pg_stat_reset()" in reviewed.reason and "needs approval" in reviewed.reason
    denied = _engine(
        allow={"operations": ["*"], "tables": ["*"]}, deny={"operations": ["side_effects"]}
    )
    result = _decide(denied, "SELECT pg_advisory_lock(1)")
    assert result.outcome == "deny" and "pg_advisory_lock()" in result.reason
    vouched = _engine(
        allow={"operations": ["select"], "tables": ["public.*"], "functions": ["public.safe_*"]}
    )
    assert _decide(vouched, "SELECT public.safe_total()").outcome == "allow"
    assert _decide(vouched, "SELECT public.unsafe()").outcome == "deny"
    # The effects the analyzer already models keep their own operation.
    assert "UPDATE" in _decide(vouched, "SELECT nextval('s')").reason


def test_an_unqualified_call_is_checked_as_every_function_it_could_run() -> None:
    # PostgreSQL runs the first function of that name along pg_catalog and the search_path;
    # a denial of any of them refuses the call (a qualified denial was bypassed by the bare
    # name: str(function) is just "pg_sleep").
    denied = _engine(
        allow={"operations": ["select"], "tables": ["*"]},
        deny={"functions": ["pg_catalog.pg_sleep", "public.leak"]},
    )
    for sql in ("SELECT pg_sleep(0)", "SELECT pg_catalog.pg_sleep(0)", "SELECT leak()"):
        result = _decide(denied, sql)
        assert result.outcome == "deny", sql
        assert "is denied by rule" in result.reason
    # Another schema's function of the same name is not the denied one (it is refused
    # only as a function PostgreSQL does not define: side_effects).
    assert "is denied by rule" not in _decide(denied, "SELECT other.leak()").reason
    # Lifting a protection needs every candidate covered: the bare name could run another
    # schema's pg_read_file, the qualified call cannot.
    lifted = _engine(
        allow={
            "operations": ["select"],
            "tables": ["*"],
            "functions": ["pg_catalog.pg_read_file"],
        }
    )
    assert _decide(lifted, "SELECT pg_catalog.pg_read_file('x')").outcome == "allow"
    assert _decide(lifted, "SELECT pg_read_file('x')").outcome == "deny"


@pytest.mark.parametrize(
    ("sql", "exposed"),
    [
        ("SELECT * FROM pg_catalog.pg_stats WHERE tablename = 'orders'", "pg_catalog.pg_stats"),
        ("SELECT * FROM pg_stats", "pg_catalog.pg_stats"),
        ("SELECT * FROM pg_stats_ext_exprs", "pg_catalog.pg_stats_ext_exprs"),
        ("SELECT stavalues1 FROM pg_statistic", "pg_catalog.pg_statistic"),
        ("SELECT * FROM pg_catalog.pg_statistic_ext_data", "pg_catalog.pg_statistic_ext_data"),
        ("SELECT query FROM pg_stat_activity", "pg_catalog.pg_stat_activity"),
        ("SELECT query FROM public.pg_stat_statements", "public.pg_stat_statements"),
        ("SELECT data FROM pg_largeobject", "pg_catalog.pg_largeobject"),
        ("SELECT lo_get(42)", "pg_catalog.pg_largeobject"),
        ("SELECT * FROM pg_stat_get_activity(NULL)", "pg_stat_get_activity()"),
        ("SELECT * FROM pg_logical_slot_peek_changes('s', NULL, NULL)", "peek_changes()"),
        ("SELECT schema_to_xml('pg_catalog', true, false, '')", "pg_catalog.*"),
        ("SELECT chunk_data FROM pg_toast.pg_toast_16384", "pg_toast.pg_toast_16384"),
        ("SELECT table_to_xml('pg_statistic', true, false, '')", "pg_catalog.pg_statistic"),
        ("SELECT query_to_xml('SELECT * FROM pg_stats', true, false, '')", "pg_stats"),
    ],
)
def test_relations_exposing_other_relations_count_as_reading_every_table(
    sql: str, exposed: str
) -> None:
    result = verdict(AGENT, sql)
    assert result.outcome == "deny"
    assert result.rule == "built-in"
    assert exposed in result.reason and "beyond the tables your policy" in result.reason
    # The dba may read every table, so nothing is hidden from it.
    assert verdict(DBA, sql).outcome == "allow"


def test_exposing_relations_are_lifted_by_an_exact_name_only() -> None:
    named = _engine(allow={"operations": ["select"], "tables": ["public.*", "pg_catalog.pg_stats"]})
    assert _decide(named, "SELECT * FROM pg_catalog.pg_stats").outcome == "allow"
    # Reading everything but one denied table is not reading everything.
    almost = _engine(
        allow={"operations": ["select"], "tables": ["*"]}, deny={"tables": ["public.secrets"]}
    )
    assert _decide(almost, "SELECT * FROM pg_stats").outcome == "deny"
    assert _decide(almost, "SELECT * FROM pg_stat_get_activity(NULL)").outcome == "deny"
    # The TOAST table of public.secrets holds its long values.
    assert _decide(almost, "SELECT chunk_data FROM pg_toast.pg_toast_16390").outcome == "deny"
    listed = _engine(
        allow={"operations": ["select"], "tables": ["*"], "functions": ["pg_stat_get_activity"]},
        deny={"tables": ["public.secrets"]},
    )
    assert _decide(listed, "SELECT * FROM pg_stat_get_activity(NULL)").outcome == "allow"


def test_a_masked_identity_does_not_read_everything() -> None:
    # Masking redacts the statistics' values but not the constants in another session's
    # statement text: an identity masking applies to is refused pg_stat_activity even
    # with every table allowed; the exempt group reads it.
    document = PolicyDocument.model_validate(
        {
            "rules": [
                {
                    "name": "all",
                    "subjects": {"groups": ["ai-agents", "dba"]},
                    "allow": {"operations": ["select"], "tables": ["*"]},
                }
            ],
            "masking": {
                "columns": [{"table": "public.customers", "column": "ssn", "strategy": "redact"}],
                "exempt": {"groups": ["dba"]},
            },
        }
    )
    masking_engine = PolicyEngine(document)
    summaries = analyzer.analyze("SELECT query FROM pg_stat_activity")
    assert masking_engine.evaluate(AGENT, "app", summaries).outcome == "deny"
    assert masking_engine.evaluate(DBA, "app", summaries).outcome == "allow"


# --- unqualified names resolve as PostgreSQL resolves them (issue 17) -------------------

PUBLIC_ONLY = {"operations": ["select"], "tables": ["public.*"]}


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM orders",
        "SELECT o.id FROM orders o JOIN customers c ON c.id = o.customer_id",
        "WITH x AS (SELECT id FROM orders) SELECT count(*) FROM x",
    ],
)
def test_a_public_only_policy_allows_unqualified_user_tables(sql: str) -> None:
    # pg_catalog has no relation named orders, so PostgreSQL can only find public.orders.
    assert _decide(_engine(allow=PUBLIC_ONLY), sql).outcome == "allow"


def test_an_unqualified_catalog_name_is_still_checked_as_pg_catalogs() -> None:
    public_only = _engine(allow=PUBLIC_ONLY)
    refused = _decide(public_only, "SELECT relname FROM pg_class")
    assert refused.outcome == "deny"
    assert "pg_class (as pg_catalog.pg_class)" in refused.reason
    assert refused.hint is not None
    assert refused.hint.startswith(
        "unqualified, pg_class is pg_catalog.pg_class (PostgreSQL searches pg_catalog first), "
        "which no rule lets you read; if you meant public.pg_class, write it schema-qualified; "
        "allowed for you: SELECT on public.* (rule reader)"
    ), refused.hint
    # The statistics stay behind the built-in protection, qualified or not.
    for sql in ("SELECT * FROM pg_stats", "SELECT query FROM pg_stat_activity"):
        verdict = _decide(public_only, sql)
        assert verdict.outcome == "deny" and verdict.rule == "built-in", sql


def test_every_schema_on_the_search_path_stays_a_candidate() -> None:
    public_only = _engine(allow=PUBLIC_ONLY)
    summaries = analyzer.analyze("SELECT * FROM orders")
    refused = public_only.evaluate(AGENT, "app", summaries, search_path=("hr", "public"))
    assert refused.outcome == "deny"
    assert "orders (as hr.orders)" in refused.reason
    assert refused.hint is not None
    assert refused.hint.startswith(
        "unqualified, orders could be hr.orders (a schema on your search_path), which no rule "
        "lets you read; if you meant public.orders, write it schema-qualified;"
    ), refused.hint


def test_an_unknown_catalog_checks_every_name_as_pg_catalogs_too() -> None:
    strict = _engine(allow=PUBLIC_ONLY)
    strict.use_catalog_relations(None)
    assert _decide(strict, "SELECT * FROM orders").outcome == "deny"
    # A server's own list (a newer version's relation) is used as given.
    newer = _engine(allow=PUBLIC_ONLY)
    newer.use_catalog_relations(frozenset({"pg_class", "pg_stat_io"}))
    assert _decide(newer, "SELECT * FROM pg_stat_io").outcome == "deny"
    assert _decide(newer, "SELECT * FROM orders").outcome == "allow"


def test_a_denied_table_hint_does_not_imply_it_is_allowed() -> None:
    verdict = _decide(
        _engine(allow=PUBLIC_ONLY, deny={"tables": ["public.secrets"]}), "SELECT * FROM secrets"
    )
    assert verdict.outcome == "deny"
    assert verdict.reason == "public.secrets is denied by rule reader"
    assert verdict.hint == (
        "leave public.secrets out: it is not available to you; "
        "allowed for you: SELECT on public.* (rule reader), except public.secrets"
    )


@pytest.mark.parametrize(
    ("sql", "instead"),
    [
        ("COPY orders TO STDOUT", "use SELECT ... and read the rows"),
        ("COPY orders FROM STDIN", "use INSERT ... VALUES with parameters"),
        ("COPY orders TO '/tmp/x'", "read rows with SELECT ... and write them with INSERT"),
        ("COPY orders FROM PROGRAM 'id'", "read rows with SELECT ... and write them"),
        ("SET work_mem = '1GB'", "leave the setting out"),
        ("SET search_path TO hr", "write table names schema-qualified"),
        ("PREPARE q AS SELECT 1", "use the protocol's prepared statements"),
        ("EXECUTE q", "use the protocol's prepared statements"),
        ("DO $$ BEGIN PERFORM 1; END $$", "send the statements themselves"),
        ("SET ROLE postgres", "the gateway connects with the role your policy names"),
    ],
)
def test_a_refused_operation_says_what_to_do_instead(sql: str, instead: str) -> None:
    verdict = _decide(_engine(allow=PUBLIC_ONLY), sql)
    assert verdict.outcome == "deny", sql
    assert verdict.hint is not None and verdict.hint.startswith(instead), verdict.hint
    assert "allowed for you: SELECT on public.*" in verdict.hint


def test_an_exposing_relation_hint_does_not_imply_pg_catalog_star_covers_it() -> None:
    verdict = _decide(_engine(), "SELECT * FROM pg_stats")
    assert verdict.outcome == "deny" and verdict.rule == "built-in"
    assert verdict.hint is not None
    assert "SELECT on public.*, pg_catalog.* (rule reader)" in verdict.hint
    assert verdict.hint.endswith(
        "; but never pg_catalog.pg_stats, which the built-in protections refuse"
    )
    whole = _decide(_engine(), "SELECT schema_to_xml('pg_catalog', true, false, '')")
    assert whole.hint is not None
    assert whole.hint.endswith(
        "; but never all of pg_catalog.* at once, which the built-in protections refuse"
    )


def test_a_refused_catalog_read_says_what_describing_the_schema_needs() -> None:
    verdict = _decide(_engine(allow=PUBLIC_ONLY), "SELECT relname FROM pg_catalog.pg_class")
    assert verdict.outcome == "deny"
    assert verdict.reason == "read access to pg_catalog.pg_class is not allowed for you by any rule"
    assert verdict.hint is not None and verdict.hint.startswith(
        "describing the schema (psql's \\d, a driver's introspection) needs a rule that allows "
        "pg_catalog.*: ask an operator; allowed for you: SELECT on public.*"
    ), verdict.hint


@pytest.mark.parametrize(
    ("sql", "hint"),
    [
        ("SELECT pg_read_file('x')", "leave pg_read_file() out: it is not available through"),
        ("SELECT pg_sleep(1)", "leave pg_sleep() out: it is not available to you;"),
    ],
)
def test_a_refused_function_hint_says_to_leave_it_out(sql: str, hint: str) -> None:
    verdict = _decide(_engine(allow=PUBLIC_ONLY, deny={"functions": ["pg_sleep"]}), sql)
    assert verdict.outcome == "deny"
    assert verdict.hint is not None and verdict.hint.startswith(hint), verdict.hint
