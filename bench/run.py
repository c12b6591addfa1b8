#!/usr/bin/env python3
"""querywarden benchmark: the gateway against direct PostgreSQL and pgbouncer.

One run on one machine starts an ephemeral PostgreSQL, the gateway (``querywarden serve``,
a separate process) and pgbouncer (session pooling) in front of it, and then

* runs ``pgbench -n -S`` (simple and ``-M prepared``) against each of the three targets,
  interleaved and repeated to even out the noise of a shared machine;
* streams a one-million-row result through the gateway with ``psql`` and measures how
  much the gateway's resident memory grows meanwhile (and the time, against direct).

It prints a table and writes everything as JSON into ``bench/results/``. See
``bench/README.md`` for the figures and how to read them. Run it as ``make bench`` or
``.venv/bin/python bench/run.py --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pwd
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
try:
    from querywarden import devcluster
except ImportError:  # not installed in this interpreter: use the source tree
    sys.path.insert(0, str(REPO / "proxy"))
    from querywarden import devcluster

DATABASE = devcluster.DATABASE
UPSTREAM_USER = "qw_scram"
TOOLS = Path(os.environ.get("QUERYWARDEN_TOOLS_DIR", Path.home() / ".cache/querywarden/tools"))
BENCH_USER = "bench"
BENCH_PASSWORD = "bench-pw"
MODES = ("simple", "prepared")
STREAM_SQL = "SELECT g, repeat('x', 100) FROM generate_series(1, 1000000) g"
#: The project's targets.
TPS_TARGET_RATIO = 0.9
RSS_TARGET_MB = 64.0

_CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- small helpers -------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def postgres_owner() -> tuple[int, int] | None:
    """The uid/gid to run pgbouncer as: postgres when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid


def chown_tree(path: Path, owner: tuple[int, int] | None) -> None:
    if owner is None:
        return
    os.chown(path, *owner)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), *owner)


