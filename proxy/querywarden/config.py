"""Gateway process settings: listen address, TLS, upstream, limits, policy file.

Settings come from a YAML file (``querywarden serve --config FILE``) with environment
overrides: ``QUERYWARDEN_`` + the path in camelCase joined by ``__``, for example
``QUERYWARDEN_UPSTREAM__PASSWORD`` or ``QUERYWARDEN_LIMITS__MAXCLIENTMESSAGE``. The
policy (who may do what) is a separate document.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> Any:
    """Turn ``30s``, ``5m``, ``1h``, ``7d``, ``250ms`` or a number of seconds into a timedelta.

    ISO 8601 (``PT1H``, as pydantic writes a timedelta in JSON) is accepted too, so a
    document dumped by the models loads again.
    """
    if isinstance(value, str):
        if value.strip().upper().startswith("P"):
            return value  # ISO 8601: pydantic's own timedelta parsing takes it
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"invalid duration {value!r}: use a number with ms, s, m, h or d")
        return timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])
    return value


def _positive(value: timedelta) -> timedelta:
    if value.total_seconds() <= 0:
        raise ValueError("duration must be positive")
    return value


#: A duration written as ``30s``, ``5m``, ``1h``, ``7d``, ``250ms`` or a number of seconds.
Duration = Annotated[timedelta, BeforeValidator(parse_duration), AfterValidator(_positive)]


class _Section(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class ListenSettings(_Section):
    """Where the gateway accepts client connections."""

    host: str = "127.0.0.1"
    port: int = Field(6432, ge=0, le=65535)
    #: When a client may skip TLS: ``never``, only from ``loopback`` addresses, or ``always``.
    plaintext: Literal["never", "loopback", "always"] = "loopback"


class TLSSettings(_Section):
    """The certificate the gateway presents to clients."""

    cert_file: Path | None = None
    key_file: Path | None = None
    #: CA bundle for client certificates. When set, clients may present one (it is not
    #: required); a token bound to a certificate (``cnf.x5t#S256``) must match it.
    client_ca_file: Path | None = None


def _secret(value: str | None, file: Path | None) -> str | None:
    """A secret given inline or in a file (the file wins; a trailing newline is dropped)."""
    if file is not None:
        return file.read_text().rstrip("\n")
    return value


class UpstreamRoleSettings(_Section):
    """Credentials for one upstream role that policy rules can name (``upstreamRole``)."""

    user: str
    password: str | None = None
    password_file: Path | None = None

    def resolved_password(self) -> str | None:
        """The password, read from ``passwordFile`` (at each use, so it can rotate)."""
        return _secret(self.password, self.password_file)


class UpstreamSettings(_Section):
    """The database the gateway connects to, with its own credentials."""

    host: str = "127.0.0.1"
    port: int = Field(5432, ge=1, le=65535)
    #: Pin every session to this database; unset, the client's ``database`` is used.
    database: str | None = None
    user: str = "querywarden"
    password: str | None = None
    password_file: Path | None = None
    sslmode: Literal["disable", "prefer", "require", "verify-ca", "verify-full"] = "prefer"
    sslrootcert: Path | None = None
    connect_timeout: Duration = timedelta(seconds=5)
    #: Named credentials a policy rule's ``upstreamRole`` selects; a session whose rules
    #: name none connects as ``user``.
    roles: dict[str, UpstreamRoleSettings] = {}

    def resolved_password(self) -> str | None:
        """The password, read from ``passwordFile`` when that is set."""
        return _secret(self.password, self.password_file)


class LimitSettings(_Section):
    """Bounds that keep one client from harming the others."""

    #: Largest client message the gateway reads whole (a COPY row streams past it).
    max_client_message: ByteSize = ByteSize(64 * 1024 * 1024)
    #: Largest server message the gateway reads whole when a hook must inspect it.
    max_server_message: ByteSize = ByteSize(1024 * 1024 * 1024)
    #: Time a client has from connecting to completing authentication.
    startup_timeout: Duration = timedelta(seconds=15)
    max_connections: int = Field(1000, ge=1)


class MaskingSettings(_Section):
    """Secrets of the masking strategies (the policy says what is masked and how)."""

    #: Key of the ``hash`` strategy (keyed HMAC-SHA256): keep it secret and the same on
    #: every replica, so hashed values stay comparable. Required when a policy uses hash.
    hash_key: str | None = None
    hash_key_file: Path | None = None

    def resolved_hash_key(self) -> bytes | None:
        """The hash key's bytes, read from ``hashKeyFile`` when that is set."""
        key = _secret(self.hash_key, self.hash_key_file)
        return key.encode() if key else None


