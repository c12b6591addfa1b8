"""The policy corpus (tests/policy_corpus.py) through a real gateway and real clients.

Every case runs for both identities through psycopg (simple protocol; COPY through
``cursor.copy``); a representative subset also runs through psql (simple protocol, a
multi-statement Query per ``-c``) and asyncpg (extended protocol: asyncpg prepares every
statement), and a refusal must look the same there (SQLSTATE, message, hint) as through
psycopg. Cases run inside BEGIN ... ROLLBACK unless they are transaction control, so
allowed writes leave nothing behind; the tests at the end check, directly against
PostgreSQL, that refused writes outside a transaction did not happen and that the session
goes on after a refusal, in each protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import asyncpg
import psycopg
import pytest

from client_helpers import run_psql
from gateway_harness import POLICY, RunningGateway, gateway_settings, start_gateway, token_for
from policy_corpus import (
    ASYNCPG_SUBSET,
    COPY_IN_DATA,
    CORPUS,
    IDENTITIES,
    PSQL_SUBSET,
    RULES,
    SETUP_SQL,
    SHAPES,
    TEARDOWN_SQL,
    Case,
    Expect,
)
from querywarden.devcluster import DATABASE, EphemeralCluster
from querywarden.policy import PolicyDocument

PREFIX = "querywarden: "
BY_ID = {case.id: case for case in CORPUS}


@dataclass(frozen=True, slots=True)
class Seen:
    """What a client saw: success, or an error's SQLSTATE, primary message and hint."""

    ok: bool
    sqlstate: str = ""
    message: str = ""
    hint: str | None = None

    @property
    def refusal(self) -> tuple[str, str, str | None]:
        return (self.sqlstate, self.message, self.hint)


def check(expect: Expect, seen: Seen) -> None:
    """Assert that what a client saw is what the corpus expects."""
    if expect.outcome == "allow":
        assert seen.ok, f"expected to run, but: {seen}"
        return
    assert not seen.ok, f"expected {expect}, but it ran"
    if expect.outcome == "server_error":
        # Forwarded (the gateway said allow) and refused by PostgreSQL itself.
        assert not seen.message.startswith(PREFIX), f"expected a server error, got {seen}"
        assert seen.sqlstate == expect.sqlstate, seen
        return
    assert seen.message.startswith(PREFIX), f"expected a gateway refusal, got {seen}"
    assert seen.sqlstate == expect.sqlstate, seen
    assert expect.reason in seen.message, seen
    assert seen.hint, f"a refusal says what to do instead: {seen}"


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_tables(pg: EphemeralCluster) -> Iterator[None]:
    pg.psql(SETUP_SQL)
    try:
        yield
    finally:
        pg.psql(TEARDOWN_SQL)


def corpus_policy() -> PolicyDocument:
    """The harness's identity section (its development issuer) with the corpus's rules."""
    return PolicyDocument.model_validate(
        {"identity": POLICY.identity.model_dump(by_alias=True), "rules": RULES}
    )


@pytest.fixture(scope="module")
def policed(pg: EphemeralCluster, corpus_tables: None) -> Iterator[RunningGateway]:
    """A gateway deciding with the corpus's policy (the gateway's own PolicyGate)."""
    running = start_gateway(gateway_settings(pg), policy=corpus_policy())
    try:
        yield running
    finally:
        running.stop()


class Sessions:
    """One psycopg session per identity, shared by the corpus cases (reopened if broken)."""

    def __init__(self, gateway: RunningGateway) -> None:
        self.gateway = gateway
        self.conns: dict[str, psycopg.Connection] = {}

    def __call__(self, identity: str) -> psycopg.Connection:
        conn = self.conns.get(identity)
        if conn is None or conn.closed or conn.broken:
            conn = psycopg.connect(
                self.gateway.dsn(IDENTITIES[identity]), autocommit=True, prepare_threshold=None
            )
            self.conns[identity] = conn
        elif conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")
        return conn

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()


@pytest.fixture(scope="module")
def sessions(policed: RunningGateway) -> Iterator[Sessions]:
    held = Sessions(policed)
    try:
        yield held
    finally:
        held.close()


# --- the three clients -----------------------------------------------------------------------


def _psycopg_error(exc: psycopg.Error) -> Seen:
    return Seen(False, exc.sqlstate or "", exc.diag.message_primary or "", exc.diag.message_hint)


