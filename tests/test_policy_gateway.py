"""The policy as the gateway's decision point, through real clients and a real PostgreSQL."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import psycopg
import pytest

from gateway_harness import POLICY, RunningGateway
from querywarden.devcluster import DATABASE, EphemeralCluster, free_port
from querywarden.policy import PolicyDocument
from querywarden.policy.gate import PolicyGate

RULES = [
    {
        "name": "ai-agents-read",
        "subjects": {"groups": ["ai-agents"]},
        "allow": {
            "operations": ["select", "transaction", "show"],
            "tables": ["public.*", "pg_catalog.*"],
        },
        "deny": {"tables": ["public.qw_secrets"]},
        "review": {"operations": ["update", "delete"]},
    },
    {
        "name": "dba-all",
        "subjects": {"groups": ["dba"]},
        "allow": {"operations": ["*"], "tables": ["*"]},
        "review": {"unboundedWrite": True},
    },
]


@pytest.fixture(scope="module")
def tables(pg: EphemeralCluster) -> Iterator[None]:
    pg.psql(
        "CREATE TABLE IF NOT EXISTS qw_orders (id int PRIMARY KEY, amount int);"
        "CREATE TABLE IF NOT EXISTS qw_secrets (id int, secret text);"
        "GRANT ALL ON qw_orders, qw_secrets TO PUBLIC;"
        "INSERT INTO qw_orders VALUES (1, 10), (2, 20) ON CONFLICT DO NOTHING;"
        "INSERT INTO qw_secrets VALUES (1, 'hunter2');"
    )
    yield
    pg.psql("DROP TABLE qw_orders, qw_secrets")


@pytest.fixture
def policed(make_gateway: Callable[..., RunningGateway], tables: None) -> RunningGateway:
    policy = PolicyDocument.model_validate(
        {"identity": POLICY.identity.model_dump(by_alias=True), "rules": RULES}
    )
    return make_gateway(gate=PolicyGate(policy))


def test_agent_reads_and_is_refused_with_rule_reason_and_hint(policed: RunningGateway) -> None:
    with psycopg.connect(policed.dsn("alice"), autocommit=True) as conn:
        assert conn.execute("SELECT sum(amount) FROM qw_orders").fetchone() == (30,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as denied:
            conn.execute("SELECT * FROM qw_orders WHERE id IN (SELECT id FROM qw_secrets)")
        diag = denied.value.diag
        assert diag.message_primary is not None
        assert "public.qw_secrets is denied by rule ai-agents-read" in diag.message_primary
        assert diag.message_hint is not None and "SELECT" in diag.message_hint
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="needs approval"):
            conn.execute("WITH d AS (DELETE FROM qw_orders RETURNING *) SELECT * FROM d")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not allowed"):
            conn.execute("EXPLAIN ANALYZE DELETE FROM qw_orders")
        # Nothing was deleted, and the session carries on.
        assert conn.execute("SELECT count(*) FROM qw_orders").fetchone() == (2,)


def _public_only(make_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    rules = [
        {
            "name": "public-only",
            "subjects": {"groups": ["ai-agents"]},
            "allow": {"operations": ["select"], "tables": ["public.*"]},
        }
    ]
    policy = PolicyDocument.model_validate(
        {"identity": POLICY.identity.model_dump(by_alias=True), "rules": rules}
    )
    return make_gateway(gate=PolicyGate(policy))


def test_a_public_only_policy_reads_unqualified_tables(
    make_gateway: Callable[..., RunningGateway], tables: None
) -> None:
    # Issue 17: `tables: ["public.*"]` refused `SELECT ... FROM qw_orders`, checked as
    # pg_catalog.qw_orders too, so every policy had to allow pg_catalog.* as well. pg_catalog
    # has no qw_orders: PostgreSQL can only find public.qw_orders, and so does the gateway.
    gateway = _public_only(make_gateway)
    with psycopg.connect(gateway.dsn("alice"), autocommit=True) as conn:
        assert conn.execute("SELECT sum(amount) FROM qw_orders").fetchone() == (30,)
        # A name pg_catalog does have is still that relation, and stays refused.
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
            conn.execute("SELECT relname FROM pg_class")
        diag = refused.value.diag
        assert diag.message_primary is not None
        assert "pg_class (as pg_catalog.pg_class)" in diag.message_primary
        assert diag.message_hint is not None
        assert diag.message_hint.startswith(
            "unqualified, pg_class is pg_catalog.pg_class (PostgreSQL searches pg_catalog "
            "first), which no rule lets you read; if you meant public.pg_class, write it "
            "schema-qualified;"
        ), diag.message_hint
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="built-in protections"):
            conn.execute("SELECT * FROM pg_stats")
        assert conn.execute("SELECT count(*) FROM public.qw_orders").fetchone() == (2,)


def test_the_gateway_resolves_names_with_the_servers_own_catalog_list(
    pg: EphemeralCluster, make_gateway: Callable[..., RunningGateway], tables: None
) -> None:
    # A relation that only this server's pg_catalog has (as a newer PostgreSQL's would be:
    # the shipped lists do not know it) must still be checked as pg_catalog's. Made in
    # both the database the gateway reads its list from and the one the session uses.
    databases = ("postgres", DATABASE)
    for database in databases:
        pg.psql(
            "SET allow_system_table_mods = on; CREATE TABLE pg_catalog.qw_newer (x int)",
            database=database,
        )
    try:
        gateway = _public_only(make_gateway)
        known = gateway.gateway.catalog_relations
        assert known is not None and "qw_newer" in known and "pg_class" in known
        with psycopg.connect(gateway.dsn("alice"), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
                conn.execute("SELECT * FROM qw_newer")
            assert "qw_newer (as pg_catalog.qw_newer)" in str(refused.value)
            assert conn.execute("SELECT count(*) FROM qw_orders").fetchone() == (2,)
    finally:
        for database in databases:
            pg.psql(
                "SET allow_system_table_mods = on; DROP TABLE pg_catalog.qw_newer",
                database=database,
            )


def test_a_denied_table_hint_says_it_is_denied(policed: RunningGateway) -> None:
    with psycopg.connect(policed.dsn("alice"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as denied:
            conn.execute("SELECT * FROM qw_secrets")
        diag = denied.value.diag
        assert diag.message_primary == (
            "querywarden: public.qw_secrets is denied by rule ai-agents-read"
        )
        assert diag.message_hint is not None
        assert diag.message_hint.startswith("leave public.qw_secrets out: it is not available")
        assert diag.message_hint.endswith(", except public.qw_secrets"), diag.message_hint


def test_unparseable_sql_is_refused_not_forwarded(policed: RunningGateway) -> None:
    with psycopg.connect(policed.dsn("alice"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.SyntaxError) as info:
            conn.execute("SELEC 1")
        assert "was not run" in str(info.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_extended_protocol_and_prepared_statements(policed: RunningGateway) -> None:
    with psycopg.connect(policed.dsn("alice"), autocommit=True) as conn:
        row = conn.execute("SELECT amount FROM qw_orders WHERE id = %s", (2,), prepare=True)
        assert row.fetchone() == (20,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE qw_orders SET amount = %s WHERE id = %s", (0, 1), prepare=True)
        # SQL-level PREPARE is analyzed by its body too; here PREPARE itself is not allowed.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="PREPARE is not allowed"):
            conn.execute("PREPARE p AS DELETE FROM qw_orders")


def test_psql_function_call_path_is_refused(policed: RunningGateway, tmp_path: object) -> None:
    # \lo_import uses FunctionCall messages, which call a function by OID.
    result = subprocess.run(
        ["psql", policed.dsn("bob"), "-X", "-c", "\\lo_import /etc/hostname"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "FunctionCall" in result.stderr


def test_dba_is_treated_differently(policed: RunningGateway) -> None:
    name = f"qw_tmp_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(policed.dsn("bob"), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM qw_secrets").fetchone() == (1,)
        conn.execute(f"CREATE TABLE {name} (a int)")
        conn.execute(f"INSERT INTO {name} VALUES (1), (2)")
        conn.execute(f"DELETE FROM {name} WHERE a = 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="without WHERE"):
            conn.execute(f"DELETE FROM {name}")
        conn.execute(f"DROP TABLE {name}")


def test_statement_timeout_is_enforced_upstream(
    make_gateway: Callable[..., RunningGateway],
) -> None:
    rules = [
        {
            "name": "agents-timeout",
            "subjects": {"groups": ["ai-agents"]},
            "allow": {"operations": ["select", "show", "set"], "tables": ["pg_catalog.*"]},
            "limits": {"statementTimeout": "500ms"},
        }
    ]
    policy = PolicyDocument.model_validate(
        {"identity": POLICY.identity.model_dump(by_alias=True), "rules": rules}
    )
    gw = make_gateway(policy=policy)
    # A client asking for a longer timeout at start-up gets the rule's.
    with psycopg.connect(
        gw.dsn("alice", options="'-c statement_timeout=1h'"), autocommit=True
    ) as c:
        assert c.execute("SHOW statement_timeout").fetchone() == ("500ms",)
        with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
            c.execute("SELECT pg_sleep(3)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"fixed at 0\.5s"):
            c.execute("SET statement_timeout = 0")
        c.execute("SET application_name = 'still allowed'")
        assert c.execute("SELECT 1").fetchone() == (1,)


def _policy_yaml(denied: str) -> str:
    from gateway_harness import DEV_KEY

    return (
        f"identity: {{issuers: [{{name: dev, kind: dev, keyFile: {DEV_KEY}}}]}}\n"
        "rules:\n"
        "  - name: agents\n"
        "    subjects: {groups: [ai-agents]}\n"
        "    allow: {operations: [select], tables: ['public.*', 'pg_catalog.*']}\n"
        f"    deny: {{tables: [{denied}]}}\n"
    )


def test_policy_file_reload_applies_to_open_sessions_and_keeps_last_good(
    make_gateway: Callable[..., RunningGateway], tables: None, tmp_path: Path
) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(_policy_yaml("public.qw_secrets"))
    gw = make_gateway(policyFile=str(policy_file), policyReloadInterval="100ms")

    def wait_for(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 20
        while not condition():
            assert time.monotonic() < deadline, "policy was not reloaded"
            time.sleep(0.05)

    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM qw_orders").fetchone() == (2,)
        # Deny qw_orders instead: the open session is refused from the next statement on.
        policy_file.write_text(_policy_yaml("public.qw_orders"))
        wait_for(lambda: "public.qw_orders" in str(gw.gateway.policy.rules[0].deny.tables))
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="qw_orders is denied"):
            conn.execute("SELECT count(*) FROM qw_orders")
        # A broken policy file is refused at reload; the last good policy stays in force.
        good = gw.gateway.policy
        policy_file.write_text("rules: [{name: BAD NAME}]\n")
        time.sleep(0.5)
        assert gw.gateway.policy is good
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="qw_orders is denied"):
            conn.execute("SELECT count(*) FROM qw_orders")
        assert conn.execute("SELECT count(*) FROM qw_secrets").fetchone() == (1,)


def test_upstream_role_per_rule(
    make_gateway: Callable[..., RunningGateway], pg: EphemeralCluster
) -> None:
    pg.psql(
        "DO $$ BEGIN CREATE ROLE qw_reader LOGIN PASSWORD 'reader-pw'; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    )
    rules = [
        {
            "name": "agents",
            "subjects": {"groups": ["ai-agents"]},
            "allow": {"operations": ["select"], "tables": ["pg_catalog.*"]},
            "upstreamRole": "reader",
        },
        {
            "name": "dba",
            "subjects": {"groups": ["dba"]},
            "allow": {"operations": ["select"], "tables": ["pg_catalog.*"]},
        },
    ]
    policy = PolicyDocument.model_validate(
        {"identity": POLICY.identity.model_dump(by_alias=True), "rules": rules}
    )
    roles = {"reader": {"user": "qw_reader", "password": "reader-pw"}}
    gw = make_gateway(policy=policy, upstream={"roles": roles})
    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("qw_reader",)
    with psycopg.connect(gw.dsn("bob"), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("qw_scram",)
    # A role the settings do not define is a configuration error, said as such.
    broken = make_gateway(policy=policy)
    with pytest.raises(psycopg.OperationalError, match="do not define"):
        psycopg.connect(broken.dsn("alice"))


def test_full_table_scan_needs_review(
    make_gateway: Callable[..., RunningGateway], pg: EphemeralCluster, tables: None
) -> None:
    pg.psql(
        "DROP TABLE IF EXISTS qw_big; "
        "CREATE TABLE qw_big (id int PRIMARY KEY, v text); "
        "INSERT INTO qw_big SELECT g, md5(g::text) FROM generate_series(1, 150000) g; "
        "GRANT SELECT ON qw_big TO PUBLIC; ANALYZE qw_big"
    )
    rules = [
        {
            "name": "agents-scan",
            "subjects": {"groups": ["ai-agents"]},
            "allow": {"operations": ["select"], "tables": ["public.*", "pg_catalog.*"]},
            "review": {"fullTableScan": {"minRows": 100000}},
        }
    ]
    policy = PolicyDocument.model_validate(
        {"identity": POLICY.identity.model_dump(by_alias=True), "rules": rules}
    )
    gw = make_gateway(policy=policy)
    try:
        with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                conn.execute("SELECT count(*) FROM qw_big WHERE v LIKE 'a%'")
            message = info.value.diag.message_primary or ""
            assert "scans a table of about 150000 rows" in message
            assert "rule agents-scan" in message
            assert "indexed column" in (info.value.diag.message_hint or "")
            # An index lookup and a small table are fine.
            row = conn.execute("SELECT v FROM qw_big WHERE id = 42").fetchone()
            assert row is not None and len(row[0]) == 32
            assert conn.execute("SELECT count(*) FROM qw_orders").fetchone() == (2,)
            assert conn.execute("SELECT count(*) FROM qw_big WHERE id < 10").fetchone() == (9,)
            # A parameterized statement has a plan only as a generic one (PostgreSQL 16+);
            # before that the gateway cannot estimate it, and fails closed.
            if conn.info.server_version >= 160000:
                got = conn.execute("SELECT v FROM qw_big WHERE id = %s", (7,)).fetchone()
                assert got is not None
            else:
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="plan"):
                    conn.execute("SELECT v FROM qw_big WHERE id = %s", (7,))
    finally:
        pg.psql("DROP TABLE qw_big")


def test_a_qualified_function_denial_covers_the_bare_call(
    make_gateway: Callable[..., RunningGateway], tables: None
) -> None:
    # `deny: {functions: [pg_catalog.pg_sleep]}` once let `SELECT pg_sleep(...)` through:
    # the bare name was matched as "pg_sleep" alone, not as the pg_catalog function the
    # server resolves it to.
    rule = {
        "name": "no-sleep",
        "subjects": {"groups": ["ai-agents"]},
        "allow": {"operations": ["select"], "tables": ["*"]},
        "deny": {"functions": ["pg_catalog.pg_sleep"]},
    }
    policy = PolicyDocument.model_validate(
        {"identity": POLICY.identity.model_dump(by_alias=True), "rules": [rule]}
    )
    gateway = make_gateway(gate=PolicyGate(policy))
    with psycopg.connect(gateway.dsn("alice"), autocommit=True) as conn:
        for sql in ("SELECT pg_sleep(0)", "SELECT pg_catalog.pg_sleep(0)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="denied by rule"):
                conn.execute(sql)
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_megabyte_statement_is_decided_like_a_short_one(policed: RunningGateway) -> None:
    # Statements past ANALYZED_ON_THE_LOOP are parsed in a worker thread (the session
    # holds the client's later input meanwhile): same decisions, same order of answers.
    ids = ",".join(str(i) for i in range(200_000))  # about 1.3 MB
    with psycopg.connect(policed.dsn("alice"), autocommit=True) as conn:
        rows = conn.execute(f"SELECT id FROM qw_orders WHERE id IN ({ids}) ORDER BY id")
        assert rows.fetchall() == [(1,), (2,)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="qw_secrets is denied"):
            conn.execute(f"SELECT secret FROM qw_secrets WHERE id IN ({ids})")
        with conn.pipeline():
            big = conn.execute(f"SELECT count(*) FROM qw_orders WHERE id IN ({ids})")
            small = conn.execute("SELECT 42")
        assert big.fetchone() == (2,)
        assert small.fetchone() == (42,)


@pytest.mark.parametrize(
    ("sql", "instead"),
    [
        ("PREPARE q AS SELECT amount FROM qw_orders", "use the protocol's prepared statements"),
        ("EXECUTE q", "use the protocol's prepared statements"),
        ("DO $$ BEGIN PERFORM 1; END $$", "send the statements themselves"),
        ("SET work_mem = '64MB'", "leave the setting out"),
        ("COPY qw_orders FROM STDIN", "use INSERT ... VALUES with parameters"),
    ],
)
def test_a_refusal_says_what_to_do_instead(policed: RunningGateway, sql: str, instead: str) -> None:
    with psycopg.connect(policed.dsn("alice"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
            conn.execute(sql)
        hint = refused.value.diag.message_hint
        assert hint is not None and hint.startswith(instead), hint
        assert "allowed for you: SELECT, TRANSACTION, SHOW on public.*" in hint
        # ... and the way out works: the driver prepares, the rows are read.
        row = conn.execute("SELECT amount FROM qw_orders WHERE id = %s", (1,), prepare=True)
        assert row.fetchone() == (10,)


def test_psql_copy_out_is_refused_with_the_select_to_use(policed: RunningGateway) -> None:
    done = subprocess.run(
        ["psql", policed.dsn("alice"), "-X", "-c", r"\copy qw_orders TO STDOUT"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "COPY OUT is not allowed for you by any rule" in done.stderr
    assert "HINT:  use SELECT ... and read the rows" in done.stderr, done.stderr


class _Forwarder(socketserver.ThreadingTCPServer):
    """A plain TCP relay to the cluster: an upstream that comes up after the gateway."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, target: int) -> None:
        self.target = target
        super().__init__(("127.0.0.1", port), _Relay)