def cpu_seconds(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds a process has used so far (from /proc/PID/stat)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def tree_cpu_seconds(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds of a process and its live children (the gateway's audit
    exporter runs as one): what serving the benchmark costs, wherever it runs."""
    own = cpu_seconds(pid)
    if own is None:
        return None
    user, system = own
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == pid:
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:  # ppid
            user += int(fields[11]) / _CLK_TCK
            system += int(fields[12]) / _CLK_TCK
    return user, system


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


def background_load(seconds: float = 2.0) -> float:
    """Share of the machine's CPUs busy while our own processes are idle (other tenants)."""
    busy0, total0 = machine_cpu()
    time.sleep(seconds)
    busy1, total1 = machine_cpu()
    return (busy1 - busy0) / max(1, total1 - total0)


def proc_status_kb(pid: int) -> dict[str, int]:
    """The Vm* lines of /proc/PID/status, in kB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Vm") and line.endswith(" kB"):
            name, value = line.split(":", 1)
            out[name] = int(value.split()[0])
    return out


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (writing 5 to clear_refs, Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def stop_process(proc: subprocess.Popen[bytes], name: str, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        log(f"{name} did not stop in 15 s: killing it")
        proc.kill()
        proc.wait(timeout=15)


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --- targets ---------------------------------------------------------------------------


@dataclass
class Target:
    """Something pgbench connects to."""

    name: str
    port: int
    user: str
    password: str
    #: The proxy process (for CPU and memory figures); None for direct PostgreSQL.
    pid: int | None = None
    host: str = "127.0.0.1"

    def env(self) -> dict[str, str]:
        """Environment for libpq clients (pgbench, psql): no TLS on any target."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(
            PGHOST=self.host,
            PGPORT=str(self.port),
            PGUSER=self.user,
            PGPASSWORD=self.password,
            PGDATABASE=DATABASE,
            PGSSLMODE="disable",
            PGGSSENCMODE="disable",
            PGAPPNAME="querywarden-bench",
            PGCONNECT_TIMEOUT="10",
            LC_ALL="C",
        )
        return env


def start_collector(workdir: Path) -> tuple[subprocess.Popen[bytes] | None, str | None]:
    """The Collector from the tools cache with an OTLP/HTTP receiver, or (None, None)."""
    binary = TOOLS / "bin" / "otelcol"
    if not binary.exists():
        return None, None
    port = devcluster.free_port()
    config = {
        "receivers": {"otlp": {"protocols": {"http": {"endpoint": f"127.0.0.1:{port}"}}}},
        "exporters": {"file": {"path": str(workdir / "spans.jsonl")}},
        "service": {
            "pipelines": {
                "traces": {"receivers": ["otlp"], "exporters": ["file"]},
                "metrics": {"receivers": ["otlp"], "exporters": ["file"]},
            },
            "telemetry": {"metrics": {"level": "none"}},
        },
    }
    path = workdir / "otelcol.yaml"
    path.write_text(yaml.safe_dump(config))
    logfile = (workdir / "otelcol.log").open("wb")
    proc = subprocess.Popen(
        [str(binary), "--config", str(path)],
        stdout=logfile,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    logfile.close()
    return proc, f"http://127.0.0.1:{port}"


#: ``--agent``: what an AI agent's identity has on, beyond the policy decision. The
#: column pgbench -S reads is masked (so every result row is rewritten), the content
#: detectors run on any other text column, and everything is audited.
AGENT_MASKING = {
    "columns": [{"table": "public.pgbench_accounts", "column": "abalance", "strategy": "null"}],
    "detectors": ["ssn", "credit_card", "api_key", "jwt", "private_key"],
}


def gateway_credentials(
    workdir: Path, *, masking: dict[str, Any] | None = None
) -> tuple[dict[str, Any], str]:
    """Settings that let the client ``bench`` in, and the token it presents as password.

    A policy trusting a local development issuer, with a read-only rule for ``bench``, and
    a token from that issuer valid for 50 minutes.
    """
    from querywarden.identity.dev import mint_token

    key_file = workdir / "dev-issuer.pem"
    token: str = mint_token(BENCH_USER, ttl=3000, key_file=key_file)
    policy = workdir / "policy.yaml"
    issuer = {"name": "bench", "kind": "dev", "keyFile": str(key_file), "maxTokenLifetime": "1h"}
    # A realistic read-only rule: every statement is parsed and checked against it.
    rule = {
        "name": "bench-read",
        "subjects": {"users": [BENCH_USER]},
        "allow": {"operations": ["select"], "tables": ["public.*", "pg_catalog.*"]},
        "deny": {"tables": ["public.secrets"]},
        "review": {"operations": ["update", "delete"], "unboundedWrite": True},
    }
    document: dict[str, Any] = {"identity": {"issuers": [issuer]}, "rules": [rule]}
    if masking is not None:
        document["masking"] = masking
    policy.write_text(yaml.safe_dump(document, sort_keys=False))
    return {"policyFile": str(policy)}, token


def start_gateway(
    workdir: Path, cluster: devcluster.EphemeralCluster, *, agent_audit: dict[str, Any] | None
) -> tuple[subprocess.Popen[bytes], int, str]:
    """Start ``querywarden serve``; return the process, its port and the client password.

    With ``agent_audit`` (``--agent``) the bench identity is masked and audited as given.
    """
    masking = AGENT_MASKING if agent_audit is not None else None
    auth, password = gateway_credentials(workdir, masking=masking)
    if agent_audit is not None:
        auth["audit"] = agent_audit
    proc, port = spawn_gateway(workdir, cluster, "gateway", auth)
    return proc, port, password


def spawn_gateway(
    workdir: Path, cluster: devcluster.EphemeralCluster, name: str, extra: dict[str, Any]
) -> tuple[subprocess.Popen[bytes], int]:
    """``querywarden serve`` on a free port in front of ``cluster``, with ``extra`` settings.

    The settings go to ``workdir/NAME.yaml`` and the output to ``workdir/NAME.log``.
    """
    port = devcluster.free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port, "plaintext": "loopback"},
        "upstream": {
            "host": "127.0.0.1",
            "port": cluster.port,
            "database": DATABASE,
            "user": UPSTREAM_USER,
            "password": devcluster.ROLE_PASSWORD,
            "sslmode": "disable",
        },
        **extra,
    }
    path = workdir / f"{name}.yaml"
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    script = Path(sys.executable).parent / "querywarden"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "querywarden"]
    command += ["--log-level", "WARNING", "serve", "--config", str(path)]
    # Settings come from the file alone: no QUERYWARDEN_* override from our environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUERYWARDEN_")}
    logfile = (workdir / f"{name}.log").open("wb")
    proc = subprocess.Popen(
        command, stdout=logfile, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    logfile.close()
    return proc, port


def start_pgbouncer(
    binary: str, workdir: Path, cluster: devcluster.EphemeralCluster, clients: int
) -> tuple[subprocess.Popen[bytes], int]:
    port = devcluster.free_port()
    bouncer = workdir / "pgbouncer"
    bouncer.mkdir()
    (bouncer / "userlist.txt").write_text(f'"{BENCH_USER}" "{BENCH_PASSWORD}"\n')
    ini = f"""\
[databases]
{DATABASE} = host=127.0.0.1 port={cluster.port} dbname={DATABASE} \
user={UPSTREAM_USER} password={devcluster.ROLE_PASSWORD}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = plain
auth_file = {bouncer / "userlist.txt"}
pool_mode = session
default_pool_size = {clients + 4}
max_client_conn = {clients + 100}
max_db_connections = 0
server_tls_sslmode = disable
client_tls_sslmode = disable
ignore_startup_parameters = extra_float_digits
logfile = {bouncer / "pgbouncer.log"}
pidfile = {bouncer / "pgbouncer.pid"}
log_connections = 0
log_disconnections = 0
"""
    (bouncer / "pgbouncer.ini").write_text(ini)
    owner = postgres_owner()  # pgbouncer refuses to run as root
    chown_tree(bouncer, owner)
    stderr = (bouncer / "stderr.log").open("wb")
    proc = subprocess.Popen(
        [binary, str(bouncer / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        cwd=str(bouncer),
        user=owner[0] if owner else None,
        group=owner[1] if owner else None,
        extra_groups=[] if owner else None,
        start_new_session=True,
    )
    stderr.close()
    return proc, port


def wait_ready(proc: subprocess.Popen[bytes], name: str, port: int, logs: list[Path]) -> None:
    """Wait until the process accepts connections on port; fail early if it exits."""
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            text = "\n".join(tail(p) for p in logs)
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{text}")
        try:
            devcluster.wait_for_port("127.0.0.1", port, timeout=0.2)
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                text = "\n".join(tail(p) for p in logs)
                raise RuntimeError(f"{name} did not start listening:\n{text}") from exc


# --- pgbench ----------------------------------------------------------------------------


@dataclass
class PgbenchRun:
    target: str
    mode: str
    round: int
    tps: float
    latency_ms: float
    transactions: int
    failed: int
    seconds: float
    #: CPU time of the proxy process as a share of one core (None for direct).
    proxy_cpu: float | None
    #: The part of proxy_cpu spent in the kernel (system time).
    proxy_cpu_sys: float | None
    #: Proxy CPU time per transaction, in microseconds.
    proxy_us_per_txn: float | None
    #: Share of all the machine's CPUs that was busy during the run.
    machine_cpu: float


_TPS = re.compile(r"^tps = ([\d.]+) \(without initial connection time\)", re.M)
_LATENCY = re.compile(r"^latency average = ([\d.]+) ms", re.M)
_TRANSACTIONS = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)


def parse_pgbench(output: str) -> tuple[float, float, int, int]:
    """(tps, average latency ms, transactions, failed) from pgbench's report."""
    tps, latency, count = _TPS.search(output), _LATENCY.search(output), _TRANSACTIONS.search(output)
    if tps is None or latency is None or count is None:
        raise RuntimeError(f"cannot parse pgbench output:\n{output}")
    failed = _FAILED.search(output)
    return float(tps[1]), float(latency[1]), int(count[1]), int(failed[1]) if failed else 0


def pgbench(
    binary: Path, target: Target, mode: str, args: argparse.Namespace, duration: float
) -> tuple[str, float, tuple[float, float] | None, float]:
    """Run pgbench -S once.

    Returns (output, seconds, proxy (user, system) CPU as shares of one core, machine CPU
    share).
    """
    command = [
        str(binary),
        "-n",
        "-S",
        "-M",
        mode,
        "-c",
        str(args.clients),
        "-j",
        str(args.threads),
        "-T",
        str(int(duration)),
    ]
    cpu_before = tree_cpu_seconds(target.pid) if target.pid else None
    busy_before, total_before = machine_cpu()
    start = time.perf_counter()
    result = subprocess.run(
        command, capture_output=True, text=True, env=target.env(), timeout=duration + 120
    )
    seconds = time.perf_counter() - start
    busy_after, total_after = machine_cpu()
    cpu_after = tree_cpu_seconds(target.pid) if target.pid else None
    if result.returncode != 0:
        raise RuntimeError(
            f"pgbench against {target.name} failed ({result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}"
        )
    proxy_cpu = None
    if cpu_before is not None and cpu_after is not None:
        proxy_cpu = (
            (cpu_after[0] - cpu_before[0]) / seconds,
            (cpu_after[1] - cpu_before[1]) / seconds,
        )
    machine = (busy_after - busy_before) / max(1, total_after - total_before)
    return result.stdout, seconds, proxy_cpu, machine


def latency_p50_us(binary: Path, target: Target, seconds: int, workdir: Path) -> float:
    """Median latency of ``pgbench -S`` with one client, from its per-transaction log.

    One client: what an agent's single connection sees, without queueing behind others.
    """
    prefix = workdir / f"latency-{target.name}"
    result = subprocess.run(
        [str(binary), "-n", "-S", "-c", "1", "-T", str(seconds), "-l",
         f"--log-prefix={prefix}"],
        capture_output=True, text=True, env=target.env(), timeout=seconds + 120,
        cwd=workdir, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"pgbench -c 1 against {target.name} failed:\n{result.stderr}")
    latencies = [
        int(line.split()[2])  # client, transaction, latency (µs), ...
        for log_file in workdir.glob(f"{prefix.name}.*")
        for line in log_file.read_text().splitlines()
        if line.strip()
    ]
    for log_file in workdir.glob(f"{prefix.name}.*"):
        log_file.unlink()
    if not latencies:
        raise RuntimeError(f"pgbench -l against {target.name} logged no transactions")
    return float(statistics.median(latencies))


def run_pgbench_rounds(
    binary: Path, targets: list[Target], args: argparse.Namespace, background: list[float]
) -> list[PgbenchRun]:
    runs: list[PgbenchRun] = []
    total = args.rounds * len(MODES) * len(targets)
    done = 0
    for rnd in range(args.rounds):
        load = background_load()
        background.append(round(load, 3))
        log(f"round {rnd + 1}: background CPU load (us idle) {load:.0%} of the machine")
        for mode in MODES:
            # Rotate the order each round so no target always runs first or last.
            shift = (rnd + MODES.index(mode)) % len(targets)
            for target in targets[shift:] + targets[:shift]:
                done += 1
                output, seconds, proxy_cpu, machine = pgbench(
                    binary, target, mode, args, args.duration
                )
                tps, latency, count, failed = parse_pgbench(output)
                cpu_share = cpu_sys = us_per_txn = None
                cpu = ""
                if proxy_cpu is not None:
                    cpu_share, cpu_sys = sum(proxy_cpu), proxy_cpu[1]
                    us_per_txn = cpu_share * seconds / max(1, count) * 1e6
                    cpu = (
                        f", proxy CPU {cpu_share:.0%} of a core ({cpu_sys:.0%} sys, "
                        f"{us_per_txn:.1f} us/txn)"
                    )
                runs.append(
                    PgbenchRun(
                        target.name,
                        mode,
                        rnd + 1,
                        tps,
                        latency,
                        count,
                        failed,
                        round(seconds, 2),
                        None if cpu_share is None else round(cpu_share, 3),
                        None if cpu_sys is None else round(cpu_sys, 3),
                        None if us_per_txn is None else round(us_per_txn, 2),
                        round(machine, 3),
                    )
                )
                log(
                    f"[{done}/{total}] {target.name:<9} {mode:<8} round {rnd + 1}: "
                    f"{tps:9.1f} tps, {latency:.3f} ms{cpu}, machine CPU {machine:.0%}"
                )
    return runs


@dataclass
class Summary:
    target: str
    mode: str
    tps: float
    tps_min: float
    tps_max: float
    latency_ms: float
    proxy_cpu: float | None
    proxy_us_per_txn: float | None
    vs_direct: float | None = None
    vs_pgbouncer: float | None = None


def summarize(runs: list[PgbenchRun], targets: list[Target]) -> list[Summary]:
    out: list[Summary] = []
    for mode in MODES:
        by_target: dict[str, Summary] = {}
        for target in targets:
            mine = [r for r in runs if r.target == target.name and r.mode == mode]
            if not mine:
                continue
            cpus = [r.proxy_cpu for r in mine if r.proxy_cpu is not None]
            costs = [r.proxy_us_per_txn for r in mine if r.proxy_us_per_txn is not None]
            by_target[target.name] = Summary(
                target.name,
                mode,
                statistics.fmean(r.tps for r in mine),
                min(r.tps for r in mine),
                max(r.tps for r in mine),
                statistics.fmean(r.latency_ms for r in mine),
                statistics.fmean(cpus) if cpus else None,
                statistics.fmean(costs) if costs else None,
            )
        direct, bouncer = by_target.get("direct"), by_target.get("pgbouncer")
        for summary in by_target.values():
            if direct is not None:
                summary.vs_direct = summary.tps / direct.tps
            if bouncer is not None:
                summary.vs_pgbouncer = summary.tps / bouncer.tps
            out.append(summary)
    return out


def format_table(summaries: list[Summary]) -> str:
    header = (
        "| target | mode | tps (mean) | tps min-max | latency avg ms | proxy CPU "
        "| proxy CPU us/txn | / direct | / pgbouncer |"
    )
    lines = [header, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in summaries:
        cpu = "-" if s.proxy_cpu is None else f"{s.proxy_cpu:.0%}"
        cost = "-" if s.proxy_us_per_txn is None else f"{s.proxy_us_per_txn:.1f}"
        vs_direct = "-" if s.vs_direct is None else f"{s.vs_direct:.2f}"
        vs_bouncer = "-" if s.vs_pgbouncer is None else f"{s.vs_pgbouncer:.2f}"
        lines.append(
            f"| {s.target} | {s.mode} | {s.tps:,.0f} | {s.tps_min:,.0f}-{s.tps_max:,.0f} "
            f"| {s.latency_ms:.3f} | {cpu} | {cost} | {vs_direct} | {vs_bouncer} |"
        )
    return "\n".join(lines)


# --- the one-million-row result --------------------------------------------------------


@dataclass
class StreamRun:
    target: str
    seconds: float
    rss_before_mb: float | None = None
    peak_rss_mb: float | None = None
    #: Peak RSS during the query minus RSS before it.
    growth_mb: float | None = None
    #: How the peak was measured: "VmHWM" (reset before the query) or "sampled".
    peak_source: str | None = None


class RssSampler:
    """Polls a process's VmRSS in a thread, as a fallback when VmHWM cannot be reset."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.peak_kb = max(self.peak_kb, proc_status_kb(self.pid)["VmRSS"])
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stream_once(psql: Path, target: Target) -> StreamRun:
    """Stream the million rows to /dev/null with psql; measure time and proxy memory."""
    command = [str(psql), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", STREAM_SQL]
    pid = target.pid
    run = StreamRun(target.name, 0.0)
    hwm_reset = False
    if pid is not None:
        hwm_reset = reset_peak_rss(pid)
        before = proc_status_kb(pid)["VmRSS"]
    sampler = RssSampler(pid) if pid is not None else contextlib.nullcontext()
    with sampler:
        start = time.perf_counter()
        result = subprocess.run(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=target.env(),
            timeout=600,
        )
        run.seconds = round(time.perf_counter() - start, 3)
    if result.returncode != 0:
        raise RuntimeError(f"psql against {target.name} failed: {result.stderr}")
    if pid is not None:
        assert isinstance(sampler, RssSampler)
        status = proc_status_kb(pid)
        peak = status["VmHWM"] if hwm_reset else sampler.peak_kb
        peak = max(peak, sampler.peak_kb)
        run.rss_before_mb = round(before / 1024, 1)
        run.peak_rss_mb = round(peak / 1024, 1)
        run.growth_mb = round((peak - before) / 1024, 1)
        run.peak_source = "VmHWM" if hwm_reset else "sampled"
    return run


def run_stream_test(psql: Path, direct: Target, gateway: Target, repeats: int) -> list[StreamRun]:
    runs: list[StreamRun] = []
    # One small query first, so the gateway's connection path is warm (imports, caches).
    subprocess.run(
        [str(psql), "-X", "-q", "-c", "SELECT 1"],
        check=True,
        capture_output=True,
        env=gateway.env(),
        timeout=60,
    )
    for i in range(repeats):
        for target in (gateway, direct) if i % 2 == 0 else (direct, gateway):
            run = stream_once(psql, target)
            runs.append(run)
            extra = ""
            if run.growth_mb is not None:
                extra = (
                    f", gateway RSS {run.rss_before_mb} -> peak {run.peak_rss_mb} MB "
                    f"(+{run.growth_mb} MB, {run.peak_source})"
                )
            log(f"1M rows via {target.name:<8}: {run.seconds:.2f} s{extra}")
    return runs


# --- optional profile of the gateway ----------------------------------------------------


def profile_gateway(
    py_spy: str,
    binary: Path,
    gateway: Target,
    args: argparse.Namespace,
    outdir: Path,
    stamp: str,
) -> dict[str, Any]:
    """Run pgbench once per mode against the gateway with py-spy attached (not timed)."""
    assert gateway.pid is not None
    report: dict[str, Any] = {}
    for mode in MODES:
        raw = outdir / f"{stamp}-profile-{mode}.txt"
        spy = subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(gateway.pid),
                "--rate",
                str(args.profile_rate),
                "--format",
                "raw",
                "--output",
                str(raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)
        try:
            output, _, proxy_cpu, _ = pgbench(binary, gateway, mode, args, args.duration)
        finally:
            spy.send_signal(signal.SIGINT)
            _, err = spy.communicate(timeout=60)
        if not raw.exists():
            raise RuntimeError(f"py-spy wrote no profile: {err.decode(errors='replace')}")
        tps = parse_pgbench(output)[0]
        summary = summarize_profile(raw)
        summary.update(
            tps_while_profiled=tps,
            proxy_cpu=None if proxy_cpu is None else round(sum(proxy_cpu), 3),
            file=str(raw),
        )
        report[mode] = summary
        log(f"profiled gateway, {mode}: {tps:.0f} tps under py-spy; stacks in {raw}")
    return report


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> tuple[str, str]:
    """("func (file:line)", "func (file)") with paths shortened to the interesting part."""
    match = _FRAME.match(frame)
    if match is None:
        return frame, frame
    path = match["file"]
    for marker in ("/proxy/", "/site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    line = f":{match['line']}" if match["line"] else ""
    return f"{match['func']} ({path}{line})", f"{match['func']} ({path})"


def summarize_profile(raw: Path, top: int = 15) -> dict[str, Any]:
    self_line: Counter[str] = Counter()
    self_func: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for text in raw.read_text().splitlines():
        stack, _, count_text = text.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        self_line[frames[-1][0]] += count
        self_func[frames[-1][1]] += count
        for name in {f[1] for f in frames}:
            inclusive[name] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(v / total, 4)) for k, v in counter.most_common(top)] if total else []

    return {
        "samples": total,
        "self_by_line": share(self_line),
        "self_by_function": share(self_func),
        "inclusive_by_function": share(inclusive),
    }


# --- main ------------------------------------------------------------------------------


def versions(cluster: devcluster.EphemeralCluster, pgbouncer_bin: str) -> dict[str, str]:
    def first_line(command: list[str]) -> str:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        return (result.stdout or result.stderr).strip().splitlines()[0]

    def dist(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "postgresql": cluster.psql("SELECT version()"),
        "pgbench": first_line([str(cluster.bindir / "pgbench"), "--version"]),
        "pgbouncer": first_line([pgbouncer_bin, "--version"]),
        "python": sys.version.split()[0],
        "uvloop": dist("uvloop"),
        "querywarden": dist("querywarden"),
        "git": commit or "unknown",
    }


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "memory_total_kb": proc_meminfo_total(),
    }


def proc_meminfo_total() -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20, help="seconds per pgbench run")
    parser.add_argument("--clients", type=int, default=8, help="pgbench clients (-c)")
    parser.add_argument("--threads", type=int, default=2, help="pgbench threads (-j)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor")
    parser.add_argument("--warmup", type=float, default=3, help="warm-up seconds per target")
    parser.add_argument(
        "--stream-repeats", type=int, default=2, help="1M-row runs per target (gateway, direct)"
    )
    parser.add_argument("--pgbouncer", default=None, help="pgbouncer binary")
    parser.add_argument(
        "--agent",
        action="store_true",
        help="the bench identity as an AI agent's: masked, audited (batched fsync) and "
        "exported over OTLP to a real Collector",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="afterwards, one extra gateway run per mode under py-spy (not in the figures)",
    )
    parser.add_argument("--py-spy", default=None, help="py-spy binary (default: from PATH)")
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples/s")
    parser.add_argument(
        "--results-dir", type=Path, default=REPO / "bench" / "results", help="where JSON goes"
    )
    args = parser.parse_args(argv)
    if args.duration < 1 or args.clients < 1 or args.threads < 1 or args.rounds < 1:
        parser.error("--duration, --clients, --threads and --rounds must be positive")
    if args.threads > args.clients:
        parser.error("--threads cannot exceed --clients")
    return args


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so the clean-up below runs for it too."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pgbouncer_bin = args.pgbouncer or shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(pgbouncer_bin).exists():
        print("pgbouncer not found: run scripts/ensure-system-deps.sh --bench", file=sys.stderr)
        return 2
    py_spy = None
    if args.profile:
        py_spy = args.py_spy or shutil.which("py-spy")
        if py_spy is None:
            print("--profile needs py-spy (pip install py-spy; --py-spy PATH)", file=sys.stderr)
            return 2
    started = datetime.now(UTC)
    results: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    with terminate_on_sigterm(), contextlib.ExitStack() as stack:
        try:
            return run(args, pgbouncer_bin, py_spy, stack, results, started)
        except KeyboardInterrupt:
            log("interrupted: cleaning up")
            return 130


def run(
    args: argparse.Namespace,
    pgbouncer_bin: str,
    py_spy: str | None,
    stack: contextlib.ExitStack,
    results: dict[str, Any],
    started: datetime,
) -> int:
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    workdir = Path(tempfile.mkdtemp(prefix="querywarden-bench-"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    workdir.chmod(0o711)  # pgbouncer runs as postgres when we are root: let it in

    log("starting an ephemeral PostgreSQL (no TLS) ...")
    cluster = devcluster.EphemeralCluster.create(ssl=False)
    stack.callback(cluster.stop)
    cluster.start()
    pgbench_bin = cluster.bindir / "pgbench"
    psql_bin = cluster.bindir / "psql"
    results["versions"] = versions(cluster, pgbouncer_bin)
    results["background_load"] = [round(background_load(), 3)]
    log(f"background CPU load before the benchmark: {results['background_load'][0]:.0%}")
    direct = Target("direct", cluster.port, UPSTREAM_USER, devcluster.ROLE_PASSWORD)

    log(f"pgbench -i -s {args.scale} (directly) ...")
    init = subprocess.run(
        [str(pgbench_bin), "-i", "-q", "-s", str(args.scale)],
        capture_output=True,
        text=True,
        env=direct.env(),
        timeout=900,
    )
    if init.returncode != 0:
        raise RuntimeError(f"pgbench -i failed:\n{init.stdout}\n{init.stderr}")

    agent_audit: dict[str, Any] | None = None
    if args.agent:
        collector, endpoint = start_collector(workdir)
        if collector is None or endpoint is None:
            raise RuntimeError("--agent needs the Collector of `make tools` (otelcol)")
        stack.callback(stop_process, collector, "collector")
        agent_audit = {
            "directory": str(workdir / "audit"),
            "fsync": "batch",
            "otlpEndpoint": endpoint,
        }
        log(f"agent identity: masking {AGENT_MASKING['columns']}, audit to {endpoint}")
    results["agent"] = args.agent
    log("starting the gateway and pgbouncer ...")
    gw_proc, gw_port, gw_password = start_gateway(workdir, cluster, agent_audit=agent_audit)
    stack.callback(stop_process, gw_proc, "gateway")
    bouncer_proc, bouncer_port = start_pgbouncer(pgbouncer_bin, workdir, cluster, args.clients)
    stack.callback(stop_process, bouncer_proc, "pgbouncer")
    wait_ready(gw_proc, "gateway", gw_port, [workdir / "gateway.log"])
    bouncer_logs = [workdir / "pgbouncer" / n for n in ("pgbouncer.log", "stderr.log")]
    wait_ready(bouncer_proc, "pgbouncer", bouncer_port, bouncer_logs)
    gateway = Target("gateway", gw_port, BENCH_USER, gw_password, gw_proc.pid)
    bouncer = Target("pgbouncer", bouncer_port, BENCH_USER, BENCH_PASSWORD, bouncer_proc.pid)
    targets = [direct, gateway, bouncer]
    log(
        f"PostgreSQL :{direct.port}, gateway :{gateway.port} (pid {gateway.pid}), "
        f"pgbouncer :{bouncer.port} (pid {bouncer.pid})"
    )

    log(f"1M-row result through the gateway and directly, {args.stream_repeats}x each ...")
    stream = run_stream_test(psql_bin, direct, gateway, args.stream_repeats)

    if args.warmup > 0:
        log(f"warm-up: {args.warmup:.0f} s of pgbench -S per target ...")
        for target in targets:
            pgbench(pgbench_bin, target, "simple", args, max(1, args.warmup))

    minutes = args.rounds * len(MODES) * len(targets) * args.duration / 60
    log(
        f"pgbench -n -S -c {args.clients} -j {args.threads} -T {args.duration:.0f}: "
        f"{args.rounds} rounds x {len(MODES)} modes x {len(targets)} targets "
        f"(about {minutes:.1f} min) ..."
    )
    background = results["background_load"]
    runs = run_pgbench_rounds(pgbench_bin, targets, args, background)
    summaries = summarize(runs, targets)

    if py_spy is not None:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        results["profile"] = profile_gateway(
            py_spy, pgbench_bin, gateway, args, args.results_dir.resolve(), stamp
        )

    gw_summary = {s.mode: s for s in summaries if s.target == "gateway"}
    gw_streams = [r for r in stream if r.target == "gateway"]
    direct_streams = [r for r in stream if r.target == "direct"]
    growth = max((r.growth_mb or 0.0) for r in gw_streams)
    verdict = {
        "tps_ratio_target": TPS_TARGET_RATIO,
        "tps_ratio_simple": gw_summary["simple"].vs_pgbouncer,
        "tps_ratio_prepared": gw_summary["prepared"].vs_pgbouncer,
        "tps_target_met_simple": (gw_summary["simple"].vs_pgbouncer or 0) >= TPS_TARGET_RATIO,
        "rss_target_mb": RSS_TARGET_MB,
        "rss_growth_mb": growth,
        "rss_target_met": growth < RSS_TARGET_MB,
    }
    log("p50 latency at one client (pgbench -S -c 1 -T 10, per-transaction log) ...")
    p50 = {t.name: latency_p50_us(pgbench_bin, t, 10, workdir) for t in (direct, gateway)}
    results["latency_p50_us"] = p50
    results.update(
        pgbench_runs=[asdict(r) for r in runs],
        summary=[asdict(s) for s in summaries],
        stream=[asdict(r) for r in stream],
        verdict=verdict,
        finished=datetime.now(UTC).isoformat(timespec="seconds"),
    )

    print()
    print(
        f"pgbench -n -S -c {args.clients} -j {args.threads} -T {args.duration:.0f}, "
        f"scale {args.scale}, {args.rounds} rounds (mean of rounds; proxy CPU = share of one "
        "core used by the gateway/pgbouncer process)"
    )
    print(format_table(summaries))
    print()
    print(
        f"p50 latency at one client: direct {p50['direct']:.0f} us, gateway "
        f"{p50['gateway']:.0f} us (+{p50['gateway'] - p50['direct']:.0f} us; target +60 us "
        "with everything on)"
    )
    print(
        f"1M rows ({STREAM_SQL!r}, psql > /dev/null): gateway "
        f"{statistics.median(r.seconds for r in gw_streams):.2f} s, direct "
        f"{statistics.median(r.seconds for r in direct_streams):.2f} s (median); gateway peak "
        f"RSS growth {growth:.1f} MB (target < {RSS_TARGET_MB:.0f} MB)"
    )
    print(
        f"target gateway >= {TPS_TARGET_RATIO} x pgbouncer tps (-S, simple): "
        f"{'met' if verdict['tps_target_met_simple'] else 'NOT met'} "
        f"({verdict['tps_ratio_simple']:.2f}; prepared {verdict['tps_ratio_prepared']:.2f}); "
        f"RSS target {'met' if verdict['rss_target_met'] else 'NOT met'}"
    )
    noisy = max(results["background_load"])
    print(
        f"background CPU load of other processes (sampled while idle): "
        f"{', '.join(f'{x:.0%}' for x in results['background_load'])}"
        + ("  <- the machine was busy: figures are noisy" if noisy > 0.1 else "")
    )
    if "profile" in results:
        for mode, prof in results["profile"].items():
            print(f"\ngateway profile ({mode}, py-spy self time, top 10 lines):")
            for name, share in prof["self_by_line"][:10]:
                print(f"  {share:6.1%}  {name}")

    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"{stamp}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
