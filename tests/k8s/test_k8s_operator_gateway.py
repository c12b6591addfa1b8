"""What the operator renders is what the gateway loads: the injected sidecar, run for real.

No kubelet runs on the harness, so the injected Pod is never started. This test does the
kubelet's part for the sidecar container (k8sharness.podfiles): it writes the Pod's
volumes from the ConfigMap and Secrets in the API server, resolves the container's
environment from the Secrets, and runs the container's command, ``querywarden serve
--config /etc/querywarden/gateway.yaml`` (paths moved under a temporary root). Clients
then connect through it to the session's real PostgreSQL: the rendered listener, TLS,
upstream credentials (the default role and a rule's role), policy, masking key and
audit export all have to work, and a policy change has to travel from the resource to
the ConfigMap to the running gateway.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg.conninfo import make_conninfo

from k8sharness.cluster import Cluster
from k8sharness.collector import Collector
from k8sharness.helm import Helm
from k8sharness.pki import CertificateAuthority
from k8sharness.podfiles import ContainerFiles
from k8sharness.processes import ManagedProcess, free_port
from k8sharness.qwoperator import (
    InstalledOperator,
    condition,
    create_secret,
    installed_operator,
    pod,
    policies,
    policy,
    wait_until,
)
from k8sharness.tools import REPO
from querywarden.devcluster import DATABASE, ROLE_PASSWORD, EphemeralCluster
from querywarden.identity.dev import ensure_key, mint_token

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

LABELS = {"app": "pg"}
TABLES = ("qwop_orders", "qwop_customers", "qwop_secrets")


@pytest.fixture(scope="module")
def installed(k8s: Cluster, helm: Helm, workdir: Path) -> Iterator[InstalledOperator]:
    with installed_operator(k8s, helm, workdir / "operator-gateway") as running:
        yield running


@pytest.fixture(scope="module")
def tables(pg: EphemeralCluster) -> Iterator[None]:
    pg.psql(
        "CREATE TABLE qwop_orders (id int, note text);"
        "INSERT INTO qwop_orders VALUES (1, 'first'), (2, 'second');"
        "CREATE TABLE qwop_customers (id int, ssn text);"
        "INSERT INTO qwop_customers VALUES (1, '123-45-6789');"
        "CREATE TABLE qwop_secrets (id int);"
        "INSERT INTO qwop_secrets VALUES (42);",
        user="qw_scram",
    )
    try:
        yield
    finally:
        pg.psql(f"DROP TABLE IF EXISTS {', '.join(TABLES)}", user="qw_scram")


#: The example policy's Kubernetes issuer reads these, as any in-cluster client does.
SERVICE_ACCOUNT_FILES = "/var/run/secrets/kubernetes.io/serviceaccount"


def cluster_issuer(k8s: Cluster, namespace: str) -> dict[str, Any]:
    """This cluster's service-account issuer, written as examples/policy.yaml writes it."""
    return {
        "name": "cluster",
        "kind": "kubernetes",
        "issuer": k8s.get("/.well-known/openid-configuration")["issuer"],
        "audiences": ["querywarden"],
        "caFile": f"{SERVICE_ACCOUNT_FILES}/ca.crt",
        "bearerTokenFile": f"{SERVICE_ACCOUNT_FILES}/token",
        "groupMappings": {f"system:serviceaccount:{namespace}:coder": ["ai-agents"]},
    }


def policy_spec(
    pg: EphemeralCluster,
    gateway_port: int,
    otlp: str,
    tables: list[str],
    issuers: Sequence[dict[str, Any]] = (),
) -> Any:
    return {
        "target": {
            "podSelector": {"matchLabels": LABELS},
            "databasePort": pg.port,
            "database": DATABASE,
            "sslmode": "require",
            "credentials": {"secretName": "pg-gateway"},
            "roles": [{"name": "readonly", "secretName": "pg-readonly"}],
            "tlsSecretName": "pg-gateway-tls",
            "maskingKey": {"secretName": "pg-masking", "key": "key"},
        },
        "sidecar": {
            "gatewayPort": gateway_port,
            "otlpEndpoint": otlp,
            "files": [{"name": "dev", "secretName": "dev-issuer"}],
        },
        "policy": {
            "identity": {
                "issuers": [
                    {
                        "name": "dev",
                        "kind": "dev",
                        "keyFile": "/etc/querywarden/files/dev/dev-issuer.pem",
                    },
                    *issuers,
                ]
            },
            "rules": [
                {
                    "name": "agents-read",
                    "subjects": {"groups": ["ai-agents"]},
                    "allow": {"operations": ["select"], "tables": tables},
                    "upstreamRole": "readonly",
                }
            ],
            "masking": {
                "columns": [{"table": "public.qwop_customers", "column": "ssn", "strategy": "hash"}]
            },
        },
    }


