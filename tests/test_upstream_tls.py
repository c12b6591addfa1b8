"""One upstream connector: every connection the gateway opens verifies TLS as configured.

The relay's connection for a client and the gateway's side connections (the masking
catalog, the EXPLAIN behind a ``fullTableScan`` review) take their TLS from the same
``upstream`` settings. A PostgreSQL of its own here serves certificates signed by a test
CA: one for another name, then one for the name the gateway connects to. With
``verify-full`` and the wrong name, no connection is made at all (the server log shows
none authorized), side connections included; ``verify-ca`` accepts the chain whatever the
name, as in libpq; with the right name everything works over TLS.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway_harness import DATABASE, POLICY, RunningGateway, gateway_settings, start_gateway
from querywarden.devcluster import EphemeralCluster
from querywarden.errors import UpstreamError
from querywarden.policy import PolicyDocument
from querywarden.tlsutil import CA_KEY_USAGE, write_private_key
from querywarden.upstream import deliver_cancel

#: The name on the certificate that does not match (the gateway connects to 127.0.0.1).
OTHER_NAME = "db.elsewhere.test"
SSN = "123-45-6789"

RULES = [
    {
        "name": "agents-read",
        "subjects": {"groups": ["ai-agents"]},
        "allow": {"operations": ["select"], "tables": ["public.*", "pg_catalog.*"]},
        # Every statement is planned on a side connection; none is large enough to hold.
        "review": {"fullTableScan": {"minRows": 1_000_000}},
    }
]
MASKING = {
    "columns": [{"table": "public.tls_people", "column": "ssn", "strategy": "redact"}],
    "exempt": {"groups": ["dba"]},
}


@dataclass
class Pki:
    """A test CA and server certificates it signed, as files."""

    ca: Path
    wrong_name: tuple[Path, Path]
    right_name: tuple[Path, Path]


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_pki(directory: Path) -> Pki:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("querywarden test CA"))
        .issuer_name(_name("querywarden test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    ca = directory / "ca.crt"
    ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    def server(stem: str, names: list[x509.GeneralName]) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(stem))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        cert_path = directory / f"{stem}.crt"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, write_private_key(directory / f"{stem}.key", key)

    return Pki(
        ca=ca,
        wrong_name=server("wrong", [x509.DNSName(OTHER_NAME)]),
        right_name=server(
            "right",
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        ),
    )


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EphemeralCluster, Pki]]:
    """A PostgreSQL without TLS at first, logging every connection, with a test table."""
    cluster = EphemeralCluster.create(ssl=False)
    cluster.start()
    try:
        pki = _write_pki(cluster.datadir / "pki")
        cluster._chown(cluster.datadir / "pki")  # the server reads its key as its user
        cluster.psql("ALTER SYSTEM SET log_connections = on", database="postgres")
        cluster.psql("SELECT pg_reload_conf()", database="postgres")
        cluster.psql(
            "CREATE TABLE tls_people (id int, ssn text); GRANT SELECT ON tls_people TO PUBLIC;"
            f"INSERT INTO tls_people VALUES (1, '{SSN}'); ANALYZE tls_people"
        )
        yield cluster, pki
    finally:
        cluster.stop()


def _serve(cluster: EphemeralCluster, cert: tuple[Path, Path] | None) -> None:
    """Have the server use ``cert`` (None: no TLS) for connections from now on."""
    statements = (
        ["ALTER SYSTEM SET ssl = off"]
        if cert is None
        else [
            f"ALTER SYSTEM SET ssl_cert_file = '{cert[0]}'",
            f"ALTER SYSTEM SET ssl_key_file = '{cert[1]}'",
            "ALTER SYSTEM SET ssl = on",
        ]
    )
    for statement in statements:
        cluster.psql(statement, database="postgres")
    cluster.psql("SELECT pg_reload_conf()", database="postgres")
    wanted = "off" if cert is None else f"on {cert[0]}"
    # The postmaster applies the reload on its own time; new backends show when it has.
    deadline = time.monotonic() + 20
    while True:
        shown = cluster.psql(
            "SELECT current_setting('ssl') || ' ' || current_setting('ssl_cert_file')",
            database="postgres",
        )
        if shown.startswith(wanted):
            return
        assert time.monotonic() < deadline, f"the server still has {shown!r}"
        time.sleep(0.05)


def _gateway(cluster: EphemeralCluster, pki: Pki, sslmode: str) -> RunningGateway:
    policy = PolicyDocument.model_validate(
        {"identity": POLICY.identity.model_dump(by_alias=True), "rules": RULES, "masking": MASKING}
    )
    upstream: dict[str, Any] = {"sslmode": sslmode, "sslrootcert": str(pki.ca)}
    return start_gateway(gateway_settings(cluster, upstream=upstream), policy=policy)


def _authorized(cluster: EphemeralCluster, since: int) -> list[str]:
    """The server's "connection authorized" log lines after offset ``since``."""
    return [
        line for line in cluster.log_text()[since:].splitlines() if "connection authorized" in line
    ]


