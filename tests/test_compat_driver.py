"""`make compat`'s driver on a small real run: one pgx test and one node-postgres script,
each directly and through a real gateway (`querywarden serve`) with the audit log on.

The suites come from their registries (scripts/fetch-compat.sh; nothing to do when they
are cached). The figures of a whole run are in docs/compatibility.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PGCONN = "github.com/jackc/pgx/v5/pgconn"


@pytest.mark.slow
@pytest.mark.postgres
def test_a_small_real_run_is_parsed_and_compared(tmp_path: Path) -> None:
    subprocess.run(["bash", str(ROOT / "scripts/fetch-compat.sh")], check=True, timeout=600)
    out = tmp_path / "compat.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "compat/run.py"),
            "--mode",
            "audit-on",
            "--pgx-package",
            "./pgconn",
            "--pgx-run",
            "^TestConnect$",
            "--node-file",
            "test/integration/client/simple-query-tests.js",
            "--work",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    pgx, node = figures["comparisons"]

    # TestConnect has one subtest per kind of connection string; only the TCP one is
    # configured, the others skip themselves (both ways, so they are not compared).
    assert (pgx["suite"], pgx["mode"]) == ("pgx", "audit-on")
    assert pgx["direct"] == {"passed": 2, "failed": 0, "skipped": 4}
    assert pgx["through"] == pgx["direct"]
    assert pgx["ratio"] == 1.0
    assert pgx["only_direct"] == []

    # One script, run as text and as binary (the suite's test-integration, test-binary).
    assert (node["suite"], node["direct"]["passed"] + node["direct"]["failed"]) == (
        "node-postgres",
        2,
    )
    assert node["through"]["passed"] == node["direct"]["passed"] > 0
    assert node["only_direct"] == []

    # The audit-on gateway wrote the sessions it served.
    assert any((tmp_path / "work/gateway-pgx-audit-on/audit").iterdir())
    table = result.stdout
    rows = [line.split() for line in table.splitlines()]
    assert ["pgx", "audit-on", "2", "2", "100.0%"] in rows
    assert "pgx, audit-on: 0 pass only directly" in table
    assert f"{PGCONN} TestConnect/TCP" not in table
