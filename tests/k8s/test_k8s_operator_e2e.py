"""End to end on the real API server: helm install, apply policies, create pods.

The chart is installed with helm; the operator runs in this process as the chart's
ServiceAccount (so the chart's RBAC is what it has) and serves the webhook on loopback,
where the chart's webhook configuration sends the API server (``webhook.url``). Then, as
a user would: ``kubectl apply`` a DatabaseAccessPolicy, create pods, read the status.
No kubelet runs: pods are stored, never started; the tests check what admission made
of them and what the operator wrote.
"""

from __future__ import annotations

import base64
import json
import ssl
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8sharness.cluster import Cluster, KubeError
from k8sharness.helm import Helm
from k8sharness.processes import free_port
from k8sharness.qwoperator import (
    SIDECAR_IMAGE,
    InstalledOperator,
    OperatorThread,
    condition,
    create_secret,
    installed_operator,
    pod,
    policies,
    policy,
    wait_until,
)
from querywarden.policy import PolicyDocument
from querywarden_operator.spec import (
    ANNOTATION_CONFIG_HASH,
    ANNOTATION_RESTART,
    ANNOTATION_RESTARTED_FOR,
    GROUP,
)

pytestmark = pytest.mark.slow

LABELS = {"app": "orders-db"}


@pytest.fixture(scope="module")
def installed(k8s: Cluster, helm: Helm, workdir: Path) -> Iterator[InstalledOperator]:
    with installed_operator(k8s, helm, workdir / "operator-e2e") as running:
        yield running


@pytest.fixture(autouse=True)
def operator_alive(installed: InstalledOperator) -> Iterator[None]:
    yield
    assert installed.operator.alive, f"the operator died: {installed.operator.error!r}"


def spec(**sidecar: Any) -> dict[str, Any]:
    return {
        "target": {
            "podSelector": {"matchLabels": dict(LABELS)},
            "databasePort": 5432,
            "database": "orders",
            "credentials": {"secretName": "orders-gateway"},
            "roles": [{"name": "readonly", "secretName": "orders-readonly"}],
            "tlsSecretName": "orders-gateway-tls",
            "clients": [{"namespaceSelector": {"matchLabels": {"team": "agents"}}}],
        },
        "sidecar": {"gatewayPort": 6432, **sidecar},
        "policy": {
            "rules": [
                {
                    "name": "agents-read",
                    "subjects": {"groups": ["ai-agents"]},
                    "allow": {"operations": ["select"], "tables": ["public.*"]},
                    "upstreamRole": "readonly",
                }
            ]
        },
    }


def kubectl_apply(k8s: Cluster, namespace: str, manifest: dict[str, Any]) -> Any:
    return k8s.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(manifest))


def get_policy(k8s: Cluster, namespace: str, name: str) -> Any:
    return k8s.get(f"{policies(namespace)}/{name}")


