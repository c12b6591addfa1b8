"""Side channels through the catalog, and functions with side effects, through the gateway.

A read-only identity whose rule allows ``pg_catalog.*`` (so that unqualified names
resolve, as in examples/policy.yaml) must neither read a denied table through the
statistics PostgreSQL keeps about it, nor change the server's state by calling a
volatile function.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import psycopg
import pytest

from gateway_harness import POLICY, RunningGateway
from querywarden.devcluster import EphemeralCluster
from querywarden.policy import PolicyDocument
from querywarden.policy.gate import PolicyGate

pytestmark = pytest.mark.postgres

RULES = [
    {
        "name": "ai-agents-read",
        "subjects": {"groups": ["ai-agents"]},
        "allow": {
            "operations": ["select", "explain", "show", "transaction"],
            "tables": ["public.*", "pg_catalog.*", "information_schema.*"],
        },
        "deny": {"tables": ["public.qw_sc_secrets"]},
    },
    {
        # Every table but one: not "everything", so the statistics stay refused.
        "name": "support-all-but-secrets",
        "subjects": {"groups": ["support"]},
        "allow": {"operations": ["select"], "tables": ["*"]},
        "deny": {"tables": ["public.qw_sc_secrets"]},
    },
    {
        "name": "dba-all",
        "subjects": {"groups": ["dba"]},
        "allow": {"operations": ["*"], "tables": ["*"]},
    },
]

REFUSED = "querywarden: "


@pytest.fixture(scope="module")
def tables(pg: EphemeralCluster) -> Iterator[None]:
    pg.psql(
        "CREATE TABLE qw_sc_orders (id int PRIMARY KEY, amount int);"
        "CREATE TABLE qw_sc_secrets (id int, secret text);"
        "CREATE SEQUENCE qw_sc_seq;"
        "CREATE FUNCTION qw_sc_peek() RETURNS text LANGUAGE sql"
        "  AS $$SELECT secret FROM qw_sc_secrets ORDER BY id LIMIT 1$$;"
        "GRANT ALL ON qw_sc_orders, qw_sc_secrets, qw_sc_seq TO PUBLIC;"
        "INSERT INTO qw_sc_orders SELECT g, g * 10 FROM generate_series(1, 50) g;"
        "INSERT INTO qw_sc_secrets SELECT g, CASE WHEN g % 2 = 0 THEN 'TOPSECRET-alpha'"
        "  ELSE 'TOPSECRET-bravo' END FROM generate_series(1, 100) g;"
        "ANALYZE qw_sc_orders, qw_sc_secrets;"
    )
    yield
    pg.psql(
        "DROP TABLE qw_sc_orders, qw_sc_secrets; DROP SEQUENCE qw_sc_seq;DROP FUNCTION qw_sc_peek()"
    )


@pytest.fixture
def policed(make_gateway: Callable[..., RunningGateway], tables: None) -> RunningGateway:
    policy = PolicyDocument.model_validate(
        {"identity": POLICY.identity.model_dump(by_alias=True), "rules": RULES}
    )
    return make_gateway(gate=PolicyGate(policy))


def _refusal(conn: psycopg.Connection[tuple[object, ...]], sql: str) -> psycopg.errors.Diagnostic:
    """Run ``sql`` expecting the gateway's own refusal (42501); its diagnostics."""
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
        conn.execute(sql)
    diag = refused.value.diag
    assert diag.message_primary is not None
    assert diag.message_primary.startswith(REFUSED), f"the server answered: {diag}"
    return diag


# --- statistics and other catalogs that expose other relations' data ----------------------


def test_statistics_of_a_denied_table_are_there_for_who_may_read_everything(
    policed: RunningGateway,
) -> None:
    # The dba reads every table, so the statistics hide nothing from it; and they do hold
    # the denied table's values (what the agent must not see).
    with psycopg.connect(policed.dsn("bob"), autocommit=True) as conn:
        row = conn.execute(
            "SELECT most_common_vals::text FROM pg_catalog.pg_stats "
            "WHERE tablename = 'qw_sc_secrets' AND attname = 'secret'"
        ).fetchone()
    assert row is not None and "TOPSECRET-alpha" in str(row[0])


@pytest.mark.parametrize(
    ("sql", "exposed"),
    [
        ("SELECT * FROM pg_catalog.pg_stats", "pg_catalog.pg_stats"),
        (
            "SELECT most_common_vals FROM pg_stats WHERE tablename = 'qw_sc_orders'",
            "pg_catalog.pg_stats",
        ),
        ("SELECT * FROM pg_catalog.pg_stats_ext", "pg_catalog.pg_stats_ext"),
        ("SELECT * FROM pg_catalog.pg_stats_ext_exprs", "pg_catalog.pg_stats_ext_exprs"),
        ("SELECT stavalues1 FROM pg_catalog.pg_statistic", "pg_catalog.pg_statistic"),
        ("SELECT * FROM pg_statistic_ext_data", "pg_catalog.pg_statistic_ext_data"),
        ("SELECT query FROM pg_stat_activity", "pg_catalog.pg_stat_activity"),
        ("SELECT * FROM pg_stat_get_activity(NULL)", "pg_stat_get_activity()"),
        ("SELECT pg_stat_get_backend_activity(1)", "pg_stat_get_backend_activity()"),
        ("SELECT loid FROM pg_largeobject", "pg_catalog.pg_largeobject"),
    ],
)
def test_agent_cannot_read_what_exposes_other_tables(
    policed: RunningGateway, sql: str, exposed: str
) -> None:
    with psycopg.connect(policed.dsn("alice"), autocommit=True) as conn:
        diag = _refusal(conn, sql)
        assert exposed in str(diag.message_primary)
        assert "beyond the tables your policy lets you read" in str(diag.message_primary)
        assert diag.message_hint is not None and "allow." in diag.message_hint
        # The session carries on.
        assert conn.execute("SELECT count(*) FROM qw_sc_orders").fetchone() == (50,)


