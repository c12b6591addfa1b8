#!/usr/bin/env python3
"""Cancel latency: from the client's CancelRequest to the server's "canceling statement".

For each target (PostgreSQL directly, the gateway, the gateway with its audit log on) and
two statements, a psycopg client calls ``conn.cancel_safe()`` and the script times how long
the statement takes to raise ``QueryCanceled`` after that call started:

* ``SELECT pg_sleep(30)``, cancelled once ``pg_stat_activity`` shows it active (the gateway
  is idle: this is the cost of the cancel path itself);
* a streaming ``COPY ... TO STDOUT``, cancelled 0.3 s into its output (the gateway's event
  loop is busy relaying; the rows already in the socket buffers arrive first).

Run ``.venv/bin/python bench/cancel_latency.py [--iterations N]``; figures in
bench/README.md ("Cancel latency").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the in-process gateway harness
try:
    import querywarden  # noqa: F401
except ImportError:  # not installed in this interpreter: use the source tree
    sys.path.insert(0, str(REPO / "proxy"))

import psycopg  # noqa: E402

from gateway_harness import gateway_settings, start_gateway  # noqa: E402
from querywarden.devcluster import EphemeralCluster  # noqa: E402

Connect = Callable[[], "psycopg.Connection[tuple[object, ...]]"]


def wait_until_active(admin: psycopg.Connection[tuple[object, ...]], marker: str) -> None:
    """Block until the server runs the statement tagged with ``marker``."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s",
            (f"%{marker}%",),
        ).fetchone()
        if row is not None and row[0]:
            return
        time.sleep(0.002)
    raise RuntimeError("the statement never started")


def cancel_sleep(connect: Connect, admin: psycopg.Connection[tuple[object, ...]], i: int) -> float:
    """Milliseconds from cancel_safe() to QueryCanceled for a running pg_sleep."""
    marker = f"cancel_bench_{i}_{time.monotonic_ns()}"
    outcome: list[float] = []
    with connect() as conn:

        def run() -> None:
            try:
                conn.execute(f"SELECT pg_sleep(30) /* {marker} */")
            except psycopg.errors.QueryCanceled:
                outcome.append(time.perf_counter())

        runner = threading.Thread(target=run)
        runner.start()
        wait_until_active(admin, marker)
        started = time.perf_counter()
        conn.cancel_safe()
        runner.join(35)
    if not outcome:
        raise RuntimeError("the cancel did not stop the statement")
    return (outcome[0] - started) * 1000


def cancel_copy(connect: Connect, admin: psycopg.Connection[tuple[object, ...]], i: int) -> float:
    """Milliseconds from cancel_safe() to QueryCanceled, 0.3 s into a COPY TO STDOUT.

    The event loop is busiest then (relaying the COPY), and the rows already on their way
    (socket buffers, two hops through the gateway) still reach the client first.
    """
    del admin, i
    copy = (
        "COPY (SELECT g, repeat('x', 100) FROM (SELECT generate_series(1, 100000000) g) s) "
        "TO STDOUT"
    )
    with connect() as conn:
        first: float | None = None
        started: float | None = None
        try:
            with conn.cursor().copy(copy) as stream:
                for _chunk in stream:
                    now = time.perf_counter()
                    first = first or now
                    if started is None and now - first > 0.3:
                        started = time.perf_counter()
                        conn.cancel_safe()
        except psycopg.errors.QueryCanceled:
            assert started is not None
            return (time.perf_counter() - started) * 1000
    raise RuntimeError("the COPY ran to its end")


Scenario = Callable[[Connect, "psycopg.Connection[tuple[object, ...]]", int], float]


def measure(connect: Connect, admin_dsn: str, scenario: Scenario, iterations: int) -> list[float]:
    """One fresh session per sample."""
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        return [scenario(connect, admin, i) for i in range(iterations)]


def summary(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    return (
        f"{name:<22} n={len(samples):<3} median {statistics.median(ordered):7.1f} ms"
        f"   p90 {ordered[int(0.9 * (len(ordered) - 1))]:7.1f} ms   max {ordered[-1]:7.1f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    cluster = EphemeralCluster.create()
    cluster.start()
    try:
        admin_dsn = cluster.dsn()
        audit_dir = Path(tempfile.mkdtemp(prefix="qw-cancel-bench-audit-"))
        targets = {
            "direct": None,
            "gateway": gateway_settings(cluster),
            "gateway+audit": gateway_settings(cluster, audit={"directory": str(audit_dir)}),
        }
        scenarios: dict[str, Scenario] = {"pg_sleep": cancel_sleep, "COPY": cancel_copy}
        for name, settings in targets.items():
            running = start_gateway(settings) if settings is not None else None
            dsn = running.dsn() if running is not None else admin_dsn

            def connect(dsn: str = dsn) -> psycopg.Connection[tuple[object, ...]]:
                return psycopg.connect(dsn, autocommit=True)

            try:
                for what, scenario in scenarios.items():
                    samples = measure(connect, admin_dsn, scenario, args.iterations)
                    print(summary(f"{name} {what}", samples), flush=True)
            finally:
                if running is not None:
                    running.stop()
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
