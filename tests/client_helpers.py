"""Small helpers shared by the client transparency tests (test_clients_*.py)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from querywarden.devcluster import DATABASE, ROLE_PASSWORD, EphemeralCluster


def unique_name(prefix: str) -> str:
    """A table (or channel) name no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def client_env() -> dict[str, str]:
    """Environment for client subprocesses: no stray libpq settings, fixed locale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({"LC_ALL": "C", "PGTZ": "UTC", "PGCONNECT_TIMEOUT": "10"})
    return env


def run_psql(
    dsn: str, *args: str, input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run psql (without ~/.psqlrc) against ``dsn``; further options in ``args``."""
    return subprocess.run(
        ["psql", dsn, "-X", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        env=client_env(),
    )


def direct_url(pg: EphemeralCluster, *, scheme: str = "postgresql") -> str:
    """A URL for a direct connection to the cluster as the gateway's upstream role."""
    return f"{scheme}://qw_scram:{ROLE_PASSWORD}@127.0.0.1:{pg.port}/{DATABASE}"


@contextmanager
def dropping(pg: EphemeralCluster, *tables: str) -> Iterator[None]:
    """Drop the given tables (directly, as superuser) when the block ends."""
    try:
        yield
    finally:
        pg.psql("; ".join(f"DROP TABLE IF EXISTS {t}" for t in tables))