def wait_for_status(
    k8s: Cluster, namespace: str, name: str, check: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    def fetch() -> dict[str, Any] | None:
        current = get_policy(k8s, namespace, name)
        return current if check(current) else None

    try:
        return wait_until(fetch, timeout=45, what=what)
    except TimeoutError as exc:
        status = json.dumps(get_policy(k8s, namespace, name).get("status"), indent=1)
        raise AssertionError(f"{exc}; the status is {status}") from None


def is_ready(obj: dict[str, Any], reason: str | None = None) -> bool:
    ready = condition(obj, "Ready")
    return (
        ready is not None
        and ready["status"] == "True"
        and obj["status"].get("observedGeneration") == obj["metadata"]["generation"]
        and (reason is None or (condition(obj, "Injected") or {}).get("reason") == reason)
    )


def secrets_for(k8s: Cluster, namespace: str) -> None:
    create_secret(k8s, namespace, "orders-gateway", {"username": "gw", "password": "pw"})
    create_secret(k8s, namespace, "orders-readonly", {"username": "ro", "password": "pw2"})


def test_policy_renders_and_matching_pods_get_the_gateway(
    k8s: Cluster, namespace: str, installed: InstalledOperator
) -> None:
    secrets_for(k8s, namespace)
    kubectl_apply(k8s, namespace, policy("orders", spec()))
    current = wait_for_status(
        k8s, namespace, "orders", lambda o: is_ready(o, "NoTargets"), "the policy Ready"
    )
    assert condition(current, "Rendered")["reason"] == "Rendered"  # type: ignore[index]
    uid = current["metadata"]["uid"]

    # The ConfigMap: owned by the policy, the policy as written, the settings.
    configmap = k8s.get(f"/api/v1/namespaces/{namespace}/configmaps/orders-querywarden")
    assert [(o["kind"], o["name"], o["uid"]) for o in configmap["metadata"]["ownerReferences"]] == [
        ("DatabaseAccessPolicy", "orders", uid)
    ]
    assert PolicyDocument.model_validate(
        yaml.safe_load(configmap["data"]["policy.yaml"])
    ) == PolicyDocument.model_validate(spec()["policy"])
    settings = yaml.safe_load(configmap["data"]["gateway.yaml"])
    assert settings["upstream"]["port"] == 5432
    assert settings["upstream"]["database"] == "orders"
    assert settings["listen"] == {"host": "0.0.0.0", "port": 6432, "plaintext": "never"}
    assert settings["policyFile"] == "/etc/querywarden/policy/policy.yaml"

    # The NetworkPolicy: the gateway port from the named clients; the database port shut.
    network_policy = k8s.get(
        f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies/orders-querywarden"
    )
    assert network_policy["metadata"]["ownerReferences"][0]["uid"] == uid
    assert network_policy["spec"]["podSelector"] == {"matchLabels": LABELS}
    assert network_policy["spec"]["ingress"] == [
        {
            "ports": [{"protocol": "TCP", "port": 6432}],
            "from": [{"namespaceSelector": {"matchLabels": {"team": "agents"}}}],
        }
    ]

    # The policy's own webhook entry, next to the chart's.
    entry_name = f"orders.{namespace}.policies.{GROUP}"
    assert entry_name in installed.webhook_names()
    installed.wait_for_webhook(namespace, pod("probe", LABELS))

    pods = f"/api/v1/namespaces/{namespace}/pods"
    database = k8s.create(pods, pod("orders-db-0", {**LABELS, "role": "primary"}))
    other = k8s.create(pods, pod("web-0", {"app": "web"}))

    # The database pod: the gateway as a native sidecar, before anything else.
    assert other["spec"].get("initContainers") is None
    assert [c["name"] for c in other["spec"]["containers"]] == ["postgres"]
    assert "annotations" not in other["metadata"]
    annotations = database["metadata"]["annotations"]
    assert annotations[f"{GROUP}/status"] == "injected"
    assert annotations[f"{GROUP}/policy"] == "orders"
    assert [c["name"] for c in database["spec"]["containers"]] == ["postgres"]
    (sidecar,) = database["spec"]["initContainers"]
    assert sidecar["name"] == "querywarden"
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == SIDECAR_IMAGE
    assert sidecar["args"] == ["serve", "--config", "/etc/querywarden/gateway.yaml"]
    assert sidecar["readinessProbe"]["tcpSocket"] == {"port": 6432}
    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e for e in sidecar["env"]}
    assert env["QUERYWARDEN_UPSTREAM__USER"]["valueFrom"]["secretKeyRef"] == {
        "name": "orders-gateway",
        "key": "username",
    }
    assert (
        env["QUERYWARDEN_UPSTREAM__ROLES__READONLY__USER"]["valueFrom"]["secretKeyRef"]["name"]
        == "orders-readonly"
    )
    volumes = {v["name"]: v for v in database["spec"]["volumes"]}
    assert volumes["querywarden-policy"]["configMap"]["name"] == "orders-querywarden"
    assert volumes["querywarden-tls"]["secret"]["secretName"] == "orders-gateway-tls"
    sources = [
        s["secret"]["name"] for s in volumes["querywarden-credentials"]["projected"]["sources"]
    ]
    assert sources == ["orders-gateway", "orders-readonly"]
    if k8s.local:
        assert k8s.get(f"{pods}/orders-db-0")["status"]["phase"] == "Pending"

    # The status counts the pod; the printer columns show it.
    wait_for_status(
        k8s, namespace, "orders",
        lambda o: o["status"].get("targets") == 1 and o["status"].get("injected") == 1
        and is_ready(o, "AllInjected"),
        "the pod counted",
    )  # fmt: skip
    # Idempotent: the resync runs every second and finds nothing to change.
    version = get_policy(k8s, namespace, "orders")["metadata"]["resourceVersion"]
    configmap_version = k8s.get(f"/api/v1/namespaces/{namespace}/configmaps/orders-querywarden")[
        "metadata"
    ]["resourceVersion"]
    time.sleep(3)
    assert get_policy(k8s, namespace, "orders")["metadata"]["resourceVersion"] == version
    assert (
        k8s.get(f"/api/v1/namespaces/{namespace}/configmaps/orders-querywarden")["metadata"][
            "resourceVersion"
        ]
        == configmap_version
    )

    table = k8s.kubectl("get", "databaseaccesspolicies", "-n", namespace, "-o", "wide").stdout
    header, row = table.strip().splitlines()
    assert header.split() == ["NAME", "TARGETS", "INJECTED", "READY", "REASON", "PORT", "AGE"]
    assert row.split()[:6] == ["orders", "1", "1", "True", "Ready", "6432"]
    short = k8s.kubectl("get", "dap", "-n", namespace).stdout.splitlines()[0].split()
    assert short == ["NAME", "TARGETS", "INJECTED", "READY", "AGE"]

    # A policy change reaches the ConfigMap (the sidecar reloads it live: the pod stays
    # current, its settings did not change).
    changed = spec()
    changed["policy"]["rules"].append(
        {"name": "dba", "subjects": {"groups": ["dba"]}, "allow": {"operations": ["*"]}}
    )
    kubectl_apply(k8s, namespace, policy("orders", changed))

    def followed() -> str | None:
        data = k8s.get(f"/api/v1/namespaces/{namespace}/configmaps/orders-querywarden")["data"]
        return data["policy.yaml"] if "name: dba" in data["policy.yaml"] else None

    wait_until(followed, what="the ConfigMap following the policy")
    updated = wait_for_status(
        k8s, namespace, "orders", lambda o: is_ready(o, "AllInjected"), "generation 2 ready"
    )
    assert updated["status"]["observedGeneration"] == 2

    # A settings change needs a restart: the pod is reported as outdated.
    kubectl_apply(k8s, namespace, policy("orders", {**changed, "sidecar": {"gatewayPort": 6433}}))
    outdated = wait_for_status(
        k8s, namespace, "orders",
        lambda o: (condition(o, "Injected") or {}).get("reason") == "OutdatedSettings",
        "the pod reported outdated",
    )  # fmt: skip
    assert condition(outdated, "Ready")["status"] == "False"  # type: ignore[index]
    assert "orders-db-0" in condition(outdated, "Injected")["message"]  # type: ignore[index]


