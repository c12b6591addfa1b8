"""psql through the gateway returns what it returns directly."""

from __future__ import annotations

import subprocess

from gateway_harness import RunningGateway
from querywarden.devcluster import EphemeralCluster


def run_psql(dsn: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", dsn, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", *args],
        capture_output=True,
        text=True,
        timeout=60,
        input=input,
    )


def test_psql_query_matches_direct(pg: EphemeralCluster, gateway: RunningGateway) -> None:
    sql = "SELECT g, md5(g::text) FROM generate_series(1, 500) g ORDER BY g"
    through = run_psql(gateway.dsn(), "-c", sql)
    direct = run_psql(pg.dsn(), "-c", sql)
    assert through.returncode == 0, through.stderr
    assert through.stdout == direct.stdout
    assert through.stdout.count("\n") == 500