class _Relay(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, _Forwarder)
        upstream = socket.create_connection(("127.0.0.1", server.target))

        def pump(source: socket.socket, sink: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := source.recv(65536):
                    sink.sendall(data)
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pump, args=(upstream, self.request), daemon=True)
        back.start()
        pump(self.request, upstream)
        back.join(timeout=30)
        upstream.close()


def _catalog_of(gate: PolicyGate) -> Collection[str] | None:
    return gate.engine.catalog_relations


def test_until_the_upstream_answers_every_name_is_checked_as_pg_catalogs_too(
    pg: EphemeralCluster, make_gateway: Callable[..., RunningGateway], tables: None
) -> None:
    # Fail closed: without the server's list, pg_catalog could hold any name.
    port = free_port()
    rules = [
        {
            "name": "public-only",
            "subjects": {"groups": ["ai-agents"]},
            "allow": {"operations": ["select"], "tables": ["public.*"]},
        }
    ]
    policy = PolicyDocument.model_validate(
        {"identity": POLICY.identity.model_dump(by_alias=True), "rules": rules}
    )
    gateway = make_gateway(gate=PolicyGate(policy), upstream={"port": port})
    gate = gateway.gateway.gate
    assert isinstance(gate, PolicyGate)
    assert gateway.gateway.catalog_relations is None
    assert gate.engine.catalog_relations is None
    forwarder = _Forwarder(port, pg.port)
    threading.Thread(target=forwarder.serve_forever, daemon=True).start()
    try:
        deadline = time.monotonic() + 20
        while gateway.gateway.catalog_relations is None and time.monotonic() < deadline:
            time.sleep(0.1)
        learnt = _catalog_of(gate)
        assert learnt is not None and "pg_class" in learnt
        with psycopg.connect(gateway.dsn("alice"), autocommit=True) as conn:
            assert conn.execute("SELECT sum(amount) FROM qw_orders").fetchone() == (30,)
    finally:
        forwarder.shutdown()
        forwarder.server_close()
