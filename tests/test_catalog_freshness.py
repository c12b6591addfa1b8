"""Masking never uses a catalog older than the relations a result comes from.

Views created or replaced by anyone (through the gateway or beside it, as a migration
would) are masked from the first result that reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from gateway_harness import POLICY, RunningGateway
from querywarden.devcluster import EphemeralCluster
from querywarden.policy import PolicyDocument

HASH_KEY = "test-freshness-masking-key-0123456789"
SSN = "987-65-4321"


@pytest.fixture(scope="module")
def people(pg: EphemeralCluster) -> Iterator[None]:
    pg.psql(
        "DROP TABLE IF EXISTS qf_people CASCADE;"
        "CREATE TABLE qf_people (id int PRIMARY KEY, ssn text, city text);"
        f"INSERT INTO qf_people VALUES (1, '{SSN}', 'Lyon');"
        "GRANT ALL ON qf_people TO PUBLIC; GRANT CREATE ON SCHEMA public TO PUBLIC;"
    )
    yield
    pg.psql("DROP TABLE qf_people CASCADE")


@pytest.fixture
def gw(make_gateway: Callable[..., RunningGateway], people: None) -> RunningGateway:
    document: dict[str, Any] = {
        "identity": POLICY.identity.model_dump(by_alias=True),
        "rules": [
            {
                "name": "agents",
                "subjects": {"groups": ["ai-agents"]},
                "allow": {"operations": ["select"], "tables": ["public.*", "pg_catalog.*"]},
            },
            {
                "name": "dba",
                "subjects": {"groups": ["dba"]},
                "allow": {"operations": ["*"], "tables": ["*"]},
            },
        ],
        "masking": {
            "columns": [{"table": "public.qf_people", "column": "ssn", "strategy": "redact"}],
            "predicates": "deny",
            "exempt": {"groups": ["dba"]},
        },
    }
    running = make_gateway(
        policy=PolicyDocument.model_validate(document), masking={"hashKey": HASH_KEY}
    )
    # Only the mechanism under test: no periodic fingerprint check unless a test asks.
    running.gateway.catalogs.recheck = 3600.0
    return running


def rows(conn: psycopg.Connection[Any], sql: str) -> str:
    return str(conn.execute(sql).fetchall())


def test_a_view_created_beside_the_gateway_is_masked_at_once(
    gw: RunningGateway, pg: EphemeralCluster
) -> None:
    pg.psql("DROP VIEW IF EXISTS qf_new_view")
    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        assert "Lyon" in rows(conn, "SELECT id, ssn, city FROM qf_people")  # catalog read
        assert SSN not in rows(conn, "SELECT id, ssn, city FROM qf_people")
        # A migration adds a view over the masked column: the gateway's catalog has
        # never seen it, and nothing tells the gateway.
        pg.psql(
            "CREATE VIEW qf_new_view AS SELECT id, ssn AS note FROM qf_people;"
            "GRANT SELECT ON qf_new_view TO PUBLIC"
        )
        simple = rows(conn, "SELECT id, note FROM qf_new_view")
        extended = str(conn.execute("SELECT note FROM qf_new_view WHERE id = %s", (1,)).fetchall())
        assert SSN not in simple and "4321" not in simple, simple
        assert SSN not in extended and "4321" not in extended, extended
        assert "1" in simple  # the row came, masked


def test_a_view_replaced_beside_the_gateway_is_masked_at_the_next_decision(
    gw: RunningGateway, pg: EphemeralCluster
) -> None:
    pg.psql(
        "DROP VIEW IF EXISTS qf_replaced;"
        "CREATE VIEW qf_replaced AS SELECT id, city AS note FROM qf_people;"
        "GRANT SELECT ON qf_replaced TO PUBLIC"
    )
    gw.gateway.catalogs.recheck = 0.0  # every decision checks the catalog's fingerprint
    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        assert rows(conn, "SELECT id, note FROM qf_replaced") == "[(1, 'Lyon')]"
        # Same OID, same column names and types, another source column.
        pg.psql("CREATE OR REPLACE VIEW qf_replaced AS SELECT id, ssn AS note FROM qf_people")
        replaced = rows(conn, "SELECT id, note FROM qf_replaced")
        assert SSN not in replaced and "4321" not in replaced, replaced


def test_a_prepared_statement_reads_a_replaced_view_masked(
    gw: RunningGateway, pg: EphemeralCluster
) -> None:
    pg.psql(
        "DROP VIEW IF EXISTS qf_prepared;"
        "CREATE VIEW qf_prepared AS SELECT id, city AS note FROM qf_people;"
        "GRANT SELECT ON qf_prepared TO PUBLIC"
    )
    gw.gateway.catalogs.recheck = 0.0
    query = "SELECT id, note FROM qf_prepared WHERE id = %s"
    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        assert conn.execute(query, (1,), prepare=True).fetchall() == [(1, "Lyon")]
        pg.psql("CREATE OR REPLACE VIEW qf_prepared AS SELECT id, ssn AS note FROM qf_people")
        # Bind and Execute only: no new decision unless the session asks for one.
        replaced = str(conn.execute(query, (1,), prepare=True).fetchall())
        assert SSN not in replaced and "4321" not in replaced, replaced


def test_ddl_through_the_gateway_by_an_exempt_identity_reaches_every_session(
    gw: RunningGateway, pg: EphemeralCluster
) -> None:
    pg.psql("DROP VIEW IF EXISTS qf_by_dba")
    with (
        psycopg.connect(gw.dsn("alice"), autocommit=True) as agent,
        psycopg.connect(gw.dsn("bob"), autocommit=True) as dba,
    ):
        dba.execute("CREATE VIEW qf_by_dba AS SELECT id, city AS note FROM qf_people")
        assert rows(agent, "SELECT id, note FROM qf_by_dba") == "[(1, 'Lyon')]"
        dba.execute("CREATE OR REPLACE VIEW qf_by_dba AS SELECT id, ssn AS note FROM qf_people")
        replaced = rows(agent, "SELECT id, note FROM qf_by_dba")
        assert SSN not in replaced and "4321" not in replaced, replaced


def test_a_result_whose_new_plan_refuses_it_is_withheld(
    gw: RunningGateway, pg: EphemeralCluster
) -> None:
    pg.psql("DROP VIEW IF EXISTS qf_filtered")
    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        rows(conn, "SELECT id FROM qf_people")  # catalog read
        pg.psql(
            "CREATE VIEW qf_filtered AS SELECT id, ssn AS note FROM qf_people;"
            "GRANT SELECT ON qf_filtered TO PUBLIC"
        )
        # Decided with the old catalog, note was nobody's column; it is the ssn now, and
        # a masked column may not steer a WHERE (predicates: deny).
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="may not be used in"):
            conn.execute(f"SELECT id FROM qf_filtered WHERE note = '{SSN}'").fetchall()
        assert conn.execute("SELECT 1").fetchone() == (1,)
