"""The built-in protections through the gateway, with real clients (issue 19).

A DBA identity whose rule allows everything sees PostgreSQL: ``set_config`` is decided
as the SET of its setting, a role switch and its reset run, and a session may end
itself. What stays refused does so with the rule, the reason and a way out: another
session's backend, a setting the gateway cannot name, the session's encoding, a role
switch for an identity masking applies to, and any database password (psql's
``\\password``), since identities come from tokens.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import psycopg
import pytest

from gateway_harness import POLICY, RunningGateway
from querywarden.devcluster import ROLE_PASSWORD, EphemeralCluster
from querywarden.policy import PolicyDocument

pytestmark = pytest.mark.postgres

RULES = [
    {
        "name": "ai-agents-read",
        "subjects": {"groups": ["ai-agents"]},
        "allow": {"operations": ["select", "show"], "tables": ["public.*"]},
    },
    {
        "name": "dba-all",
        "subjects": {"groups": ["dba"]},
        "allow": {"operations": ["*"], "tables": ["*"]},
    },
    {
        # Everything allowed too, but masking applies to this group.
        "name": "support-all",
        "subjects": {"groups": ["support"]},
        "allow": {"operations": ["*"], "tables": ["*"]},
    },
]
MASKING = {
    "columns": [{"table": "public.qw_pr_cards", "column": "number", "strategy": "redact"}],
    "exempt": {"groups": ["dba"]},
}
#: A role the gateway's upstream role (qw_scram) is a member of.
ROLE = "qw_pr_reader"


@pytest.fixture(scope="module")
def objects(pg: EphemeralCluster) -> Iterator[None]:
    pg.psql(
        f"CREATE ROLE {ROLE} NOLOGIN; GRANT {ROLE} TO qw_scram;"
        "CREATE ROLE qw_pr_app LOGIN PASSWORD 'before';"
        "CREATE TABLE qw_pr_cards (id int, number text); GRANT ALL ON qw_pr_cards TO PUBLIC;"
        "INSERT INTO qw_pr_cards VALUES (1, '4111111111111111');"
    )
    yield
    pg.psql(f"DROP TABLE qw_pr_cards; DROP ROLE qw_pr_app; DROP ROLE {ROLE}")


@pytest.fixture
def protected(make_gateway: Callable[..., RunningGateway], objects: None) -> RunningGateway:
    policy = PolicyDocument.model_validate(
        {
            "identity": POLICY.identity.model_dump(by_alias=True),
            "rules": RULES,
            "masking": MASKING,
        }
    )
    return make_gateway(policy=policy)


def _refusal(conn: psycopg.Connection[tuple[object, ...]], sql: str) -> psycopg.errors.Diagnostic:
    with pytest.raises(psycopg.Error) as refused:
        conn.execute(sql)
    return refused.value.diag


def _psql(gateway: RunningGateway, user: str, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", gateway.dsn(user), "-X", "-v", "ON_ERROR_STOP=0", "-At"],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_set_config_is_decided_as_the_set_of_its_setting(protected: RunningGateway) -> None:
    with psycopg.connect(protected.dsn("bob"), autocommit=True) as conn:
        row = conn.execute("SELECT set_config('TimeZone', 'Asia/Tokyo', false)").fetchone()
        assert row == ("Asia/Tokyo",)
        assert conn.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)
        assert conn.execute("SELECT current_setting('TimeZone')").fetchone() == ("Asia/Tokyo",)
        # The gateway's own refusal of an encoding it cannot follow holds, as for SET.
        diag = _refusal(conn, "SELECT set_config('client_encoding', 'LATIN1', false)")
        assert diag.sqlstate == "0A000"
        assert diag.message_primary is not None and "client_encoding" in diag.message_primary
        assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)
        # A name the gateway cannot see stays refused (fail closed).
        diag = _refusal(conn, "SELECT set_config(lower('TIMEZONE'), 'UTC', false)")
        assert diag.sqlstate == "42501"
        assert diag.message_primary is not None
        assert "a setting whose name querywarden cannot see" in diag.message_primary
        assert diag.message_hint is not None
        assert diag.message_hint.startswith("name the setting as a constant")
        assert conn.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)
    script = (
        "SELECT set_config('TimeZone', 'Asia/Tokyo', false);\nSHOW TimeZone;\n"
        "SELECT set_config('client_encoding', 'LATIN1', false);\nSHOW client_encoding;\n"
    )
    result = _psql(protected, "bob", script)
    assert result.stdout.splitlines() == ["Asia/Tokyo", "Asia/Tokyo", "UTF8"], result
    assert "ERROR:  querywarden:" in result.stderr and "client_encoding" in result.stderr
    with psycopg.connect(protected.dsn("alice"), autocommit=True) as conn:
        diag = _refusal(conn, "SELECT set_config('TimeZone', 'UTC', false)")
        assert diag.sqlstate == "42501"
        assert "SET is not allowed for you by any rule" in str(diag.message_primary)
        assert diag.message_hint is not None
        assert diag.message_hint.startswith("leave the setting out")


def test_a_masked_value_cannot_leave_through_a_setting(protected: RunningGateway) -> None:
    # set_config takes any expression as its value, and SHOW / current_setting() return
    # it as no column of the masked table: with set_config decided as SET, a masked
    # identity allowed to SET must not park a masked value there.
    with psycopg.connect(protected.dsn("carol"), autocommit=True) as conn:
        masked = conn.execute("SELECT number FROM qw_pr_cards").fetchone()
        assert masked is not None and masked[0] != "4111111111111111"
        diag = _refusal(conn, "SELECT set_config('qw.card', number, false) FROM qw_pr_cards")
        assert diag.sqlstate == "42501"
        assert "may not be sent with set_config" in str(diag.message_primary)
        assert diag.message_hint is not None and "SELECT them instead" in diag.message_hint
        assert conn.execute("SELECT current_setting('qw.card', true)").fetchone() in (
            (None,),
            ("",),
        )
        # A setting without masked values is the rules' business, as SET is.
        assert conn.execute("SELECT set_config('qw.card', id::text, false) FROM qw_pr_cards")
        assert conn.execute("SHOW qw.card").fetchone() == ("1",)


def test_a_trusted_identity_switches_role_and_back(protected: RunningGateway) -> None:
    with psycopg.connect(protected.dsn("bob"), autocommit=True) as conn:
        conn.execute(f"SET ROLE {ROLE}")
        assert conn.execute("SELECT current_user").fetchone() == (ROLE,)
        conn.execute("RESET ROLE")
        assert conn.execute("SELECT current_user").fetchone() == ("qw_scram",)
        conn.execute(f"SELECT set_config('role', '{ROLE}', false)")
        assert conn.execute("SELECT current_user").fetchone() == (ROLE,)
        conn.execute("DISCARD ALL")
        assert conn.execute("SELECT current_user").fetchone() == ("qw_scram",)
    # psql, as a DBA would type it.
    result = _psql(protected, "bob", f"SET ROLE {ROLE};\nSELECT current_user;\nRESET ROLE;\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["SET", ROLE, "RESET"]


def test_role_switches_stay_refused_where_something_is_hidden(protected: RunningGateway) -> None:
    # carol's rule allows everything, but masking applies to her.
    with psycopg.connect(protected.dsn("carol"), autocommit=True) as conn:
        diag = _refusal(conn, f"SET ROLE {ROLE}")
        assert diag.sqlstate == "42501"
        assert diag.message_primary is not None
        assert "built-in protections" in diag.message_primary
        assert "masking applies to you" in diag.message_primary
        assert diag.message_hint is not None and diag.message_hint.startswith(
            "run what you need as the role the gateway connects with"
        )
        conn.execute("RESET ROLE")  # returning to the gateway's role is no switch
        assert conn.execute("SELECT current_user").fetchone() == ("qw_scram",)
    with psycopg.connect(protected.dsn("alice"), autocommit=True) as conn:
        diag = _refusal(conn, f"SET ROLE {ROLE}")
        assert "a role switch changes which privileges the server enforces" in str(
            diag.message_primary
        )
        assert conn.execute("SELECT current_user").fetchone() == ("qw_scram",)


def test_a_session_may_end_itself_but_not_another(
    protected: RunningGateway, pg: EphemeralCluster
) -> None:
    with psycopg.connect(protected.dsn("bob"), autocommit=True) as other:
        other_pid = other.execute("SELECT pg_backend_pid()").fetchone()
        assert other_pid is not None
        with psycopg.connect(protected.dsn("bob"), autocommit=True) as conn:
            diag = _refusal(conn, f"SELECT pg_terminate_backend({other_pid[0]})")
            assert diag.sqlstate == "42501"
            assert "it signals another session's backend" in str(diag.message_primary)
            assert diag.message_hint is not None and "allow.functions" in diag.message_hint
            # Cancelling oneself reaches the server, which cancels the statement itself.
            diag = _refusal(conn, "SELECT pg_cancel_backend(pg_backend_pid())")
            assert diag.sqlstate == "57014"
            assert diag.message_primary == "canceling statement due to user request"
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert other.execute("SELECT 1").fetchone() == (1,)  # still alive
    # psql reports the end of its own session as it does directly.
    script = "SELECT 1;\nSELECT pg_terminate_backend(pg_backend_pid());\n"
    result = _psql(protected, "bob", script)
    assert result.returncode == 2, result
    assert "FATAL:  terminating connection due to administrator command" in result.stderr
    assert "querywarden" not in result.stderr.splitlines()[0]


def test_psql_password_is_refused_because_identities_are_tokens(
    protected: RunningGateway, pg: EphemeralCluster
) -> None:
    # psql's \password asks for the new password twice, then sends ALTER USER ...
    # PASSWORD with the role's SCRAM verifier; without a name it is the current role,
    # here the gateway's own upstream role.
    passwords = (
        "SELECT rolname, rolpassword FROM pg_authid WHERE rolname IN ('qw_scram', 'qw_pr_app')"
    )
    before = pg.psql(passwords)
    try:
        for command in ("\\password", "\\password qw_pr_app"):
            result = _psql(protected, "bob", f"{command}\nchanged\nchanged\nSELECT 'after';\n")
            assert "after" in result.stdout, result
            assert "ERROR:  querywarden: setting a role's password" in result.stderr, result
            assert "identities come from tokens, not database passwords" in result.stderr
            assert "HINT:  to sign in, get a new token from your identity provider" in result.stderr
        # Nothing changed: the gateway still signs in upstream with its password.
        with psycopg.connect(protected.dsn("bob"), autocommit=True) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("qw_scram",)
            diag = _refusal(conn, "ALTER ROLE qw_pr_app PASSWORD 'x'")
            assert diag.sqlstate == "42501"
            assert diag.message_hint is not None
            assert "names password in allow.operations" in diag.message_hint
        assert pg.psql(passwords) == before
        # Signing in with a database password says what the password field takes.
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(protected.dsn("bob", password="changed", connect_timeout=5))
        assert "malformed token" in str(refused.value)
        assert "not a database password" in str(refused.value)
    finally:
        # Without the protection the first \password changed the gateway's own password.
        pg.psql(f"ALTER ROLE qw_scram PASSWORD '{ROLE_PASSWORD}'")