def test_every_table_but_a_denied_one_is_not_every_table(
    policed: RunningGateway, pg: EphemeralCluster
) -> None:
    toast = pg.psql(
        "SELECT 'pg_toast.' || t.relname FROM pg_class c JOIN pg_class t "
        "ON t.oid = c.reltoastrelid WHERE c.relname = 'qw_sc_secrets'"
    )
    with psycopg.connect(policed.dsn("carol"), autocommit=True) as conn:
        for sql in (
            "SELECT most_common_vals::text FROM pg_stats WHERE tablename = 'qw_sc_secrets'",
            "SELECT query FROM pg_catalog.pg_stat_activity",
            f"SELECT chunk_data FROM {toast}",
        ):
            diag = _refusal(conn, sql)
            assert "beyond the tables your policy lets you read" in str(diag.message_primary)
        assert conn.execute("SELECT count(*) FROM qw_sc_orders").fetchone() == (50,)


# --- functions with side effects ----------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SELECT pg_stat_reset()", "pg_stat_reset()"),
        ("SELECT pg_stat_reset_shared('bgwriter')", "pg_stat_reset_shared()"),
        ("SELECT pg_logical_emit_message(false, 'x', 'y')", "pg_logical_emit_message()"),
        ("SELECT pg_try_advisory_lock(id) FROM qw_sc_orders", "pg_try_advisory_lock()"),
        ("SELECT qw_sc_peek()", "qw_sc_peek()"),
        ("SELECT nextval('qw_sc_seq')", "UPDATE is not allowed"),
        ("SELECT pg_notify('qw_sc', 'x')", "NOTIFY is not allowed"),
        ("SELECT set_config('work_mem', '1MB', false)", "SET is not allowed"),
        ("SELECT lo_creat(-1)", "UPDATE is not allowed"),
        ("SELECT lo_open(1, 262144)", "pg_catalog.pg_largeobject"),
    ],
)
def test_agent_cannot_call_functions_with_side_effects(
    policed: RunningGateway, sql: str, reason: str
) -> None:
    with psycopg.connect(policed.dsn("alice"), autocommit=True) as conn:
        diag = _refusal(conn, sql)
        assert reason in str(diag.message_primary)
        if "()" in reason:
            assert "a function with side effects" in str(diag.message_primary)
            assert diag.message_hint is not None and "side_effects" in diag.message_hint
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_refused_advisory_lock_never_reaches_the_server(
    policed: RunningGateway, pg: EphemeralCluster
) -> None:
    with psycopg.connect(policed.dsn("alice"), autocommit=True) as conn:
        _refusal(conn, "SELECT pg_advisory_lock(8080)")
        # A session-level advisory lock would outlive the statement: there is none.
        held = pg.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        assert held == "0"


def test_agent_still_calls_functions_without_side_effects(policed: RunningGateway) -> None:
    with psycopg.connect(policed.dsn("alice"), autocommit=True) as conn:
        row = conn.execute(
            "SELECT now() IS NOT NULL, random() < 1, lower('AbC'), count(*), "
            "pg_catalog.format_type(23, NULL), pg_table_size('qw_sc_orders') > 0, "
            "clock_timestamp() IS NOT NULL FROM qw_sc_orders"
        ).fetchone()
        assert row == (True, True, "abc", 50, "integer", True, True)


def test_psql_describe_still_works_for_the_agent(policed: RunningGateway) -> None:
    for command in (
        "\\d+ qw_sc_orders",
        "\\dt+ qw_sc_*",
        "\\di+",
        "\\ds+",
        "\\df+ lower",
        "\\dn+",
        "\\dT",
        "\\du",
        "\\dx+",
        "\\dp qw_sc_*",
        "\\dconfig work_mem",
        "\\db",
        "\\dP+",
        "\\l+",
        "\\sf lower(text)",
    ):
        result = subprocess.run(
            ["psql", policed.dsn("alice"), "-X", "-c", command],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, f"{command}: {result.stderr}"
        assert "querywarden" not in result.stderr


def test_who_may_have_side_effects_still_has_them(policed: RunningGateway) -> None:
    # The dba's rule allows every operation, side_effects included.
    with psycopg.connect(policed.dsn("bob")) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(8081)")
        held = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 8081"
        ).fetchone()
        assert held == (1,)
        assert conn.execute("SELECT qw_sc_peek()").fetchone() == ("TOPSECRET-bravo",)