def test_invalid_policies_are_refused_or_reported(
    k8s: Cluster, namespace: str, installed: InstalledOperator
) -> None:
    # What the schema can say, the API server refuses (CEL).
    bad = spec()
    bad["sidecar"]["gatewayPort"] = 5432
    refused = k8s.kubectl(
        "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(policy("bad", bad)), check=False
    )
    assert refused.returncode != 0
    assert "sidecar.gatewayPort must differ from target.databasePort" in refused.stderr

    # A policy next to the operator: never injected, said so.
    kubectl_apply(k8s, installed.namespace, policy("mine", spec()))
    excluded = wait_for_status(
        k8s, installed.namespace, "mine",
        lambda o: (condition(o, "Rendered") or {}).get("reason") == "ExcludedNamespace",
        "the excluded namespace reported",
    )  # fmt: skip
    assert "is never injected" in condition(excluded, "Rendered")["message"]  # type: ignore[index]
    assert f"mine.{installed.namespace}.policies.{GROUP}" not in installed.webhook_names()
    k8s.delete(f"{policies(installed.namespace)}/mine")

    # What only the operator's pydantic validation finds: a False condition, the reason,
    # and nothing rendered.
    twins = spec()
    issuer = {"issuer": "https://idp.example.com", "audiences": ["qw"]}
    twins["policy"]["identity"] = {"issuers": [{"name": "a", **issuer}, {"name": "b", **issuer}]}
    kubectl_apply(k8s, namespace, policy("twins", twins))
    reported = wait_for_status(
        k8s, namespace, "twins",
        lambda o: (condition(o, "Rendered") or {}).get("status") == "False",
        "the Rendered condition",
    )  # fmt: skip
    rendered = condition(reported, "Rendered")
    assert rendered is not None
    assert rendered["reason"] == "InvalidPolicy"
    assert "two issuers share the same issuer URL" in rendered["message"]
    ready = condition(reported, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "InvalidPolicy")
    with pytest.raises(KubeError):
        k8s.get(f"/api/v1/namespaces/{namespace}/configmaps/twins-querywarden")

    # Fixed: rendered.
    twins["policy"]["identity"]["issuers"][1]["issuer"] = "https://other.example.com"
    kubectl_apply(k8s, namespace, policy("twins", twins))
    wait_for_status(k8s, namespace, "twins", is_ready, "the fixed policy Ready")

    # Broken again: the ConfigMap keeps the last good policy (running sidecars keep it).
    before = k8s.get(f"/api/v1/namespaces/{namespace}/configmaps/twins-querywarden")["data"]
    twins["policy"]["identity"]["issuers"][1]["issuer"] = "https://idp.example.com"
    kubectl_apply(k8s, namespace, policy("twins", twins))
    wait_for_status(
        k8s, namespace, "twins",
        lambda o: (condition(o, "Rendered") or {}).get("reason") == "InvalidPolicy"
        and o["status"]["observedGeneration"] == 3,
        "the broken update reported",
    )  # fmt: skip
    after = k8s.get(f"/api/v1/namespaces/{namespace}/configmaps/twins-querywarden")["data"]
    assert after == before


