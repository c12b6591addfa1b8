"""Bootstrap: the gateway's login role, made from a superuser Secret.

Runs as the init container ``bootstrap`` of a gateway Deployment
(``python -m querywarden_operator.bootstrap``), before the gateway starts, or as the
container ``querywarden-bootstrap`` of an injected database pod (``stay``: it waits for
the database container, makes the role, then stays up), on every pod start: each run
converges on the same state, so it is idempotent. The superuser's
credentials are files of a Secret volume mounted into this container alone; they are
used for one connection and never written, logged or passed on. The gateway's own
password comes from the Secret the operator generated (mounted as the gateway's
credentials); it is sent to the database as a SCRAM-SHA-256 verifier, never in clear, so
no statement log of the server holds it either.

What the role gets (:func:`grants`, documented in docs/operator.md#bootstrap):

- ``LOGIN`` and the password; no other role attribute (not superuser, no CREATEROLE ...);
- ``CONNECT`` on ``target.database``;
- in each schema named by a rule's ``allow.tables`` (``public`` when none names one;
  ``pg_catalog`` and ``information_schema`` are readable anyway): ``USAGE``, and on all
  its tables the privileges of the operations the rules allow or review: ``SELECT``
  always, ``INSERT``, ``UPDATE``, ``DELETE``, ``TRUNCATE`` when named (plus sequence
  ``USAGE`` for inserts); the same as default privileges for tables the superuser
  creates later.

Grants are only ever added: narrowing the policy does not revoke them (the policy
refuses what it no longer allows; revoke by hand if the role must lose them too).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import signal
import ssl
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from querywarden.policy import PolicyDocument

log = logging.getLogger("querywarden.bootstrap")

#: Where the init container finds what it needs (render: external.py).
SUPERUSER_DIR = Path("/etc/querywarden/bootstrap/superuser")
ENV_SETTINGS = "QUERYWARDEN_BOOTSTRAP"
#: Next to a sidecar: an emptyDir of the bootstrap container, where it says it is done.
STATE_DIR = Path("/var/run/querywarden-bootstrap")
READY_FILE = STATE_DIR / "done"

SCRAM_ITERATIONS = 4096
_SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema"})
_PRIVILEGES = {"insert": "INSERT", "update": "UPDATE", "delete": "DELETE", "truncate": "TRUNCATE"}


def quote_ident(name: str) -> str:
    """A SQL identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """A SQL string literal (standard_conforming_strings, the default since 9.1)."""
    return "'" + value.replace("'", "''") + "'"


def scram_verifier(password: str, *, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5803 format)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, SCRAM_ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = base64.b64encode
    return (
        f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{b64(salt).decode()}"
        f"${b64(stored_key).decode()}:{b64(server_key).decode()}"
    )


@dataclass(frozen=True, slots=True)
class Grants:
    """What the gateway's role is granted."""

    schemas: tuple[str, ...]
    privileges: tuple[str, ...]


def grants(policy: PolicyDocument) -> Grants:
    """The schemas and table privileges the policy's rules need (see the module docstring)."""
    schemas: set[str] = set()
    privileges = {"SELECT"}
    for rule in policy.rules:
        for pattern in rule.allow.tables:
            schema = pattern.split(".", 1)[0] if "." in pattern else ""
            if schema and not any(ch in schema for ch in "*?[") and schema not in _SYSTEM_SCHEMAS:
                schemas.add(schema)
        for operation in (*rule.allow.operations, *rule.review.operations):
            if operation in _PRIVILEGES:
                privileges.add(_PRIVILEGES[operation])
    order = ["SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE"]
    return Grants(
        schemas=tuple(sorted(schemas or {"public"})),
        privileges=tuple(p for p in order if p in privileges),
    )


def statements(
    role: str, database: str, verifier: str, wanted: Grants, *, exists: bool
) -> list[str]:
    """The SQL that brings ``role`` to the wanted state (run in ``database``)."""
    r = quote_ident(role)
    out = [
        f"ALTER ROLE {r} WITH LOGIN PASSWORD {quote_literal(verifier)}"
        if exists
        else f"CREATE ROLE {r} WITH LOGIN PASSWORD {quote_literal(verifier)}",
        f"GRANT CONNECT ON DATABASE {quote_ident(database)} TO {r}",
    ]
    privileges = ", ".join(wanted.privileges)
    for schema in wanted.schemas:
        s = quote_ident(schema)
        out += [
            f"GRANT USAGE ON SCHEMA {s} TO {r}",
            f"GRANT {privileges} ON ALL TABLES IN SCHEMA {s} TO {r}",
            f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT {privileges} ON TABLES TO {r}",
        ]
        if "INSERT" in wanted.privileges:
            out += [
                f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {r}",
                f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT USAGE, SELECT ON SEQUENCES TO {r}",
            ]
    return out


