"""An ephemeral PostgreSQL cluster for the demo and the tests.

It runs the real server binaries (``initdb``, ``pg_ctl``) in a temporary directory on a
free loopback port, with its own Unix socket directory, so it never touches a server the
machine happens to have. PostgreSQL refuses to run as root; when we are root the cluster
runs as the ``postgres`` system user that Debian's package creates.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from querywarden.tlsutil import write_self_signed

#: Roles every cluster gets, one per upstream authentication method the gateway speaks.
ROLE_PASSWORD = "qw-secret-pw"  # noqa: S105 - a throw-away test cluster's password
ROLES = {"qw_scram": "scram-sha-256", "qw_md5": "md5", "qw_trust": "trust", "qw_clear": "password"}
DATABASE = "app"


class ClusterError(RuntimeError):
    """The cluster could not be set up or started."""


def find_bindir() -> Path:
    """The directory with the newest installed PostgreSQL server binaries."""
    override = os.environ.get("QUERYWARDEN_PG_BINDIR")
    if override:
        return Path(override)
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise ClusterError(
        "PostgreSQL server binaries not found: install Debian's 'postgresql' package "
        "(make test and make demo do this themselves)"
    )


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class EphemeralCluster:
    """A throw-away PostgreSQL server on 127.0.0.1."""

    base: Path
    port: int
    bindir: Path
    ssl: bool = True

    @classmethod
    def create(cls, *, ssl: bool = True) -> EphemeralCluster:
        """Make a temporary directory and pick a free port (nothing runs yet)."""
        base = Path(tempfile.mkdtemp(prefix="querywarden-pg-"))
        return cls(base=base, port=free_port(), bindir=find_bindir(), ssl=ssl)

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base / "run"

    @property
    def superuser(self) -> str:
        return "postgres"

    def dsn(self, user: str = "qw_scram", database: str = DATABASE) -> str:
        """A libpq DSN for a direct connection (no gateway)."""
        password = "" if ROLES.get(user) == "trust" else f" password={ROLE_PASSWORD}"
        return f"host=127.0.0.1 port={self.port} dbname={database} user={user}{password}"

    # lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """initdb, configure, start, and create the test roles and database."""
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.base)
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                self.superuser,
                "--auth-local=trust",
                "--auth-host=reject",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        self._configure()
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-l",
                str(self.base / "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
        self._create_roles()

    def stop(self) -> None:
        """Stop the server (fast) and delete its directory."""
        if (self.datadir / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run(
                    [
                        str(self.bindir / "pg_ctl"),
                        "-D",
                        str(self.datadir),
                        "-m",
                        "fast",
                        "-w",
                        "stop",
                    ]
                )
        shutil.rmtree(self.base, ignore_errors=True)

    def psql(self, sql: str, *, database: str = DATABASE, user: str | None = None) -> str:
        """Run SQL as the superuser over the Unix socket; return psql's unaligned output."""
        result = self._run(
            [
                str(self.bindir / "psql"),
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                user or self.superuser,
                "-d",
                database,
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ]
        )
        return result.stdout.strip()

    def log_text(self) -> str:
        """The server log, for diagnosing a failed test."""
        path = self.base / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # internals ----------------------------------------------------------------------

    def _configure(self) -> None:
        conf = [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.socket_dir}'",
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
            "max_connections = 200",
            "shared_buffers = 128MB",
            "password_encryption = 'scram-sha-256'",
        ]
        if self.ssl:
            cert, key = write_self_signed(self.datadir, "server", hostname="localhost")
            self._chown(cert)
            self._chown(key)
            conf += ["ssl = on", f"ssl_cert_file = '{cert}'", f"ssl_key_file = '{key}'"]
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\n# querywarden ephemeral cluster\n" + "\n".join(conf) + "\n")
        hba = ["local all all trust"]
        for role, method in ROLES.items():
            for net in ("127.0.0.1/32", "::1/128"):
                hba.append(f"host all {role} {net} {method}")
        for net in ("127.0.0.1/32", "::1/128"):
            hba.append(f"host all all {net} scram-sha-256")
        (self.datadir / "pg_hba.conf").write_text("\n".join(hba) + "\n")

    def _create_roles(self) -> None:
        statements = []
        for role, method in ROLES.items():
            encryption = "md5" if method == "md5" else "scram-sha-256"
            statements.append(
                f"SET password_encryption = '{encryption}'; "
                f"CREATE ROLE {role} LOGIN PASSWORD '{ROLE_PASSWORD}';"
            )
        self.psql(" ".join(statements), database="postgres")
        self.psql(f"CREATE DATABASE {DATABASE} OWNER qw_scram", database="postgres")
        grants = "; ".join(f"GRANT ALL ON SCHEMA public TO {r}" for r in ROLES)
        self.psql(grants + "; GRANT qw_scram TO qw_md5, qw_trust, qw_clear")

    def _as_owner(self) -> tuple[int, int] | None:
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError as exc:
            raise ClusterError(
                "running as root and there is no 'postgres' user to run the server as"
            ) from exc
        return entry.pw_uid, entry.pw_gid

    def _chown(self, path: Path) -> None:
        owner = self._as_owner()
        if owner is None:
            return
        os.chown(path, *owner)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    os.chown(os.path.join(root, name), *owner)

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        owner = self._as_owner()
        env = {**os.environ, "LC_ALL": "C", "PGTZ": "UTC"}
        try:
            return subprocess.run(
                argv,
                check=True,
                capture_output=True,
                text=True,
                env=env,
                cwd=str(self.base),
                timeout=120,
                user=owner[0] if owner else None,
                group=owner[1] if owner else None,
                extra_groups=[] if owner else None,
            )
        except subprocess.CalledProcessError as exc:
            raise ClusterError(f"{Path(argv[0]).name} failed: {exc.stderr or exc.stdout}") from exc


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
