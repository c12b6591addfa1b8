"""psql through the gateway returns what it returns directly."""

from __future__ import annotations

from client_helpers import run_psql
from gateway_harness import RunningGateway
from querywarden.devcluster import EphemeralCluster


def test_psql_query_matches_direct(pg: EphemeralCluster, gateway: RunningGateway) -> None:
    sql = "SELECT g, md5(g::text) FROM generate_series(1, 500) g ORDER BY g"
    options = ("-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql)
    through = run_psql(gateway.dsn(), *options)
    direct = run_psql(pg.dsn(), *options)
    assert through.returncode == 0, through.stderr
    assert through.stdout == direct.stdout
    assert through.stdout.count("\n") == 500
