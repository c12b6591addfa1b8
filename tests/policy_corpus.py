"""The policy corpus: statements and what two identities may do with them, as data.

Every :class:`Case` is a request as a client sends it (one statement, or several in one
simple Query) with the expected outcome for each identity of :data:`RULES`:

- ``agent`` (alice, group ``ai-agents``): read-only. SELECT, EXPLAIN, SHOW and transaction
  control on ``public.*`` and the catalogs; ``public.qwc_secrets`` (and ``qwc_pay€1``, a
  name only PostgreSQL's scanner reads right) denied; UPDATE and DELETE need an approver
  (refused until approvals exist).
- ``dba`` (bob, group ``dba``): read-write. DML, COPY to/from the client, DDL, SQL-level
  prepared statements, SET and functions with side effects on ``public.*`` and the
  catalogs; ``public.qwc_vault`` denied; TRUNCATE and UPDATE/DELETE without WHERE need an
  approver.

An expectation is :data:`ALLOW` (the gateway forwards it and it runs), :func:`refused`
(the gateway answers itself: SQLSTATE 42501, or 42601 for unparseable text, and a message
holding ``reason``) or :func:`server_error` (the gateway forwards it and PostgreSQL
itself refuses it with that SQLSTATE: proof that the gateway's decision was *allow*, and
that its notion of names matches the server's).

Some expectations are what the gateway *should* do and fail today (see each case's
``note``): they are kept as failing cases, not skipped, until the gateway is fixed.

The corpus covers every shape of "SQL shapes that fool naive firewalls" in
``shared/design/PROTOCOL.md``; :data:`SHAPES` lists them and each case names its shape.
The objects the corpus needs are created by :data:`SETUP_SQL` (as superuser) and dropped
by :data:`TEARDOWN_SQL`; all of them start with ``qwc_`` (or are in schema
``qwc_private``), so no other test's tables are touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Outcome = Literal["allow", "refuse", "server_error"]


@dataclass(frozen=True, slots=True)
class Expect:
    """What one identity should see for one case."""

    outcome: Outcome
    #: For a refusal: a substring of the message (after the ``querywarden: `` prefix).
    reason: str = ""
    #: For a refusal or a server error: the SQLSTATE.
    sqlstate: str = ""


ALLOW = Expect("allow")


def refused(reason: str, sqlstate: str = "42501") -> Expect:
    """Refused by the gateway, with ``reason`` in the message."""
    return Expect("refuse", reason, sqlstate)


def syntax(reason: str = "syntax error") -> Expect:
    """Unparseable: refused by the gateway with SQLSTATE 42601, never forwarded."""
    return Expect("refuse", reason, "42601")


def server_error(sqlstate: str) -> Expect:
    """Allowed by the gateway; PostgreSQL answers with an error of this SQLSTATE."""
    return Expect("server_error", "", sqlstate)


@dataclass(frozen=True, slots=True)
class Case:
    """One request and the outcome expected for each identity."""

    id: str
    shape: str
    sql: str
    agent: Expect
    dba: Expect
    #: Run inside BEGIN ... ROLLBACK (off for transaction control itself).
    tx: bool = True
    #: ``out`` for COPY ... TO STDOUT, ``in`` for COPY ... FROM STDIN (data: COPY_IN_DATA).
    copy: Literal["", "out", "in"] = ""
    #: Why the expectation is what it is, when it is not obvious.
    note: str = ""

    def expect(self, identity: str) -> Expect:
        return self.agent if identity == "agent" else self.dba


#: The test identities (gateway_harness.USERS) and the rule each is subject to.
IDENTITIES = {"agent": "alice", "dba": "bob"}

CATALOGS = ["pg_catalog.*", "information_schema.*"]
# fmt: off
RULES = [
    {
        "name": "agents-read",
        "subjects": {"groups": ["ai-agents"]},
        "allow": {
            "operations": ["select", "explain", "show", "transaction"],
            "tables": ["public.*", *CATALOGS],
        },
        "deny": {"tables": ["public.qwc_secrets", "public.qwc_pay€1"]},
        "review": {"operations": ["update", "delete"]},
    },
    {
        "name": "dba-write",
        "subjects": {"groups": ["dba"]},
        "allow": {
            "operations": ["select", "insert", "update", "delete", "merge", "copy_out",
                           "copy_in", "transaction", "ddl", "prepare", "execute", "deallocate",
                           "set", "side_effects"],
            "tables": ["public.*", *CATALOGS],
        },
        "deny": {"tables": ["public.qwc_vault"]},
        "review": {"operations": ["truncate"], "unboundedWrite": True},
    },
]
# fmt: on

#: Rows COPY ... FROM STDIN sends (into qwc_scratch, one int column).
COPY_IN_DATA = b"7\n8\n"

SETUP_SQL = """
DROP SCHEMA IF EXISTS qwc_private CASCADE;
DROP VIEW IF EXISTS qwc_secrets_view;
DROP TABLE IF EXISTS qwc_orders, qwc_customers, qwc_secrets, qwc_vault, qwc_scratch,
    qwc_pay€1, "QwcMixed" CASCADE;
DROP SEQUENCE IF EXISTS qwc_seq;
DROP FUNCTION IF EXISTS qwc_peek();
DROP PROCEDURE IF EXISTS qwc_proc();
CREATE TABLE qwc_orders (id int PRIMARY KEY, customer_id int, amount int, note text);
INSERT INTO qwc_orders SELECT g, g % 3, g * 10, 'order ' || g FROM generate_series(1, 5) g;
CREATE TABLE qwc_customers (id int PRIMARY KEY, name text, ssn text);
INSERT INTO qwc_customers VALUES (0, 'Ada', '111-22-3333'), (1, 'Bo', '444-55-6666'),
    (2, 'Cy', '777-88-9999');
CREATE TABLE qwc_secrets (id int, secret text);
INSERT INTO qwc_secrets VALUES (1, 'hunter2'), (2, 'swordfish');
CREATE TABLE qwc_vault (id int, payload text);
INSERT INTO qwc_vault VALUES (1, 'gold');
CREATE TABLE qwc_scratch (a int);
ALTER TABLE qwc_scratch OWNER TO qw_scram;
CREATE TABLE qwc_pay€1 (salary int);
INSERT INTO qwc_pay€1 VALUES (250000);
CREATE TABLE "QwcMixed" (id int);
INSERT INTO "QwcMixed" VALUES (1);
CREATE SEQUENCE qwc_seq;
CREATE VIEW qwc_secrets_view AS SELECT id, secret FROM qwc_secrets;
CREATE FUNCTION qwc_peek() RETURNS text LANGUAGE sql
    AS $$SELECT secret FROM qwc_secrets ORDER BY id LIMIT 1$$;
CREATE PROCEDURE qwc_proc() LANGUAGE sql AS $$SELECT 1$$;
CREATE SCHEMA qwc_private;
CREATE TABLE qwc_private.payroll (id int, salary int);
INSERT INTO qwc_private.payroll VALUES (1, 100000);
GRANT ALL ON qwc_orders, qwc_customers, qwc_secrets, qwc_vault, qwc_pay€1, "QwcMixed",
    qwc_secrets_view, qwc_private.payroll TO PUBLIC;
