"""Which check may spare an approver a statement: :func:`check_before_hold`, pure.

The checks against a real server, through the gateway, are in
``tests/test_approvals_checks.py``.
"""

from __future__ import annotations

import pytest

from querywarden.analysis import QualifiedName, analyze
from querywarden.hooks import WireState
from querywarden.policy.prechecks import AbsenceCheck, ParseCheck, check_before_hold

IDLE = WireState()


def check(
    sql: str, *, kind: str = "query", wire: WireState = IDLE, path: tuple[str, ...] = ("public",)
) -> object:
    return check_before_hold(kind, sql, analyze(sql), wire, list(path))


def test_dml_is_parsed_with_the_exact_text_and_its_unqualified_relations() -> None:
    sql = "  DELETE FROM orders o USING pg_temp.t, s.u WHERE o.id = t.id;"
    assert check(sql) == ParseCheck(sql, "public", ("orders", "t"))
    for sql in (
        "SELECT 1",
        "INSERT INTO t VALUES (1)",
        "UPDATE t SET a = 1",
        "MERGE INTO t USING u ON t.a = u.a WHEN MATCHED THEN DELETE",
    ):
        assert isinstance(check(sql), ParseCheck), sql
    assert isinstance(check("DELETE FROM t", kind="parse"), ParseCheck)


def test_drop_if_exists_is_looked_up_by_kind_and_name() -> None:
    assert check("DROP TABLE IF EXISTS a, s.b CASCADE") == AbsenceCheck(
        "relation", (QualifiedName(None, "a"), QualifiedName("s", "b")), ("public",)
    )
    assert check('DROP SCHEMA IF EXISTS "S"') == AbsenceCheck(
        "schema", (QualifiedName(None, "S"),), ("public",)
    )
    assert check("DROP DOMAIN IF EXISTS s.d", path=("public", "app")) == AbsenceCheck(
        "type", (QualifiedName("s", "d"),), ("public", "app")
    )
    for kind in ("VIEW", "MATERIALIZED VIEW", "INDEX", "SEQUENCE", "FOREIGN TABLE"):
        found = check(f"DROP {kind} IF EXISTS x")
        assert isinstance(found, AbsenceCheck) and found.kind == "relation", kind


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE a",  # no IF EXISTS: it fails or drops, an approver decides
        "DROP FUNCTION IF EXISTS f()",  # kinds not looked up by name alone
        "DROP TRIGGER IF EXISTS tr ON t",
        "DROP TYPE IF EXISTS t[]",
        "DROP TABLE IF EXISTS db.s.t",
        "ALTER TABLE t DROP COLUMN c",  # utility statements: Parse resolves nothing
        "TRUNCATE t",
        "EXECUTE p",
        "DELETE FROM a; DELETE FROM b",  # an earlier statement may change a later one
    ],
)
def test_what_the_server_cannot_be_asked_about_is_held(sql: str) -> None:
    assert check(sql) is None


def test_what_only_the_session_can_see_is_held() -> None:
    for wire in (WireState(b"T"), WireState(b"E"), WireState(b"I", in_flight=True)):
        assert check("DELETE FROM t", wire=wire) is None
        assert check("DROP TABLE IF EXISTS t", wire=wire) is None
    # A path of several schemas: their order is not known.
    assert check("DELETE FROM t", path=("app", "public")) is None
    assert check("DELETE FROM t", path=("$user",)) is None
    # A Parse prepares what may run much later; an EXECUTE decided again likewise.
    assert check("DROP TABLE IF EXISTS t", kind="parse") is None
    assert check("DELETE FROM t", kind="execute") is None