DASHBOARD = REPO / "examples" / "dashboards" / "querywarden.json"
#: What the dashboard charts, as the Collector's prometheus exporter names it.
DASHBOARD_METRICS = {
    "querywarden_decisions_total",
    "querywarden_masked_values_total",
    "querywarden_auth_refused_total",
    "db_client_operation_duration_seconds_bucket",
    "db_client_operation_duration_seconds_count",
    "db_client_connection_count",
}
# A metric is followed by its selector; a label (querywarden_decision) is not.
_METRIC = re.compile(r"\b((?:querywarden|db_client)_[a-z_]+)\{")
#: Labels the Collector's prometheus exporter derives from the resource itself:
#: job from service.namespace/service.name, instance from service.instance.id.
EXPORTER_LABELS = {"job", "instance"}
_UNITS = {"ms": "milliseconds", "s": "seconds", "By": "bytes"}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"] if "expr" in t]
    assert {m for e in exprs for m in _METRIC.findall(e)} == DASHBOARD_METRICS
    return exprs


def prometheus_names(requests: list[dict[str, Any]]) -> dict[str, set[str]]:
    """OTLP metrics as Prometheus names them (suffixes on), with their label names.

    Resource attributes are labels too, as the example Collector configures
    (``resource_to_telemetry_conversion``).
    """
    names: dict[str, set[str]] = {}
    for request in requests:
        for resource_metrics in request.get("resourceMetrics", []):
            resource = {
                a["key"].replace(".", "_")
                for a in resource_metrics.get("resource", {}).get("attributes", [])
            }
            for scope in resource_metrics.get("scopeMetrics", []):
                for metric in scope.get("metrics", []):
                    base = metric["name"].replace(".", "_")
                    unit = metric.get("unit", "")
                    if unit and not unit.startswith("{"):
                        base += "_" + _UNITS.get(unit, unit)
                    data = metric.get("sum") or metric.get("histogram") or metric.get("gauge") or {}
                    labels = set(resource)
                    for point in data.get("dataPoints", []):
                        labels |= {a["key"].replace(".", "_") for a in point.get("attributes", [])}
                    if "histogram" in metric:
                        series = [base + "_bucket", base + "_sum", base + "_count"]
                        labels.add("le")
                    elif "sum" in metric and metric["sum"].get("isMonotonic"):
                        series = [base + "_total"]
                    else:
                        series = [base]
                    for name in series:
                        names.setdefault(name, set()).update(labels)
    return names


def connect(port: int, token: str, ca: CertificateAuthority) -> psycopg.Connection[Any]:
    return psycopg.connect(
        make_conninfo(
            host="127.0.0.1",
            port=port,
            dbname=DATABASE,
            user="alice",
            password=token,
            sslmode="verify-full",
            sslrootcert=str(ca.cert_file),
            connect_timeout=10,
        ),
        autocommit=True,
    )