@dataclass(frozen=True, slots=True)
class Settings:
    """What the init container is told (JSON in ``$QUERYWARDEN_BOOTSTRAP``)."""

    host: str
    port: int
    database: str
    sslmode: str
    role: str
    schemas: tuple[str, ...]
    privileges: tuple[str, ...]
    sslrootcert: str | None = None
    #: Next to a sidecar: wait for the database as long as it takes, then stay (a pod's
    #: container that exits is restarted), ``ready_file`` saying the role is made.
    stay: bool = False
    superuser_dir: str = str(SUPERUSER_DIR)
    password_file: str = "/etc/querywarden/credentials/default/password"  # noqa: S105

    def as_json(self) -> str:
        """The environment value."""
        return json.dumps(
            {
                "host": self.host, "port": self.port, "database": self.database,
                "sslmode": self.sslmode, "role": self.role, "schemas": list(self.schemas),
                "privileges": list(self.privileges), "sslrootcert": self.sslrootcert,
                **({"stay": True} if self.stay else {}),
            },
            sort_keys=True,
        )  # fmt: skip

    @classmethod
    def from_json(cls, raw: str) -> Settings:
        """From the environment value."""
        data = json.loads(raw)
        return cls(
            host=str(data["host"]), port=int(data["port"]), database=str(data["database"]),
            sslmode=str(data["sslmode"]), role=str(data["role"]),
            schemas=tuple(data["schemas"]), privileges=tuple(data["privileges"]),
            sslrootcert=data.get("sslrootcert"), stay=bool(data.get("stay", False)),
        )  # fmt: skip


def _ssl(settings: Settings) -> ssl.SSLContext | str | bool:
    if settings.sslmode in ("verify-ca", "verify-full"):
        context = ssl.create_default_context(cafile=settings.sslrootcert)
        context.check_hostname = settings.sslmode == "verify-full"
        return context
    return settings.sslmode


@dataclass(frozen=True, slots=True)
class _Secrets:
    user: str
    password: str = field(repr=False)
    gateway_password: str = field(repr=False)

    @classmethod
    def read(cls, settings: Settings) -> _Secrets:
        superuser = Path(settings.superuser_dir)
        return cls(
            user=(superuser / "username").read_text().strip(),
            password=(superuser / "password").read_text().rstrip("\n"),
            gateway_password=Path(settings.password_file).read_text().rstrip("\n"),
        )


async def run(settings: Settings, credentials: _Secrets) -> list[str]:
    """Connect as the superuser and converge the role; the statements run (no secrets)."""
    import asyncpg  # the gateway's driver; imported here so the operator never needs it

    user, password = credentials.user, credentials.password
    gateway_password = credentials.gateway_password
    conn = await asyncpg.connect(
        host=settings.host, port=settings.port, user=user, password=password,
        database=settings.database, ssl=_ssl(settings), timeout=10,
    )  # fmt: skip
    try:
        exists = bool(
            await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", settings.role)
        )
        wanted = Grants(settings.schemas, settings.privileges)
        sql = statements(
            settings.role, settings.database, scram_verifier(gateway_password), wanted,
            exists=exists,
        )  # fmt: skip
        async with conn.transaction():
            for statement in sql:
                await conn.execute(statement)
    finally:
        await conn.close()
    # The first statement carries the verifier: report it without.
    return [sql[0].split(" PASSWORD ", 1)[0], *sql[1:]]


def _not_up_yet(exc: BaseException) -> bool:
    """The database is not reachable, or up but not accepting connections yet (57P03)."""
    return isinstance(exc, (TimeoutError, OSError)) or getattr(exc, "sqlstate", None) == "57P03"


def main(argv: Sequence[str] | None = None) -> int:
    """The container's entry point; exit status 0 once the role is as wanted.

    ``--check``: exit status 0 if a staying bootstrap has made the role (its readiness
    probe).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--check"]:
        return 0 if READY_FILE.exists() else 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings.from_json(os.environ[ENV_SETTINGS])
    attempt = 0
    while settings.stay or attempt < 30:
        attempt += 1
        try:
            done = asyncio.run(run(settings, _Secrets.read(settings)))
        except ssl.SSLError as exc:
            # A certificate that does not verify will not verify on the next attempt.
            log.error("bootstrap of role %s: TLS to %s:%d failed: %s", settings.role,
                      settings.host, settings.port, exc)  # fmt: skip
            return 1
        except Exception as exc:  # reported (no secret is in asyncpg's messages)
            if not _not_up_yet(exc):
                log.error("bootstrap of role %s failed: %s: %s", settings.role,
                          type(exc).__name__, exc)  # fmt: skip
                return 1
            # The database may not be reachable yet (a new Service, DNS; next to a
            # sidecar, the database container starting): retry.
            log.warning("attempt %d: cannot reach %s:%d: %s", attempt, settings.host,
                        settings.port, exc)  # fmt: skip
            time.sleep(min(2 * attempt, 10))
            continue
        _report(done)
        if settings.stay:
            _stay()
        return 0
    log.error("bootstrap of role %s: %s:%d unreachable", settings.role, settings.host,
              settings.port)  # fmt: skip
    return 1


def _stay() -> None:
    """Say the role is made (``--check``), then wait for the pod's end (SIGTERM)."""
    READY_FILE.parent.mkdir(parents=True, exist_ok=True)
    READY_FILE.write_text("done\n")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


def _report(done: Iterable[str]) -> None:
    for statement in done:
        log.info("%s", statement)


if __name__ == "__main__":
    sys.exit(main())