def owned(kind: str, name: str, uid: str, api_version: str = "apps/v1") -> list[dict[str, Any]]:
    return [{"apiVersion": api_version, "kind": kind, "name": name, "uid": uid, "controller": True}]


def test_existing_pods_are_reported_and_their_deployment_restarted_on_request(
    k8s: Cluster, namespace: str, installed: InstalledOperator
) -> None:
    # A Deployment's pod from before the policy. No controllers run here: the
    # ReplicaSet and the Pod are created by hand, owned as the controllers would.
    apps = f"/apis/apps/v1/namespaces/{namespace}"
    template = {"metadata": {"labels": LABELS}, "spec": pod("x", LABELS)["spec"]}
    deployment = k8s.create(
        f"{apps}/deployments",
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "orders-db"},
            "spec": {"selector": {"matchLabels": LABELS}, "template": template},
        },
    )
    replicaset = k8s.create(
        f"{apps}/replicasets",
        {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": "orders-db-5d8f",
                "ownerReferences": owned("Deployment", "orders-db", deployment["metadata"]["uid"]),
            },
            "spec": {"selector": {"matchLabels": LABELS}, "template": template},
        },
    )
    old = pod("orders-db-5d8f-abcde", LABELS)
    old["metadata"]["ownerReferences"] = owned(
        "ReplicaSet", "orders-db-5d8f", replicaset["metadata"]["uid"]
    )
    k8s.create(f"/api/v1/namespaces/{namespace}/pods", old)

    secrets_for(k8s, namespace)
    kubectl_apply(k8s, namespace, policy("orders", spec()))
    reported = wait_for_status(
        k8s, namespace, "orders",
        lambda o: (condition(o, "Injected") or {}).get("reason") == "PodsWithoutGateway",
        "the pod without a gateway reported",
    )  # fmt: skip
    injected = condition(reported, "Injected")
    assert injected is not None
    assert "1 of 1 pods have no gateway" in injected["message"]
    assert "orders-db-5d8f-abcde" in injected["message"]
    assert ANNOTATION_RESTART in injected["message"]  # the way out, named
    assert (reported["status"]["targets"], reported["status"]["injected"]) == (1, 0)
    assert condition(reported, "Ready")["status"] == "False"  # type: ignore[index]
    path = f"{apps}/deployments/orders-db"
    assert "annotations" not in k8s.get(path)["spec"]["template"]["metadata"]

    # Opt in: the operator rolls the Deployment, once.
    k8s.kubectl("annotate", "-n", namespace, "dap", "orders", f"{ANNOTATION_RESTART}=true")

    def restarted() -> str | None:
        annotations = k8s.get(path)["spec"]["template"]["metadata"].get("annotations") or {}
        return annotations.get(ANNOTATION_RESTARTED_FOR)

    key = wait_until(restarted, what="the Deployment restarted")
    configmap = k8s.get(f"/api/v1/namespaces/{namespace}/configmaps/orders-querywarden")
    assert key == f"orders/{configmap['metadata']['annotations'][ANNOTATION_CONFIG_HASH]}"
    generation = k8s.get(path)["metadata"]["generation"]
    wait_for_status(
        k8s, namespace, "orders",
        lambda o: "being restarted" in (condition(o, "Injected") or {}).get("message", ""),
        "the restart reported",
    )  # fmt: skip
    # The resync keeps running (no controller replaces the pod here): no second roll.
    assert k8s.get(path)["metadata"]["generation"] == generation


def test_pods_that_ask_for_a_gateway_they_would_not_get_are_refused(
    k8s: Cluster, namespace: str, installed: InstalledOperator
) -> None:
    asking = pod("lonely-db", {"querywarden.io/inject": "true"})

    def refusal() -> str | None:
        try:
            k8s.request(
                "POST", f"/api/v1/namespaces/{namespace}/pods", asking, query={"dryRun": "All"}
            )
        except KubeError as exc:
            return exc.message
        return None

    message = wait_until(refusal, what="the chart's webhook refusing the pod")
    assert "no DatabaseAccessPolicy in namespace" in message
    assert "would run without the querywarden gateway" in message