class PerformanceSettings(_Section):
    """How the gateway runs its hot loops; the bytes clients get are the same either way."""

    #: The compiled row masker (``querywarden_native``): ``auto`` uses it when it is
    #: installed, ``on`` requires it (the gateway does not start without it), ``off`` uses
    #: the pure-Python reference.
    native: Literal["auto", "on", "off"] = "auto"


class AuditSettings(_Section):
    """The audit log (off unless ``directory`` is set) and its export over OTLP."""

    #: Where the hash-chained segment files go (created 0700). None: no audit log.
    directory: Path | None = None
    #: ``always``: each record is on disk before the statement is forwarded. ``batch``:
    #: written to the OS before forwarding (it survives a gateway crash) and on disk
    #: within ``fsyncInterval``.
    fsync: Literal["always", "batch"] = "batch"
    fsync_interval: Duration = timedelta(milliseconds=50)
    max_segment_size: ByteSize = ByteSize(64 * 1024 * 1024)
    max_segment_age: Duration = timedelta(hours=1)
    retention: Duration = timedelta(days=30)
    #: Rows of each result kept in the record, as the client received them (masked).
    sample_rows: int = Field(5, ge=0)
    #: When a record cannot be written the statement is refused; true runs it anyway.
    fail_open: bool = False
    #: Record Bind parameter values as ``****`` (they are always redacted when they may
    #: carry masked values).
    redact_parameters: bool = False
    #: OTLP/HTTP endpoint of the user's Collector (``http://collector:4318``): spans from
    #: the log (at least once, resumed from a persisted offset) and live metrics.
    otlp_endpoint: str | None = None
    #: Where the export runs: ``process`` (a child process, off the relay's event loop
    #: and interpreter lock; restarted if it dies) or ``thread`` (inside the gateway
    #: process: one process less, but building spans, some 30-40 µs a statement, then
    #: competes with the relay for the interpreter).
    exporter: Literal["thread", "process"] = "process"
    #: On shutdown the exporter keeps sending what the Collector has not received yet for
    #: up to this long. Keep it below the time the gateway gets to stop (a pod's
    #: terminationGracePeriodSeconds; the operator sets it from the pod's) so that a log
    #: on an emptyDir is out before the pod and the volume go.
    drain_timeout: Duration = timedelta(seconds=20)
    #: What exported spans carry as ``db.query.text``: ``normalized`` (constants become
    #: ``$n``, comments go; the exact text stays in the log), ``raw`` (the exact text,
    #: and the server's error messages), or ``none``.
    export_query_text: Literal["normalized", "raw", "none"] = "normalized"


class AdminSettings(_Section):
    """The admin HTTP API (reviews: list, show, approve, deny); off without a port."""

    host: str = "127.0.0.1"
    #: Port of the admin API; None: no admin API (approvals then come from the store).
    port: int | None = None
    #: Serve HTTPS with this certificate and key.
    cert_file: Path | None = None
    key_file: Path | None = None


_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _schema_name(value: str) -> str:
    if not _SCHEMA_NAME.match(value):
        raise ValueError(
            f"invalid schema name {value!r}: use lower-case letters, digits and underscores "
            "(at most 63, not starting with a digit)"
        )
    return value


def _postgres_url(value: str) -> str:
    if not value.startswith(("postgresql://", "postgres://")):
        raise ValueError(
            "approvals.postgres.dsn must be a URL, postgresql://USER@HOST:PORT/DATABASE "
            "(TLS as ?sslmode=verify-full&sslrootcert=FILE); key=value conninfo is not "
            "accepted"
        )
    return value


class PostgresStoreSettings(_Section):
    """``approvals.store: postgres``: the database the gateway replicas share reviews in."""

    #: ``postgresql://USER@HOST:PORT/DATABASE?sslmode=...`` (libpq URL parameters). Leave the
    #: password out: give it as ``password``/``passwordFile`` (or ``PGPASSWORD``,
    #: ``~/.pgpass``).
    dsn: Annotated[str, AfterValidator(_postgres_url)]
    password: str | None = None
    password_file: Path | None = None
    #: The schema the gateway creates and owns in that database.
    schema_name: Annotated[str, AfterValidator(_schema_name)] = Field("querywarden", alias="schema")
    #: Connections each gateway process keeps to the store (besides one that listens).
    pool_size: int = Field(4, ge=1, le=100)
    #: Bound on connecting; a store that does not answer in time refuses held statements.
    connect_timeout: Duration = timedelta(seconds=5)
    #: Bound on each query of the store.
    command_timeout: Duration = timedelta(seconds=10)

    def resolved_password(self) -> str | None:
        """The password, read from ``passwordFile`` (at each connect, so it can rotate)."""
        return _secret(self.password, self.password_file)


