"""Masking throughput: a million rows with two masked columns, against the same rows
unmasked through the gateway and directly from PostgreSQL, in one run.

Two gateway processes with the same policy, one masking rows with the compiled row masker
(``performance.native: on``) and one with the pure-Python reference (``off``), serve two
identities: ``bench`` (masked: ``ssn`` partial, ``email`` email strategy, plus the content
detectors) and ``bench-exempt`` (in the policy's exemption: the same relay and policy
checks, no masking). psql reads ``SELECT id, name, ssn, email FROM qm_bench`` (1,000,000
rows) to /dev/null, alternating targets; each gateway's peak RSS growth is measured as in
bench/run.py.
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
    RSS_TARGET_MB,
    UPSTREAM_USER,
    RssSampler,
    Target,
    background_load,
    log,
    proc_status_kb,
    reset_peak_rss,
    spawn_gateway,
    stop_process,
    terminate_on_sigterm,
    wait_ready,
)

ROWS = 1_000_000
QUERY = "SELECT id, name, ssn, email FROM qm_bench"
THROUGHPUT_TARGET = 0.5


def start_masking_gateway(
    workdir: Path, cluster: devcluster.EphemeralCluster, name: str, native: str
) -> tuple[subprocess.Popen[bytes], int, dict[str, str]]:
    """``querywarden serve`` with a masking policy; return it, its port and two tokens."""
    key_file = workdir / "dev-issuer.pem"
    tokens = {
        user: mint_token(user, ttl=3000, key_file=key_file) for user in ("bench", "bench-exempt")
    }
    policy = {
        "identity": {"issuers": [{"name": "bench", "kind": "dev", "keyFile": str(key_file)}]},
        "rules": [
            {
                "name": "bench-read",
                "subjects": {"users": ["bench", "bench-exempt"]},
                "allow": {"operations": ["select"], "tables": ["public.*", "pg_catalog.*"]},
            }
        ],
        "masking": {
            "columns": [
                {"table": "public.qm_bench", "column": "ssn", "strategy": "partial", "keepLast": 4},
                {"table": "public.qm_bench", "column": "email", "strategy": "email"},
            ],
            "detectors": ["ssn", "credit_card", "api_key", "jwt", "private_key", "email"],
            "exempt": {"users": ["bench-exempt"]},
        },
    }
    (workdir / "policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    proc, port = spawn_gateway(
        workdir,
        cluster,
        name,
        {"policyFile": str(workdir / "policy.yaml"), "performance": {"native": native}},
    )
    return proc, port, tokens


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (other work on the machine shows here too)."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def read_all(psql: Path, target: Target) -> dict[str, Any]:
    """Read the million rows with psql into /dev/null; time it and the gateway's memory."""
    pid = target.pid
    before = proc_status_kb(pid)["VmRSS"] if pid else 0
    hwm = reset_peak_rss(pid) if pid else False
    sampler = RssSampler(pid) if pid else contextlib.nullcontext()
    with sampler:
        start = time.perf_counter()
        result = subprocess.run(
            [str(psql), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", QUERY],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=target.env(),
            timeout=900,
            check=False,
        )
        seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"psql via {target.name} failed: {result.stderr}")
    run: dict[str, Any] = {"target": target.name, "seconds": round(seconds, 3)}
    if pid:
        assert isinstance(sampler, RssSampler)
        peak = max(proc_status_kb(pid)["VmHWM"] if hwm else 0, sampler.peak_kb)
        run["rss_growth_mb"] = round((peak - before) / 1024, 1)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="reads per target")
    parser.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    started = datetime.now(UTC)
    with terminate_on_sigterm(), contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="querywarden-maskbench-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        cluster = devcluster.EphemeralCluster.create(ssl=False)
        stack.callback(cluster.stop)
        cluster.start()
        psql = cluster.bindir / "psql"
        load = background_load()
        loadavg_before = loadavg()
        log(f"background CPU load: {load:.0%}; seeding {ROWS} rows ...")
        cluster.psql(
            "CREATE TABLE qm_bench (id int, name text, ssn text, email text);"
            "INSERT INTO qm_bench SELECT g, 'customer ' || g, "
            "lpad((g % 900 + 100)::text, 3, '0') || '-' || lpad((g % 99 + 1)::text, 2, '0') "
            "|| '-' || lpad((g % 9999 + 1)::text, 4, '0'), 'user' || g || '@example.com' "
            f"FROM generate_series(1, {ROWS}) g;"
            "GRANT SELECT ON qm_bench TO PUBLIC;"
        )
        cluster.psql("VACUUM ANALYZE qm_bench")
        proc, port, tokens = start_masking_gateway(workdir, cluster, "gateway", "on")
        stack.callback(stop_process, proc, "gateway")
        wait_ready(proc, "gateway", port, [workdir / "gateway.log"])
        ref, ref_port, _ = start_masking_gateway(workdir, cluster, "gateway-python", "off")
        stack.callback(stop_process, ref, "gateway-python")
        wait_ready(ref, "gateway-python", ref_port, [workdir / "gateway-python.log"])
        targets = [
            Target("direct", cluster.port, UPSTREAM_USER, devcluster.ROLE_PASSWORD),
            Target("unmasked", port, "bench-exempt", tokens["bench-exempt"], proc.pid),
            Target("masked", port, "bench", tokens["bench"], proc.pid),
            Target("masked-python", ref_port, "bench", tokens["bench"], ref.pid),
        ]
        runs: list[dict[str, Any]] = []
        for i in range(args.repeats):
            order = targets if i % 2 == 0 else list(reversed(targets))
            for target in order:
                run = read_all(psql, target)
                runs.append(run)
                log(f"{target.name:<13} {run['seconds']:.2f} s  {run.get('rss_growth_mb', '')}")
        load_after = background_load()
        loadavg_after = loadavg()
    names = [t.name for t in targets]
    medians = {t: statistics.median(r["seconds"] for r in runs if r["target"] == t) for t in names}
    growths = {
        t: max(r.get("rss_growth_mb", 0.0) for r in runs if r["target"] == t) for t in names[1:]
    }
    growth = max(growths.values())
    ratio = medians["unmasked"] / medians["masked"]
    summary = {
        "started": started.isoformat(timespec="seconds"),
        "rows": ROWS,
        "median_seconds": medians,
        "masked_throughput_vs_unmasked": round(ratio, 3),
        "reference_masked_throughput_vs_unmasked": round(
            medians["unmasked"] / medians["masked-python"], 3
        ),
        "peak_rss_growth_mb": growths,
        "background_load": load,
        "background_load_after": load_after,
        "loadavg_before": loadavg_before,
        "loadavg_after": loadavg_after,
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    verdict = "met" if ratio >= THROUGHPUT_TARGET else "NOT met"
    print(
        f"masked throughput {ratio:.2f} x unmasked (target {THROUGHPUT_TARGET}): {verdict}; "
        f"reference {summary['reference_masked_throughput_vs_unmasked']:.2f} x; "
        f"peak RSS growth {growth} MB (target < {RSS_TARGET_MB})"
    )
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"{started.strftime('%Y%m%dT%H%M%SZ')}-masking.json"
    out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
