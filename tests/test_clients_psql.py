"""psql through the gateway behaves exactly as psql connected directly.

Each test runs the same psql invocation against the gateway and directly against
PostgreSQL and compares what psql printed and how it exited.
"""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import time
from pathlib import Path

from client_helpers import client_env, dropping, run_psql, unique_name
from gateway_harness import RunningGateway
from querywarden.devcluster import EphemeralCluster


def assert_same(
    through: subprocess.CompletedProcess[str], direct: subprocess.CompletedProcess[str]
) -> None:
    assert (through.returncode, through.stdout, through.stderr) == (
        direct.returncode,
        direct.stdout,
        direct.stderr,
    )


def test_plain_queries_match_direct(pg: EphemeralCluster, gateway: RunningGateway) -> None:
    sql = (
        "SELECT g AS id, g * 1.5 AS half, repeat('x', g % 7) AS text, "
        "CASE WHEN g % 3 = 0 THEN NULL ELSE g END AS maybe, "
        "timestamptz '2024-02-29 12:34:56+00' + g * interval '1 hour' AS ts, "
        "ARRAY[g, g + 1] AS arr, jsonb_build_object('g', g) AS doc "
        "FROM generate_series(1, 50) g ORDER BY g"
    )
    through = run_psql(gateway.dsn(), "-v", "ON_ERROR_STOP=1", "-c", sql)
    direct = run_psql(pg.dsn(), "-v", "ON_ERROR_STOP=1", "-c", sql)
    assert through.returncode == 0, through.stderr
    assert_same(through, direct)
    assert "(50 rows)" in through.stdout


def test_several_statements_in_one_command(pg: EphemeralCluster, gateway: RunningGateway) -> None:
    table = unique_name("psql_multi")
    sql = (
        f"CREATE TEMP TABLE {table} (id int, v text); "
        f"INSERT INTO {table} SELECT g, md5(g::text) FROM generate_series(1, 20) g; "
        f"SELECT count(*) AS n, min(v) AS lo FROM {table}; "
        "SELECT 'second' AS label; "
        f"UPDATE {table} SET v = 'x' WHERE id <= 5; "
        f"SELECT id, v FROM {table} WHERE id <= 6 ORDER BY id"
    )
    args = ("-v", "ON_ERROR_STOP=1", "-c", sql, "-c", "SELECT 42 AS answer")
    through = run_psql(gateway.dsn(), *args)
    direct = run_psql(pg.dsn(), *args)
    assert through.returncode == 0, through.stderr
    assert_same(through, direct)
    assert "second" in through.stdout and "answer" in through.stdout

    # psql's own statement features: \gdesc describes through the extended protocol
    # (Parse, Describe, Sync); \gset and \gexec feed results back into psql.
    script = (
        "SELECT 1::int AS a, 'x'::text AS b, now() AS c \\gdesc\n"
        "SELECT 7 AS seven \\gset\n"
        "SELECT :seven * 6 AS from_gset;\n"
        "SELECT format('SELECT %s AS generated', g) FROM generate_series(1, 3) g \\gexec\n"
    )
    through = run_psql(gateway.dsn(), "-v", "ON_ERROR_STOP=1", input=script)
    direct = run_psql(pg.dsn(), "-v", "ON_ERROR_STOP=1", input=script)
    assert through.returncode == 0, through.stderr
    assert_same(through, direct)
    assert "timestamp with time zone" in through.stdout  # \gdesc
    assert "        42\n" in through.stdout  # \gset
    assert through.stdout.count("generated") == 3  # \gexec


def test_copy_from_stdin_and_to_stdout(pg: EphemeralCluster, gateway: RunningGateway) -> None:
    table = unique_name("psql_copy")
    pg.psql(f"CREATE TABLE {table} (id int PRIMARY KEY, name text, note text)")
    pg.psql(f"GRANT ALL ON {table} TO qw_scram")
    # COPY text format: \N is NULL, \t a tab inside a value, \\ a backslash.
    lines = [
        f"{i}\tname {i}\t" + ("\\N" if i % 10 == 0 else f"tab\\there {i} \\\\ back")
        for i in range(1, 5001)
    ]
    data = "\n".join(lines) + "\n"
    with dropping(pg, table):
        script = f"\\copy {table} FROM stdin\n{data}\\.\nSELECT count(*) FROM {table};\n"
        loaded = run_psql(gateway.dsn(), "-v", "ON_ERROR_STOP=1", "-At", input=script)
        assert loaded.returncode == 0, loaded.stderr
        assert loaded.stdout.splitlines() == ["COPY 5000", "5000"]
        stats = pg.psql(
            f"SELECT count(*), sum(id), count(note), "
            "count(*) FILTER (WHERE note = 'tab' || chr(9) || 'here ' || id || ' ' "
            f"|| chr(92) || ' back') FROM {table}"
        )
        assert stats == "5000|12502500|4500|4500"

        out_args = (
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            f"\\copy (SELECT * FROM {table} ORDER BY id) TO stdout",
        )
        through = run_psql(gateway.dsn(), *out_args)
        direct = run_psql(pg.dsn(), *out_args)
        assert through.returncode == 0, through.stderr
        assert_same(through, direct)
        assert through.stdout == data

        csv_args = (
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            f"\\copy (SELECT id, note FROM {table} WHERE id <= 100 ORDER BY id) "
            "TO stdout WITH (FORMAT csv, HEADER)",
        )
        through = run_psql(gateway.dsn(), *csv_args)
        direct = run_psql(pg.dsn(), *csv_args)
        assert through.returncode == 0, through.stderr
        assert_same(through, direct)
        assert through.stdout.count("\n") == 101


