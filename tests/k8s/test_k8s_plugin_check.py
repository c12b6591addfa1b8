"""``kubectl querywarden check``: the real plugin, run by the real kubectl, on crafted state.

The plugin is put on PATH as ``kubectl-querywarden`` (as krew links it) and kubectl runs
it as a plugin; it reads the cluster with the kubeconfig it is given. One namespace holds
a state with every finding, another a state with none.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8sharness.cluster import NAMESPACE_LABEL, Cluster
from k8sharness.qwoperator import apply_crd, create_secret, minimal_spec, pod, policies, policy
from k8sharness.tools import REPO, tool
from querywarden_operator.issuers import ISSUER_API_VERSION, ISSUER_CRD_NAME, ISSUER_PLURAL
from querywarden_operator.review import REVIEW_CRD_NAME

PLUGIN = REPO / "charts" / "querywarden" / "files" / "kubectl-querywarden"
ISSUERS = f"/apis/{ISSUER_API_VERSION}/{ISSUER_PLURAL}"
DB = {"app": "orders-db"}


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    bin_dir = tmp_path_factory.mktemp("plugin-bin")
    (bin_dir / "kubectl-querywarden").symlink_to(PLUGIN)
    kubectl = tool("kubectl")
    return os.pathsep.join([str(bin_dir), str(kubectl.parent), os.environ.get("PATH", "")])


@pytest.fixture
def crds(k8s: Cluster, review_crd_as_found: None) -> Iterator[None]:
    apply_crd(k8s)
    for path, name in (("clustertokenissuers.yaml", ISSUER_CRD_NAME),
                       ("queryreviews.yaml", REVIEW_CRD_NAME)):  # fmt: skip
        k8s.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds" / path))
        k8s.wait_established(name)
    yield


def check(k8s: Cluster, path: str, *args: str) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = k8s.run(
        tool("kubectl"), "querywarden", "check", *args, env={"PATH": path}, check=False
    )
    return result


def findings(k8s: Cluster, path: str, *args: str) -> tuple[int, list[dict[str, Any]]]:
    result = check(k8s, path, *args, "--json")
    assert result.returncode in (0, 1), result.stderr
    found: list[dict[str, Any]] = json.loads(result.stdout)
    return result.returncode, found


def database_pod(name: str) -> dict[str, Any]:
    manifest = pod(name, DB)
    manifest["spec"]["containers"][0]["ports"] = [{"name": "postgres", "containerPort": 5432}]
    return manifest


def service(name: str, target_port: int | str, port: int = 5432) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": DB, "ports": [{"port": port, "targetPort": target_port}]},
    }


def review_rules() -> list[dict[str, Any]]:
    return [
        {
            "name": "deletes-need-review",
            "subjects": {"groups": ["agents"]},
            "allow": {"operations": ["select", "delete"]},
            "review": {"operations": ["delete"]},
        }
    ]


def issuer(name: str, **fields: Any) -> dict[str, Any]:
    spec = {"issuer": f"https://{name}.example.com", "audiences": ["querywarden"], **fields}
    return {"apiVersion": ISSUER_API_VERSION, "kind": "ClusterTokenIssuer",
            "metadata": {"name": name}, "spec": spec}  # fmt: skip


def secrets_for(k8s: Cluster, namespace: str) -> None:
    create_secret(k8s, namespace, "db-gateway", {"username": "gw", "password": "pw"})


def test_a_broken_state_gives_every_finding(
    k8s: Cluster, namespace: str, crds: None, plugin_path: str
) -> None:
    ns = namespace
    corp = f"corp-{secrets.token_hex(3)}"
    gone = f"gone-{secrets.token_hex(3)}"
    k8s.create(ISSUERS, issuer(corp, caFile="/etc/querywarden/files/corp-ca/ca.crt"))
    clients = f"qw-clients-{secrets.token_hex(3)}"
    k8s.create_namespace(clients, {NAMESPACE_LABEL: clients})

    # The database pod, reached on its database port through a Service, by a client in
    # another namespace; an older NetworkPolicy opens the database port to everyone.
    k8s.create(f"/api/v1/namespaces/{ns}/pods", database_pod("orders-db-0"))
    k8s.create(f"/api/v1/namespaces/{ns}/services", service("orders-db", "postgres"))
    web = pod("web-0", {"app": "web"})
    web["spec"]["containers"][0]["env"] = [
        {"name": "DATABASE_URL", "value": f"postgres://app@orders-db.{ns}.svc:5432/orders"}
    ]
    k8s.create(f"/api/v1/namespaces/{clients}/pods", web)
    k8s.create(
        f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": "legacy-allow"},
         "spec": {"podSelector": {"matchLabels": DB}, "ingress": [{}]}},
    )  # fmt: skip

    # orders: the credentials Secret is missing, one issuerRef too, the other's CA is
    # not mounted, and nobody may patch QueryReviews for its approvers.
    orders = minimal_spec(DB)
    # Its clients are the agents' namespaces, which the client's namespace is not; its
    # readonly role's Secret has no password.
    orders["target"]["clients"] = [{"namespaceSelector": {"matchLabels": {"team": "agents"}}}]
    orders["target"]["roles"] = [{"name": "readonly", "secretName": "db-readonly"}]
    create_secret(k8s, ns, "db-readonly", {"username": "ro"})
    orders["policy"] = {
        "identity": {"issuerRefs": [corp, gone]},
        "rules": review_rules(),
        "approvals": {"approvers": {"groups": ["dba-oncall"]}},
    }
    k8s.create(policies(ns), policy("orders", orders))
    # replica: selects the same pod, mounts the issuer's CA from a ConfigMap without the
    # key, and is not Ready; reports: selects nothing, review rules, no approvers.
    replica = minimal_spec({"app": "orders-db"})
    replica["sidecar"]["files"] = [{"name": "corp-ca", "configMapName": "corp-ca"}]
    replica["policy"] = {"identity": {"issuerRefs": [corp]}}
    k8s.create(
        f"/api/v1/namespaces/{ns}/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "corp-ca"},
         "data": {"other.crt": "-----BEGIN CERTIFICATE-----"}},
    )  # fmt: skip
    k8s.create(policies(ns), policy("replica", replica))
    k8s.request(
        "PATCH",
        f"{policies(ns)}/replica/status",
        {"status": {"conditions": [{
            "type": "Ready", "status": "False", "reason": "PodsWithoutGateway",
            "message": "1 of 1 pods have no gateway", "lastTransitionTime": "2026-01-01T00:00:00Z",
        }]}},
        content_type="application/merge-patch+json",
    )  # fmt: skip
    reports = minimal_spec({"app": "reports-db"})
    reports["policy"] = {"rules": review_rules()}
    k8s.create(policies(ns), policy("reports", reports))

    code, found = findings(k8s, plugin_path, "-n", ns)
    assert code == 1
    by_code: dict[str, list[dict[str, Any]]] = {}
    for finding in found:
        assert set(finding) == {"severity", "code", "policy", "message", "fix"}
        assert finding["fix"]
        by_code.setdefault(finding["code"], []).append(finding)

    def one(code: str, policy_name: str, *words: str) -> dict[str, Any]:
        matching = [f for f in by_code.get(code, []) if f["policy"] == f"{ns}/{policy_name}"]
        assert matching, f"no {code} for {policy_name}: {json.dumps(found, indent=1)}"
        for word in words:
            assert any(word in f["message"] for f in matching), (word, matching)
        return matching[0]

    # (a) the NetworkPolicy closes the database port to the Service and its client.
    assert one("QW0101", "orders", "Service", "orders-db", "5432")["severity"] == "error"
    assert one("QW0102", "orders", f"{clients}/web-0", "DATABASE_URL")["severity"] == "error"
    one("QW0103", "orders", f"{clients}/web-0", "target.clients")
    one("QW0104", "orders", "gateway port 6432")
    assert one("QW0105", "orders", "legacy-allow", "anyone")["severity"] == "error"
    # (b) review rules nobody can decide.
    assert one("QW0201", "reports", "deletes-need-review")["severity"] == "error"
    assert one("QW0202", "orders", "group dba-oncall")["severity"] == "error"
    # (c) issuers and Secrets.
    one("QW0301", "orders", gone)
    one("QW0302", "orders", corp, "corp-ca")
    one("QW0304", "replica", "corp-ca", "ca.crt")
    one("QW0305", "orders", "db-gateway")
    one("QW0306", "orders", "db-readonly", "password")
    # (d) a selector matching nothing, a pod selected twice.
    assert one("QW0401", "reports")["severity"] == "warning"
    assert one("QW0403", "replica", "PodsWithoutGateway")["severity"] == "warning"
    twice = [f for f in by_code["QW0402"] if "orders-db-0" in f["message"]]
    assert twice and "orders, replica" in twice[0]["message"]

    # The human format: one line per finding, severity first, and the fix.
    text = check(k8s, plugin_path, "-n", ns)
    assert text.returncode == 1
    lines = text.stdout.splitlines()
    assert len(lines) == len(found)
    assert lines[0].startswith("ERROR ")
    assert all(" Fix: " in line for line in lines)
    assert "errors" in text.stderr


def test_a_sound_state_gives_none(
    k8s: Cluster, namespace: str, crds: None, plugin_path: str, tmp_path: Path
) -> None:
    ns = namespace
    corp = f"corp-{secrets.token_hex(3)}"
    k8s.create(ISSUERS, issuer(corp, caFile="/etc/querywarden/files/corp-ca/ca.crt"))
    k8s.create(
        f"/api/v1/namespaces/{ns}/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "corp-ca"},
         "data": {"ca.crt": "-----BEGIN CERTIFICATE-----"}},
    )  # fmt: skip
    secrets_for(k8s, ns)
    k8s.create(f"/api/v1/namespaces/{ns}/pods", database_pod("orders-db-0"))
    # Clients go to the gateway's port.
    k8s.create(f"/api/v1/namespaces/{ns}/services", service("orders-db", 6432))
    # The approvers may patch QueryReviews here.
    k8s.create(
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "approver"},
         "rules": [{"apiGroups": ["querywarden.io"], "resources": ["queryreviews"],
                    "verbs": ["get", "list", "patch"]}]},
    )  # fmt: skip
    k8s.create(
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "approvers"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "approver"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                       "name": "dba-oncall"}]},
    )  # fmt: skip
    spec = minimal_spec(DB)
    spec["target"]["credentials"] = {"secretName": "db-gateway"}
    spec["sidecar"]["files"] = [{"name": "corp-ca", "configMapName": "corp-ca"}]
    spec["policy"] = {
        "identity": {"issuerRefs": [corp]},
        "rules": review_rules(),
        "approvals": {"approvers": {"groups": ["dba-oncall"]}},
    }
    k8s.create(policies(ns), policy("orders", spec))

    code, found = findings(k8s, plugin_path, "-n", ns)
    assert (code, found) == (0, [])
    text = check(k8s, plugin_path, "-n", ns)
    assert text.returncode == 0 and text.stdout == ""
    assert "no findings" in text.stderr

    # A policy not applied yet (-f): it would select the same pod as orders.
    manifest = tmp_path / "second.yaml"
    manifest.write_text(yaml.safe_dump(policy("second", {**spec, "policy": {}})))
    code, found = findings(k8s, plugin_path, "-n", ns, "-f", str(manifest))
    assert code == 1
    assert [f["code"] for f in found if f["severity"] == "error"] == ["QW0402"]


def test_services_the_policy_switches_are_not_reported(
    k8s: Cluster, namespace: str, crds: None, plugin_path: str
) -> None:
    ns = namespace
    secrets_for(k8s, ns)
    data = {**DB, "tier": "data"}
    database = database_pod("orders-db-0")
    database["metadata"]["labels"] = data
    k8s.create(f"/api/v1/namespaces/{ns}/pods", database)
    k8s.create(f"/api/v1/namespaces/{ns}/pods", pod("web-0", {"app": "web", "tier": "data"}))
    services = f"/api/v1/namespaces/{ns}/services"
    # Switched by the operator: by the container port's name.
    k8s.create(services, service("orders-db", "postgres"))
    # Not switched: it also sends traffic to web-0, and another is a controller's.
    shared = service("data", 5432)
    shared["spec"]["selector"] = {"tier": "data"}
    k8s.create(services, shared)
    owned = service("owned", 5432)
    owned["metadata"]["ownerReferences"] = [
        {"apiVersion": "example.com/v1", "kind": "Cluster", "name": "pg", "controller": True,
         "uid": "0b5c8d6e-6d3e-4c1b-9a58-0a1f5e2b7c11"}
    ]  # fmt: skip
    k8s.create(services, owned)

    # Without the option: every such Service, and the fix names the option and the patch.
    spec = minimal_spec(DB)
    k8s.create(policies(ns), policy("orders", spec))
    _, found = findings(k8s, plugin_path, "-n", ns)
    cut = {f["message"].split()[1]: f for f in found if f["code"] == "QW0101"}
    assert set(cut) == {f"{ns}/orders-db", f"{ns}/data", f"{ns}/owned"}
    fix = cut[f"{ns}/orders-db"]["fix"]
    assert "spec.target.services.switch: true" in fix
    assert (
        f"kubectl -n {ns} patch service orders-db --type json -p "
        """'[{"op": "replace", "path": "/spec/ports/0/targetPort", "value": 6432}]'"""
    ) in fix

    # With it: the Service the operator switches is not reported; the others say why not.
    spec["target"]["services"] = {"switch": True}
    k8s.kubectl("apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump(policy("orders", spec)))
    _, found = findings(k8s, plugin_path, "-n", ns)
    cut = {f["message"].split()[1]: f for f in found if f["code"] == "QW0101"}
    assert set(cut) == {f"{ns}/data", f"{ns}/owned"}
    assert "does not select: web-0" in cut[f"{ns}/data"]["fix"]
    assert "controlled by Cluster pg" in cut[f"{ns}/owned"]["fix"]
    assert "QW0104" not in {f["code"] for f in found}  # orders-db will reach the gateway
