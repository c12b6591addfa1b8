"""querywarden as users run it: the chart, the image and the operator on a real node.

Everything here happens the way a user's cluster does it. ``helm install`` of the chart
with the locally built image; the operator's Deployment runs in pods; a PostgreSQL
StatefulSet that a DatabaseAccessPolicy selects gets the gateway injected by the real
webhook and the kubelet starts it as a native sidecar; a client pod with a projected
service-account token runs psql through it, and the Kubernetes issuer (discovery at
``https://kubernetes.default.svc.cluster.local``, through CoreDNS and kube-proxy)
authenticates it; held statements are approved with ``kubectl querywarden approve``;
a policy edit reaches the running sidecar through the kubelet's ConfigMap update; audit
spans reach a Collector pod; deleting the database pod under load loses no audit record.

The tests share one installation (module scope) and run in file order: each step builds
on the state the previous ones left, as a user's session would.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg.conninfo import make_conninfo

from k8sharness.cluster import Cluster, KubeError
from k8sharness.collector import Collector, ReceivedSpan
from k8sharness.helm import Helm
from k8sharness.node import Node
from k8sharness.pki import CertificateAuthority
from k8sharness.tools import REPO, tool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CHART = REPO / "charts" / "querywarden"
PLUGIN = CHART / "files" / "kubectl-querywarden"
RELEASE = "querywarden"
SYSTEM = "querywarden-system"
SHOP = "shop"
AGENTS = "agents"
OBSERVABILITY = "observability"
POLICY = "app-db"
DB_LABELS = {"app.kubernetes.io/name": "app-db"}
GATEWAY_PORT = 6432
#: Where the client pod finds its token: a projected volume, audience querywarden.
TOKEN_DIR = "/var/run/secrets/querywarden"
GATEWAY_HOST = f"app-db-0.app-db.{SHOP}.svc.cluster.local"
COLLECTOR_ENDPOINT = f"http://otel-collector.{OBSERVABILITY}.svc.cluster.local:4318"
POSTGRES_IMAGE = "localhost/querywarden-postgres:15"
OTELCOL_IMAGE = "localhost/querywarden-otelcol:dev"
ROLLOUT_TIMEOUT = 240.0

INIT_SQL = """
CREATE ROLE gateway LOGIN PASSWORD 'gateway-password';
CREATE ROLE ai_readonly LOGIN PASSWORD 'readonly-password';
CREATE TABLE customers (id int PRIMARY KEY, name text, email text, ssn text);
INSERT INTO customers VALUES
  (1, 'Ada', 'ada@example.com', '123-45-6789'),
  (2, 'Grace', 'grace@example.com', '987-65-4321');
CREATE TABLE orders (id int PRIMARY KEY, customer_id int, total numeric);
INSERT INTO orders SELECT g, 1 + g % 2, g * 10 FROM generate_series(1, 20) g;
CREATE TABLE api_keys (id int, secret text);
INSERT INTO api_keys VALUES (1, 'sk_live_abcdef');
GRANT SELECT ON ALL TABLES IN SCHEMA public TO ai_readonly;
GRANT DELETE ON orders TO ai_readonly;
"""


def policy_spec(denied: list[str]) -> dict[str, Any]:
    """The chart's example policy, with a review rule and the Collector as in a cluster."""
    return {
        "target": {
            "podSelector": {"matchLabels": DB_LABELS},
            "databasePort": 5432,
            "database": "app",
            "credentials": {"secretName": "app-db-gateway"},
            "roles": [{"name": "ai_readonly", "secretName": "app-db-readonly"}],
            "tlsSecretName": "app-db-gateway-tls",
            "clients": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": AGENTS}}}
            ],
        },
        "sidecar": {"gatewayPort": GATEWAY_PORT, "otlpEndpoint": COLLECTOR_ENDPOINT},
        "policy": {
            "identity": {
                "issuers": [
                    {
                        "name": "cluster",
                        "kind": "kubernetes",
                        "issuer": "https://kubernetes.default.svc.cluster.local",
                        "audiences": ["querywarden"],
                        "caFile": "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
                        "bearerTokenFile": "/var/run/secrets/kubernetes.io/serviceaccount/token",
                        "groupMappings": {AGENTS: ["ai-agents"]},
                    }
                ]
            },
            "rules": [
                {
                    "name": "ai-agents-read",
                    "subjects": {"groups": ["ai-agents"]},
                    "databases": ["app"],
                    "allow": {
                        "operations": ["select", "explain", "show", "transaction"],
                        "tables": ["public.*", "pg_catalog.*"],
                    },
                    "deny": {"tables": denied},
                    "review": {"operations": ["delete"]},
                    "limits": {"statementTimeout": "30s", "maxRows": 10000},
                    "upstreamRole": "ai_readonly",
                }
            ],
            "masking": {
                "columns": [
                    {"table": "public.customers", "column": "email", "strategy": "email"},
                    {
                        "table": "public.customers",
                        "column": "ssn",
                        "strategy": "partial",
                        "keepLast": 4,
                    },
                ]
            },
            "approvals": {"approvers": {"groups": ["dba"]}, "hold": "120s"},
        },
    }


