"""Unqualified names, search_path changes and temporary tables through the real gateway.

The policy decides on names; PostgreSQL resolves them against the session's search_path
(temporary schema first). These tests change what a name means and check that the
gateway's decision follows, against a real server holding a table the policy denies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from gateway_harness import POLICY, RunningGateway
from otlp_receiver import OtlpReceiver
from querywarden.audit.log import read_records
from querywarden.devcluster import EphemeralCluster
from querywarden.policy import PolicyDocument

RULES = [
    {
        "name": "agents-public",
        "subjects": {"groups": ["ai-agents"]},
        "allow": {
            "operations": [
                "select",
                "insert",
                "set",
                "set_search_path",
                "transaction",
                "ddl",
                "show",
            ],
            # No pg_catalog.*: unqualified names resolve without it (issue 17).
            "tables": ["public.*", "pg_temp.*"],
        },
        "deny": {"tables": ["qw_hr.*", "public.qw_secrets"]},
    }
]


def _policy() -> PolicyDocument:
    return PolicyDocument.model_validate(
        {"identity": POLICY.identity.model_dump(by_alias=True), "rules": RULES}
    )


@pytest.fixture(scope="module")
def hr_schema(pg: EphemeralCluster) -> Iterator[None]:
    pg.psql(
        "CREATE SCHEMA IF NOT EXISTS qw_hr; GRANT USAGE ON SCHEMA qw_hr TO PUBLIC;"
        "CREATE TABLE IF NOT EXISTS qw_hr.qw_pay (who text, amount int);"
        "GRANT SELECT ON qw_hr.qw_pay TO PUBLIC;"
        "INSERT INTO qw_hr.qw_pay VALUES ('ceo', 1000000);"
    )
    yield
    pg.psql("DROP SCHEMA qw_hr CASCADE")


@pytest.fixture
def gateway_sp(make_gateway: Callable[..., RunningGateway], hr_schema: None) -> RunningGateway:
    return make_gateway(policy=_policy())


def test_set_search_path_changes_what_unqualified_names_are_checked_as(
    gateway_sp: RunningGateway,
) -> None:
    with psycopg.connect(gateway_sp.dsn("alice"), autocommit=True) as conn:
        # public.qw_pay does not exist: the policy allows the name, the server says no.
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM qw_pay")
        # pg_catalog's own relations are still pg_catalog's, which no rule allows here.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"as pg_catalog\.pg_"):
            conn.execute("SELECT * FROM pg_namespace")
        conn.execute("SET search_path TO qw_hr, public")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"qw_hr\.qw_pay"):
            conn.execute("SELECT * FROM qw_pay")
        # Setting it back does not forget: the gateway keeps every schema ever set.
        conn.execute("SET search_path TO public")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"qw_hr\.qw_pay"):
            conn.execute("SELECT * FROM qw_pay")


def test_set_and_read_in_one_request_and_rolled_back_sets_are_still_counted(
    gateway_sp: RunningGateway,
) -> None:
    with (
        psycopg.connect(gateway_sp.dsn("alice"), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"qw_hr\.qw_pay"),
    ):
        conn.execute("SET search_path TO qw_hr; SELECT amount FROM qw_pay")
    with psycopg.connect(gateway_sp.dsn("alice")) as conn:
        conn.execute("SET LOCAL search_path TO qw_hr")
        conn.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"qw_hr\.qw_pay"):
            conn.execute("SELECT amount FROM qw_pay")


def test_search_path_the_gateway_cannot_name_is_refused(gateway_sp: RunningGateway) -> None:
    with psycopg.connect(gateway_sp.dsn("alice"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"\$user"):
            conn.execute('SET search_path TO "$user", public')
        # Quoted, mixed-case and string forms are read as PostgreSQL reads them.
        conn.execute("SET search_path TO \"QW_HR\", 'qw_hr, x'")
        assert conn.execute("SHOW search_path").fetchone() == ('"QW_HR", "qw_hr, x"',)
        # Every schema now on the path must allow the bare name, not only qw_hr's denial.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"as QW_HR\.qw_pay"):
            conn.execute("SELECT * FROM qw_pay")


def test_temporary_tables(gateway_sp: RunningGateway) -> None:
    with psycopg.connect(gateway_sp.dsn("alice"), autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE qw_scratch (n int)")
        conn.execute("INSERT INTO qw_scratch VALUES (1), (2)")
        assert conn.execute("SELECT sum(n) FROM qw_scratch").fetchone() == (3,)
        assert conn.execute("SELECT count(*) FROM pg_temp.qw_scratch").fetchone() == (2,)
        # A temporary table named like a denied one: the bare name is still refused,
        # because it could mean public.qw_secrets.
        conn.execute("CREATE TEMP TABLE qw_secrets (n int)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="qw_secrets"):
            conn.execute("SELECT * FROM qw_secrets")
        assert conn.execute("SELECT count(*) FROM pg_temp.qw_secrets").fetchone() == (0,)


def test_exported_spans_qualify_names_only_where_the_schema_is_certain(
    make_gateway: Callable[..., RunningGateway], hr_schema: None, tmp_path: Path
) -> None:
    # Before any SET, "qw_missing" can only mean public.qw_missing (pg_catalog has no
    # such relation); once the session may have qw_hr on its path too, a name stays as
    # written: which schema holds it would be a guess.
    with OtlpReceiver() as receiver:
        gw = make_gateway(
            policy=_policy(),
            audit={"directory": str(tmp_path / "audit"), "otlpEndpoint": receiver.endpoint},
        )
        with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.UndefinedTable):
                conn.execute("SELECT id FROM qw_missing")
            # A temporary relation: PostgreSQL resolves its name there first.
            conn.execute("CREATE TEMP TABLE qw_note (n int)")
            conn.execute("SELECT n FROM qw_note")
            conn.execute("SET search_path TO qw_hr, public")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT * FROM qw_pay")
        spans = receiver.wait_for(
            lambda got: sum("qw_missing" in s.name or "qw_pay" in s.name for s in got) >= 2
        )
    by_text = {s.attributes.get("db.query.text"): s for s in spans}
    before = by_text["SELECT id FROM qw_missing"]
    assert before.attributes["db.collection.name"] == "public.qw_missing"
    assert before.name == "SELECT public.qw_missing"
    assert (
        by_text["CREATE TEMP TABLE qw_note (n int)"].attributes["db.collection.name"]
        == "pg_temp.qw_note"
    )
    assert by_text["SELECT n FROM qw_note"].attributes["db.collection.name"] == "qw_note"
    after = by_text["SELECT * FROM qw_pay"]
    assert after.attributes["db.collection.name"] == "qw_pay"
    assert after.attributes["db.query.summary"] == "SELECT qw_pay"
    # The log says why: the request record carries the search path the session may have.
    requests = [
        r
        for r in read_records(tmp_path / "audit")
        if r["type"] == "statement.request" and r["text"] == "SELECT * FROM qw_pay"
    ]
    assert requests[0]["search_path"] == ["public", "qw_hr"]