GRANT ALL ON SEQUENCE qwc_seq TO PUBLIC;
GRANT ALL ON SCHEMA qwc_private TO PUBLIC;
"""

TEARDOWN_SQL = """
DROP SCHEMA IF EXISTS qwc_private CASCADE;
DROP VIEW IF EXISTS qwc_secrets_view;
DROP TABLE IF EXISTS qwc_orders, qwc_customers, qwc_secrets, qwc_vault, qwc_scratch,
    qwc_pay€1, "QwcMixed" CASCADE;
DROP SEQUENCE IF EXISTS qwc_seq;
DROP FUNCTION IF EXISTS qwc_peek();
DROP PROCEDURE IF EXISTS qwc_proc();
"""

# Reasons, as the engine words them.
SECRETS = "public.qwc_secrets is denied by rule agents-read"
VAULT = "public.qwc_vault is denied by rule dba-write"
BUILTIN = "built-in protections"
NEEDS = "needs approval"
UNBOUNDED = "UPDATE or DELETE without WHERE needs approval (rule dba-write)"
OPAQUE = "cannot inspect"
SIDE_EFFECTS = "a function with side effects"


def not_allowed(what: str) -> Expect:
    """An operation (``DDL``, ``COPY OUT`` ...) or relation no rule allows."""
    return refused(f"{what} is not allowed for you by any rule")


#: The shapes of PROTOCOL.md's "SQL shapes that fool naive firewalls", plus the basics.
SHAPES = (
    "plain",
    "names",
    "comments-quoting",
    "multi-statement",
    "dml-cte",
    "select-into",
    "row-lock",
    "explain-analyze",
    "dangerous-function",
    "side-effect-function",
    "do-call-prepare",
    "create-function",
    "role-and-settings",
    "union",
    "subquery",
    "view",
    "copy",
    "temporary",
    "writes",
    "ddl",
    "transaction",
    "unparseable",
)


def _c(
    id: str,
    shape: str,
    sql: str,
    agent: Expect,
    dba: Expect,
    *,
    tx: bool = True,
    copy: Literal["", "out", "in"] = "",
    note: str = "",
) -> Case:
    assert shape in SHAPES, shape
    return Case(id, shape, sql, agent, dba, tx=tx, copy=copy, note=note)


# fmt: off
CORPUS: tuple[Case, ...] = (
    # -- plain -----------------------------------------------------------------------------------
    _c("select-const", "plain", "SELECT 1", ALLOW, ALLOW),
    _c("select-orders", "plain", "SELECT * FROM qwc_orders", ALLOW, ALLOW),
    _c("table-cmd-secrets", "plain", "TABLE qwc_secrets", refused(SECRETS), ALLOW),
    _c("select-secrets", "plain", "SELECT * FROM qwc_secrets", refused(SECRETS), ALLOW),
    _c("select-vault", "plain", "SELECT * FROM qwc_vault", ALLOW, refused(VAULT)),
    _c("select-only-secrets", "plain", "SELECT * FROM ONLY qwc_secrets", refused(SECRETS), ALLOW),
    _c("secrets-expression", "plain",
       "SELECT upper(secret) || '' FROM qwc_secrets",
       refused(SECRETS), ALLOW),
    _c("secrets-whole-row", "plain",
       "SELECT row_to_json(s) FROM qwc_secrets s",
       refused(SECRETS), ALLOW),
    _c("secrets-aggregate", "plain",
       "SELECT string_agg(secret, ',') FROM qwc_secrets",
       refused(SECRETS), ALLOW),
    _c("secrets-tablesample", "plain",
       "SELECT * FROM qwc_secrets TABLESAMPLE SYSTEM (100)",
       refused(SECRETS), ALLOW),
    _c("secrets-predicate-leak", "plain",
       "SELECT count(*) FROM qwc_secrets WHERE secret LIKE 'h%'",
       refused(SECRETS), ALLOW),
    _c("catalog-qualified", "plain",
       "SELECT relname FROM pg_catalog.pg_class LIMIT 1",
       ALLOW, ALLOW),
    _c("catalog-unqualified", "plain", "SELECT relname FROM pg_class LIMIT 1", ALLOW, ALLOW),
    _c("information-schema", "plain",
       "SELECT column_name FROM information_schema.columns WHERE table_name = 'qwc_secrets'",
       ALLOW, ALLOW),
    _c("pg-authid", "plain",
       "SELECT rolname FROM pg_catalog.pg_authid",
       server_error("42501"), server_error("42501"),
       note="the policy allows pg_catalog.*; PostgreSQL's own privileges still apply"),
    _c("private-schema", "plain",
       "SELECT * FROM qwc_private.payroll",
       not_allowed("read access to qwc_private.payroll"),
       not_allowed("read access to qwc_private.payroll")),
    # -- names -----------------------------------------------------------------------------------
    _c("qualified-orders", "names", "SELECT * FROM public.qwc_orders", ALLOW, ALLOW),
    _c("qualified-secrets", "names", "SELECT * FROM public.qwc_secrets", refused(SECRETS), ALLOW),
    _c("quoted-secrets", "names", 'SELECT * FROM "qwc_secrets"', refused(SECRETS), ALLOW),
    _c("quoted-qualified-secrets", "names",
       'SELECT * FROM "public"."qwc_secrets"',
       refused(SECRETS), ALLOW),
    _c("upper-case-folds", "names", "SELECT * FROM PUBLIC.QWC_SECRETS", refused(SECRETS), ALLOW),
    _c("mixed-case-folds", "names", "select * from Qwc_Secrets", refused(SECRETS), ALLOW),
    _c("quoted-upper-is-other-table", "names",
       'SELECT * FROM "QWC_SECRETS"',
       server_error("42P01"), server_error("42P01"),
       note="a quoted name keeps its case: another (missing) relation, so not denied"),
    _c("quoted-mixed-case", "names", 'SELECT * FROM "QwcMixed"', ALLOW, ALLOW),
    _c("non-ascii-identifier", "names",
       "SELECT * FROM qwc_pay€1",
       refused("public.qwc_pay€1 is denied by rule agents-read"), ALLOW,
       note="PostgreSQL reads every non-ASCII character as part of an identifier"),
    _c("non-ascii-identifier-other", "names",
       "SELECT * FROM qwc_pay€0",
       server_error("42P01"), server_error("42P01"),
       note="another (missing) table, not the denied one, although the case before left "
            "qwc_pay€1 in the gateway's statement cache"),
    _c("unicode-escape-ident", "names",
       'SELECT * FROM U&"qwc\\005fsecrets"',
       refused(SECRETS), ALLOW),
    _c("unicode-escape-uescape", "names",
       "SELECT * FROM U&\"!0071wc_secrets\" UESCAPE '!'",
       refused(SECRETS), ALLOW),
    _c("catalog-dot-schema-dot-table", "names",
       "SELECT * FROM app.public.qwc_secrets",
       refused(SECRETS), ALLOW),
    _c("cross-database", "names",
       "SELECT * FROM otherdb.public.qwc_orders",
       server_error("0A000"), server_error("0A000")),
    _c("pg-temp-qualified", "names",
       "SELECT * FROM pg_temp.qwc_orders",
       not_allowed("read access to pg_temp.qwc_orders"),
       not_allowed("read access to pg_temp.qwc_orders")),
    # -- comments-quoting ------------------------------------------------------------------------
    _c("comment-leading", "comments-quoting", "/* qwc_secrets */ SELECT 1", ALLOW, ALLOW),
    _c("comment-trailing", "comments-quoting", "SELECT 1 -- FROM qwc_secrets", ALLOW, ALLOW),
    _c("comment-nested", "comments-quoting",
       "SELECT /* outer /* DELETE FROM qwc_orders */ still comment */ 1",
       ALLOW, ALLOW),
    _c("comment-inside-from", "comments-quoting",
       "SELECT * FROM /* x */ qwc_secrets",
       refused(SECRETS), ALLOW),
    _c("comment-hides-nothing", "comments-quoting",
       "SELECT 1 /* ; */ ; SELECT * FROM qwc_secrets -- ;",
       refused(SECRETS), ALLOW),
    _c("dollar-quoted-literal", "comments-quoting",
       "SELECT $$SELECT * FROM qwc_secrets$$",
       ALLOW, ALLOW),
    _c("dollar-tag-literal", "comments-quoting",
       "SELECT $q$ ; DELETE FROM qwc_orders; $q$",
       ALLOW, ALLOW),
    _c("unicode-string-literal", "comments-quoting",
       "SELECT U&'\\0044ELETE FROM qwc_secrets'",
       ALLOW, ALLOW),
    _c("e-string-escaped-quote", "comments-quoting",
       "SELECT E'\\'; DELETE FROM qwc_orders; --'",
       ALLOW, ALLOW),
    _c("doubled-quote-then-delete", "comments-quoting",
       "SELECT 'it''s'; DELETE FROM qwc_orders WHERE id = 999",
       refused("DELETE needs approval (rule agents-read)"), ALLOW),
    _c("semicolon-in-literal", "comments-quoting",
       "SELECT * FROM qwc_orders WHERE note = 'a; DROP TABLE qwc_orders'",
       ALLOW, ALLOW),
    # -- multi-statement -------------------------------------------------------------------------
    _c("multi-denied-middle", "multi-statement",
       "SELECT 1; SELECT * FROM qwc_secrets; SELECT 2",
       refused(SECRETS), ALLOW),
    _c("multi-review-last", "multi-statement",
       "SELECT 1; DELETE FROM qwc_orders WHERE id = 999",
       refused(NEEDS), ALLOW),
    _c("multi-insert-then-truncate", "multi-statement",
       "INSERT INTO qwc_scratch VALUES (1); TRUNCATE qwc_scratch",
       not_allowed("INSERT"), refused("TRUNCATE needs approval (rule dba-write)")),
    _c("multi-vault-last", "multi-statement",
       "SELECT * FROM qwc_orders; SELECT * FROM qwc_vault",
       ALLOW, refused(VAULT)),
    _c("multi-empty-statements", "multi-statement", "SELECT 1;;; SELECT 2;", ALLOW, ALLOW),
    _c("multi-builtin-first", "multi-statement",
       "SELECT pg_read_file('/etc/hostname'); SELECT 1",
       refused(BUILTIN), refused(BUILTIN)),
    # -- dml-cte ---------------------------------------------------------------------------------
    _c("cte-delete", "dml-cte",
       "WITH d AS (DELETE FROM qwc_orders WHERE id = 999 RETURNING *) SELECT * FROM d",
       refused("DELETE needs approval"), ALLOW),
    _c("cte-update", "dml-cte",
       "WITH u AS (UPDATE qwc_orders SET amount = amount WHERE id = 999 RETURNING id) SELECT "
       "count(*) FROM u",
       refused("UPDATE needs approval"), ALLOW),
    _c("cte-insert", "dml-cte",
       "WITH i AS (INSERT INTO qwc_scratch VALUES (5) RETURNING a) SELECT * FROM i",
       not_allowed("INSERT"), ALLOW),
    _c("cte-delete-unbounded", "dml-cte",
       "WITH d AS (DELETE FROM qwc_scratch RETURNING *) SELECT count(*) FROM d",
       refused("DELETE needs approval"), refused(UNBOUNDED)),
    _c("cte-delete-denied-table", "dml-cte",
       "WITH d AS (DELETE FROM qwc_secrets WHERE false RETURNING *) SELECT 1",
       refused(SECRETS), ALLOW),
    _c("cte-read-secrets", "dml-cte",
       "WITH s AS (SELECT * FROM qwc_secrets) SELECT * FROM s",
       refused(SECRETS), ALLOW),
    _c("cte-shadows-table-name", "dml-cte",
       "WITH qwc_secrets AS (SELECT 1 AS x) SELECT * FROM qwc_secrets",
       ALLOW, ALLOW,
       note="the CTE shadows the table: nothing sensitive is read"),
    _c("cte-recursive", "dml-cte",
       "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * "
       "FROM r",
       ALLOW, ALLOW),
    _c("cte-nested-in-subquery", "dml-cte",
       "SELECT * FROM (WITH x AS (SELECT * FROM qwc_secrets) SELECT * FROM x) q",
       refused(SECRETS), ALLOW),
    # -- select-into -----------------------------------------------------------------------------
    _c("select-into", "select-into",
       "SELECT * INTO qwc_copy FROM qwc_orders",
       not_allowed("DDL"), not_allowed("SELECT INTO")),
    _c("select-into-secrets", "select-into",
       "SELECT * INTO qwc_copy FROM qwc_secrets",
       refused(SECRETS), not_allowed("SELECT INTO")),
    _c("create-table-as", "select-into",
       "CREATE TABLE qwc_ctas AS SELECT * FROM qwc_orders",
       not_allowed("DDL"), not_allowed("SELECT INTO")),
    _c("create-table-as-vault", "select-into",
       "CREATE TABLE qwc_ctas AS SELECT * FROM qwc_vault",
       not_allowed("DDL"), refused(VAULT)),
    _c("create-matview", "select-into",
       "CREATE MATERIALIZED VIEW qwc_mv AS SELECT * FROM qwc_orders",
       not_allowed("DDL"), not_allowed("SELECT INTO")),
    # -- row-lock --------------------------------------------------------------------------------
    _c("for-update", "row-lock",
       "SELECT * FROM qwc_orders FOR UPDATE",
       not_allowed("ROW LOCK"), not_allowed("ROW LOCK")),
    _c("for-share-skip-locked", "row-lock",
       "SELECT id FROM qwc_orders FOR SHARE SKIP LOCKED",
       not_allowed("ROW LOCK"), not_allowed("ROW LOCK")),
    _c("for-update-in-subquery", "row-lock",
       "SELECT * FROM qwc_orders WHERE id IN (SELECT id FROM qwc_orders FOR UPDATE)",
       not_allowed("ROW LOCK"), not_allowed("ROW LOCK")),
    _c("lock-table", "row-lock",
       "LOCK TABLE qwc_orders IN ACCESS EXCLUSIVE MODE",
       not_allowed("LOCK"), not_allowed("LOCK")),
    # -- explain-analyze -------------------------------------------------------------------------
    _c("explain-select", "explain-analyze",
       "EXPLAIN SELECT * FROM qwc_orders",
       ALLOW, not_allowed("EXPLAIN")),
    _c("explain-secrets", "explain-analyze",
       "EXPLAIN SELECT * FROM qwc_secrets",
       refused(SECRETS), not_allowed("EXPLAIN")),
    _c("explain-analyze-delete", "explain-analyze",
       "EXPLAIN ANALYZE DELETE FROM qwc_orders WHERE id = 999",
       not_allowed("EXPLAIN ANALYZE"), not_allowed("EXPLAIN")),
    _c("explain-analyze-option", "explain-analyze",
       "EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM qwc_orders",
       not_allowed("EXPLAIN ANALYZE"), not_allowed("EXPLAIN")),
    _c("explain-analyze-true-string", "explain-analyze",
       "EXPLAIN (ANALYZE 'on') INSERT INTO qwc_scratch VALUES (1)",
       not_allowed("EXPLAIN ANALYZE"), not_allowed("EXPLAIN")),
    _c("explain-analyze-off", "explain-analyze",
       "EXPLAIN (ANALYZE off) SELECT 1",
       ALLOW, not_allowed("EXPLAIN")),
    _c("explain-update-not-run", "explain-analyze",
       "EXPLAIN (COSTS off) UPDATE qwc_orders SET amount = 0 WHERE id = 999",
       refused("UPDATE needs approval"), not_allowed("EXPLAIN"),
       note="plain EXPLAIN does not run the UPDATE, but its body is still checked"),
    # -- dangerous-function ----------------------------------------------------------------------
    _c("pg-read-file", "dangerous-function",
       "SELECT pg_read_file('/etc/hostname')",
       refused(BUILTIN), refused(BUILTIN)),
    _c("pg-read-file-qualified", "dangerous-function",
       "SELECT pg_catalog.pg_read_file('postgresql.conf')",
       refused("calling pg_catalog.pg_read_file is refused"),
       refused("calling pg_catalog.pg_read_file is refused")),
    _c("pg-read-file-upper", "dangerous-function",
       "SELECT PG_READ_FILE('postgresql.conf')",
       refused(BUILTIN), refused(BUILTIN)),
    _c("pg-read-file-quoted-upper", "dangerous-function",
       "SELECT \"PG_READ_FILE\"('postgresql.conf')",
       refused(SIDE_EFFECTS), server_error("42883"),
       note="a quoted name keeps its case: not PostgreSQL's function, so a user's, whose "
            "effects cannot be seen; the server has no such function"),
    _c("pg-read-file-in-where", "dangerous-function",
       "SELECT 1 FROM qwc_orders WHERE length(pg_read_binary_file('/etc/passwd')) > 0",
       refused(BUILTIN), refused(BUILTIN)),
    _c("pg-ls-dir", "dangerous-function",
       "SELECT * FROM pg_ls_dir('.')",
       refused(BUILTIN), refused(BUILTIN)),
    _c("pg-stat-file", "dangerous-function",
       "SELECT pg_stat_file('postgresql.conf')",
       refused(BUILTIN), refused(BUILTIN)),
    _c("lo-import", "dangerous-function",
       "SELECT lo_import('/etc/hostname')",
       refused(BUILTIN), refused(BUILTIN)),
    _c("lo-export", "dangerous-function",
       "SELECT lo_export(0, '/tmp/qwc_lo_export')",
       refused(BUILTIN), refused(BUILTIN)),
    _c("dblink", "dangerous-function",
       "SELECT * FROM dblink('dbname=app', 'SELECT secret FROM qwc_secrets') AS t(s text)",
       refused(BUILTIN), refused(BUILTIN)),
    _c("dblink-exec", "dangerous-function",
       "SELECT dblink_exec('dbname=app', 'DELETE FROM qwc_orders')",
       refused(BUILTIN), refused(BUILTIN)),
    _c("pg-terminate-backend", "dangerous-function",
       "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = -1",
       refused(BUILTIN), refused(BUILTIN)),
    _c("pg-cancel-backend", "dangerous-function",
       "SELECT pg_cancel_backend(0)",
       refused(BUILTIN), refused(BUILTIN)),
    _c("pg-reload-conf", "dangerous-function",
       "SELECT pg_reload_conf()",
       refused(BUILTIN), refused(BUILTIN)),
    _c("set-config-role", "dangerous-function",
       "SELECT set_config('role', 'postgres', false)",
       refused(BUILTIN), refused(BUILTIN)),
    _c("set-config-search-path", "dangerous-function",
       "SELECT set_config('search_path', 'qwc_private', false)",
       not_allowed("SET"), not_allowed("SET SEARCH PATH"),
       note="decided as SET search_path, the setting it names"),
    _c("set-config-dynamic-name", "dangerous-function",
       "SELECT set_config(lower('ROLE'), 'postgres', true)",
       refused(BUILTIN), refused(BUILTIN),
       note="which setting it changes cannot be seen: fail closed"),
    _c("query-to-xml-constant", "dangerous-function",
       "SELECT query_to_xml('SELECT * FROM qwc_secrets', true, false, '')",
       refused(SECRETS), ALLOW,
       note="the constant query is analyzed in place"),
    _c("query-to-xml-dynamic", "dangerous-function",
       "SELECT query_to_xml('SELECT * FROM ' || 'qwc_secrets', true, false, '')",
       refused(OPAQUE), refused(OPAQUE)),
    _c("table-to-xml", "dangerous-function",
       "SELECT table_to_xml('qwc_secrets', true, false, '')",
       refused(SECRETS), ALLOW),
    _c("table-to-xml-vault-regclass", "dangerous-function",
       "SELECT table_to_xml('public.qwc_vault'::regclass, true, false, '')",
       ALLOW, refused(VAULT)),
    # -- side-effect-function --------------------------------------------------------------------
    _c("nextval", "side-effect-function",
       "SELECT nextval('qwc_seq')",
       refused(NEEDS), ALLOW,
       note="nextval writes the sequence: a read-only identity must not advance it"),
    _c("setval", "side-effect-function",
       "SELECT setval('public.qwc_seq', 42)",
       refused(NEEDS), ALLOW,
       note="setval writes the sequence: a read-only identity must not reset it"),
    _c("currval-reads", "side-effect-function", "SELECT last_value FROM qwc_seq", ALLOW, ALLOW),
    _c("pg-notify", "side-effect-function",
       "SELECT pg_notify('qwc_chan', 'x')",
       not_allowed("NOTIFY"), not_allowed("NOTIFY")),
    _c("user-function-over-secrets", "side-effect-function",
       "SELECT qwc_peek()",
       refused(SIDE_EFFECTS), ALLOW,
       note="what a user-defined function does inside the server is not visible: calling "
            "one is side_effects, which only the dba's rule allows"),
    _c("pg-sleep", "side-effect-function", "SELECT pg_sleep(0)", ALLOW, ALLOW),
    _c("pg-stat-reset", "side-effect-function",
       "SELECT pg_stat_reset()",
       refused(SIDE_EFFECTS), server_error("42501"),
       note="volatile in pg_catalog: side effects; the upstream role may not run it"),
    _c("pg-stat-reset-shared", "side-effect-function",
       "SELECT pg_stat_reset_shared('bgwriter')",
       refused(SIDE_EFFECTS), server_error("42501")),
    _c("pg-logical-emit-message", "side-effect-function",
       "SELECT pg_logical_emit_message(false, 'qwc', 'x') IS NOT NULL",
       refused(SIDE_EFFECTS), ALLOW,
       note="writes a WAL record, at any wal_level"),
    _c("advisory-lock", "side-effect-function",
       "SELECT pg_advisory_xact_lock(4242)",
       refused(SIDE_EFFECTS), ALLOW),
    _c("volatile-but-harmless", "side-effect-function",
       "SELECT now(), random(), clock_timestamp(), lower('A'), pg_table_size('qwc_orders'), "
       "pg_catalog.format_type(23, NULL), count(*) FROM qwc_orders",
       ALLOW, ALLOW),
    _c("pg-stats-of-secrets", "side-effect-function",
       "SELECT most_common_vals FROM pg_catalog.pg_stats WHERE tablename = 'qwc_secrets'",
       refused(BUILTIN), refused(BUILTIN),
       note="pg_stats holds sampled values of every table: reading it reads them all"),
    _c("pg-stat-activity", "side-effect-function",
       "SELECT query FROM pg_stat_activity",
       refused(BUILTIN), refused(BUILTIN),
       note="other sessions' statements, with their constants"),
    # -- do-call-prepare -------------------------------------------------------------------------
    _c("do-block", "do-call-prepare",
       "DO $$ BEGIN DELETE FROM qwc_orders WHERE id = 999; END $$",
       not_allowed("DO"), not_allowed("DO")),
    _c("do-language-tagged", "do-call-prepare",
       "DO LANGUAGE plpgsql $body$ BEGIN PERFORM 1; END $body$",
       not_allowed("DO"), not_allowed("DO")),
    _c("call", "do-call-prepare", "CALL qwc_proc()", not_allowed("CALL"), not_allowed("CALL")),
    _c("prepare-execute-select", "do-call-prepare",
       "PREPARE qwc_p1 AS SELECT * FROM qwc_orders WHERE id = $1; EXECUTE qwc_p1(1); DEALLOCATE "
       "qwc_p1",
       not_allowed("PREPARE"), ALLOW),
    _c("prepare-delete", "do-call-prepare",
       "PREPARE qwc_p2 AS DELETE FROM qwc_orders WHERE id = 999; EXECUTE qwc_p2; DEALLOCATE qwc_p2",
       not_allowed("PREPARE"), ALLOW),
    _c("prepare-secrets", "do-call-prepare",
       "PREPARE qwc_p3 AS SELECT * FROM qwc_secrets",
       refused(SECRETS), ALLOW,
       note="PREPARE's body is checked although it does not run yet"),
    _c("prepare-vault", "do-call-prepare",
       "PREPARE qwc_p4 AS SELECT * FROM qwc_vault",
       not_allowed("PREPARE"), refused(VAULT)),
    _c("prepare-unbounded-delete", "do-call-prepare",
       "PREPARE qwc_p5 AS DELETE FROM qwc_scratch",
       not_allowed("PREPARE"), refused(UNBOUNDED)),
    _c("execute-missing", "do-call-prepare",
       "EXECUTE qwc_missing",
       not_allowed("EXECUTE"), server_error("26000")),
    _c("deallocate-all", "do-call-prepare", "DEALLOCATE ALL", not_allowed("DEALLOCATE"), ALLOW),
    # -- create-function -------------------------------------------------------------------------
    _c("create-function-call", "create-function",
       "CREATE FUNCTION qwc_f() RETURNS int LANGUAGE sql AS 'SELECT 1'; SELECT qwc_f()",
       not_allowed("DDL"), ALLOW),
    _c("create-function-atomic-secrets", "create-function",
       "CREATE FUNCTION qwc_f2() RETURNS SETOF text LANGUAGE sql BEGIN ATOMIC SELECT secret "
       "FROM qwc_secrets; END",
       refused(SECRETS), ALLOW,
       note="a SQL-standard body is analyzed"),
    _c("create-function-atomic-vault", "create-function",
       "CREATE FUNCTION qwc_f3() RETURNS SETOF text LANGUAGE sql BEGIN ATOMIC SELECT payload "
       "FROM qwc_vault; END",
       not_allowed("DDL"), refused(VAULT)),
    _c("create-function-security-definer", "create-function",
       "CREATE FUNCTION qwc_f4() RETURNS void LANGUAGE plpgsql SECURITY DEFINER AS $$ BEGIN "
       "DELETE FROM qwc_scratch; END $$",
       not_allowed("DDL"), ALLOW,
       note="a PL/pgSQL body is text to the policy; DDL is the dba's to use"),
    _c("create-function-private-schema", "create-function",
       "CREATE FUNCTION qwc_private.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
       not_allowed("DDL"), ALLOW,
       note="functions are not relations: table patterns do not cover them"),
    # -- role-and-settings -----------------------------------------------------------------------
    _c("set-role", "role-and-settings", "SET ROLE postgres", refused(BUILTIN), refused(BUILTIN)),
    _c("set-local-role", "role-and-settings",
       "SET LOCAL ROLE qw_md5",
       refused(BUILTIN), refused(BUILTIN)),
    _c("set-session-authorization", "role-and-settings",
       "SET SESSION AUTHORIZATION postgres",
       refused(BUILTIN), refused(BUILTIN)),
    # A reset returns to the role the gateway connected with: a RESET, no role switch.
    _c("reset-role", "role-and-settings", "RESET ROLE",
       not_allowed("RESET"), not_allowed("RESET")),
    _c("reset-session-authorization", "role-and-settings",
       "RESET SESSION AUTHORIZATION",
       not_allowed("RESET"), not_allowed("RESET")),
    _c("reset-all", "role-and-settings", "RESET ALL", not_allowed("RESET"), not_allowed("RESET")),
    _c("set-search-path", "role-and-settings",
       "SET search_path = qwc_private, public",
       not_allowed("SET"), not_allowed("SET SEARCH PATH")),
    _c("set-local-search-path", "role-and-settings",
       "SET LOCAL search_path TO qwc_private",
       not_allowed("SET"), not_allowed("SET SEARCH PATH")),
    _c("set-schema", "role-and-settings",
       "SET SCHEMA 'qwc_private'",
       not_allowed("SET"), not_allowed("SET SEARCH PATH")),
    _c("reset-search-path", "role-and-settings",
       "RESET search_path",
       not_allowed("RESET"), not_allowed("RESET")),
    _c("set-statement-timeout", "role-and-settings",
       "SET statement_timeout = '5s'",
       not_allowed("SET"), ALLOW),
    _c("set-transaction-read-only", "role-and-settings",
       "SET TRANSACTION READ ONLY",
       not_allowed("SET"), ALLOW),
    _c("show-search-path", "role-and-settings", "SHOW search_path", ALLOW, not_allowed("SHOW")),
    _c("alter-system", "role-and-settings",
       "ALTER SYSTEM SET work_mem = '1MB'",
       refused(BUILTIN), refused(BUILTIN), tx=False),
    _c("alter-role-set-search-path", "role-and-settings",
       "ALTER ROLE qw_scram SET search_path = qwc_private, public",
       not_allowed("DDL"), not_allowed("SET SEARCH PATH"),
       note="changes search_path for every later session of the shared upstream role, which "
            "the engine resolves against public: must be refused like SET search_path"),
    _c("alter-database-set-search-path", "role-and-settings",
       "ALTER DATABASE app SET search_path = qwc_private, public",
       not_allowed("DDL"), not_allowed("SET SEARCH PATH"),
       note="the same, for every later session on the database (qw_scram owns app)"),
    _c("alter-role-set-role", "role-and-settings",
       "ALTER ROLE CURRENT_USER SET role = 'qw_scram'",
       refused(BUILTIN), refused(BUILTIN),
       note="a SET ROLE that runs at the start of every later session"),
    _c("discard-all", "role-and-settings",
       "DISCARD ALL",
       not_allowed("DISCARD"), not_allowed("DISCARD"), tx=False,
       note="DISCARD ALL includes RESET ALL and SET SESSION AUTHORIZATION DEFAULT: resets, "
            "no role switch"),
    # -- union -----------------------------------------------------------------------------------
    _c("union-secrets", "union",
       "SELECT id FROM qwc_orders UNION SELECT id FROM qwc_secrets",
       refused(SECRETS), ALLOW),
    _c("union-all-text", "union",
       "SELECT note FROM qwc_orders UNION ALL SELECT secret FROM public.qwc_secrets",
       refused(SECRETS), ALLOW),
    _c("intersect-secrets", "union",
       "SELECT id FROM qwc_orders INTERSECT SELECT id FROM qwc_secrets",
       refused(SECRETS), ALLOW),
    _c("except-nested", "union",
       "SELECT id FROM qwc_orders EXCEPT ALL (SELECT id FROM qwc_orders UNION ALL SELECT id "
       "FROM qwc_secrets)",
       refused(SECRETS), ALLOW),
    _c("union-vault", "union",
       "SELECT id FROM qwc_orders UNION SELECT id FROM qwc_vault",
       ALLOW, refused(VAULT)),
    _c("union-allowed", "union", "(SELECT 1) UNION ALL (SELECT id FROM qwc_orders)", ALLOW, ALLOW),
    # -- subquery --------------------------------------------------------------------------------
    _c("subquery-select-list", "subquery",
       "SELECT (SELECT secret FROM qwc_secrets LIMIT 1)",
       refused(SECRETS), ALLOW),
    _c("subquery-from", "subquery",
       "SELECT * FROM (SELECT * FROM qwc_secrets) s",
       refused(SECRETS), ALLOW),
    _c("subquery-where-exists", "subquery",
       "SELECT * FROM qwc_orders WHERE EXISTS (SELECT 1 FROM qwc_secrets)",
       refused(SECRETS), ALLOW),
    _c("subquery-where-in", "subquery",
       "SELECT * FROM qwc_orders WHERE id IN (SELECT id FROM qwc_secrets)",
       refused(SECRETS), ALLOW),
    _c("join-denied", "subquery",
       "SELECT o.id FROM qwc_orders o LEFT JOIN qwc_secrets s ON s.id = o.id",
       refused(SECRETS), ALLOW),
    _c("subquery-join-on", "subquery",
       "SELECT o.id FROM qwc_orders o JOIN qwc_customers c ON c.id = (SELECT min(id) FROM "
       "qwc_secrets)",
       refused(SECRETS), ALLOW),
    _c("subquery-group-by", "subquery",
       "SELECT count(*) FROM qwc_orders GROUP BY (SELECT 1 FROM qwc_secrets LIMIT 1)",
       refused(SECRETS), ALLOW),
    _c("subquery-having", "subquery",
       "SELECT customer_id FROM qwc_orders GROUP BY customer_id HAVING count(*) > (SELECT "
       "count(*) FROM qwc_secrets)",
       refused(SECRETS), ALLOW),
    _c("subquery-order-by", "subquery",
       "SELECT id FROM qwc_orders ORDER BY (SELECT max(id) FROM qwc_secrets)",
       refused(SECRETS), ALLOW),
    _c("subquery-limit-offset", "subquery",
       "SELECT id FROM qwc_orders LIMIT (SELECT count(*) FROM qwc_secrets) OFFSET (SELECT 0 "
       "FROM qwc_secrets LIMIT 1)",
       refused(SECRETS), ALLOW),
    _c("subquery-lateral", "subquery",
       "SELECT * FROM qwc_orders o, LATERAL (SELECT secret FROM qwc_secrets s WHERE s.id = o.id) x",
       refused(SECRETS), ALLOW),
    _c("subquery-function-arg", "subquery",
       "SELECT coalesce(NULL, (SELECT secret FROM qwc_secrets LIMIT 1))",
       refused(SECRETS), ALLOW),
    _c("subquery-case", "subquery",
       "SELECT CASE WHEN id > 0 THEN (SELECT secret FROM qwc_secrets LIMIT 1) END FROM qwc_orders",
       refused(SECRETS), ALLOW),
    _c("subquery-window", "subquery",
       "SELECT sum(amount) OVER (ORDER BY (SELECT 1 FROM qwc_secrets LIMIT 1)) FROM qwc_orders",
       refused(SECRETS), ALLOW),
    _c("subquery-filter", "subquery",
       "SELECT count(*) FILTER (WHERE id IN (SELECT id FROM qwc_secrets)) FROM qwc_orders",
       refused(SECRETS), ALLOW),
    _c("subquery-values", "subquery",
       "VALUES ((SELECT secret FROM qwc_secrets LIMIT 1))",
       refused(SECRETS), ALLOW),
    _c("subquery-array", "subquery",
       "SELECT ARRAY(SELECT secret FROM qwc_secrets)",
       refused(SECRETS), ALLOW),
    _c("subquery-in-update-where", "subquery",
       "UPDATE qwc_orders SET amount = amount WHERE id IN (SELECT id FROM qwc_secrets) AND false",
       refused(SECRETS), ALLOW),
    _c("subquery-in-update-set", "subquery",
       "UPDATE qwc_orders SET note = (SELECT payload FROM qwc_vault LIMIT 1) WHERE id = 999",
       refused("UPDATE needs approval"), refused(VAULT)),
    _c("delete-using-denied", "subquery",
       "DELETE FROM qwc_orders USING qwc_secrets WHERE qwc_orders.id = qwc_secrets.id AND false",
       refused(SECRETS), ALLOW),
    _c("returning-subquery", "subquery",
       "UPDATE qwc_orders SET amount = amount WHERE id = 999 RETURNING (SELECT secret FROM "
       "qwc_secrets LIMIT 1)",
       refused(SECRETS), ALLOW),
    _c("insert-select-denied", "subquery",
       "INSERT INTO qwc_scratch SELECT id FROM qwc_secrets",
       refused(SECRETS), ALLOW),
    _c("insert-values-subquery-vault", "subquery",
       "INSERT INTO qwc_scratch VALUES ((SELECT id FROM qwc_vault LIMIT 1))",
       not_allowed("INSERT"), refused(VAULT)),
    # -- view ------------------------------------------------------------------------------------
    _c("view-over-secrets", "view",
       "SELECT * FROM qwc_secrets_view",
       ALLOW, ALLOW,
       note="known limitation (docs/policy.md): the policy does not see through an existing "
            "view; deny the view by name"),
    _c("create-view-secrets", "view",
       "CREATE VIEW qwc_v1 AS SELECT * FROM qwc_secrets",
       refused(SECRETS), ALLOW),
    _c("create-view-vault", "view",
       "CREATE VIEW qwc_v2 AS SELECT * FROM qwc_vault",
       not_allowed("DDL"), refused(VAULT)),
    _c("create-view-private", "view",
       "CREATE VIEW qwc_private.v AS SELECT * FROM qwc_orders",
       not_allowed("DDL"), not_allowed("write access to qwc_private.v")),
    _c("create-rule", "view",
       "CREATE RULE qwc_r AS ON INSERT TO qwc_scratch DO INSTEAD DELETE FROM qwc_vault WHERE true",
       not_allowed("DDL"), refused(VAULT)),
    # -- copy ------------------------------------------------------------------------------------
    _c("copy-to-stdout", "copy",
       "COPY qwc_orders TO STDOUT",
       not_allowed("COPY OUT"), ALLOW, copy="out"),
    _c("copy-query-to-stdout-csv", "copy",
       "COPY (SELECT id, amount FROM qwc_orders) TO STDOUT WITH (FORMAT csv)",
       not_allowed("COPY OUT"), ALLOW, copy="out"),
    _c("copy-secrets-to-stdout", "copy",
       "COPY (SELECT * FROM qwc_secrets) TO STDOUT",
       refused(SECRETS), ALLOW, copy="out"),
    _c("copy-vault-to-stdout", "copy",
       "COPY qwc_vault (payload) TO STDOUT",
       not_allowed("COPY OUT"), refused(VAULT), copy="out"),
    _c("copy-from-stdin", "copy",
       "COPY qwc_scratch FROM STDIN",
       not_allowed("COPY IN"), ALLOW, copy="in"),
    _c("copy-to-file", "copy",
       "COPY qwc_orders TO '/tmp/qwc_copy_out.txt'",
       refused(BUILTIN), refused(BUILTIN)),
    _c("copy-from-file", "copy",
       "COPY qwc_scratch FROM '/etc/hostname'",
       refused(BUILTIN), refused(BUILTIN)),
    _c("copy-to-program", "copy",
       "COPY qwc_orders TO PROGRAM 'cat > /dev/null'",
       refused(BUILTIN), refused(BUILTIN)),
    _c("copy-from-program", "copy",
       "COPY qwc_scratch FROM PROGRAM 'echo 1'",
       refused(BUILTIN), refused(BUILTIN)),
    _c("copy-query-to-program", "copy",
       "COPY (SELECT 1) TO PROGRAM 'id'",
       refused(BUILTIN), refused(BUILTIN)),
    # -- temporary -------------------------------------------------------------------------------
    _c("create-temp-table", "temporary",
       "CREATE TEMP TABLE qwc_tmp (a int)",
       not_allowed("DDL"), not_allowed("write access to pg_temp.qwc_tmp"),
       note="temporary relations are in pg_temp, which no rule lists"),
    _c("create-temp-table-as", "temporary",
       "CREATE TEMP TABLE qwc_tmp AS SELECT * FROM qwc_orders",
       not_allowed("DDL"), not_allowed("SELECT INTO")),
    _c("select-into-temp", "temporary",
       "SELECT * INTO TEMP qwc_tmp FROM qwc_secrets",
       refused(SECRETS), not_allowed("SELECT INTO")),
    _c("create-temp-view", "temporary",
       "CREATE TEMP VIEW qwc_tv AS SELECT * FROM qwc_orders",
       not_allowed("DDL"), not_allowed("write access to pg_temp.qwc_tv")),
    # -- writes ----------------------------------------------------------------------------------
    _c("insert", "writes", "INSERT INTO qwc_scratch VALUES (1), (2)", not_allowed("INSERT"), ALLOW),
    _c("insert-on-conflict-update", "writes",
       "INSERT INTO qwc_orders VALUES (1, 0, 0, 'x') ON CONFLICT (id) DO UPDATE SET note = "
       "excluded.note",
       not_allowed("INSERT"), ALLOW),
    _c("update-bounded", "writes",
       "UPDATE qwc_orders SET amount = amount + 1 WHERE id = 1",
       refused("UPDATE needs approval (rule agents-read)"), ALLOW),
    _c("update-unbounded", "writes",
       "UPDATE qwc_scratch SET a = 0",
       refused("UPDATE needs approval"), refused(UNBOUNDED)),
    _c("update-where-true", "writes",
       "UPDATE qwc_scratch SET a = 0 WHERE true",
       refused("UPDATE needs approval"), ALLOW,
       note="unboundedWrite is syntactic: any WHERE bounds the statement"),
    _c("delete-bounded", "writes",
       "DELETE FROM qwc_orders WHERE id = 1",
       refused("DELETE needs approval (rule agents-read)"), ALLOW),
    _c("delete-unbounded", "writes",
       "DELETE FROM qwc_scratch",
       refused("DELETE needs approval"), refused(UNBOUNDED)),
    _c("delete-vault", "writes",
       "DELETE FROM qwc_vault WHERE id = 1",
       refused("DELETE needs approval"), refused(VAULT)),
    _c("update-secrets", "writes",
       "UPDATE qwc_secrets SET secret = 'x' WHERE id = 1",
       refused(SECRETS), ALLOW),
    _c("merge", "writes",
       "MERGE INTO qwc_scratch t USING qwc_orders o ON t.a = o.id WHEN MATCHED THEN UPDATE SET "
       "a = o.id WHEN NOT MATCHED THEN INSERT VALUES (o.id)",
       not_allowed("INSERT"), ALLOW),
    _c("merge-from-vault", "writes",
       "MERGE INTO qwc_scratch t USING qwc_vault v ON t.a = v.id WHEN NOT MATCHED THEN INSERT "
       "VALUES (v.id)",
       not_allowed("INSERT"), refused(VAULT)),
    _c("truncate", "writes",
       "TRUNCATE qwc_scratch",
       not_allowed("TRUNCATE"), refused("TRUNCATE needs approval (rule dba-write)")),
    _c("write-private-schema", "writes",
       "INSERT INTO qwc_private.payroll VALUES (2, 1)",
       not_allowed("INSERT"), not_allowed("write access to qwc_private.payroll")),
    # -- ddl -------------------------------------------------------------------------------------
    _c("create-table", "ddl", "CREATE TABLE qwc_new (a int)", not_allowed("DDL"), ALLOW),
    _c("create-table-private", "ddl",
       "CREATE TABLE qwc_private.evil (a int)",
       not_allowed("DDL"), not_allowed("write access to qwc_private.evil")),
    _c("alter-table", "ddl", "ALTER TABLE qwc_scratch ADD COLUMN b int", not_allowed("DDL"), ALLOW),
    _c("drop-table", "ddl", "DROP TABLE qwc_scratch", not_allowed("DDL"), ALLOW),
    _c("drop-vault", "ddl", "DROP TABLE qwc_vault", not_allowed("DDL"), refused(VAULT)),
    _c("drop-schema-cascade", "ddl",
       "DROP SCHEMA qwc_private CASCADE",
       not_allowed("DDL"), not_allowed("write access to qwc_private.*")),
    _c("drop-schema-public", "ddl",
       "DROP SCHEMA public CASCADE",
       refused("public.* is denied by rule agents-read"),
       refused("public.* is denied by rule dba-write"),
       note="a whole schema touches every table in it, the denied one included"),
    _c("alter-table-rename-vault", "ddl",
       "ALTER TABLE qwc_vault RENAME TO qwc_open",
       not_allowed("DDL"), refused(VAULT)),
    _c("create-role", "ddl",
       "CREATE ROLE qwc_role",
       not_allowed("DDL"), server_error("42501"),
       note="the upstream role lacks CREATEROLE; PostgreSQL refuses it"),
    _c("grant", "ddl",
       "GRANT SELECT ON qwc_secrets TO PUBLIC",
       refused(SECRETS), not_allowed("GRANT")),
    _c("create-extension", "ddl",
       "CREATE EXTENSION dblink",
       not_allowed("CREATE EXTENSION"), not_allowed("CREATE EXTENSION")),
    _c("vacuum", "ddl",
       "VACUUM qwc_orders",
       not_allowed("VACUUM"), not_allowed("VACUUM"), tx=False),
    _c("listen", "ddl", "LISTEN qwc_chan", not_allowed("LISTEN"), not_allowed("LISTEN")),
    _c("declare-cursor", "ddl",
       "DECLARE qwc_c CURSOR FOR SELECT * FROM qwc_orders",
       not_allowed("DECLARE CURSOR"), not_allowed("DECLARE CURSOR")),
    _c("declare-cursor-secrets", "ddl",
       "DECLARE qwc_c CURSOR FOR SELECT * FROM qwc_secrets",
       refused(SECRETS), not_allowed("DECLARE CURSOR")),
    # -- transaction -----------------------------------------------------------------------------
    _c("begin-select-commit", "transaction", "BEGIN; SELECT 1; COMMIT", ALLOW, ALLOW, tx=False),
    _c("read-only-transaction", "transaction",
       "START TRANSACTION READ ONLY; SELECT count(*) FROM qwc_orders; ROLLBACK",
       ALLOW, ALLOW, tx=False),
    _c("begin-delete-rollback", "transaction",
       "BEGIN; DELETE FROM qwc_orders WHERE id = 999; ROLLBACK",
       refused("DELETE needs approval"), ALLOW, tx=False),
    _c("savepoint", "transaction",
       "SAVEPOINT qwc_s; SELECT 1; RELEASE SAVEPOINT qwc_s",
       ALLOW, ALLOW),
    _c("set-constraints", "transaction", "SET CONSTRAINTS ALL DEFERRED", ALLOW, ALLOW),
    # -- unparseable -----------------------------------------------------------------------------
    _c("typo", "unparseable", "SELEC 1", syntax(), syntax()),
    _c("incomplete", "unparseable", "SELECT * FROM qwc_orders WHERE", syntax(), syntax()),
    _c("delete-without-from", "unparseable", "DELETE qwc_orders", syntax(), syntax()),
    _c("unterminated-string", "unparseable",
       "SELECT 'unterminated",
       syntax("unterminated quoted string"), syntax("unterminated quoted string")),
    _c("unterminated-dollar", "unparseable",
       "SELECT $$ DELETE FROM qwc_orders",
       syntax("unterminated dollar-quoted string"), syntax("unterminated dollar-quoted string")),
    _c("unterminated-comment", "unparseable",
       "/* DELETE FROM qwc_orders; SELECT 1",
       syntax("unterminated /* comment"), syntax("unterminated /* comment")),
    _c("multi-with-typo", "unparseable",
       "SELECT 1; SELEC 2",
       syntax(), syntax(),
       note="refused whole: the valid first statement does not run"),
    _c("valid-then-garbage", "unparseable",
       "DELETE FROM qwc_orders WHERE id = 1; )(",
       syntax(), syntax()),
)
# fmt: on

#: A representative subset run through psql (simple protocol, one Query per -c).
PSQL_SUBSET = (
    "select-orders",
    "select-secrets",
    "select-vault",
    "unicode-escape-ident",
    "comment-hides-nothing",
    "multi-denied-middle",
    "multi-insert-then-truncate",
    "cte-delete",
    "select-into",
    "for-update",
    "explain-analyze-delete",
    "pg-read-file",
    "set-config-role",
    "nextval",
    "do-block",
    "prepare-secrets",
    "set-role",
    "set-search-path",
    "union-secrets",
    "subquery-having",
    "view-over-secrets",
    "copy-to-stdout",
    "copy-to-program",
    "create-temp-table",
    "update-unbounded",
    "typo",
    "multi-with-typo",
)

#: A representative subset run through asyncpg (extended protocol: Parse, Bind, Execute).
ASYNCPG_SUBSET = (
    "select-orders",
    "select-secrets",
    "quoted-qualified-secrets",
    "mixed-case-folds",
    "cte-delete",
    "cte-shadows-table-name",
    "create-table-as",
    "for-share-skip-locked",
    "explain-analyze-option",
    "pg-ls-dir",
    "lo-import",
    "query-to-xml-dynamic",
    "setval",
    "call",
    "set-session-authorization",
    "reset-role",
    "intersect-secrets",
    "subquery-lateral",
    "create-view-secrets",
    "insert",
    "delete-unbounded",
    "truncate",
    "incomplete",
)