def manifest(kind: str, name: str, namespace: str | None, **body: Any) -> dict[str, Any]:
    api = {
        "Deployment": "apps/v1",
        "StatefulSet": "apps/v1",
        "RoleBinding": "rbac.authorization.k8s.io/v1",
        "DatabaseAccessPolicy": "querywarden.io/v1alpha1",
    }.get(kind, "v1")
    metadata: dict[str, Any] = {"name": name, **body.pop("metadata", {})}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": api, "kind": kind, "metadata": metadata, **body}


def secret(name: str, namespace: str, data: dict[str, bytes], **extra: Any) -> dict[str, Any]:
    encoded = {k: base64.b64encode(v).decode() for k, v in data.items()}
    return manifest("Secret", name, namespace, data=encoded, **extra)


@dataclass
class Installation:
    """What the module set up, and how the tests act on it."""

    node: Node
    k8s: Cluster
    helm: Helm
    collector: Collector
    gateway_ca: CertificateAuthority
    plugin_dir: Path
    timings: dict[str, float] = field(default_factory=dict)

    def apply(self, *objects: dict[str, Any]) -> None:
        self.k8s.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(objects))

    def rollout(self, namespace: str, what: str) -> None:
        self.k8s.kubectl(
            "-n", namespace, "rollout", "status", what, f"--timeout={ROLLOUT_TIMEOUT:.0f}s",
            timeout=ROLLOUT_TIMEOUT + 10,
        )  # fmt: skip

    def diagnose(self) -> str:
        """What a user would look at when something does not come up."""
        out = []
        for args in (
            ("get", "pods", "-A", "-o", "wide"),
            ("get", "events", "-A", "--sort-by=.lastTimestamp"),
            ("-n", SHOP, "describe", "pod", "app-db-0"),
            ("-n", SHOP, "logs", "app-db-0", "--all-containers", "--tail=60"),
            ("-n", SYSTEM, "logs", f"deployment/{RELEASE}", "--tail=60"),
        ):
            result = self.k8s.kubectl(*args, check=False)
            out.append(f"$ kubectl {' '.join(args)}\n{result.stdout}{result.stderr}")
        for component in ("kubelet", "containerd"):
            out.append(f"--- {component} (last lines)\n{self.node.logs(component, 30)}")
        return "\n".join(out)

    def pod(self, namespace: str, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.k8s.get(f"/api/v1/namespaces/{namespace}/pods/{name}")
        return found

    def psql(self, sql: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """psql in the client pod, through the sidecar, with the pod's projected token."""
        return self.k8s.kubectl("exec", "-n", AGENTS, "client", "--", *psql_argv(sql), check=check)

    def psql_started(self, sql: str) -> subprocess.Popen[str]:
        """The same, left running (a statement the gateway holds)."""
        return subprocess.Popen(
            [str(tool("kubectl")), "exec", "-n", AGENTS, "client", "--", *psql_argv(sql)],
            env=self.k8s.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def token(self, audience: str = "querywarden") -> str:
        """A token for agents/coder from the TokenRequest API: what the projected volume
        holds (the kubelet asks the same API), for clients outside the pod."""
        answer = self.k8s.create(
            f"/api/v1/namespaces/{AGENTS}/serviceaccounts/coder/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"audiences": [audience], "expirationSeconds": 600},
            },
        )
        return str(answer["status"]["token"])

    def connect(self, *, application_name: str = "node-e2e") -> psycopg.Connection[Any]:
        """psycopg from the test machine to the sidecar, at the pod's IP (as a peer on the
        cluster network), verifying the gateway's certificate."""
        pod_ip = self.pod(SHOP, "app-db-0")["status"]["podIP"]
        return psycopg.connect(
            make_conninfo(
                host=pod_ip, port=GATEWAY_PORT, dbname="app", user="coder",
                password=self.token(), sslmode="verify-ca",
                sslrootcert=str(self.gateway_ca.cert_file),
                application_name=application_name, connect_timeout=10,
            ),
            autocommit=True,
        )  # fmt: skip

    def statement_spans(self) -> list[ReceivedSpan]:
        """The Collector's statement spans (named after the statement: ``SELECT orders``)."""
        return [s for s in self.collector.spans() if "querywarden.statement.id" in s.attributes]

    def kubectl_querywarden(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The chart's kubectl plugin, found on PATH by kubectl as a user installs it."""
        path = f"{self.plugin_dir}:{tool('kubectl').parent}:{os.environ.get('PATH', '')}"
        return self.k8s.run(tool("kubectl"), "querywarden", *args, env={"PATH": path})


def psql_argv(sql: str) -> list[str]:
    conninfo = (
        f"host={GATEWAY_HOST} port={GATEWAY_PORT} dbname=app user=coder "
        "sslmode=verify-full sslrootcert=/etc/gateway-ca/ca.crt"
    )
    script = (
        f'PGPASSWORD="$(cat {TOKEN_DIR}/token)" exec psql -X -At -v ON_ERROR_STOP=1 "$1" -c "$2"'
    )
    return ["sh", "-c", script, "sh", conninfo, sql]


@pytest.fixture(scope="module")
def installed(node: Node, workdir: Path) -> Iterator[Installation]:
    assert node.cluster is not None
    k8s = node.cluster
    helm = Helm(k8s, workdir / "node-helm")
    collector_dir = workdir / "node-collector"
    collector_dir.mkdir(mode=0o777)
    collector_dir.chmod(0o777)  # written by the Collector pod's uid
    collector = Collector(collector_dir)
    plugin_dir = workdir / "node-plugins"
    plugin_dir.mkdir()
    (plugin_dir / "kubectl-querywarden").symlink_to(PLUGIN)
    gateway_ca = CertificateAuthority(workdir / "node-gateway-pki", "shop-gateway-ca")
    setup = Installation(node, k8s, helm, collector, gateway_ca, plugin_dir)
    try:
        install(setup)
    except BaseException:
        print(setup.diagnose())
        raise
    try:
        yield setup
    finally:
        print(f"\nnode e2e set-up: {setup.timings}; node start: {node.timings}")


def install(setup: Installation) -> None:
    """What a user does, in order: the chart, a Collector, the database, the agent."""
    k8s, helm, collector, gateway_ca = setup.k8s, setup.helm, setup.collector, setup.gateway_ca
    collector_dir = collector.workdir
    started = time.monotonic()

    # 1. The chart, as the README says, with the image loaded into the node.
    helm(
        "install", RELEASE, str(CHART), "--namespace", SYSTEM, "--create-namespace",
        "--set", "image.repository=localhost/querywarden", "--set", "image.tag=dev",
        "--wait=false",
    )  # fmt: skip
    # 2. A Collector, as examples/otel-collector.yaml deploys one (files out, for us).
    config = collector.config(listen="0.0.0.0:4318", directory="/out")
    otel_labels = {"app": "otel-collector"}
    setup.apply(
        manifest("Namespace", OBSERVABILITY, None),
        manifest("ConfigMap", "otel-collector", OBSERVABILITY,
                 data={"config.yaml": yaml.safe_dump(config)}),
        manifest(
            "Deployment", "otel-collector", OBSERVABILITY,
            spec={
                "replicas": 1,
                "selector": {"matchLabels": otel_labels},
                "template": {
                    "metadata": {"labels": otel_labels},
                    "spec": {
                        "containers": [{
                            "name": "otelcol",
                            "image": OTELCOL_IMAGE,
                            "args": ["--config=file:/etc/otelcol/config.yaml"],
                            "ports": [{"containerPort": 4318}],
                            "readinessProbe": {"tcpSocket": {"port": 4318}, "periodSeconds": 2},
                            "volumeMounts": [
                                {"name": "config", "mountPath": "/etc/otelcol"},
                                {"name": "out", "mountPath": "/out"},
                            ],
                        }],
                        "volumes": [
                            {"name": "config", "configMap": {"name": "otel-collector"}},
                            {"name": "out", "hostPath": {"path": str(collector_dir),
                                                         "type": "Directory"}},
                        ],
                    },
                },
            },
        ),
        manifest("Service", "otel-collector", OBSERVABILITY,
                 spec={"selector": otel_labels, "ports": [{"name": "otlp-http", "port": 4318}]}),
    )  # fmt: skip
    setup.rollout(SYSTEM, f"deployment/{RELEASE}")
    setup.rollout(OBSERVABILITY, "deployment/otel-collector")
    setup.timings["chart and Collector ready"] = time.monotonic() - started

    # 3. The database's namespace: credentials, the gateway's certificate, the policy.
    serving = gateway_ca.issue(
        "gateway", common_name=GATEWAY_HOST, hosts=[GATEWAY_HOST, f"app-db.{SHOP}.svc"],
        server=True,
    )  # fmt: skip
    setup.apply(
        manifest("Namespace", SHOP, None),
        secret("app-db-postgres", SHOP, {"password": b"postgres-password"}),
        secret("app-db-gateway", SHOP,
               {"username": b"gateway", "password": b"gateway-password"}),
        secret("app-db-readonly", SHOP,
               {"username": b"ai_readonly", "password": b"readonly-password"}),
        secret("app-db-gateway-tls", SHOP,
               {"tls.crt": serving.cert_file.read_bytes(),
                "tls.key": serving.key_file.read_bytes()},
               type="kubernetes.io/tls"),
        manifest("ConfigMap", "app-db-init", SHOP, data={"init.sql": INIT_SQL}),
        manifest("RoleBinding", "approvers", SHOP,
                 roleRef={"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                          "name": "querywarden-approver"},
                 subjects=[{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                            "name": "dana"}]),
    )  # fmt: skip
    setup.apply(
        manifest("DatabaseAccessPolicy", POLICY, SHOP, spec=policy_spec(["public.api_keys"]))
    )
    # 4. The database: a StatefulSet as users write one; the webhook adds the gateway.
    setup.apply(
        manifest("Service", "app-db", SHOP, spec={
            "clusterIP": "None", "selector": DB_LABELS,
            "ports": [{"name": "gateway", "port": GATEWAY_PORT}],
        }),
        manifest(
            "StatefulSet", "app-db", SHOP,
            spec={
                "serviceName": "app-db",
                "replicas": 1,
                "selector": {"matchLabels": DB_LABELS},
                "template": {
                    "metadata": {"labels": DB_LABELS},
                    "spec": {
                        # The volume writable by the image's postgres user (uid 999).
                        "securityContext": {"fsGroup": 999},
                        "containers": [{
                            "name": "postgres",
                            "image": POSTGRES_IMAGE,
                            "env": [
                                {"name": "POSTGRES_DB", "value": "app"},
                                # A subdirectory of the volume, as the official image's
                                # docs advise: PostgreSQL must own its data directory.
                                {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"},
                                {"name": "POSTGRES_PASSWORD", "valueFrom": {"secretKeyRef": {
                                    "name": "app-db-postgres", "key": "password"}}},
                            ],
                            "ports": [{"containerPort": 5432}],
                            "readinessProbe": {
                                "exec": {"command": ["pg_isready", "-h", "127.0.0.1"]},
                                "periodSeconds": 2,
                            },
                            "volumeMounts": [
                                {"name": "data", "mountPath": "/var/lib/postgresql/data"},
                                {"name": "init", "mountPath": "/docker-entrypoint-initdb.d"},
                            ],
                        }],
                        "volumes": [
                            {"name": "data", "emptyDir": {}},
                            {"name": "init", "configMap": {"name": "app-db-init"}},
                        ],
                    },
                },
            },
        ),
    )  # fmt: skip
    # 5. The agent: a pod with a projected token for the gateway, and psql.
    setup.apply(
        manifest("Namespace", AGENTS, None),
        manifest("ServiceAccount", "coder", AGENTS),
        manifest("ConfigMap", "gateway-ca", AGENTS,
                 data={"ca.crt": gateway_ca.cert_pem.decode()}),
        manifest(
            "Pod", "client", AGENTS,
            spec={
                "serviceAccountName": "coder",
                "terminationGracePeriodSeconds": 1,
                "containers": [{
                    "name": "psql",
                    "image": POSTGRES_IMAGE,
                    "command": ["sleep", "infinity"],
                    "volumeMounts": [
                        {"name": "token", "mountPath": TOKEN_DIR},
                        {"name": "gateway-ca", "mountPath": "/etc/gateway-ca"},
                    ],
                }],
                "volumes": [
                    {"name": "token", "projected": {"sources": [{"serviceAccountToken": {
                        "audience": "querywarden", "expirationSeconds": 3600, "path": "token"}}]}},
                    {"name": "gateway-ca", "configMap": {"name": "gateway-ca"}},
                ],
            },
        ),
    )  # fmt: skip
    setup.rollout(SHOP, "statefulset/app-db")
    k8s.kubectl("-n", AGENTS, "wait", "pod/client", "--for=condition=Ready", "--timeout=120s")
    setup.timings["database and client ready"] = time.monotonic() - started


def test_the_chart_runs_the_operator_and_the_webhook_injects_a_native_sidecar(
    installed: Installation,
) -> None:
    k8s = installed.k8s
    deployment = k8s.get(f"/apis/apps/v1/namespaces/{SYSTEM}/deployments/{RELEASE}")
    assert deployment["status"].get("readyReplicas") == deployment["spec"]["replicas"] == 2
    pod = installed.pod(SHOP, "app-db-0")
    # The webhook made the gateway an init container that keeps running: a native sidecar,
    # started before PostgreSQL and stopped after it.
    sidecars = [c for c in pod["spec"].get("initContainers", []) if c["name"] == "querywarden"]
    assert len(sidecars) == 1 and sidecars[0]["restartPolicy"] == "Always"
    assert sidecars[0]["image"] == "localhost/querywarden:dev"
    statuses = {s["name"]: s for s in pod["status"]["initContainerStatuses"]}
    assert statuses["querywarden"]["ready"] is True and statuses["querywarden"]["started"]
    assert statuses["querywarden"]["restartCount"] == 0
    assert all(s["ready"] for s in pod["status"]["containerStatuses"])
    # The policy reports the pod as protected.
    policy = k8s.get(
        f"/apis/querywarden.io/v1alpha1/namespaces/{SHOP}/databaseaccesspolicies/{POLICY}"
    )
    rendered = {c["type"]: c["status"] for c in policy["status"]["conditions"]}
    assert rendered.get("Rendered") == "True", policy["status"]


def test_a_client_pod_with_a_projected_token_is_authenticated_and_masked(
    installed: Installation,
) -> None:
    result = installed.psql("SELECT id, name, email, ssn FROM customers ORDER BY id")
    rows = [line.split("|") for line in result.stdout.splitlines()]
    assert [r[:2] for r in rows] == [["1", "Ada"], ["2", "Grace"]]
    for _, _, email, ssn in rows:
        assert "@" in email and email not in {"ada@example.com", "grace@example.com"}
        assert ssn.endswith(("6789", "4321")) and not ssn[:-4].strip("*x-X• ").isdigit()
        assert ssn not in {"123-45-6789", "987-65-4321"}
    assert installed.psql("SELECT count(*) FROM orders").stdout.strip() == "20"


def test_a_denied_table_is_refused_with_the_rule_and_what_to_do(installed: Installation) -> None:
    result = installed.psql("SELECT secret FROM api_keys", check=False)
    assert result.returncode != 0
    assert "sk_live" not in result.stdout
    assert "ai-agents-read" in result.stderr and "api_keys" in result.stderr, result.stderr


def test_a_held_delete_is_released_by_kubectl_querywarden_approve(
    installed: Installation,
) -> None:
    k8s = installed.k8s
    held = installed.psql_started("DELETE FROM orders WHERE id = 1")
    try:
        review = k8s.wait_for(
            lambda: next(
                (
                    r
                    for r in k8s.get(
                        f"/apis/querywarden.io/v1alpha1/namespaces/{SHOP}/queryreviews"
                    )["items"]
                    if r["spec"]["statement"] == "DELETE FROM orders WHERE id = 1"
                ),
                None,
            ),
            timeout=60,
            what="the QueryReview of the held DELETE",
        )
        assert review["spec"]["requester"]["subject"] == f"system:serviceaccount:{AGENTS}:coder"
        assert review["spec"]["decision"] == "pending"
        assert held.poll() is None  # still held on the wire
        name = review["metadata"]["name"]
        installed.kubectl_querywarden(
            "approve", name, "-n", SHOP, "--comment", "ticket 4711",
            "--as", "dana", "--as-group", "dba",
        )  # fmt: skip
        out, err = held.communicate(timeout=60)
    finally:
        if held.poll() is None:
            held.kill()
            held.communicate()
    assert held.returncode == 0, err
    assert "DELETE 1" in out or out.strip() == "", (out, err)
    assert installed.psql("SELECT count(*) FROM orders WHERE id = 1").stdout.strip() == "0"
    decided = k8s.get(f"/apis/querywarden.io/v1alpha1/namespaces/{SHOP}/queryreviews/{name}")
    assert decided["status"]["approver"]["subject"] == "dana"


def test_a_policy_edit_reaches_the_running_sidecar_without_dropping_connections(
    installed: Installation,
) -> None:
    k8s = installed.k8s
    with installed.connect(application_name="reload") as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (2,)
        before = installed.pod(SHOP, "app-db-0")["status"]["initContainerStatuses"]
        installed.apply(
            manifest(
                "DatabaseAccessPolicy", POLICY, SHOP,
                spec=policy_spec(["public.api_keys", "public.customers"]),
            )
        )  # fmt: skip
        started = time.monotonic()

        def refused_now() -> bool | None:
            try:
                conn.execute("SELECT count(*) FROM customers").fetchone()
            except psycopg.errors.InsufficientPrivilege:
                return True
            return None

        # The operator rewrites the ConfigMap; the kubelet swaps the volume's ..data link;
        # the sidecar reloads: the same open connection then gets the new rules.
        k8s.wait_for(refused_now, timeout=120, what="the edited policy in the open session")
        installed.timings["policy edit to sidecar"] = time.monotonic() - started
        assert conn.execute("SELECT count(*) FROM orders").fetchone() is not None
    after = installed.pod(SHOP, "app-db-0")["status"]["initContainerStatuses"]
    assert [s["restartCount"] for s in after] == [s["restartCount"] for s in before]
    installed.apply(
        manifest("DatabaseAccessPolicy", POLICY, SHOP, spec=policy_spec(["public.api_keys"]))
    )
    k8s.wait_for(
        lambda: (
            installed.psql("SELECT count(*) FROM customers", check=False).returncode == 0 or None
        ),
        timeout=120,
        what="the policy restored",
    )


def test_audit_spans_of_the_client_pod_reach_the_collector_pod(installed: Installation) -> None:
    def spans() -> list[ReceivedSpan] | None:
        found = [
            s
            for s in installed.statement_spans()
            if s.attributes.get("user.id") == f"system:serviceaccount:{AGENTS}:coder"
            and "customers" in str(s.attributes.get("db.query.text", ""))
        ]
        return found or None

    found = installed.k8s.wait_for(spans, timeout=90, what="statement spans in the Collector pod")
    assert any(s.attributes.get("querywarden.masked_values", 0) > 0 for s in found), [
        s.attributes for s in found
    ]


def test_deleting_the_pod_under_load_loses_no_audit_record(installed: Installation) -> None:
    k8s = installed.k8s
    marker = f"load-{secrets.token_hex(4)}"
    completed = 0
    stop = threading.Event()
    failure: list[BaseException] = []

    def load() -> None:
        nonlocal completed
        try:
            with installed.connect(application_name=marker) as conn:
                while not stop.is_set():
                    conn.execute("SELECT id, total FROM orders WHERE id = %s", (completed % 20,))
                    completed += 1
        except psycopg.Error:
            pass  # the pod went away under us: expected
        except BaseException as exc:
            failure.append(exc)

    old_uid = installed.pod(SHOP, "app-db-0")["metadata"]["uid"]
    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    k8s.wait_for(lambda: completed >= 50 or None, timeout=60, what="load running")
    k8s.kubectl("-n", SHOP, "delete", "pod", "app-db-0", "--wait=true", "--timeout=120s")
    stop.set()
    worker.join(timeout=60)
    assert not failure, failure
    assert completed >= 50

    def sessions() -> list[str] | None:
        ids = [
            str(s.attributes["querywarden.session.id"])
            for s in installed.collector.spans()
            if s.name == "querywarden.session"
            and s.attributes.get("querywarden.session.application_name") == marker
        ]
        return ids or None

    # The sidecar drained what it had not exported before the pod went: its session span
    # (written at the session's end, during the shutdown) is there, with every statement.
    (session_id,) = k8s.wait_for(sessions, timeout=60, what="the load session's span")
    statements = [
        s
        for s in installed.statement_spans()
        if s.attributes.get("querywarden.session.id") == session_id
    ]
    assert len(statements) >= completed, (len(statements), completed)
    # Statement ids count up within a session: none missing between the first and last.
    numbers = sorted(int(str(s.attributes["querywarden.statement.id"]).rsplit("-", 1)[1])
                     for s in statements)  # fmt: skip
    assert numbers == list(range(1, len(numbers) + 1)), "a statement's span is missing"
    # The StatefulSet brings the database back, with the gateway.
    k8s.wait_for(
        lambda: (
            (
                (p := installed.pod(SHOP, "app-db-0"))["metadata"]["uid"] != old_uid
                and p["status"].get("phase") == "Running"
            )
            or None
        ),
        timeout=120,
        what="the replacement pod",
    )
    installed.rollout(SHOP, "statefulset/app-db")


def test_the_network_policy_is_rendered_for_the_database_pods(installed: Installation) -> None:
    """The plain bridge plugin enforces no NetworkPolicy (docs/test-harness.md); the object
    the operator applies is checked instead: only the gateway port, only from agents."""
    k8s = installed.k8s
    try:
        policies = k8s.get(f"/apis/networking.k8s.io/v1/namespaces/{SHOP}/networkpolicies")
    except KubeError as exc:  # pragma: no cover - the API always serves it
        raise AssertionError(exc) from exc
    (rendered,) = [
        p for p in policies["items"] if p["spec"]["podSelector"] == {"matchLabels": DB_LABELS}
    ]
    ingress = rendered["spec"]["ingress"]
    ports = {p["port"] for rule in ingress for p in rule.get("ports", [])}
    assert ports == {GATEWAY_PORT}
    sources = [peer for rule in ingress for peer in rule.get("from", [])]
    assert sources == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": AGENTS}}}
    ]


MCP = f"{RELEASE}-mcp"
MCP_PUBLIC_URL = "https://mcp.example.test/mcp"


def test_the_charts_mcp_server_is_ready_on_the_node_and_asks_for_a_bearer(
    installed: Installation,
) -> None:
    """``mcp.enabled`` on the running release: the kubelet's probes pass (read-only, uid
    65532, the protected resource metadata without a token or an allowed Host), its
    Service answers /mcp with a Bearer challenge, and an agent's token runs a tool
    through the injected sidecar (which serves no admin API: the server verifies the
    bearer by a start-up on the gateway)."""
    k8s = installed.k8s
    installed.apply(
        manifest("ConfigMap", "gateway-ca", SYSTEM,
                 data={"ca.crt": installed.gateway_ca.cert_pem.decode()}),
    )  # fmt: skip
    installed.helm(
        "upgrade", RELEASE, str(CHART), "--namespace", SYSTEM, "--reuse-values", "--wait=false",
        "--set", "mcp.enabled=true",
        "--set", f"mcp.gateway=app-db.{SHOP}.svc:{GATEWAY_PORT}",
        "--set", "mcp.database=app",
        "--set", "mcp.sslmode=verify-ca",
        "--set", "mcp.ca.configMap=gateway-ca",
        "--set", "mcp.authorizationServer=https://issuer.example.test",
        "--set", f"mcp.publicUrl={MCP_PUBLIC_URL}",
        "--set", "mcp.allowedHosts={mcp.example.test}",
    )  # fmt: skip
    installed.rollout(SYSTEM, f"deployment/{MCP}")
    deployment = k8s.get(f"/apis/apps/v1/namespaces/{SYSTEM}/deployments/{MCP}")
    assert deployment["status"].get("readyReplicas") == deployment["spec"]["replicas"] == 2
    # Through the Service (CoreDNS, kube-proxy), from one of its own pods.
    script = (
        "import urllib.request, urllib.error\n"
        f"url = 'http://{MCP}.{SYSTEM}.svc.cluster.local:8765'\n"
        "print(urllib.request.urlopen(url + '/.well-known/oauth-protected-resource/mcp',"
        " timeout=10).read().decode())\n"
        "request = urllib.request.Request(url + '/mcp', data=b'{}', method='POST',"
        " headers={'Host': 'mcp.example.test', 'Content-Type': 'application/json',"
        " 'Accept': 'application/json, text/event-stream'})\n"
        "try:\n    urllib.request.urlopen(request, timeout=10)\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code, e.headers['WWW-Authenticate'])\n"
    )
    answer = k8s.kubectl(
        "exec", "-n", SYSTEM, f"deployment/{MCP}", "--", "python", "-c", script
    ).stdout.splitlines()
    assert '"authorization_servers":["https://issuer.example.test/"]' in answer[0]
    assert answer[1].startswith("401 Bearer")
    assert "https://mcp.example.test/.well-known/oauth-protected-resource/mcp" in answer[1]

    # An agent's tool call, with the SDK's client, as the agents' ServiceAccount.
    client = (
        "import asyncio, json, sys\n"
        "import httpx2\n"
        "from mcp import ClientSession\n"
        "from mcp.client.streamable_http import streamable_http_client\n"
        "async def main():\n"
        "    headers = {'Authorization': 'Bearer ' + sys.argv[1], 'Host': 'mcp.example.test'}\n"
        "    async with httpx2.AsyncClient(headers=headers, timeout=60) as http, \\\n"
        f"            streamable_http_client('http://{MCP}.{SYSTEM}.svc.cluster.local:8765/mcp',"
        " http_client=http) as (read, write), ClientSession(read, write) as session:\n"
        "        await session.initialize()\n"
        "        result = await session.call_tool('query',"
        " {'sql': 'SELECT name, ssn FROM customers ORDER BY id'})\n"
        "        print(json.dumps({'error': result.is_error,"
        " 'content': result.structured_content}))\n"
        "asyncio.run(main())\n"
    )
    out = k8s.kubectl(
        "exec", "-n", SYSTEM, f"deployment/{MCP}", "--",
        "python", "-c", client, installed.token(),
    ).stdout  # fmt: skip
    called = json.loads(out.strip().splitlines()[-1])
    assert called["error"] is False, called
    rows = called["content"]["rows"]
    assert [row[0] for row in rows] == ["Ada", "Grace"]
    assert all(row[1] not in {"123-45-6789", "987-65-4321"} for row in rows), rows
    assert called["content"]["columns"][1]["masked"] is not None

    # Two replicas: the budget keeps one through a drain, and counts both healthy.
    def both_healthy() -> bool | None:
        budget = k8s.get(f"/apis/policy/v1/namespaces/{SYSTEM}/poddisruptionbudgets/{MCP}")
        return budget.get("status", {}).get("currentHealthy") == 2 or None

    k8s.wait_for(both_healthy, timeout=60, what="the MCP server's PodDisruptionBudget")