def test_the_injected_sidecar_serves_the_rendered_policy(
    k8s: Cluster,
    namespace: str,
    installed: InstalledOperator,
    pg: EphemeralCluster,
    tables: None,
    otel_collector: Collector,
    tmp_path: Path,
) -> None:
    # The Secrets a user creates next to the database.
    ca = CertificateAuthority(tmp_path / "pki", "querywarden-test-gateway-ca")
    served = ca.issue("gateway", common_name="127.0.0.1", hosts=["127.0.0.1"], server=True)
    create_secret(
        k8s, namespace, "pg-gateway-tls",
        {"tls.crt": served.cert_file.read_bytes(), "tls.key": served.key_file.read_bytes()},
        type_="kubernetes.io/tls",
    )  # fmt: skip
    create_secret(k8s, namespace, "pg-gateway", {"username": "qw_scram", "password": ROLE_PASSWORD})
    create_secret(k8s, namespace, "pg-readonly", {"username": "qw_md5", "password": ROLE_PASSWORD})
    create_secret(k8s, namespace, "pg-masking", {"key": secrets.token_hex(16)})
    dev_key = tmp_path / "dev-issuer.pem"
    ensure_key(dev_key)
    create_secret(k8s, namespace, "dev-issuer", {"dev-issuer.pem": dev_key.read_bytes()})

    gateway_port = free_port()
    allowed = ["public.qwop_orders", "public.qwop_customers"]
    issuers = [cluster_issuer(k8s, namespace)] if k8s.local else []
    spec = policy_spec(pg, gateway_port, otel_collector.endpoint, allowed, issuers)
    k8s.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(policy("pg", spec)))
    wait_until(
        lambda: (
            (condition(k8s.get(f"{policies(namespace)}/pg"), "Rendered") or {}).get("status")
            == "True"
        ),
        what="the policy rendered",
    )
    installed.wait_for_webhook(namespace, pod("probe", LABELS))
    stored = k8s.create(f"/api/v1/namespaces/{namespace}/pods", pod("pg-0", LABELS))

    # The kubelet's part, then the container's command.
    files = ContainerFiles(k8s, stored, "querywarden", tmp_path / "root")
    files.sync()
    argv = files.argv()
    assert argv[:2] == ["querywarden", "serve"]
    argv[0] = str(Path(sys.executable).parent / "querywarden")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUERYWARDEN_")}
    env.update(files.env())
    assert env["QUERYWARDEN_UPSTREAM__USER"] == "qw_scram"
    assert env["OTEL_RESOURCE_ATTRIBUTES"] == f"k8s.pod.name=pg-0,k8s.namespace.name={namespace}"
    gateway = ManagedProcess("sidecar", argv, tmp_path / "sidecar.log", env=env)
    try:
        gateway.wait_until(
            lambda: (
                socket.create_connection(("127.0.0.1", gateway_port), timeout=1).close() is None
            ),
            timeout=30,
            what="listening",
        )
        token = mint_token("alice", groups=["ai-agents"], ttl=600, key_file=dev_key)
        with connect(gateway_port, token, ca) as conn:
            # TLS with the Secret's certificate, the rule's upstream role.
            assert conn.info.pgconn.ssl_in_use
            assert conn.execute("SELECT current_user").fetchone() == ("qw_md5",)
            assert conn.execute(
                "SELECT id, note FROM public.qwop_orders ORDER BY id"
            ).fetchall() == [
                (1, "first"),
                (2, "second"),
            ]
            # Masked with the key from the Secret (hash: 16 hex characters).
            ((ssn,),) = conn.execute("SELECT ssn FROM public.qwop_customers").fetchall()
            assert ssn != "123-45-6789"
            assert len(ssn) == 16
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="qwop_secrets"):
                conn.execute("SELECT id FROM public.qwop_secrets")

        if k8s.local:
            # An agent's pod with a projected token: the policy's Kubernetes issuer,
            # written as for any in-cluster client, reads the sidecar's own
            # ServiceAccount files (CA, token for the JWKS) at the standard path.
            k8s.create(
                f"/api/v1/namespaces/{namespace}/serviceaccounts",
                {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coder"}},
            )
            projected = k8s.create(
                f"/api/v1/namespaces/{namespace}/serviceaccounts/coder/token",
                {
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenRequest",
                    "spec": {"audiences": ["querywarden"], "expirationSeconds": 600},
                },
            )["status"]["token"]
            assert files.host_path(f"{SERVICE_ACCOUNT_FILES}/token").read_text()
            with connect(gateway_port, projected, ca) as conn:
                assert conn.execute("SELECT count(*) FROM public.qwop_orders").fetchone() == (2,)

        # A token the gateway does not trust: refused at authentication (and counted).
        with pytest.raises(psycopg.OperationalError):
            connect(gateway_port, "not-a-token", ca)

        # A policy change: resource → operator → ConfigMap → (kubelet) → gateway reload.
        spec = policy_spec(
            pg, gateway_port, otel_collector.endpoint, [*allowed, "public.qwop_secrets"], issuers
        )
        k8s.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(policy("pg", spec)))

        def reloaded() -> list[Any] | None:
            files.sync()
            with connect(gateway_port, token, ca) as conn:
                try:
                    return conn.execute("SELECT id FROM public.qwop_secrets").fetchall()
                except psycopg.errors.InsufficientPrivilege:
                    return None

        assert wait_until(reloaded, timeout=45, what="the gateway reloading the policy") == [(42,)]
        assert "policy reloaded" in gateway.log_file.read_text()

        # The audit log went to the Collector that spec.sidecar.otlpEndpoint names: the
        # refusal before the reload and the answer after it.
        def decisions() -> set[str] | None:
            found = {
                str(span.attributes.get("querywarden.decision"))
                for span in otel_collector.spans()
                if span.attributes.get("user.id") == "alice"
                and span.attributes.get("db.query.text") == "SELECT id FROM public.qwop_secrets"
            }
            return found if {"allow", "refuse"} <= found else None

        wait_until(decisions, timeout=30, what="the audit spans in the Collector")

        # The metrics the dashboard charts are the ones the sidecar exports.
        def exported() -> dict[str, set[str]] | None:
            # Only this sidecar's metrics: the session's Collector also holds those of
            # earlier tests, which have no Kubernetes resource attributes.
            names = prometheus_names(
                [
                    {
                        "resourceMetrics": [
                            rm
                            for rm in request.get("resourceMetrics", [])
                            if any(
                                a["key"] == "k8s.namespace.name"
                                for a in rm.get("resource", {}).get("attributes", [])
                            )
                        ]
                    }
                    for request in otel_collector.records("metrics")
                ]
            )
            return names if set(names) >= DASHBOARD_METRICS else None

        names = wait_until(exported, timeout=40, what="the gateway's metrics in the Collector")
        for expr in dashboard_expressions():
            used = set(_METRIC.findall(expr))
            labels = set(re.findall(r"(\w+)=~?\"", expr))
            for group in re.findall(r"by \(([^)]*)\)", expr):
                labels |= {label.strip() for label in group.split(",")}
            available = set().union(*(names[name] for name in used)) | EXPORTER_LABELS
            assert labels <= available, (expr, labels - available)
    finally:
        gateway.stop()
