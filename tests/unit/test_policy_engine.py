"""The policy engine over real analyzer output: default deny, most restrictive wins."""

from __future__ import annotations

from fnmatch import fnmatchcase

import pytest

from querywarden.analysis import Analyzer
from querywarden.identity import Principal
from querywarden.policy.engine import (
    BUILTIN_DENIED_FUNCTIONS,
    BUILTIN_DENIED_OPERATIONS,
    PolicyEngine,
    Verdict,
)
from querywarden.policy.functions import builtin_functions
from querywarden.policy.model import OPERATIONS, PolicyDocument

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
        ("SET ROLE postgres", "run what you need as the role the gateway connects with"),
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


# --- built-in protections and what lifts them (issue 19) --------------------------------

ALLOW_ALL = {"operations": ["*"], "tables": ["*"]}


def _policy(allow: dict[str, object], **extra: object) -> PolicyEngine:
    rule = {"name": "trusted", "subjects": {"groups": ["ai-agents"]}, "allow": allow}
    return PolicyEngine(PolicyDocument.model_validate({"rules": [rule], **extra}))


MASKED = {"columns": [{"table": "public.customers", "column": "ssn", "strategy": "redact"}]}


@pytest.mark.parametrize(
    ("statement", "call"),
    [
        ("SET TimeZone TO 'UTC'", "SELECT set_config('TimeZone', 'UTC', false)"),
        ("SET work_mem TO '1MB'", "SELECT set_config('work_mem', '1MB', true)"),
        (
            "SET client_encoding TO 'LATIN1'",
            "SELECT set_config('client_encoding', 'LATIN1', false)",
        ),
        ("SET search_path TO hr", "SELECT set_config('search_path', 'hr', false)"),
        ("SET statement_timeout TO 0", "SELECT set_config('statement_timeout', '0', false)"),
        ("SET ROLE admin", "SELECT set_config('role', 'admin', false)"),
        (
            "SET SESSION AUTHORIZATION admin",
            "SELECT set_config('session_authorization', 'admin', false)",
        ),
    ],
)
@pytest.mark.parametrize(
    "allow",
    [
        ALLOW_ALL,
        {"operations": ["select", "set"], "tables": ["*"]},
        {"operations": ["select", "set", "set_search_path", "set_role"], "tables": ["*"]},
        {"operations": ["select"], "tables": ["public.*"]},
    ],
    ids=["all", "set", "set-path-role", "select"],
)
def test_set_config_with_a_constant_name_is_decided_as_that_set(
    statement: str, call: str, allow: dict[str, object]
) -> None:
    # Issue 19: set_config was refused as a function whatever the rules allowed.
    engine_ = _policy(allow)
    fixed = PolicyEngine(
        PolicyDocument.model_validate(
            {
                "rules": [
                    {
                        "name": "timed",
                        "subjects": {"groups": ["ai-agents"]},
                        "allow": allow,
                        "limits": {"statementTimeout": "5s"},
                    }
                ]
            }
        )
    )
    for e in (engine_, fixed):
        as_set = _decide(e, statement)
        as_call = _decide(e, call)
        assert (as_call.outcome, as_call.rule) == (as_set.outcome, as_set.rule), (call, as_call)
        if as_set.outcome == "deny":
            assert as_call.reason == as_set.reason


def test_set_config_is_no_longer_a_built_in_refusal() -> None:
    trusted = _decide(_policy(ALLOW_ALL), "SELECT set_config('TimeZone', 'UTC', false)")
    assert trusted.outcome == "allow", trusted
    reader = _decide(_policy(PUBLIC_ONLY), "SELECT set_config('TimeZone', 'UTC', false)")
    assert reader.outcome == "deny" and reader.rule == "trusted"
    assert reader.reason == "SET is not allowed for you by any rule"
    assert reader.hint is not None and reader.hint.startswith("leave the setting out")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT set_config($1, 'UTC', false)",
        "SELECT set_config('time' || 'zone', 'UTC', false)",
        "SELECT set_config(name, 'x', false) FROM pg_settings",
        "UPDATE pg_settings SET setting = 'x' WHERE name = 'work_mem'",
    ],
)
def test_a_setting_whose_name_cannot_be_seen_stays_refused(sql: str) -> None:
    refused = _decide(_policy(ALLOW_ALL), sql)
    assert refused.outcome == "deny" and refused.rule == "built-in"
    assert "a setting whose name querywarden cannot see" in refused.reason
    assert refused.hint is not None and refused.hint.startswith("name the setting as a constant")