def run_psycopg(conn: psycopg.Connection, case: Case) -> Seen:
    """Run a case on an autocommit session (in BEGIN ... ROLLBACK when ``case.tx``)."""
    try:
        if case.tx:
            conn.execute("BEGIN")
        try:
            with conn.cursor() as cur:
                if case.copy == "out":
                    with cur.copy(case.sql) as copy:
                        for _ in copy:
                            pass
                elif case.copy == "in":
                    with cur.copy(case.sql) as copy:
                        copy.write(COPY_IN_DATA)
                else:
                    cur.execute(case.sql)
                    while True:
                        if cur.description is not None:
                            cur.fetchall()
                        if not cur.nextset():
                            break
        finally:
            if case.tx:
                conn.execute("ROLLBACK")
    except psycopg.Error as exc:
        return _psycopg_error(exc)
    return Seen(True)


_PSQL_ERROR = re.compile(r"^ERROR:  ([0-9A-Z]{5}): (.*)$", re.MULTILINE)
_PSQL_HINT = re.compile(r"^HINT:  (.*)$", re.MULTILINE)


def run_psql_case(gateway: RunningGateway, user: str, case: Case) -> tuple[Seen, str]:
    """Run a case with psql -c (one simple Query); return what it saw and its stdout."""
    commands = ["-c", case.sql]
    if case.tx:
        commands = ["-c", "BEGIN", *commands, "-c", "ROLLBACK"]
    result = run_psql(
        gateway.dsn(user),
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-v",
        "VERBOSITY=verbose",
        *commands,
        input=COPY_IN_DATA.decode() if case.copy == "in" else None,
    )
    error = _PSQL_ERROR.search(result.stderr)
    if error is None:
        assert result.returncode == 0, result.stderr
        return Seen(True), result.stdout
    assert result.returncode != 0, result.stderr
    hint = _PSQL_HINT.search(result.stderr)
    seen = Seen(False, error[1], error[2], hint[1] if hint else None)
    return seen, result.stdout


async def run_asyncpg_case(gateway: RunningGateway, user: str, case: Case) -> Seen:
    """Prepare and run a case with asyncpg (Parse/Describe/Bind/Execute) in a transaction."""
    conn = await asyncpg.connect(gateway.url(user), timeout=10)
    try:
        transaction = conn.transaction()
        await transaction.start()
        try:
            statement = await conn.prepare(case.sql)
            await statement.fetch()
        except asyncpg.PostgresError as exc:
            return Seen(False, exc.sqlstate, exc.message, exc.hint)
        finally:
            await transaction.rollback()
        # The session goes on after the case, whatever it was.
        assert await conn.fetchval("SELECT 41 + $1::int", 1) == 42
        return Seen(True)
    finally:
        await conn.close()


# --- the corpus --------------------------------------------------------------------------


def test_corpus_is_large_and_covers_every_shape() -> None:
    assert len(CORPUS) >= 100
    assert len(BY_ID) == len(CORPUS), "case ids are unique"
    assert {case.shape for case in CORPUS} == set(SHAPES)
    for identity in IDENTITIES:
        outcomes = [case.expect(identity).outcome for case in CORPUS]
        assert outcomes.count("allow") >= 20 and outcomes.count("refuse") >= 40, identity
    assert set(PSQL_SUBSET) <= set(BY_ID) and set(ASYNCPG_SUBSET) <= set(BY_ID)
    for case_id in ASYNCPG_SUBSET:  # the extended protocol takes one statement, no COPY
        assert BY_ID[case_id].copy == "" and ";" not in BY_ID[case_id].sql, case_id


def _params(ids: tuple[str, ...] | None = None) -> list[object]:
    cases = CORPUS if ids is None else tuple(BY_ID[i] for i in ids)
    return [
        pytest.param(case, identity, id=f"{identity}-{case.id}")
        for case in cases
        for identity in IDENTITIES
    ]


@pytest.mark.parametrize(("case", "identity"), _params())
def test_corpus_psycopg(sessions: Sessions, case: Case, identity: str) -> None:
    conn = sessions(identity)
    check(case.expect(identity), run_psycopg(conn, case))
    # Whatever happened, the session goes on.
    assert sessions(identity).execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize(("case", "identity"), _params(PSQL_SUBSET))
def test_corpus_psql(
    policed: RunningGateway, sessions: Sessions, case: Case, identity: str
) -> None:
    expect = case.expect(identity)
    seen, stdout = run_psql_case(policed, IDENTITIES[identity], case)
    check(expect, seen)
    if expect.outcome == "refuse":
        # Refused whole: not even the allowed statements of a multi-statement Query ran.
        assert stdout == ""
        assert seen.refusal == run_psycopg(sessions(identity), case).refusal


