"""A database the cluster does not run, on a real node: helm install plus ONE kubectl apply.

From an empty one-node cluster: ``helm install`` of the chart with the locally built
image; a PostgreSQL that no policy selects (below); then one ``kubectl apply`` of the
chart's example ``examples/external-database.yaml``, with only the database's address
and the agent's image substituted. The operator runs the gateway as a Deployment, its
init container creates the gateway's role from the example's superuser Secret, the
operator's CA issues the Service's certificate, and the example's agent pod reads
masked rows through the gateway Service with its projected token, verifying the
certificate (``verify-full``).

Which PostgreSQL, and why: a plain Deployment and Service in a namespace of its own,
which no DatabaseAccessPolicy selects. The test session's PostgreSQL listens on the
host's loopback only, and the node's network namespace has no route beyond the host's
end of its veth, so pods cannot reach it; a Service name is what an RDS or Cloud SQL
endpoint is to the operator (a host and a port), and what CloudNativePG's ``-rw``
Service is. The operator never touches that PostgreSQL's pods: it gets no sidecar and
is never restarted (checked below).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8sharness.cluster import Cluster, KubeError
from k8sharness.helm import Helm
from k8sharness.node import Node
from k8sharness.tools import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CHART = REPO / "charts" / "querywarden"
EXAMPLE = CHART / "examples" / "external-database.yaml"
RELEASE = "querywarden"
SYSTEM = "querywarden-system"
DATABASES = "databases"
POSTGRES_IMAGE = "localhost/querywarden-postgres:15"
#: What the example names, and what the test substitutes.
EXAMPLE_HOST = "billing-db.example.internal"
EXAMPLE_AGENT_IMAGE = "postgres:16"
DATABASE_HOST = f"postgres.{DATABASES}.svc.cluster.local"
ROLLOUT_TIMEOUT = 240.0

INIT_SQL = """
CREATE TABLE customers (id int PRIMARY KEY, name text, email text, ssn text);
INSERT INTO customers VALUES
  (1, 'Ada', 'ada@example.com', '123-45-6789'),
  (2, 'Grace', 'grace@example.com', '987-65-4321');
CREATE TABLE api_keys (id int, secret text);
INSERT INTO api_keys VALUES (1, 'sk_live_abcdef');
"""


def _documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]


def example_text() -> str:
    """The example as a user applies it, with this cluster's database and agent image."""
    text = EXAMPLE.read_text()
    assert text.count(EXAMPLE_HOST) == 1 and text.count(EXAMPLE_AGENT_IMAGE) == 1
    return text.replace(EXAMPLE_HOST, DATABASE_HOST).replace(EXAMPLE_AGENT_IMAGE, POSTGRES_IMAGE)


def _of(kind: str) -> dict[str, Any]:
    (found,) = [d for d in _documents() if d["kind"] == kind]
    return found


class Setup:
    """The installation, and what the test measured."""

    def __init__(self, node: Node) -> None:
        assert node.cluster is not None
        self.node = node
        self.k8s: Cluster = node.cluster
        self.timings: dict[str, float] = {}
        policy = _of("DatabaseAccessPolicy")
        self.namespace: str = policy["metadata"]["namespace"]
        self.policy: str = policy["metadata"]["name"]
        self.gateway = f"{self.policy}-querywarden"
        superuser = _of("Secret")["stringData"]
        self.superuser_password: str = superuser["password"]

    def rollout(self, namespace: str, what: str) -> None:
        self.k8s.kubectl(
            "-n", namespace, "rollout", "status", what, f"--timeout={ROLLOUT_TIMEOUT:.0f}s",
            timeout=ROLLOUT_TIMEOUT + 10,
        )  # fmt: skip

    def policy_object(self) -> dict[str, Any]:
        found: dict[str, Any] = self.k8s.get(
            f"/apis/querywarden.io/v1alpha1/namespaces/{self.namespace}"
            f"/databaseaccesspolicies/{self.policy}"
        )
        return found

    def agent_psql(self, sql: str, *, check: bool = True) -> Any:
        """psql in the example's agent pod, with its environment and projected token."""
        script = (
            'PGPASSWORD="$(cat /var/run/secrets/querywarden/token)" '
            'exec psql -X -At -v ON_ERROR_STOP=1 -c "$1"'
        )
        return self.k8s.kubectl(
            "-n", self.namespace, "exec", "deploy/coder-agent", "--",
            "sh", "-c", script, "sh", sql, check=check,
        )  # fmt: skip

    def database_psql(self, sql: str) -> str:
        """psql as the superuser inside the database's own pod (no gateway)."""
        result = self.k8s.kubectl(
            "-n", DATABASES, "exec", "deploy/postgres", "--",
            "psql", "-X", "-At", "-U", "postgres", "-d", "app", "-c", sql,
        )  # fmt: skip
        return str(result.stdout).strip()

    def diagnose(self) -> str:
        out = []
        for args in (
            ("get", "pods", "-A", "-o", "wide"),
            ("get", "events", "-A", "--sort-by=.lastTimestamp"),
            ("-n", self.namespace, "get", "dap", self.policy, "-o", "yaml"),
            ("-n", self.namespace, "logs", f"deploy/{self.gateway}", "--all-containers",
             "--tail=60"),
            ("-n", SYSTEM, "logs", f"deployment/{RELEASE}", "--tail=80"),
        ):  # fmt: skip
            result = self.k8s.kubectl(*args, check=False)
            out.append(f"$ kubectl {' '.join(args)}\n{result.stdout}{result.stderr}")
        out.append(f"--- kubelet (last lines)\n{self.node.logs('kubelet', 30)}")
        return "\n".join(out)


