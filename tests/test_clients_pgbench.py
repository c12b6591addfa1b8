"""pgbench through the gateway: concurrent clients, all three query modes, no failures.

The pgbench tables live in a database of their own, initialised directly; every run
goes through the gateway. TPC-B keeps the sums of the account, teller and branch
balances and of the history deltas equal, which checks that every transaction was
applied exactly once.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client_helpers import client_env, unique_name
from gateway_harness import RunningGateway
from querywarden.devcluster import EphemeralCluster

CLIENTS, THREADS, TRANSACTIONS = 4, 2, 200


def pgbench(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["pgbench", *args, dsn],
        capture_output=True,
        text=True,
        timeout=120,
        env=client_env(),
    )


@pytest.fixture(scope="module")
def bench_db(pg: EphemeralCluster) -> Iterator[str]:
    """A database with the pgbench tables at scale 1, initialised directly."""
    name = unique_name("pgbench")
    pg.psql(f"CREATE DATABASE {name} OWNER qw_scram", database="postgres")
    try:
        init = pgbench(pg.dsn(database=name), "-i", "-s", "1", "-q")
        assert init.returncode == 0, init.stderr
        yield name
    finally:
        pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", database="postgres")


def balances(pg: EphemeralCluster, database: str) -> tuple[int, ...]:
    """(sum of accounts, tellers, branches, history deltas, history rows)."""
    out = pg.psql(
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts), "
        "(SELECT sum(tbalance) FROM pgbench_tellers), "
        "(SELECT sum(bbalance) FROM pgbench_branches), "
        "(SELECT coalesce(sum(delta), 0) FROM pgbench_history), "
        "(SELECT count(*) FROM pgbench_history)",
        database=database,
    )
    return tuple(int(v) for v in out.split("|"))


def assert_clean_run(result: subprocess.CompletedProcess[str]) -> None:
    assert_clean_run_count(result, CLIENTS * TRANSACTIONS)


def assert_clean_run_count(result: subprocess.CompletedProcess[str], total: int) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"number of transactions actually processed: {total}/{total}" in result.stdout, (
        result.stdout
    )
    assert re.search(r"^number of failed transactions: 0 \(", result.stdout, re.M), result.stdout
    assert "error" not in result.stderr.lower(), result.stderr


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_tpcb_through_gateway(
    pg: EphemeralCluster, gateway: RunningGateway, bench_db: str, mode: str
) -> None:
    before = balances(pg, bench_db)
    result = pgbench(
        gateway.dsn(database=bench_db),
        "-n",
        "-c",
        str(CLIENTS),
        "-j",
        str(THREADS),
        "-t",
        str(TRANSACTIONS),
        "-M",
        mode,
    )
    assert_clean_run(result)
    assert f"query mode: {mode}" in result.stdout
    accounts, tellers, branches, deltas, history = balances(pg, bench_db)
    assert accounts == tellers == branches == deltas
    assert history == before[4] + CLIENTS * TRANSACTIONS


TRANSFER_SCRIPT = r"""
\set a random(1, 100000 * :scale)
\set b random(1, 100000 * :scale)
\set lo least(:a, :b)
\set hi greatest(:a, :b)
\set amount random(1, 500)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance - :amount WHERE aid = :lo;
UPDATE pgbench_accounts SET abalance = abalance + :amount WHERE aid = :hi;
SELECT abalance FROM pgbench_accounts WHERE aid IN (:lo, :hi) ORDER BY aid;
INSERT INTO transfer_log (client, amount) VALUES (:client_id, :amount);
END;
SELECT count(*) FROM transfer_log WHERE client = :client_id;
"""


@pytest.mark.parametrize("mode", ["simple", "prepared"])
def test_custom_script_keeps_balances_consistent(
    pg: EphemeralCluster,
    gateway: RunningGateway,
    bench_db: str,
    mode: str,
    tmp_path: Path,
) -> None:
    pg.psql(
        "DROP TABLE IF EXISTS transfer_log; "
        "CREATE TABLE transfer_log (id bigserial PRIMARY KEY, client int, amount int); "
        "ALTER TABLE transfer_log OWNER TO qw_scram",
        database=bench_db,
    )
    before = balances(pg, bench_db)
    script = tmp_path / "transfer.sql"
    script.write_text(TRANSFER_SCRIPT)
    result = run_script(gateway, bench_db, script, mode)
    assert_clean_run(result)
    # Transfers move money between accounts: every sum stays what it was.
    assert balances(pg, bench_db) == before
    per_client = pg.psql(
        "SELECT string_agg(client || ':' || n, ',' ORDER BY client) "
        "FROM (SELECT client, count(*) AS n FROM transfer_log GROUP BY client) c",
        database=bench_db,
    )
    assert per_client == ",".join(f"{c}:{TRANSACTIONS}" for c in range(CLIENTS))


def test_initialise_through_gateway(
    pg: EphemeralCluster, gateway: RunningGateway, bench_db: str
) -> None:
    """pgbench -i loads 100,000 accounts with COPY FROM STDIN through the gateway."""
    name = unique_name("pgbench_init")
    pg.psql(f"CREATE DATABASE {name} OWNER qw_scram", database="postgres")
    try:
        init = pgbench(gateway.dsn(database=name), "-i", "-s", "1", "-q")
        assert init.returncode == 0, init.stderr
        assert "done in" in init.stderr
        query = (
            "SELECT (SELECT count(*) FROM pgbench_accounts), "
            "(SELECT count(*) FROM pgbench_tellers), (SELECT count(*) FROM pgbench_branches), "
            "(SELECT md5(string_agg(aid || ':' || bid || ':' || filler, ',' ORDER BY aid)) "
            "FROM pgbench_accounts)"
        )
        through = pg.psql(query, database=name)
        # The directly initialised database had the same content before any run.
        expected = pg.psql(
            "SELECT 100000, 10, 1, (SELECT md5(string_agg(aid || ':' || bid || ':' || filler, "
            "',' ORDER BY aid)) FROM pgbench_accounts)",
            database=bench_db,
        )
        assert through == expected
        assert through.startswith("100000|10|1|")
    finally:
        pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", database="postgres")


def test_no_upstream_connections_left(
    pg: EphemeralCluster, gateway: RunningGateway, bench_db: str
) -> None:
    """Once pgbench has disconnected, the gateway holds no upstream backend for it."""
    result = pgbench(
        gateway.dsn(database=bench_db), "-n", "-S", "-c", "4", "-j", "2", "-t", "10", "-C"
    )
    assert_clean_run_count(result, 4 * 10)
    deadline = time.monotonic() + 10
    while True:
        left = pg.psql(
            f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{bench_db}' "
            "AND usename = 'qw_scram'"
        )
        if left == "0" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert left == "0"


PIPELINE_SCRIPT = r"""
\set a random(1, 100000 * :scale)
\set delta random(-500, 500)
\startpipeline
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :a;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = 1;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = 1 + :client_id;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime)
  VALUES (1 + :client_id, 1, :a, :delta, CURRENT_TIMESTAMP);
