"""`make compat`: client libraries' own test suites, directly and through the gateway.

Starts an ephemeral PostgreSQL set up the way the suites expect, runs each suite once
straight against it and once through a real gateway (``querywarden serve``) per gateway
mode (audit off, audit on) with an allow-all identity whose password is a token of the
development issuer, and prints per suite how many tests passed each way and which pass
only directly. The suites come from scripts/fetch-compat.sh (docs/compatibility.md).

    .venv/bin/python compat/run.py [--suite pgx] [--mode audit-off] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from querywarden.devcluster import EphemeralCluster, free_port, wait_for_port
from querywarden.identity.dev import mint_token
from results import (
    Comparison,
    SuiteRun,
    from_exit_codes,
    parse_go_test_json,
    render_table,
)

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = dict(
    line.split("=", 1)
    for line in (ROOT / "compat/versions.env").read_text().splitlines()
    if line and not line.startswith("#")
)
SUITES_DIR = (
    Path(os.environ.get("QUERYWARDEN_COMPAT_DIR", Path.home() / ".cache/querywarden/compat"))
    / "src"
)

#: The one role both ways: the suites log in as it directly, and the gateway logs in as
#: it upstream, so a difference between the runs is the gateway's and not a privilege's.
#: A superuser, as both suites' own setups make their test roles. It logs in with a
#: cleartext password (pg_hba ``password``, on loopback), the exchange the gateway has
#: with its clients too (the token is the password): node-postgres 4 predates SCRAM, and
#: its raw-connection tests answer MD5 wrongly, which would fail them directly only.
ROLE = "compat"
ROLE_PASSWORD = "compat-secret"  # noqa: S105 - a throw-away cluster's password
MODES = ("audit-off", "audit-on")


@dataclass(frozen=True)
class Target:
    """Where a suite connects: the cluster itself or a gateway in front of it."""

    host: str
    port: int
    user: str
    password: str

    def keywords(self, database: str) -> str:
        """A libpq keyword/value connection string."""
        return (
            f"host={self.host} port={self.port} user={self.user} "
            f"password={self.password} dbname={database} sslmode=disable"
        )

    def pg_environment(self, database: str) -> dict[str, str]:
        """The PG* variables libpq and node-postgres read."""
        return {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGPASSWORD": self.password,
            "PGDATABASE": database,
        }


class Suite(Protocol):
    """A client library's own test suite."""

    name: str
    #: The database each run gets, copied anew from ``template`` (see fresh_database).
    database: str
    template: str
    source: Path

    def prepare(self, cluster: EphemeralCluster) -> None:
        """One-time setup of the cluster (roles, a template database)."""

    def run(self, target: Target, log: Path) -> SuiteRun:
        """Run the whole suite against ``target`` in a fresh database."""