@pytest.mark.parametrize(
    "sql",
    [
        "SET ROLE admin",
        "SET LOCAL ROLE admin",
        "SET SESSION AUTHORIZATION admin",
        "SELECT set_config('role', 'admin', false)",
    ],
)
def test_role_switches_need_nothing_hidden_or_an_explicit_rule(sql: str) -> None:
    # Allowed to do and read everything, unmasked: * lifts a role switch.
    assert _decide(_policy(ALLOW_ALL), sql).outcome == "allow"
    operation = "set_session_authorization" if "AUTHORIZATION" in sql else "set_role"
    # * with a table out of reach: the role's privileges still guard something.
    for allow in (
        {"operations": ["*"], "tables": ["public.*"]},
        {"operations": ["select", "set"], "tables": ["*"]},
    ):
        refused = _decide(_policy(allow), sql)
        assert refused.outcome == "deny" and refused.rule == "built-in", (allow, refused)
        assert "a role switch changes which privileges the server enforces" in refused.reason
        assert refused.hint is not None and refused.hint.startswith(
            "run what you need as the role the gateway connects with"
        )
    denied_table = PolicyEngine(
        PolicyDocument.model_validate(
            {
                "rules": [
                    {
                        "name": "trusted",
                        "subjects": {"groups": ["ai-agents"]},
                        "allow": ALLOW_ALL,
                        "deny": {"tables": ["public.secrets"]},
                    }
                ]
            }
        )
    )
    assert _decide(denied_table, sql).outcome == "deny"
    # Named explicitly, the operator chose it.
    named = {"operations": ["select", "set", operation], "tables": ["public.*"]}
    assert _decide(_policy(named), sql).outcome == "allow"


@pytest.mark.parametrize("allow", [ALLOW_ALL, {"operations": ["*", "set_role"], "tables": ["*"]}])
def test_a_masked_identity_never_switches_role(allow: dict[str, object]) -> None:
    refused = _decide(_policy(allow, masking=MASKED), "SET ROLE admin")
    assert refused.outcome == "deny" and refused.rule == "built-in"
    assert "masking applies to you" in refused.reason
    exempt = _policy(allow, masking={**MASKED, "exempt": {"groups": ["ai-agents"]}})
    assert _decide(exempt, "SET ROLE admin").outcome == "allow"