SELECT abalance FROM pgbench_accounts WHERE aid = :a;
\endpipeline
"""


@pytest.mark.parametrize("mode", ["extended", "prepared"])
def test_pipeline_script(
    pg: EphemeralCluster,
    gateway: RunningGateway,
    bench_db: str,
    mode: str,
    tmp_path: Path,
) -> None:
    """pgbench's \\startpipeline sends each transaction as one libpq pipeline."""
    before = balances(pg, bench_db)
    script = tmp_path / "pipeline.sql"
    script.write_text(PIPELINE_SCRIPT)
    result = run_script(gateway, bench_db, script, mode)
    assert_clean_run(result)
    accounts, tellers, branches, deltas, history = balances(pg, bench_db)
    assert accounts == tellers == branches == deltas
    assert history == before[4] + CLIENTS * TRANSACTIONS


def run_script(
    gateway: RunningGateway, database: str, script: Path, mode: str
) -> subprocess.CompletedProcess[str]:
    """A custom pgbench script through the gateway, every client its own transactions."""
    return pgbench(
        gateway.dsn(database=database),
        "-n",
        "-f",
        str(script),
        "-c",
        str(CLIENTS),
        "-j",
        str(THREADS),
        "-t",
        str(TRANSACTIONS),
        "-M",
        mode,
    )