class Pgx:
    """pgx's Go test suite (``go test ./...``), configured by ``PGX_TEST_DATABASE``."""

    name = "pgx"
    database = "pgx_test"
    template = "pgx_template"

    def __init__(self, packages: list[str], run_pattern: str | None) -> None:
        self.source = SUITES_DIR / f"pgx-{VERSIONS['PGX_VERSION']}"
        self.packages = packages
        self.run_pattern = run_pattern

    def prepare(self, cluster: EphemeralCluster) -> None:
        # pgx's own setup (extensions, the uint64 domain, its roles) into a template that
        # every run copies, so that no run sees what an earlier one left behind.
        cluster.psql(f"CREATE DATABASE {self.template}", database="postgres")
        run_psql_file(cluster, self.source / "testsetup/postgresql_setup.sql", self.template)

    def run(self, target: Target, log: Path) -> SuiteRun:
        argv = ["go", "test", "-json", "-count=1", "-p", "1", "-timeout", "15m"]
        if self.run_pattern:
            argv += ["-run", self.run_pattern]
        env = {
            **os.environ,
            "GOTOOLCHAIN": "local",
            "PGX_TEST_DATABASE": target.keywords(self.database),
            # The suite's "TCP" tests want a TCP connection string besides the default.
            "PGX_TEST_TCP_CONN_STRING": target.keywords(self.database),
        }
        # Into the log as it comes, so that a long run can be followed with tail -f;
        # the parser skips the non-JSON lines (build errors on stderr).
        with log.open("w") as out:
            subprocess.run(
                argv + self.packages,
                cwd=self.source,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        with log.open() as lines:
            return parse_go_test_json(lines)


class NodePostgres:
    """node-postgres's integration tests: each ``*-tests.js`` file is a test script.

    Run as its Makefile's ``test-integration`` and ``test-binary`` targets do (``node
    FILE`` and ``node FILE binary``), configured by the PG* variables; a file passes when
    it exits 0 within the timeout.
    """

    name = "node-postgres"
    database = "nodepg_test"
    template = "nodepg_template"
    timeout = 60.0

    def __init__(self, files: list[str] | None) -> None:
        self.source = SUITES_DIR / f"pg-{VERSIONS['NODE_PG_VERSION']}"
        self.files = files

    def prepare(self, cluster: EphemeralCluster) -> None:
        cluster.psql(f"CREATE DATABASE {self.template}", database="postgres")

    def run(self, target: Target, log: Path) -> SuiteRun:
        env = {**os.environ, **target.pg_environment(self.database)}
        files = self.files or sorted(
            str(p.relative_to(self.source))
            for p in (self.source / "test/integration").rglob("*-tests.js")
        )
        codes: dict[str, int | None] = {}
        with log.open("w") as out:
            # The suite's own `make prepare-test-db`: the `person` table its tests read.
            setup = self._node(["script/create-test-tables.js"], env, out)
            if setup != 0:
                out.write(f"create-test-tables.js exited {setup}\n")
            for variant in ("", "binary"):
                for file in files:
                    test = f"{file} [{variant}]" if variant else file
                    codes[test] = self._node([file, variant] if variant else [file], env, out)
        return from_exit_codes(codes)

    def _node(self, args: list[str], env: Mapping[str, str], out: Any) -> int | None:
        out.write(f"\n$ node {shlex.join(args)}\n")
        out.flush()
        try:
            proc = subprocess.run(
                [str(self.source / ".node/bin/node"), *args],
                cwd=self.source,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            out.write(f"timed out after {self.timeout:.0f}s\n")
            return None
        out.write(f"exit {proc.returncode}\n")
        return proc.returncode


#: Tests no proxy can pass, whatever it does: taken out of both counts, with the reason.
#: None so far: the ones that need the server's own Unix socket (pgx's
#: PGX_TEST_UNIX_SOCKET_CONN_STRING) or a TLS client certificate are left unconfigured,
#: so they skip themselves both ways and count in neither (docs/compatibility.md).
EXCLUDED: dict[str, dict[str, str]] = {"pgx": {}, "node-postgres": {}}


def run_psql_file(cluster: EphemeralCluster, path: Path, database: str) -> None:
    r"""Run a SQL file with psql's meta-commands (``\set``, ``\gexec``) as the superuser."""
    argv = [str(cluster.bindir / "psql"), "-h", str(cluster.socket_dir), "-p", str(cluster.port)]
    argv += ["-U", cluster.superuser, "-d", database, "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    # The file sits where the server's user can read it (the cluster runs as postgres).
    copy = cluster.base / path.name
    copy.write_text(path.read_text())
    copy.chmod(0o644)
    as_postgres = os.geteuid() == 0
    subprocess.run(
        [*argv, "-f", str(copy)],
        check=True,
        capture_output=True,
        text=True,
        cwd=str(cluster.base),
        user="postgres" if as_postgres else None,
        env={**os.environ, "LC_ALL": "C"},
    )


def start_cluster() -> EphemeralCluster:
    """PostgreSQL with the ``compat`` superuser allowed from loopback by password."""
    cluster = EphemeralCluster.create()
    cluster.start()
    cluster.psql(
        f"CREATE ROLE {ROLE} SUPERUSER LOGIN PASSWORD '{ROLE_PASSWORD}'", database="postgres"
    )
    # Our line goes first: the cluster's catch-all loopback line asks for SCRAM.
    hba = cluster.datadir / "pg_hba.conf"
    lines = [f"host all {ROLE} {net} password" for net in ("127.0.0.1/32", "::1/128")]
    hba.write_text("\n".join(lines) + "\n" + hba.read_text())
    cluster.psql("SELECT pg_reload_conf()", database="postgres")
    return cluster


def fresh_database(cluster: EphemeralCluster, suite: Suite) -> None:
    """The suite's database, copied anew from its template."""
    cluster.psql(f"DROP DATABASE IF EXISTS {suite.database} WITH (FORCE)", database="postgres")
    create = f"CREATE DATABASE {suite.database} TEMPLATE {suite.template} OWNER {ROLE}"
    cluster.psql(create, database="postgres")


@contextmanager
def running_gateway(
    cluster: EphemeralCluster, work: Path, name: str, mode: str
) -> Iterator[Target]:
    """``querywarden serve`` in front of the cluster, with an allow-all identity."""
    state = work / f"gateway-{name}-{mode}"
    state.mkdir()
    key = state / "dev-issuer.pem"
    # The longest the dev issuer accepts; each gateway serves one suite run, well within it.
    token = mint_token(ROLE, ttl=3600, key_file=key)
    policy = {
        "identity": {"issuers": [{"name": "dev", "kind": "dev", "keyFile": str(key)}]},
        "rules": [
            {
                "name": "compat-allow-all",
                "subjects": {"users": [ROLE]},
                "allow": {"operations": ["*"], "tables": ["*"]},
            }
        ],
    }
    (state / "policy.yaml").write_text(yaml.safe_dump(policy))
    port = free_port()
    settings: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {
            "host": "127.0.0.1",
            "port": cluster.port,
            "user": ROLE,
            "password": ROLE_PASSWORD,
            "sslmode": "require",
        },
        "stateDirectory": str(state),
        "policyFile": str(state / "policy.yaml"),
    }
    if mode == "audit-on":
        settings["audit"] = {"directory": str(state / "audit")}
    (state / "gateway.yaml").write_text(yaml.safe_dump(settings))
    log = (work / f"gateway-{name}-{mode}.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "querywarden",
            "--log-level",
            "WARNING",
            "serve",
            "--config",
            str(state / "gateway.yaml"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
        yield Target("127.0.0.1", port, ROLE, token)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def timed_run(
    suite: Suite, cluster: EphemeralCluster, target: Target, log: Path
) -> tuple[SuiteRun, float]:
    fresh_database(cluster, suite)
    started = time.monotonic()
    result = suite.run(target, log)
    elapsed = time.monotonic() - started
    print(
        f"  {log.stem}: {len(result.passed)} passed, {len(result.failed)} failed, "
        f"{len(result.skipped)} skipped in {elapsed:.0f}s (log {log})",
        flush=True,
    )
    return result, elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", action="append", choices=["pgx", "node-postgres"])
    parser.add_argument("--mode", action="append", choices=MODES)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--work", type=Path, help="keep logs here (default: a temp dir)")
    parser.add_argument("--pgx-run", help="only pgx tests matching this go test -run pattern")
    parser.add_argument("--pgx-package", action="append", help="pgx package (default ./...)")
    parser.add_argument("--node-file", action="append", help="node-postgres test file")
    args = parser.parse_args(argv)

    chosen = args.suite or ["pgx", "node-postgres"]
    modes = args.mode or list(MODES)
    suites: list[Suite] = []
    if "pgx" in chosen:
        suites.append(Pgx(args.pgx_package or ["./..."], args.pgx_run))
    if "node-postgres" in chosen:
        suites.append(NodePostgres(args.node_file))
    for suite in suites:
        if not suite.source.is_dir():
            print(f"{suite.name} is not fetched: run scripts/fetch-compat.sh", file=sys.stderr)
            return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="querywarden-compat-"))
    work.mkdir(parents=True, exist_ok=True)

    comparisons: list[Comparison] = []
    timings: dict[str, float] = {}
    cluster = start_cluster()
    try:
        for suite in suites:
            suite.prepare(cluster)
        direct = Target("127.0.0.1", cluster.port, ROLE, ROLE_PASSWORD)
        for suite in suites:
            print(f"{suite.name}:", flush=True)
            baseline, timings[f"{suite.name} direct"] = timed_run(
                suite, cluster, direct, work / f"{suite.name}-direct.log"
            )
            excluded = EXCLUDED[suite.name]
            for mode in modes:
                with running_gateway(cluster, work, suite.name, mode) as through:
                    result, timings[f"{suite.name} {mode}"] = timed_run(
                        suite, cluster, through, work / f"{suite.name}-{mode}.log"
                    )
                comparisons.append(
                    Comparison(
                        suite.name,
                        mode,
                        baseline.without(excluded),
                        result.without(excluded),
                        excluded,
                    )
                )
    finally:
        cluster.stop()

    print()
    print(render_table(comparisons))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "versions": VERSIONS,
                    "seconds": {k: round(v, 1) for k, v in timings.items()},
                    "comparisons": [c.as_json() for c in comparisons],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