class ApprovalStoreSettings(_Section):
    """Where the reviews of held statements live (docs/approvals.md).

    ``sqlite``: a file in ``stateDirectory`` (one gateway, or several sharing a volume).
    ``kubernetes``: ``QueryReview`` resources in ``namespace``, labelled with and owned by
    the DatabaseAccessPolicy ``policy``; approvers decide with ``kubectl querywarden
    approve`` and the gateway watches the reviews. The operator renders this for its
    sidecars when the chart's ``reviews.enabled`` is on. ``postgres``: tables in a schema
    of a PostgreSQL database (``postgres``) that several gateway replicas share; they hear
    each other's decisions through LISTEN/NOTIFY.
    """

    store: Literal["sqlite", "kubernetes", "postgres"] = "sqlite"
    #: postgres: the database and schema of the reviews (required).
    postgres: PostgresStoreSettings | None = None
    #: kubernetes: the reviews' namespace; unset: ``$POD_NAMESPACE``, else the pod's
    #: ServiceAccount namespace.
    namespace: str | None = None
    #: kubernetes: the DatabaseAccessPolicy whose approvers decide (required).
    policy: str | None = None
    #: kubernetes: a kubeconfig file; unset: the pod's ServiceAccount, else ``$KUBECONFIG``.
    kubeconfig: Path | None = None
    #: kubernetes: a directory with ``token``, ``ca.crt`` and ``namespace`` of a projected
    #: ServiceAccount token (the operator mounts one, so that pods with
    #: ``automountServiceAccountToken: false`` work); the API server comes from
    #: ``$KUBERNETES_SERVICE_HOST``/``_PORT``. The token is re-read as the kubelet rotates it.
    service_account_directory: Path | None = None

    @model_validator(mode="after")
    def _kubernetes_needs_policy(self) -> ApprovalStoreSettings:
        if self.store == "kubernetes" and not self.policy:
            raise ValueError(
                "approvals.store is 'kubernetes' but approvals.policy (the "
                "DatabaseAccessPolicy name) is not set"
            )
        return self

    @model_validator(mode="after")
    def _postgres_needs_a_database(self) -> ApprovalStoreSettings:
        if self.store == "postgres" and self.postgres is None:
            raise ValueError(
                "approvals.store is 'postgres' but approvals.postgres.dsn (the database the "
                "reviews live in, postgresql://USER@HOST:PORT/DATABASE) is not set"
            )
        return self


class GatewaySettings(BaseSettings):
    """All process settings of ``querywarden serve``."""

    model_config = SettingsConfigDict(
        env_prefix="QUERYWARDEN_",
        env_nested_delimiter="__",
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )

    listen: ListenSettings = ListenSettings.model_validate({})
    tls: TLSSettings = TLSSettings.model_validate({})
    upstream: UpstreamSettings = UpstreamSettings.model_validate({})
    limits: LimitSettings = LimitSettings.model_validate({})
    masking: MaskingSettings = MaskingSettings.model_validate({})
    performance: PerformanceSettings = PerformanceSettings.model_validate({})
    audit: AuditSettings = AuditSettings.model_validate({})
    admin: AdminSettings = AdminSettings.model_validate({})
    approvals: ApprovalStoreSettings = ApprovalStoreSettings.model_validate({})
    #: Where the gateway keeps its state: the reviews of held statements (SQLite).
    state_directory: Path = Path(".querywarden")
    #: The policy document: trusted issuers and rules.
    policy_file: Path | None = None
    #: How often the policy file and the TLS certificate files are checked for changes (a
    #: failed reload keeps the last good policy or certificate).
    policy_reload_interval: Duration = timedelta(seconds=2)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file: a deployment sets secrets there.
        return env_settings, init_settings


def load_settings(path: Path | None) -> GatewaySettings:
    """Read settings from a YAML file (if given), then apply environment overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: the settings file must hold a mapping")
        data = loaded or {}
        # Relative file paths in the config are relative to the config file.
        data = _anchor_paths(data, path.parent)
    return GatewaySettings(**data)


_PATH_KEYS = {
    "certFile",
    "keyFile",
    "passwordFile",
    "sslrootcert",
    "clientCaFile",
    "policyFile",
    "hashKeyFile",
    "directory",
    "stateDirectory",
    "kubeconfig",
    "serviceAccountDirectory",
}


def _anchor_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out[key] = _anchor_paths(value, base)
        elif key in _PATH_KEYS and isinstance(value, str) and not Path(value).is_absolute():
            out[key] = str(base / value)
        else:
            out[key] = value
    return out
