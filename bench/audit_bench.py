"""Audit cost: ``pgbench -S`` through a gateway with the audit log on (batched fsync, OTLP
export to a real OpenTelemetry Collector) against the same gateway with audit off.

Both gateways run at once with the same policy, in front of one PostgreSQL; pgbench runs
against each in turn, rotating the order every round. The Collector is the one
``make tools`` builds (``~/.cache/querywarden/tools/bin/otelcol``), receiving OTLP/HTTP and
writing to a file; without it the export is off and the figures say so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from querywarden import devcluster
from querywarden.identity.dev import mint_token
from run import (
    UPSTREAM_USER,
    Target,
    background_load,
    log,
    parse_pgbench,
    spawn_gateway,
    start_collector,
    stop_process,
    terminate_on_sigterm,
    wait_ready,
)

TARGET_RATIO = 0.9


def start_gateway(
    workdir: Path, cluster: devcluster.EphemeralCluster, name: str, audit: dict[str, Any] | None
) -> tuple[subprocess.Popen[bytes], int, str]:
    """``querywarden serve`` with a realistic read-only policy, audit as given."""
    key_file = workdir / "dev-issuer.pem"
    token = mint_token("bench", ttl=3000, key_file=key_file)
    policy = {
        "identity": {"issuers": [{"name": "bench", "kind": "dev", "keyFile": str(key_file)}]},
        "rules": [
            {
                "name": "bench-read",
                "subjects": {"users": ["bench"]},
                "allow": {"operations": ["select"], "tables": ["public.*", "pg_catalog.*"]},
                "deny": {"tables": ["public.secrets"]},
            }
        ],
    }
    (workdir / "policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    extra: dict[str, Any] = {"policyFile": str(workdir / "policy.yaml")}
    if audit is not None:
        extra["audit"] = audit
    proc, port = spawn_gateway(workdir, cluster, name, extra)
    return proc, port, token


def pgbench(bin_dir: Path, target: Target, seconds: int) -> float:
    """tps of ``pgbench -n -S -c 8 -j 2`` against a target."""
    result = subprocess.run(
        [str(bin_dir / "pgbench"), "-n", "-S", "-c", "8", "-j", "2", "-T", str(seconds)],
        capture_output=True,
        text=True,
        env=target.env(),
        timeout=seconds + 120,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pgbench via {target.name} failed: {result.stderr}")
    return parse_pgbench(result.stdout)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    started = datetime.now(UTC)
    with terminate_on_sigterm(), contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="querywarden-auditbench-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        cluster = devcluster.EphemeralCluster.create(ssl=False)
        stack.callback(cluster.stop)
        cluster.start()
        bin_dir = cluster.bindir
        init = subprocess.run(
            [str(bin_dir / "pgbench"), "-i", "-q", "-s", "10"],
            capture_output=True,
            text=True,
            env=Target("direct", cluster.port, UPSTREAM_USER, devcluster.ROLE_PASSWORD).env(),
            check=False,
        )
        if init.returncode != 0:
            raise RuntimeError(init.stderr)
        collector, endpoint = start_collector(workdir)
        if collector is not None:
            stack.callback(stop_process, collector, "collector")
        audit = {"directory": str(workdir / "audit"), "fsync": "batch"}
        if endpoint:
            audit["otlpEndpoint"] = endpoint
        off_proc, off_port, token = start_gateway(workdir, cluster, "audit-off", None)
        stack.callback(stop_process, off_proc, "gateway (audit off)")
        on_proc, on_port, _ = start_gateway(workdir, cluster, "audit-on", audit)
        stack.callback(stop_process, on_proc, "gateway (audit on)")
        wait_ready(off_proc, "gateway (audit off)", off_port, [workdir / "audit-off.log"])
        wait_ready(on_proc, "gateway (audit on)", on_port, [workdir / "audit-on.log"])
        targets = [
            Target("audit-off", off_port, "bench", token, off_proc.pid),
            Target("audit-on", on_port, "bench", token, on_proc.pid),
        ]
        load = background_load()
        log(f"background load {load:.0%}; OTLP export: {endpoint or 'off (no Collector built)'}")
        for target in targets:
            pgbench(bin_dir, target, 3)  # warm-up
        tps: dict[str, list[float]] = {t.name: [] for t in targets}
        for i in range(args.rounds):
            for target in targets if i % 2 == 0 else list(reversed(targets)):
                value = pgbench(bin_dir, target, args.duration)
                tps[target.name].append(value)
                log(f"round {i + 1}: {target.name:<9} {value:,.0f} tps")
        time.sleep(2)  # let the exporter catch up before the log is measured
        records = sum(1 for _ in (workdir / "audit").glob("audit-*.jsonl"))
        audit_bytes = sum(f.stat().st_size for f in (workdir / "audit").glob("audit-*.jsonl"))
        spans_bytes = (workdir / "spans.jsonl").stat().st_size if endpoint else 0
    means = {name: statistics.mean(values) for name, values in tps.items()}
    ratio = means["audit-on"] / means["audit-off"]
    summary = {
        "started": started.isoformat(timespec="seconds"),
        "tps": tps,
        "mean_tps": means,
        "ratio": round(ratio, 3),
        "otlp": bool(endpoint),
        "segments": records,
        "audit_bytes": audit_bytes,
        "collector_file_bytes": spans_bytes,
        "background_load": load,
    }
    print(json.dumps(summary, indent=2))
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(f"audit on: {ratio:.2f} x audit-off tps (target {TARGET_RATIO}): {verdict}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"{started.strftime('%Y%m%dT%H%M%SZ')}-audit.json"
    out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
