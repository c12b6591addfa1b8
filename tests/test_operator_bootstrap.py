"""Bootstrap of an external database's gateway role, against the session's real PostgreSQL.

``querywarden_operator.bootstrap`` is what the gateway Deployment's init container runs:
here it runs in-process with the same settings the operator renders, twice (it must be
idempotent), and the role it made logs in with the generated password and can do what
the policy allows and no more.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from querywarden.devcluster import DATABASE, EphemeralCluster
from querywarden.policy import PolicyDocument
from querywarden.tlsutil import write_self_signed
from querywarden_operator import bootstrap
from querywarden_operator.bootstrap import (
    ENV_SETTINGS,
    Settings,
    _Secrets,
    grants,
    main,
    run,
    scram_verifier,
)

pytestmark = pytest.mark.postgres

ADMIN = "qwboot_admin"
ROLE = "qwboot_gateway"


@pytest.fixture
def admin(pg: EphemeralCluster, tmp_path: Path) -> Iterator[Path]:
    """A superuser with a password (the cluster's own superuser has none), as files."""
    password = secrets.token_urlsafe(12)
    pg.psql(
        f"CREATE ROLE {ADMIN} SUPERUSER LOGIN PASSWORD '{password}';"
        "CREATE SCHEMA IF NOT EXISTS qwboot_sales;"
        "CREATE TABLE qwboot_sales.deals (id int PRIMARY KEY, amount numeric);"
        "INSERT INTO qwboot_sales.deals VALUES (1, 100);"
        "CREATE TABLE qwboot_other (id int);",
    )
    directory = tmp_path / "superuser"
    directory.mkdir()
    (directory / "username").write_text(ADMIN)
    (directory / "password").write_text(password)
    try:
        yield directory
    finally:
        pg.psql(
            "DROP SCHEMA qwboot_sales CASCADE; DROP TABLE qwboot_other;"
            f"DROP OWNED BY {ROLE}; DROP ROLE IF EXISTS {ROLE};"
            f"DROP OWNED BY {ADMIN}; DROP ROLE {ADMIN};"
        )


def _settings(pg: EphemeralCluster, superuser: Path, password_file: Path) -> Settings:
    policy = PolicyDocument.model_validate(
        {
            "rules": [
                {
                    "name": "r",
                    "subjects": {"groups": ["g"]},
                    "allow": {"operations": ["select"], "tables": ["qwboot_sales.*"]},
                    "review": {"operations": ["delete"]},
                }
            ]
        }
    )
    wanted = grants(policy)
    assert wanted.schemas == ("qwboot_sales",)
    assert wanted.privileges == ("SELECT", "DELETE")
    return Settings(
        host="127.0.0.1", port=pg.port, database=DATABASE, sslmode="disable", role=ROLE,
        schemas=wanted.schemas, privileges=wanted.privileges,
        superuser_dir=str(superuser), password_file=str(password_file),
    )  # fmt: skip


def test_bootstrap_creates_the_role_idempotently_with_what_the_policy_needs(
    pg: EphemeralCluster,
    admin: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    password_file = tmp_path / "gateway-password"
    password_file.write_text("first-generated-password")
    settings = _settings(pg, admin, password_file)
    done = asyncio.run(run(settings, _Secrets.read(settings)))
    assert done[0] == f'CREATE ROLE "{ROLE}" WITH LOGIN'
    # Again, as every new gateway pod does, with a rotated password: converges.
    password_file.write_text("second-generated-password")
    monkeypatch.setenv(ENV_SETTINGS, settings.as_json())
    with caplog.at_level(logging.INFO, logger="querywarden.bootstrap"):
        # main() reads the default paths; run with the test's files instead.
        monkeypatch.setattr(Settings, "from_json", classmethod(lambda cls, raw: settings))
        assert main() == 0
    logged = caplog.text
    assert f'ALTER ROLE "{ROLE}" WITH LOGIN' in logged
    admin_password = (admin / "password").read_text()
    assert admin_password not in logged and "second-generated-password" not in logged
    assert "SCRAM-SHA-256$" not in logged

    dsn = f"host=127.0.0.1 port={pg.port} dbname={DATABASE} user={ROLE}"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"{dsn} password=first-generated-password").close()
    with psycopg.connect(f"{dsn} password=second-generated-password", autocommit=True) as conn:
        assert conn.execute("SELECT amount FROM qwboot_sales.deals").fetchone() == (100,)
        conn.execute("DELETE FROM qwboot_sales.deals WHERE id = 0")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO qwboot_sales.deals VALUES (2, 1)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM qwboot_other")
        rolsuper, createrole = conn.execute(
            "SELECT rolsuper, rolcreaterole FROM pg_roles WHERE rolname = current_user"
        ).fetchone() or (None, None)
        assert (rolsuper, createrole) == (False, False)
    # Tables the superuser creates later are granted too (default privileges).
    with psycopg.connect(
        f"host=127.0.0.1 port={pg.port} dbname={DATABASE} user={ADMIN} password={admin_password}",
        autocommit=True,
    ) as conn:
        conn.execute("CREATE TABLE qwboot_sales.later (id int)")
    with psycopg.connect(f"{dsn} password=second-generated-password") as conn:
        assert conn.execute("SELECT count(*) FROM qwboot_sales.later").fetchone() == (0,)


def test_the_scram_verifier_is_what_postgresql_stores(pg: EphemeralCluster) -> None:
    """A role given the verifier logs in with the password (the server checks it)."""
    verifier = scram_verifier("pa'ss word")
    assert verifier.startswith("SCRAM-SHA-256$4096:")
    role = f"qwboot_v{secrets.token_hex(3)}"
    pg.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{verifier}'")
    try:
        with psycopg.connect(
            host="127.0.0.1", port=pg.port, dbname=DATABASE, user=role, password="pa'ss word"
        ) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
    finally:
        pg.psql(f"DROP ROLE {role}")


def test_bootstrap_verifies_the_databases_certificate(
    pg: EphemeralCluster,
    admin: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``sslmode: verify-full`` with the CA of ``caSecret``; a wrong CA fails at once."""
    password_file = tmp_path / "gateway-password"
    password_file.write_text("tls-generated-password")
    base = _settings(pg, admin, password_file)
    server_cert = pg.datadir / "server.crt"
    verified = dataclasses.replace(
        base, host="localhost", sslmode="verify-full", sslrootcert=str(server_cert)
    )
    asyncio.run(run(verified, _Secrets.read(verified)))
    with psycopg.connect(
        host="localhost", port=pg.port, dbname=DATABASE, user=ROLE,
        password="tls-generated-password", sslmode="verify-full", sslrootcert=str(server_cert),
    ) as conn:  # fmt: skip
        assert conn.execute("SELECT current_user").fetchone() == (ROLE,)
    other = write_self_signed(tmp_path, "other", hostname="localhost")[0]
    wrong = dataclasses.replace(verified, sslrootcert=str(other))
    monkeypatch.setattr(Settings, "from_json", classmethod(lambda cls, raw: wrong))
    monkeypatch.setenv(ENV_SETTINGS, "{}")
    with caplog.at_level(logging.INFO, logger="querywarden.bootstrap"):
        assert main() == 1
    assert "TLS to localhost" in caplog.text and "attempt" not in caplog.text


class _Forwarder(socketserver.ThreadingTCPServer):
    """A TCP relay to the database: "the database container" starting late."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, upstream: int) -> None:
        self.upstream = upstream
        super().__init__(("127.0.0.1", port), _Relay)


class _Relay(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        assert isinstance(self.server, _Forwarder)
        with socket.create_connection(("127.0.0.1", self.server.upstream)) as upstream:

            def pump(src: socket.socket, dst: socket.socket) -> None:
                with contextlib.suppress(OSError):
                    while data := src.recv(65536):
                        dst.sendall(data)
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

            back = threading.Thread(target=pump, args=(upstream, self.request), daemon=True)
            back.start()
            pump(self.request, upstream)
            back.join(timeout=5)


class _Stayed(Exception):
    """Raised instead of waiting for SIGTERM forever."""


def test_next_to_a_sidecar_bootstrap_waits_for_the_database_then_stays(
    pg: EphemeralCluster,
    admin: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database container starts after the bootstrap container: it retries, then stays."""
    password_file = tmp_path / "gateway-password"
    password_file.write_text("sidecar-generated-password")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = dataclasses.replace(_settings(pg, admin, password_file), port=port, stay=True)
    assert Settings.from_json(settings.as_json()).stay is True
    monkeypatch.setenv(ENV_SETTINGS, settings.as_json())
    monkeypatch.setattr(Settings, "from_json", classmethod(lambda cls, raw: settings))
    ready = tmp_path / "state" / "done"
    monkeypatch.setattr(bootstrap, "READY_FILE", ready)
    servers: list[_Forwarder] = []

    def database_starts(seconds: float) -> None:
        # The first retry: nothing listened; now "the database container" is up.
        assert seconds > 0
        if not servers:
            servers.append(_Forwarder(port, pg.port))
            threading.Thread(target=servers[0].serve_forever, daemon=True).start()

    def pause() -> None:
        raise _Stayed

    monkeypatch.setattr(bootstrap.time, "sleep", database_starts)
    monkeypatch.setattr(bootstrap.signal, "signal", lambda *_: None)
    monkeypatch.setattr(bootstrap.signal, "pause", pause)
    assert main(["--check"]) == 1
    try:
        with pytest.raises(_Stayed):
            main([])
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert servers, "the first attempt found the database up"
    assert ready.exists()
    assert main(["--check"]) == 0
    dsn = f"host=127.0.0.1 port={pg.port} dbname={DATABASE} user={ROLE}"
    with psycopg.connect(f"{dsn} password=sidecar-generated-password") as conn:
        assert conn.execute("SELECT amount FROM qwboot_sales.deals").fetchone() == (100,)
