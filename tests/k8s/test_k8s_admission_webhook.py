"""The API server calls a mutating webhook on Pod CREATE and stores what it patched in.

The webhook runs in the test process over HTTPS (its own CA, given to the API server as
``caBundle``) and injects a native sidecar, as the operator's webhook will inject the
gateway. No kubelet runs on the harness's control plane, so the Pod is stored but never
started: the test checks what admission made of it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from k8sharness.cluster import NAMESPACE_LABEL, Cluster
from k8sharness.webhook import WebhookServer

INJECTED_LABEL = "querywarden.test/injected"
#: A native sidecar (an init container that keeps running): Kubernetes 1.33+ accepts it
#: everywhere, and it is how the gateway will sit next to a database.
SIDECAR: dict[str, Any] = {
    "name": "querywarden",
    "image": "registry.invalid/querywarden:test",
    "restartPolicy": "Always",
    "ports": [{"name": "postgres", "containerPort": 6432}],
}


def inject_sidecar(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON Patch for one Pod: a label saying so, and the sidecar."""
    pod = request["object"]
    patch: list[dict[str, Any]] = []
    if not pod["metadata"].get("labels"):
        patch.append({"op": "add", "path": "/metadata/labels", "value": {}})
    label_path = "/metadata/labels/" + INJECTED_LABEL.replace("~", "~0").replace("/", "~1")
    patch.append({"op": "add", "path": label_path, "value": "true"})
    if pod["spec"].get("initContainers"):
        patch.append({"op": "add", "path": "/spec/initContainers/-", "value": SIDECAR})
    else:
        patch.append({"op": "add", "path": "/spec/initContainers", "value": [SIDECAR]})
    return patch


@pytest.fixture
def webhook(workdir: Path, namespace: str) -> Iterator[WebhookServer]:
    # The API server must reach this address: loopback for the harness's own control
    # plane; for a cluster in containers, an address of this machine it can route to.
    host = os.environ.get("QUERYWARDEN_K8S_WEBHOOK_HOST", "127.0.0.1")
    server = WebhookServer(workdir / f"webhook-{namespace}", inject_sidecar, host=host).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mutating_webhook(k8s: Cluster, namespace: str, webhook: WebhookServer) -> Iterator[str]:
    """A MutatingWebhookConfiguration for Pod CREATE in this test's namespace only."""
    name = f"querywarden-test-{namespace}"
    k8s.create(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [
                {
                    "name": "sidecar.harness.querywarden.dev",
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "failurePolicy": "Fail",
                    "timeoutSeconds": 10,
                    "clientConfig": {"url": f"{webhook.url}/mutate", "caBundle": webhook.ca_bundle},
                    "rules": [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE"],
                            "resources": ["pods"],
                            "scope": "Namespaced",
                        }
                    ],
                    # Only this test's namespace: on a shared cluster nothing else is touched.
                    "namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: namespace}},
                }
            ],
        },
    )
    try:
        yield name
    finally:
        k8s.delete(f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}")


def database_pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "postgres"}},
        "spec": {
            "containers": [{"name": "postgres", "image": "registry.invalid/postgres:17"}],
            "automountServiceAccountToken": False,
        },
    }


def test_mutating_webhook_is_called_on_pod_create(
    k8s: Cluster, namespace: str, webhook: WebhookServer, mutating_webhook: str
) -> None:
    pods = f"/api/v1/namespaces/{namespace}/pods"

    # The API server picks up a new webhook configuration asynchronously. A dry run calls
    # webhooks too (they declare no side effects) and stores nothing: probe with it.
    def webhook_applied() -> dict[str, Any] | None:
        probe = k8s.request("POST", pods, database_pod("probe"), query={"dryRun": "All"})
        labels = probe["metadata"].get("labels", {})
        return probe if INJECTED_LABEL in labels else None

    k8s.wait_for(webhook_applied, what="the API server calling the new webhook")
    assert k8s.get(pods)["items"] == []  # the dry runs stored nothing

    created = k8s.create(pods, database_pod("db-0"))

    assert created["metadata"]["labels"] == {"app": "postgres", INJECTED_LABEL: "true"}
    init = created["spec"]["initContainers"]
    assert [c["name"] for c in init] == ["querywarden"]
    assert init[0]["restartPolicy"] == "Always"
    assert init[0]["image"] == SIDECAR["image"]
    assert [c["name"] for c in created["spec"]["containers"]] == ["postgres"]
    stored = k8s.get(f"{pods}/db-0")
    assert stored["spec"]["initContainers"][0]["name"] == "querywarden"
    if k8s.local:
        # No scheduler, no kubelet: stored, admitted, and never started.
        assert stored["status"]["phase"] == "Pending"
        assert "nodeName" not in stored["spec"]

    reviews = [r["request"] for r in webhook.received() if not r["request"]["dryRun"]]
    assert len(reviews) == 1
    review = reviews[0]
    assert review["operation"] == "CREATE"
    assert review["kind"] == {"group": "", "version": "v1", "kind": "Pod"}
    assert review["namespace"] == namespace
    assert review["name"] == "db-0"
    assert review["object"]["spec"]["containers"][0]["name"] == "postgres"
    assert "initContainers" not in review["object"]["spec"]  # the webhook saw the original
    me = k8s.create(
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    assert review["userInfo"]["username"] == me["status"]["userInfo"]["username"]

    # The rule covers CREATE only: an update does not reach the webhook.
    patched = k8s.request(
        "PATCH",
        f"{pods}/db-0",
        {"metadata": {"labels": {"tier": "primary"}}},
        content_type="application/merge-patch+json",
    )
    assert patched["metadata"]["labels"]["tier"] == "primary"
    assert [r["request"]["uid"] for r in webhook.received() if not r["request"]["dryRun"]] == [
        review["uid"]
    ]