@pytest.mark.parametrize(("case", "identity"), _params(ASYNCPG_SUBSET))
def test_corpus_asyncpg(
    policed: RunningGateway, sessions: Sessions, case: Case, identity: str
) -> None:
    expect = case.expect(identity)
    seen = asyncio.run(run_asyncpg_case(policed, IDENTITIES[identity], case))
    check(expect, seen)
    if expect.outcome == "refuse":
        assert seen.refusal == run_psycopg(sessions(identity), case).refusal


# --- refused writes did not happen; the session goes on -------------------------------------


def _count(pg: EphemeralCluster, sql: str) -> int:
    return int(pg.psql(sql))


def test_psycopg_refused_writes_did_not_happen(pg: EphemeralCluster, sessions: Sessions) -> None:
    agent = sessions("agent")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="needs approval"):
        agent.execute("DELETE FROM qwc_orders WHERE id = 1")
    assert _count(pg, "SELECT count(*) FROM qwc_orders WHERE id = 1") == 1
    assert agent.execute("SELECT count(*) FROM qwc_orders").fetchone() == (5,)
    # Inside a transaction a refusal fails the transaction block, as a server error would;
    # ROLLBACK ends it and the session goes on.
    agent.execute("BEGIN")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="qwc_secrets"):
        agent.execute("SELECT 1; UPDATE qwc_orders SET amount = 0; SELECT * FROM qwc_secrets")
    assert agent.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
    with pytest.raises(psycopg.errors.InFailedSqlTransaction):
        agent.execute("SELECT 1")
    agent.execute("ROLLBACK")
    assert agent.execute("SELECT amount FROM qwc_orders WHERE id = 2").fetchone() == (20,)
    assert _count(pg, "SELECT count(*) FROM qwc_orders WHERE amount = 0") == 0

    dba = sessions("dba")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="TRUNCATE needs approval"):
        dba.execute("INSERT INTO qwc_scratch VALUES (4201); TRUNCATE qwc_scratch")
    assert _count(pg, "SELECT count(*) FROM qwc_scratch WHERE a = 4201") == 0
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="qwc_vault is denied"):
        dba.execute("INSERT INTO qwc_vault VALUES (%s, %s)", (4202, "x"))  # extended protocol
    assert _count(pg, "SELECT count(*) FROM qwc_vault WHERE id = 4202") == 0
    dba.execute("INSERT INTO qwc_scratch VALUES (%s)", (4203,))
    assert _count(pg, "SELECT count(*) FROM qwc_scratch WHERE a = 4203") == 1
    dba.execute("DELETE FROM qwc_scratch WHERE a = 4203")


def test_psql_refused_writes_did_not_happen(pg: EphemeralCluster, policed: RunningGateway) -> None:
    # Without ON_ERROR_STOP psql goes on to the next -c on the same session.
    result = run_psql(
        policed.dsn("alice"),
        "-At",
        "-c",
        "UPDATE qwc_orders SET amount = 0 WHERE id = 3",
        "-c",
        "SELECT amount FROM qwc_orders WHERE id = 3",
    )
    assert "querywarden: UPDATE needs approval (rule agents-read)" in result.stderr
    assert result.stdout == "30\n"
    assert _count(pg, "SELECT amount FROM qwc_orders WHERE id = 3") == 30

    result = run_psql(
        policed.dsn("bob"),
        "-At",
        "-c",
        "INSERT INTO qwc_scratch VALUES (4301); DELETE FROM qwc_scratch",
        "-c",
        "SELECT count(*) FROM qwc_orders",
    )
    assert "querywarden: UPDATE or DELETE without WHERE needs approval" in result.stderr
    assert result.stdout == "5\n"
    assert _count(pg, "SELECT count(*) FROM qwc_scratch WHERE a = 4301") == 0


def test_asyncpg_refused_writes_did_not_happen(
    pg: EphemeralCluster, policed: RunningGateway
) -> None:
    async def scenario() -> None:
        agent = await asyncpg.connect(policed.url("alice"), timeout=10)
        try:
            # Extended protocol: the refused Parse never creates the statement.
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="needs approval"):
                await agent.execute("DELETE FROM qwc_orders WHERE id = $1", 4)
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="needs approval"):
                await agent.prepare("UPDATE qwc_orders SET amount = $1 WHERE id = $2")
            assert await agent.fetchval("SELECT amount FROM qwc_orders WHERE id = $1", 4) == 40
        finally:
            await agent.close()
        dba = await asyncpg.connect(policed.url("bob"), timeout=10)
        try:
            # Without arguments asyncpg sends a simple Query: refused whole.
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="TRUNCATE"):
                await dba.execute("INSERT INTO qwc_scratch VALUES (4401); TRUNCATE qwc_scratch")
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="qwc_vault is denied"):
                await dba.execute("UPDATE qwc_vault SET payload = $1 WHERE id = 1", "lead")
            async with dba.transaction():
                assert await dba.fetchval("INSERT INTO qwc_scratch VALUES (4402) RETURNING a")
        finally:
            await dba.close()

    asyncio.run(scenario())
    assert _count(pg, "SELECT count(*) FROM qwc_orders WHERE id = 4") == 1
    assert _count(pg, "SELECT count(*) FROM qwc_scratch WHERE a IN (4401, 4402)") == 1
    assert pg.psql("SELECT payload FROM qwc_vault WHERE id = 1") == "gold"
    pg.psql("DELETE FROM qwc_scratch WHERE a = 4402")