@pytest.mark.parametrize(
    "sql",
    [
        "RESET ROLE",
        "SET ROLE NONE",
        "RESET SESSION AUTHORIZATION",
        "SET SESSION AUTHORIZATION DEFAULT",
        "RESET ALL",
        "DISCARD ALL",
    ],
)
def test_returning_to_the_gateways_role_is_no_role_switch(sql: str) -> None:
    settings = {
        "operations": ["select", "set", "reset", "discard", "set_search_path"],
        "tables": ["public.*"],
    }
    assert _decide(_policy(settings), sql).outcome == "allow"
    assert _decide(_policy(ALLOW_ALL, masking=MASKED), sql).outcome == "allow"


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT pg_terminate_backend(pg_backend_pid())",
        "SELECT pg_cancel_backend(pg_backend_pid())",
        "SELECT pg_catalog.pg_terminate_backend(pg_catalog.pg_backend_pid(), 100)",
    ],
)
def test_signalling_the_own_backend_is_not_a_built_in_refusal(sql: str) -> None:
    assert _decide(_policy(ALLOW_ALL), sql).outcome == "allow"
    # It still changes state (the session ends): a rule without side_effects refuses it.
    reader = _decide(_policy(PUBLIC_ONLY), sql)
    assert reader.outcome == "deny" and reader.rule == "trusted"
    assert "side_effects" in reader.reason


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT pg_terminate_backend(42)",
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE usename = current_user",
        "SELECT pg_terminate_backend(pg_backend_pid()), pg_terminate_backend(42)",
    ],
)
def test_signalling_another_backend_needs_the_function_named(sql: str) -> None:
    refused = _decide(_policy(ALLOW_ALL), sql)
    assert refused.outcome == "deny" and refused.rule == "built-in"
    assert "it signals another session's backend" in refused.reason
    assert refused.hint is not None and "allow.functions" in refused.hint
    named = _policy({**ALLOW_ALL, "functions": ["pg_terminate_backend", "pg_cancel_backend"]})
    assert _decide(named, sql).outcome == "allow"


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER USER carol PASSWORD 'SCRAM-SHA-256$4096:abc'",  # psql's \password
        "ALTER ROLE CURRENT_USER WITH ENCRYPTED PASSWORD 'secret'",
        "ALTER ROLE carol PASSWORD NULL",
        "CREATE ROLE app LOGIN PASSWORD 'secret'",
    ],
)
def test_setting_a_password_is_refused_because_identities_are_tokens(sql: str) -> None:
    refused = _decide(_policy(ALLOW_ALL), sql)
    assert refused.outcome == "deny" and refused.rule == "built-in"
    assert refused.reason.startswith(
        "setting a role's password (CREATE or ALTER ROLE ... PASSWORD) is refused by "
        "querywarden's built-in protections: identities come from tokens, not database "
        "passwords"
    ), refused.reason
    assert refused.hint is not None
    assert refused.hint.startswith("to sign in, get a new token from your identity provider")
    assert "names password in allow.operations" in refused.hint
    # Lifted only by naming it; role DDL without a password is DDL.
    assert _decide(_policy({**ALLOW_ALL, "operations": ["*", "password"]}), sql).outcome == (
        "allow"
    )
    assert _decide(_policy(ALLOW_ALL), "ALTER ROLE carol NOLOGIN").outcome == "allow"


def test_every_built_in_protection_says_what_it_protects_against() -> None:
    assert set(BUILTIN_DENIED_OPERATIONS) <= OPERATIONS
    known, _ = builtin_functions()
    for pattern, protection in BUILTIN_DENIED_FUNCTIONS.items():
        assert protection.startswith("it "), pattern
        if pattern in ("dblink*", "pg_file_*"):  # extensions' (dblink, adminpack)
            continue
        # Every other entry names a function PostgreSQL defines (no dead entries).
        assert any(fnmatchcase(name.partition(".")[2], pattern) for name in known), pattern
    for sql, protection in (
        ("COPY t FROM '/etc/passwd'", "files on the database server's host"),
        ("COPY t TO PROGRAM 'id'", "runs a program"),
        ("ALTER SYSTEM SET work_mem = '1MB'", "archive_command"),
        ("SELECT pg_reload_conf()", "reloads the server's configuration"),
        ("SELECT pg_read_file('/etc/passwd')", "the database server's files"),
        ("SELECT lo_export(1, '/tmp/x')", "writes a file on the database server's host"),
        ("SELECT pg_file_write('x', 'y', false)", "adminpack"),
        ("SELECT pg_promote()", "administers the whole server"),
    ):
        refused = _decide(_policy(ALLOW_ALL), sql)
        assert refused.outcome == "deny" and refused.rule == "built-in", sql
        assert protection in refused.reason, (sql, refused.reason)


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER ROLE CURRENT_USER SET role = 'admin'",
        "ALTER DATABASE app SET role = 'admin'",
        "ALTER ROLE ALL IN DATABASE app SET session_authorization = 'admin'",
    ],
)
def test_a_role_default_for_later_sessions_needs_the_operation_named(sql: str) -> None:
    # Every later session of the shared upstream role would start as another role,
    # other identities' (masked ones too): * does not lift it.
    refused = _decide(_policy(ALLOW_ALL), sql)
    assert refused.outcome == "deny" and refused.rule == "built-in"
    assert "every later session, other identities' included" in refused.reason
    operation = "set_session_authorization" if "authorization" in sql else "set_role"
    assert _decide(_policy({**ALLOW_ALL, "operations": ["*", operation]}), sql).outcome == ("allow")