def _works_through_every_connection(gw: RunningGateway) -> None:
    """A masked identity's SELECT: the relay, the catalog and the EXPLAIN all connect."""
    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        # Allowed means the plan was read (no plan, no statement); redacted means the
        # catalog was read (no catalog, no statement).
        rows = conn.execute("SELECT id, ssn FROM tls_people").fetchall()
    assert len(rows) == 1
    assert rows[0][0] == 1
    assert rows[0][1] != SSN


def _cancel_a_running_statement(gw: RunningGateway, cluster: EphemeralCluster) -> None:
    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        failure: list[BaseException] = []

        def sleep() -> None:
            try:
                conn.execute("SELECT pg_sleep(60)")
            except psycopg.Error as exc:
                failure.append(exc)

        worker = threading.Thread(target=sleep)
        worker.start()
        deadline = time.monotonic() + 20
        # Cancel once the statement runs upstream (not while the gate still plans it).
        while (
            cluster.psql(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'"
            )
            != "1"
        ):
            assert time.monotonic() < deadline, "the statement never started"
            time.sleep(0.05)
        conn.cancel_safe()
        worker.join(timeout=30)
    assert not worker.is_alive()
    assert len(failure) == 1 and isinstance(failure[0], psycopg.errors.QueryCanceled), failure


def test_verify_full_refuses_a_certificate_for_another_name_on_every_connection(
    tls_pg: tuple[EphemeralCluster, Pki],
) -> None:
    cluster, pki = tls_pg
    _serve(cluster, pki.wrong_name)
    gw = _gateway(cluster, pki, "verify-full")
    try:
        since = len(cluster.log_text())
        # The client's own connection.
        with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
            psycopg.connect(gw.dsn("alice"))
        # The side connections the gate opens for masked identities and scan reviews.
        gateway = gw.gateway
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            gw.call(gateway._load_catalog(DATABASE))
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            gw.call(
                gateway.plans.largest_scan(
                    gateway.upstream_target, DATABASE, "SELECT * FROM tls_people"
                )
            )
        # A cancel request carries a backend's key: it goes to the verified server only.
        with pytest.raises(UpstreamError, match="certificate verify failed"):
            deliver_cancel(gateway.upstream_target, 4242, b"\x00\x01\x02\x03")
        # Not one connection got as far as authentication: no password went out.
        assert _authorized(cluster, since) == []
    finally:
        gw.stop()


def test_verify_ca_checks_the_chain_only(tls_pg: tuple[EphemeralCluster, Pki]) -> None:
    cluster, pki = tls_pg
    _serve(cluster, pki.wrong_name)
    gw = _gateway(cluster, pki, "verify-ca")
    try:
        _works_through_every_connection(gw)
    finally:
        gw.stop()


def test_verify_full_with_the_right_name_works_over_tls_everywhere(
    tls_pg: tuple[EphemeralCluster, Pki],
) -> None:
    cluster, pki = tls_pg
    _serve(cluster, pki.right_name)
    gw = _gateway(cluster, pki, "verify-full")
    try:
        since = len(cluster.log_text())
        _works_through_every_connection(gw)
        lines = _authorized(cluster, since)
        # And a client's cancel reaches its statement through the same connector.
        _cancel_a_running_statement(gw, cluster)
    finally:
        gw.stop()
    for application in ("querywarden-catalog", "querywarden-plans"):
        mine = [line for line in lines if f"application_name={application}" in line]
        assert mine, lines
        assert all("SSL enabled" in line for line in mine), mine
    assert lines and all("SSL enabled" in line for line in lines), lines


def test_prefer_goes_on_without_tls_when_the_server_has_none(
    tls_pg: tuple[EphemeralCluster, Pki],
) -> None:
    cluster, pki = tls_pg
    _serve(cluster, None)
    gw = _gateway(cluster, pki, "prefer")
    try:
        _works_through_every_connection(gw)
        # verify-full never does.
        strict = _gateway(cluster, pki, "verify-full")
        try:
            with pytest.raises(psycopg.OperationalError, match="does not offer TLS"):
                psycopg.connect(strict.dsn("alice"))
            with pytest.raises(ConnectionError, match="rejected SSL upgrade"):
                strict.call(strict.gateway._load_catalog(DATABASE))
        finally:
            strict.stop()
    finally:
        gw.stop()