def test_identity_without_a_rule_is_refused_everything(policed: RunningGateway) -> None:
    dsn = (
        f"host={policed.host} port={policed.port} dbname={DATABASE} user=carol "
        f"password={token_for('carol')}"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        for sql in ("SELECT 1", "SELECT * FROM qwc_orders", "SHOW search_path"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
                conn.execute(sql)
            assert "no rule of the policy applies to carol" in str(refused.value)


# --- names the server resolves differently from the policy -----------------------------------


def test_user_schema_does_not_shadow_public_unchecked(
    pg: EphemeralCluster, policed: RunningGateway
) -> None:
    """PostgreSQL's default search_path is "$user", public: a schema named after the
    upstream role comes first. The policy must not check public.x while the server reads
    qw_scram.x, a table no rule allows."""
    pg.psql(
        "CREATE SCHEMA qw_scram; CREATE TABLE qw_scram.qwc_orders (id int, note text);"
        "INSERT INTO qw_scram.qwc_orders VALUES (1, 'from schema qw_scram');"
        "GRANT USAGE ON SCHEMA qw_scram TO qw_scram;"
        "GRANT SELECT ON qw_scram.qwc_orders TO qw_scram"
    )
    try:
        with psycopg.connect(policed.dsn("alice"), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not allowed"):
                conn.execute("SELECT * FROM qw_scram.qwc_orders")
            # Refused, or the server reads the table the policy checked (public's): both do.
            try:
                rows = conn.execute("SELECT note FROM qwc_orders ORDER BY id").fetchall()
            except psycopg.errors.InsufficientPrivilege as exc:
                assert "qw_scram.qwc_orders" in str(exc)
            else:
                assert ("from schema qw_scram",) not in rows, (
                    "an unqualified name read qw_scram.qwc_orders, which no rule allows"
                )
    finally:
        pg.psql("DROP SCHEMA qw_scram CASCADE")


def test_statement_cache_keeps_identifiers_apart(
    make_gateway: Callable[..., RunningGateway], corpus_tables: None
) -> None:
    """Two statements that differ in a digit of an identifier are two statements.

    PostgreSQL reads every non-ASCII character as part of an identifier, so ``qwc_pay€1``
    is one name; a cache key that replaces "numbers" must not make it ``qwc_pay€0``.
    A fresh gateway: its analyzer cache holds nothing but this test's statements.
    """
    gateway = make_gateway(policy=corpus_policy())
    with psycopg.connect(gateway.dsn("alice"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM qwc_pay€0")  # allowed; no such table
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="qwc_pay€1 is denied"):
            conn.execute("SELECT * FROM qwc_pay€1")  # denied by name


def test_role_default_search_path_does_not_redirect_other_identities(
    pg: EphemeralCluster, policed: RunningGateway
) -> None:
    """Every identity's session uses the same upstream role. If the dba may change that
    role's default search_path (ALTER ROLE ... SET, committed), an agent's unqualified
    name must still mean what the policy checked, not a table no rule allows it."""
    try:
        with (
            psycopg.connect(policed.dsn("bob"), autocommit=True) as conn,
            contextlib.suppress(psycopg.errors.InsufficientPrivilege),  # refused: fine too
        ):
            conn.execute("ALTER ROLE qw_scram SET search_path = qwc_private, public")
        with psycopg.connect(policed.dsn("alice"), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not allowed"):
                conn.execute("SELECT * FROM qwc_private.payroll")
            # No public.payroll: the server must say so, not read qwc_private.payroll.
            with pytest.raises(psycopg.Error) as info:
                conn.execute("SELECT * FROM payroll").fetchall()
            assert isinstance(
                info.value, (psycopg.errors.UndefinedTable, psycopg.errors.InsufficientPrivilege)
            )
    finally:
        pg.psql("ALTER ROLE qw_scram RESET search_path")