def _manifest(kind: str, name: str, namespace: str | None, **body: Any) -> dict[str, Any]:
    api = {"Deployment": "apps/v1"}.get(kind, "v1")
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": api, "kind": kind, "metadata": metadata, **body}


def install(setup: Setup, helm: Helm) -> None:
    k8s = setup.k8s
    started = time.monotonic()
    # 1. The chart, as the README says (a short resync: Ready follows the Deployment's
    # availability within it).
    helm(
        "install", RELEASE, str(CHART), "--namespace", SYSTEM, "--create-namespace",
        "--set", "image.repository=localhost/querywarden", "--set", "image.tag=dev",
        "--set", "operator.resyncInterval=5", "--wait=false",
    )  # fmt: skip
    # 2. A PostgreSQL no policy selects, with the example's superuser password.
    labels = {"app": "postgres"}
    k8s.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all([
        _manifest("Namespace", DATABASES, None),
        _manifest("ConfigMap", "postgres-init", DATABASES, data={"init.sql": INIT_SQL}),
        _manifest("Service", "postgres", DATABASES, spec={
            "selector": labels, "ports": [{"name": "postgres", "port": 5432}],
        }),
        _manifest("Deployment", "postgres", DATABASES, spec={
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {
                "terminationGracePeriodSeconds": 2,
                "containers": [{
                    "name": "postgres",
                    "image": POSTGRES_IMAGE,
                    "env": [
                        {"name": "POSTGRES_DB", "value": "app"},
                        {"name": "POSTGRES_PASSWORD", "value": setup.superuser_password},
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
                    {"name": "init", "configMap": {"name": "postgres-init"}},
                ],
            }},
        }),
    ]))  # fmt: skip
    setup.rollout(SYSTEM, f"deployment/{RELEASE}")
    setup.rollout(DATABASES, "deployment/postgres")
    setup.timings["chart and database ready"] = time.monotonic() - started
    # 3. ONE kubectl apply of the documented example.
    applied = time.monotonic()
    k8s.kubectl("apply", "-f", "-", stdin=example_text())
    k8s.wait_for(
        lambda: k8s.get(f"/apis/apps/v1/namespaces/{setup.namespace}/deployments/{setup.gateway}"),
        timeout=60,
        what="the operator's gateway Deployment",
    )
    setup.rollout(setup.namespace, f"deployment/{setup.gateway}")
    setup.timings["apply to gateway Deployment rolled out"] = time.monotonic() - applied
    setup.rollout(setup.namespace, "deployment/coder-agent")
    setup.timings["apply to agent ready"] = time.monotonic() - applied


@pytest.fixture(scope="module")
def installed(node: Node, workdir: Path) -> Iterator[Setup]:
    assert node.cluster is not None
    setup = Setup(node)
    try:
        install(setup, Helm(node.cluster, workdir / "node-external-helm"))
    except BaseException:
        print(setup.diagnose())
        raise
    try:
        yield setup
    finally:
        print(f"\nnode external set-up: {setup.timings}; node start: {node.timings}")