def test_describe_table(pg: EphemeralCluster, gateway: RunningGateway) -> None:
    parent = unique_name("psql_parent")
    child = unique_name("psql_child")
    pg.psql(
        f"CREATE TABLE {parent} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
        "code text NOT NULL UNIQUE); "
        f"CREATE TABLE {child} (id serial PRIMARY KEY, "
        f"parent_id bigint NOT NULL REFERENCES {parent}(id) ON DELETE CASCADE, "
        "amount numeric(12,2) DEFAULT 0 CHECK (amount >= 0), "
        "tags text[], created timestamptz DEFAULT now()); "
        f"CREATE INDEX {child}_parent_idx ON {child} (parent_id, created DESC); "
        f"COMMENT ON COLUMN {child}.amount IS 'money'; "
        f"ALTER TABLE {parent} OWNER TO qw_scram; ALTER TABLE {child} OWNER TO qw_scram"
    )
    with dropping(pg, child, parent):
        for command in (f"\\d {child}", f"\\d+ {child}", f"\\d {parent}", "\\dt", "\\di"):
            through = run_psql(gateway.dsn(), "-v", "ON_ERROR_STOP=1", "-c", command)
            direct = run_psql(pg.dsn(), "-v", "ON_ERROR_STOP=1", "-c", command)
            assert through.returncode == 0, through.stderr
            assert_same(through, direct)
        described = run_psql(gateway.dsn(), "-c", f"\\d {child}").stdout
        assert f"{child}_parent_idx" in described
        assert "Foreign-key constraints:" in described


def test_error_inside_transaction(pg: EphemeralCluster, gateway: RunningGateway) -> None:
    script = (
        "\\set VERBOSITY verbose\n"
        "BEGIN;\n"
        "SELECT 1 AS before;\n"
        "SELECT 1/0;\n"
        "SELECT 2 AS after_error;\n"
        "ROLLBACK;\n"
        "SELECT 3 AS after_rollback;\n"
    )
    through = run_psql(gateway.dsn(), input=script)
    direct = run_psql(pg.dsn(), input=script)
    assert_same(through, direct)
    assert through.returncode == 0
    assert "22012: division by zero" in through.stderr
    assert "25P02: current transaction is aborted" in through.stderr
    assert "after_rollback" in through.stdout

    # With ON_ERROR_STOP psql stops at the error and exits with status 3.
    through = run_psql(gateway.dsn(), "-v", "ON_ERROR_STOP=1", input=script)
    direct = run_psql(pg.dsn(), "-v", "ON_ERROR_STOP=1", input=script)
    assert_same(through, direct)
    assert through.returncode == 3

    # All in one -c (one simple Query): the error aborts the rest; exit status 1.
    one = "BEGIN; SELECT 1/0; SELECT 2; ROLLBACK"
    through = run_psql(gateway.dsn(), "-c", one)
    direct = run_psql(pg.dsn(), "-c", one)
    assert_same(through, direct)
    assert through.returncode == 1


def test_cancel_with_sigint(pg: EphemeralCluster, gateway: RunningGateway) -> None:
    marker = unique_name("cancel_me")
    sql = f"SELECT pg_sleep(30) AS {marker}"
    started = time.monotonic()
    proc = subprocess.Popen(
        ["psql", gateway.dsn(), "-X", "-c", sql],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=client_env(),
    )
    try:
        # Wait until the statement is really running upstream, then interrupt psql.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            active = pg.psql(
                "SELECT count(*) FROM pg_stat_activity "
                f"WHERE state = 'active' AND query LIKE '%{marker}%' AND pid <> pg_backend_pid()"
            )
            if active == "1":
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the pg_sleep statement never became active upstream")
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    elapsed = time.monotonic() - started
    assert "canceling statement due to user request" in stderr, (stdout, stderr)
    assert proc.returncode == 1
    assert elapsed < 20
    still_running = pg.psql(
        "SELECT count(*) FROM pg_stat_activity "
        f"WHERE state = 'active' AND query LIKE '%{marker}%' AND pid <> pg_backend_pid()"
    )
    assert still_running == "0"


