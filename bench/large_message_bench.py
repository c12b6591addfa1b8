"""Large messages and everyone else: how much one huge message delays another session.

One gateway process (the masking policy of bench/masking_bench.py) serves a prober, an
exempt session running ``SELECT 1`` back to back, while another client

* sends a 60 MB Query (``SELECT length('xxx...')``), and
* receives one 32 MiB DataRow in a masked session (``SELECT repeat('x', 32 MiB)``).

It reports the prober's worst and 99th-percentile latency during each load next to its
latency with no load, and how long the load itself took. The target: a 60 MB Query adds
no more than 50 ms to another session's latency.

The Query is run twice: through the policy gateway, where the policy's analysis of 60 MB
of SQL is part of the cost, and through the same settings with an allow-all gate (a child
process of this script), which measures the relay alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from masking_bench import start_masking_gateway
from querywarden import codec, devcluster
from querywarden.cli import run_event_loop
from querywarden.config import GatewaySettings
from querywarden.hooks import AllowAll
from querywarden.server import Gateway
from run import DATABASE, log, stop_process, terminate_on_sigterm, wait_ready

QUERY_BYTES = 60 * 1024 * 1024
ROW_BYTES = 32 * 1024 * 1024
ADDED_LATENCY_TARGET_MS = 50.0


def dsn(port: int, user: str, token: str) -> str:
    return (
        f"host=127.0.0.1 port={port} dbname={DATABASE} user={user} password={token} "
        "sslmode=disable connect_timeout=10"
    )


class Prober:
    """``SELECT 1`` back to back on its own connection, each latency recorded."""

    def __init__(self, conninfo: str) -> None:
        self.conn = psycopg.connect(conninfo, autocommit=True)
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            self.conn.execute("SELECT 1").fetchone()
            self.latencies.append(time.perf_counter() - started)

    def during(self, load: Callable[[], None]) -> dict[str, float]:
        """Probe while ``load`` runs; the latency figures in milliseconds."""
        self.latencies = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        started = time.perf_counter()
        load()
        took = time.perf_counter() - started
        self._stop.set()
        self._thread.join()
        ms = sorted(x * 1000 for x in self.latencies)
        return {
            "load_seconds": round(took, 3),
            "probes": len(ms),
            "median_ms": round(statistics.median(ms), 2),
            "p99_ms": round(ms[int(len(ms) * 0.99) - 1] if len(ms) > 1 else ms[0], 2),
            "max_ms": round(ms[-1], 2),
        }


def serve_allow_all(config: Path) -> None:
    """The gateway of ``config`` with an allow-all gate, until killed (the child mode)."""

    settings = GatewaySettings(**yaml.safe_load(config.read_text()))

    async def run() -> None:
        gateway = Gateway(settings, gate=AllowAll())
        await gateway.start()
        await asyncio.Event().wait()

    run_event_loop(run())


def run_raw(port: int, user: str, token: str, query: bytes) -> None:
    """Log in and run one prebuilt Query over a plain socket.

    A driver would build and parse the big message in this process, holding the GIL the
    prober thread needs: the figures would measure the client, not the gateway.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        reader = codec.FrameReader(1 << 30)

        def until(mtype: bytes) -> list[bytes]:
            frames = []
            while True:
                frame = reader.next_frame()
                if frame is None:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        raise RuntimeError(f"gateway closed the connection; got {frames!r}")
                    reader.feed(chunk)
                    continue
                frames.append(frame[1])
                if frame[1][:1] == b"E":
                    raise RuntimeError(codec.decode_fields(frame[1]).get("M"))
                if frame[1][:1] in mtype:
                    return frames

        sock.sendall(codec.startup_message({"user": user, "database": DATABASE}))
        until(b"R")
        sock.sendall(codec.password_message(token.encode() + b"\0"))
        until(b"Z")
        sock.sendall(query)
        until(b"Z")
        sock.sendall(codec.TERMINATE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--native",
        choices=("auto", "on", "off"),
        default="auto",
        help="the gateway's performance.native (the compiled row masker)",
    )
    parser.add_argument("--serve-allow-all", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_allow_all:
        serve_allow_all(args.serve_allow_all)
        return 0
    with terminate_on_sigterm(), contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="querywarden-largebench-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        cluster = devcluster.EphemeralCluster.create(ssl=False)
        stack.callback(cluster.stop)
        cluster.start()
        cluster.psql(
            "CREATE TABLE qm_bench (id int, name text, ssn text, email text);"
            "GRANT SELECT ON qm_bench TO PUBLIC;"
        )
        proc, port, tokens = start_masking_gateway(workdir, cluster, "gateway", args.native)
        stack.callback(stop_process, proc, "gateway")
        wait_ready(proc, "gateway", port, [workdir / "gateway.log"])
        exempt = dsn(port, "bench-exempt", tokens["bench-exempt"])
        prober = Prober(exempt)
        stack.callback(prober.conn.close)
        big_query = codec.query("SELECT length('" + "x" * (QUERY_BYTES - 40) + "')")
        row_query = codec.query(f"SELECT repeat('x', {ROW_BYTES})")

        def send_query() -> None:
            run_raw(port, "bench-exempt", tokens["bench-exempt"], big_query)

        def receive_row() -> None:
            run_raw(port, "bench", tokens["bench"], row_query)

        results: dict[str, Any] = {
            "idle": [],
            "query_60mb_policy": [],
            "masked_row_32mib": [],
            "query_60mb_relay": [],
        }
        for _ in range(args.repeats):
            results["idle"].append(prober.during(lambda: time.sleep(2)))
            results["query_60mb_policy"].append(prober.during(send_query))
            results["masked_row_32mib"].append(prober.during(receive_row))
        prober.conn.close()
        stop_process(proc, "gateway")
        # The same settings with an allow-all gate: the relay's own cost.
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve-allow-all", str(workdir / "gateway.yaml")],
            start_new_session=True,
        )
        stack.callback(stop_process, child, "allow-all gateway")
        wait_ready(child, "allow-all gateway", port, [])
        prober = Prober(exempt)
        stack.callback(prober.conn.close)
        for _ in range(args.repeats):
            results["query_60mb_relay"].append(prober.during(send_query))
        for name, runs in results.items():
            for run in runs:
                log(f"{name:<18} {run}")
    idle_max = statistics.median(r["max_ms"] for r in results["idle"])
    summary = {
        name: {
            "median_max_ms": statistics.median(r["max_ms"] for r in runs),
            "median_load_seconds": statistics.median(r["load_seconds"] for r in runs),
        }
        for name, runs in results.items()
    }
    print(json.dumps(summary, indent=2))
    for name in ("query_60mb_relay", "query_60mb_policy"):
        added = summary[name]["median_max_ms"] - idle_max
        verdict = "met" if added <= ADDED_LATENCY_TARGET_MS else "NOT met"
        print(
            f"{name}: a 60 MB Query adds {added:.1f} ms to another session's worst latency "
            f"(target {ADDED_LATENCY_TARGET_MS:.0f} ms): {verdict}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