def test_two_policies_for_one_pod_are_refused_and_deletion_removes_the_entry(
    k8s: Cluster, namespace: str, installed: InstalledOperator
) -> None:
    secrets_for(k8s, namespace)
    kubectl_apply(k8s, namespace, policy("first", spec()))
    kubectl_apply(k8s, namespace, policy("second", spec(gatewayPort=6500)))
    for name in ("first", "second"):
        wait_for_status(k8s, namespace, name, is_ready, f"{name} Ready")
    pods = f"/api/v1/namespaces/{namespace}/pods"

    def refusal() -> str | None:
        try:
            k8s.request("POST", pods, pod("db", LABELS), query={"dryRun": "All"})
        except KubeError as exc:
            return exc.message if "several" in exc.message else None
        return None

    message = wait_until(refusal, what="the pod refused")
    assert "selected by several DatabaseAccessPolicies (first, second)" in message

    k8s.delete(f"{policies(namespace)}/second")
    wait_until(
        lambda: f"second.{namespace}.policies.{GROUP}" not in installed.webhook_names(),
        what="the deleted policy's webhook entry removed",
    )
    assert f"first.{namespace}.policies.{GROUP}" in installed.webhook_names()
    created = wait_until(
        lambda: _create_or_none(k8s, pods, pod("db", LABELS)), what="the pod admitted"
    )
    assert created["metadata"]["annotations"][f"{GROUP}/policy"] == "first"


def _create_or_none(k8s: Cluster, path: str, manifest: dict[str, Any]) -> Any:
    try:
        return k8s.create(path, manifest)
    except KubeError as exc:
        if "several" in exc.message:
            return None
        raise


def test_the_operator_takes_part_in_kopf_peering(
    k8s: Cluster, installed: InstalledOperator
) -> None:
    def peers() -> dict[str, Any] | None:
        found = k8s.get(f"/apis/kopf.dev/v1/clusterkopfpeerings/{installed.peering}")
        return found.get("status") or None

    status = wait_until(peers, what="the operator in the peering object")
    (peer,) = status.values()
    assert peer["priority"] >= 1
    assert peer["lifetime"] > 0


def test_a_second_replica_stands_by_but_serves_the_webhook(
    k8s: Cluster,
    namespace: str,
    installed: InstalledOperator,
) -> None:
    """kopf peering: one replica handles the events, every replica answers the webhook."""
    port = free_port()
    # A lower priority than the running one (random, at least 1): it pauses.
    config = installed.operator.config.model_copy(update={"webhook_port": port, "priority": 0})
    standby = OperatorThread(config).start()
    try:

        def peers() -> list[int] | None:
            found = k8s.get(f"/apis/kopf.dev/v1/clusterkopfpeerings/{installed.peering}")
            status = found.get("status") or {}
            return sorted(p["priority"] for p in status.values()) if len(status) == 2 else None

        # Two peers, never tied (a tie pauses both): the one of priority 0 stands by.
        standby_priority, active_priority = wait_until(peers, what="two peers")
        assert standby_priority == 0 < active_priority
        secrets_for(k8s, namespace)
        kubectl_apply(k8s, namespace, policy("orders", spec()))
        wait_for_status(k8s, namespace, "orders", is_ready, "the policy Ready")

        # The standby's webhook answers an admission review for a selected pod.
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": str(uuid.uuid4()),
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": namespace,
                "operation": "CREATE",
                "userInfo": {"username": "test"},
                "object": {**pod("db", LABELS), "metadata": {
                    "name": "db", "namespace": namespace, "labels": LABELS,
                }},
                "dryRun": True,
            },
        }  # fmt: skip
        context = ssl.create_default_context(cafile=str(installed.webhook_ca.cert_file))
        request = urllib.request.Request(
            f"https://127.0.0.1:{port}/inject",
            data=json.dumps(review).encode(),
            headers={"Content-Type": "application/json"},
        )
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        with opener.open(request, timeout=10) as answer:
            response = json.loads(answer.read())["response"]
        assert response["allowed"] is True
        patch = json.loads(base64.b64decode(response["patch"]))
        added = [op for op in patch if op["path"] == "/spec/initContainers"]
        assert added
        assert added[0]["value"][0]["name"] == "querywarden"
    finally:
        standby.stop()