def test_the_policy_is_ready_once_the_gateway_deployment_is_available(installed: Setup) -> None:
    k8s = installed.k8s
    started = time.monotonic()

    def ready() -> dict[str, Any] | None:
        status = installed.policy_object().get("status") or {}
        found = {c["type"]: c for c in status.get("conditions") or []}
        return status if found.get("Ready", {}).get("status") == "True" else None

    try:
        status = k8s.wait_for(ready, timeout=120, what="the policy Ready")
    except BaseException:
        print(installed.diagnose())
        raise
    installed.timings["gateway available to policy Ready"] = time.monotonic() - started
    assert status["availableReplicas"] == status["replicas"] == 2
    assert status["gatewayService"] == f"{installed.gateway}.{installed.namespace}.svc:6432"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Available"]["reason"] == "ReplicasAvailable"
    assert "Injected" not in conditions
    deployment = k8s.get(
        f"/apis/apps/v1/namespaces/{installed.namespace}/deployments/{installed.gateway}"
    )
    assert deployment["status"]["availableReplicas"] == 2
    pods = k8s.get(
        f"/api/v1/namespaces/{installed.namespace}/pods",
    )["items"]
    gateway_pods = [p for p in pods if p["metadata"]["name"].startswith(installed.gateway)]
    assert len(gateway_pods) == 2
    for pod in gateway_pods:
        (init,) = pod["status"]["initContainerStatuses"]
        assert init["name"] == "bootstrap" and init["state"]["terminated"]["exitCode"] == 0


def test_the_agent_reads_masked_rows_from_the_external_database(installed: Setup) -> None:
    started = time.monotonic()
    result = installed.agent_psql("SELECT id, name, email, ssn FROM customers ORDER BY id")
    installed.timings["one agent query"] = time.monotonic() - started
    rows = [line.split("|") for line in result.stdout.splitlines()]
    assert [r[:2] for r in rows] == [["1", "Ada"], ["2", "Grace"]]
    for _, _, email, ssn in rows:
        assert "@" in email and email not in {"ada@example.com", "grace@example.com"}
        assert ssn.endswith(("6789", "4321")) and ssn not in {"123-45-6789", "987-65-4321"}

    # The example agent's own loop (every 30 s) gets the same masked rows.
    def logged() -> str | None:
        logs = installed.k8s.kubectl("-n", installed.namespace, "logs", "deploy/coder-agent")
        return str(logs.stdout) if "1|Ada|" in logs.stdout else None

    logs = installed.k8s.wait_for(logged, timeout=75, what="masked rows in the agent's log")
    assert "ada@example.com" not in logs and "123-45-6789" not in logs
    # A denied table is refused with the rule.
    refused = installed.agent_psql("SELECT secret FROM api_keys", check=False)
    assert refused.returncode != 0 and "sk_live" not in refused.stdout
    assert "ai-agents-read" in refused.stderr, refused.stderr


def test_the_bootstrapped_role_exists_and_the_database_pod_is_untouched(
    installed: Setup,
) -> None:
    assert (
        installed.database_psql(
            "SELECT rolcanlogin, rolsuper, rolcreaterole FROM pg_roles "
            "WHERE rolname = 'querywarden_gateway'"
        )
        == "t|f|f"
    )
    pods = installed.k8s.get(f"/api/v1/namespaces/{DATABASES}/pods")["items"]
    (pod,) = pods
    names = [c["name"] for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", [])]
    assert names == ["postgres"]
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
    # The superuser's password is in its Secret only, nowhere the operator wrote.
    for kind in ("configmaps", "secrets"):
        items = installed.k8s.get(f"/api/v1/namespaces/{installed.namespace}/{kind}")["items"]
        for item in items:
            if item["metadata"]["name"] == "billing-db-superuser":
                continue
            assert installed.superuser_password not in yaml.safe_dump(item)


def test_deleting_the_policy_deletes_the_gateway(installed: Setup) -> None:
    k8s = installed.k8s
    k8s.kubectl("-n", installed.namespace, "delete", "dap", installed.policy, "--wait=true")
    base = f"/namespaces/{installed.namespace}"

    def gone() -> bool | None:
        for path in (
            f"/apis/apps/v1{base}/deployments/{installed.gateway}",
            f"/api/v1{base}/services/{installed.gateway}",
            f"/apis/policy/v1{base}/poddisruptionbudgets/{installed.gateway}",
            f"/api/v1{base}/configmaps/{installed.gateway}",
            f"/api/v1{base}/secrets/{installed.gateway}-tls",
        ):
            try:
                k8s.get(path)
            except KubeError as exc:
                if exc.status == 404:
                    continue
                raise
            return None
        return True

    k8s.wait_for(gone, timeout=120, what="the gateway's objects garbage-collected")