def test_large_objects_use_function_calls(
    pg: EphemeralCluster, gateway: RunningGateway, tmp_path: Path
) -> None:
    """\\lo_import and \\lo_export go through libpq's fast-path FunctionCall messages."""
    source = tmp_path / "source.bin"
    payload = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and a bit: several lo_write calls
    source.write_bytes(payload)
    exported = tmp_path / "exported.bin"
    imported = run_psql(
        gateway.dsn(), "-v", "ON_ERROR_STOP=1", "-c", f"\\lo_import {source} 'from gateway'"
    )
    assert imported.returncode == 0, imported.stderr
    match = re.fullmatch(r"lo_import (\d+)\n", imported.stdout)
    assert match, imported.stdout
    oid = match[1]
    try:
        assert pg.psql(f"SELECT md5(lo_get({oid}))") == hashlib.md5(payload).hexdigest()
        script = f"\\lo_export {oid} {exported}\n\\lo_list\nSELECT lo_unlink({oid});\n"
        through = run_psql(gateway.dsn(), "-v", "ON_ERROR_STOP=1", input=script)
        assert through.returncode == 0, through.stderr
        assert exported.read_bytes() == payload
        assert "from gateway" in through.stdout
        # The same export and listing directly (the object is gone by now: same error).
        direct = run_psql(pg.dsn(), "-v", "ON_ERROR_STOP=1", input=script)
        again = run_psql(gateway.dsn(), "-v", "ON_ERROR_STOP=1", input=script)
        assert_same(again, direct)
        assert again.returncode == 3
    finally:
        pg.psql(f"SELECT lo_unlink(oid) FROM pg_largeobject_metadata WHERE oid = {oid}")


def test_notices_empty_queries_and_copy_errors(
    pg: EphemeralCluster, gateway: RunningGateway
) -> None:
    table = unique_name("psql_copy_err")
    pg.psql(
        f"CREATE TABLE {table} (id int PRIMARY KEY, v text); ALTER TABLE {table} OWNER TO qw_scram"
    )
    good = "".join(f"{i}\tv{i}\n" for i in range(1, 20001))
    script = (
        "\\set VERBOSITY verbose\n"
        "DO $$ BEGIN RAISE NOTICE 'note %', 1; RAISE WARNING 'careful'; END $$;\n"
        ";\n"
        "SELECT 'after empty' AS label;\n"
        f"\\copy {table} FROM stdin\n{good}oops\tnot a number\n{good}\\.\n"
        f"SELECT count(*) AS after_failed_copy FROM {table};\n"
        f"\\copy {table} FROM stdin\n1\tfirst\n1\tduplicate\n\\.\n"
        f"SELECT count(*) AS after_duplicate FROM {table};\n"
        f"\\copy {table} FROM stdin\n{good}\\.\n"
        f"SELECT count(*) AS loaded FROM {table};\n"
    )
    with dropping(pg, table):
        through = run_psql(gateway.dsn(), input=script)
        pg.psql(f"TRUNCATE {table}")
        direct = run_psql(pg.dsn(), input=script)
    assert_same(through, direct)
    assert "NOTICE:  00000: note 1" in through.stderr
    assert "WARNING:  01000: careful" in through.stderr
    assert 'invalid input syntax for type integer: "oops"' in through.stderr
    assert "duplicate key value violates unique constraint" in through.stderr
    assert "after empty" in through.stdout
    assert through.stdout.count(" 0\n") == 2 and " 20000\n" in through.stdout


def test_backend_termination_reported_like_direct(
    pg: EphemeralCluster, gateway: RunningGateway
) -> None:
    """When the server ends the session with FATAL, psql reports it as it does directly.

    The direct connection is made without TLS, like the one to the gateway, so that
    libpq's own words about the closed connection are the same on both sides.
    """
    script = "SELECT 1 AS before;\nSELECT pg_terminate_backend(pg_backend_pid());\nSELECT 2;\n"
    through = run_psql(gateway.dsn(), input=script)
    direct = run_psql(pg.dsn() + " sslmode=disable", input=script)
    assert (through.returncode, through.stdout) == (direct.returncode, direct.stdout)
    assert through.returncode == 2
    # The server's FATAL comes first, as directly. After it the gateway deliberately adds
    # a FATAL of its own saying the upstream is gone (see test_robustness.py); apart from
    # that line psql prints the same.
    through_lines = through.stderr.splitlines()
    assert through_lines[0] == "FATAL:  terminating connection due to administrator command"
    assert through_lines[0] == direct.stderr.splitlines()[0]
    own = [line for line in through_lines if "upstream database was lost" in line]
    assert len(own) <= 1
    assert [line for line in through_lines if line not in own] == direct.stderr.splitlines()
