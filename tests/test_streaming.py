"""A one-million-row result streams through the gateway in bounded memory.

The gateway runs as its own process here so that its resident memory can be read from
/proc. This is a bound on memory, not on time: nothing here depends on machine speed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway_harness import DEV_KEY, token_for
from querywarden.devcluster import ROLE_PASSWORD, EphemeralCluster, free_port, wait_for_port

ROWS = 1_000_000
QUERY = f"SELECT g, repeat('x', 100) FROM generate_series(1, {ROWS}) g"


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not found")


@pytest.mark.slow
def test_million_row_select_streams_in_bounded_memory(pg: EphemeralCluster, tmp_path: Path) -> None:
    port = free_port()
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        f"identity: {{issuers: [{{name: dev, kind: dev, keyFile: {DEV_KEY}}}]}}\n"
        "rules: [{name: read, subjects: {users: [alice]}, allow: {operations: [select]}}]\n"
    )
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"listen: {{port: {port}}}\n"
        f"upstream: {{port: {pg.port}, user: qw_scram, password: {ROLE_PASSWORD}, "
        "sslmode: disable}\n"
        f"policyFile: {policy_file}\n"
    )
    gateway = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "querywarden",
            "--log-level",
            "WARNING",
            "serve",
            "--config",
            str(config),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port("127.0.0.1", port)
        dsn = f"host=127.0.0.1 port={port} dbname=app user=alice password={token_for('alice')}"
        # Warm up: imports, first connection, TLS-less upstream handshake.
        subprocess.run(["psql", dsn, "-X", "-c", "SELECT 1"], check=True, capture_output=True)
        before = rss_kib(gateway.pid, "VmRSS")
        # psql reads the whole result as fast as the server sends it; count its lines.
        result = subprocess.run(
            ["psql", dsn, "-X", "-A", "-t", "-c", QUERY],
            capture_output=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.count(b"\n") == ROWS
        peak = rss_kib(gateway.pid, "VmHWM")
    finally:
        gateway.terminate()
        gateway.communicate(timeout=15)
    growth_mib = (peak - before) / 1024
    print(f"gateway RSS growth: {growth_mib:.1f} MiB")
    # The result is about 110 MB on the wire; a buffering gateway would grow by that much.
    assert growth_mib < 64, f"gateway RSS grew by {growth_mib:.1f} MiB"
