"""The injection controls through the real API server and the operator's real webhook.

The chart installed with helm, the operator in this process as the chart's ServiceAccount
(as in test_k8s_operator_e2e.py), namespaces in by default (the chart's default): a
namespace labelled ``querywarden.io/inject=disabled`` is left alone, a pod may opt out
and tune its sidecar with annotations, and invalid or disallowed values refuse the pod
with the webhook's message. docs/operator.md ("Injection") is the specification.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8sharness.cluster import Cluster, KubeError
from k8sharness.helm import Helm
from k8sharness.qwoperator import (
    SIDECAR_IMAGE,
    InstalledOperator,
    condition,
    create_namespace,
    create_secret,
    installed_operator,
    minimal_spec,
    pod,
    policy,
    wait_until,
)
from querywarden_operator.spec import ANNOTATION_CONFIG_HASH, GROUP

pytestmark = pytest.mark.slow

LABELS = {"app": "db"}
INJECT = f"{GROUP}/inject"


@pytest.fixture(scope="module")
def installed(k8s: Cluster, helm: Helm, workdir: Path) -> Iterator[InstalledOperator]:
    with installed_operator(k8s, helm, workdir / "operator-injection") as running:
        yield running


@pytest.fixture(autouse=True)
def operator_alive(installed: InstalledOperator) -> Iterator[None]:
    yield
    assert installed.operator.alive, f"the operator died: {installed.operator.error!r}"


def label_namespace(k8s: Cluster, namespace: str, value: str | None) -> None:
    """Set (or, with None, remove) the namespace's querywarden.io/inject label."""
    k8s.request(
        "PATCH",
        f"/api/v1/namespaces/{namespace}",
        {"metadata": {"labels": {INJECT: value}}},
        content_type="application/merge-patch+json",
    )


def annotated(name: str, annotations: dict[str, str], labels: dict[str, str] = LABELS) -> Any:
    manifest = pod(name, labels)
    manifest["metadata"]["annotations"] = dict(annotations)
    return manifest


def pods(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/pods"


def dry_run(k8s: Cluster, namespace: str, manifest: dict[str, Any]) -> Any:
    return k8s.request("POST", pods(namespace), manifest, query={"dryRun": "All"})


def is_injected(created: dict[str, Any]) -> bool:
    return (created["metadata"].get("annotations") or {}).get(f"{GROUP}/status") == "injected"


def refusal(k8s: Cluster, namespace: str, manifest: dict[str, Any]) -> str:
    """The webhook's message for a pod it refuses (a dry run: nothing is stored)."""
    with pytest.raises(KubeError) as refused:
        dry_run(k8s, namespace, manifest)
    assert refused.value.status == 403, refused.value.message
    return refused.value.message


def sidecar_of(created: dict[str, Any]) -> dict[str, Any]:
    (sidecar,) = [c for c in created["spec"]["initContainers"] if c["name"] == "querywarden"]
    return sidecar


def serve_policy(k8s: Cluster, installed: InstalledOperator, namespace: str) -> None:
    """A policy for the ``app: db`` pods, its webhook entry loaded by the API server."""
    create_secret(k8s, namespace, "db-gateway", {"username": "gw", "password": "pw"})
    k8s.kubectl(
        "apply", "-n", namespace, "-f", "-",
        stdin=yaml.safe_dump(
            policy("db", minimal_spec(LABELS, resources={"requests": {"cpu": "50m"}}))
        ),
    )  # fmt: skip
    wait_until(
        lambda: condition(
            k8s.get(f"/apis/{GROUP}/v1alpha1/namespaces/{namespace}/databaseaccesspolicies/db"),
            "Rendered",
        ),
        what="the policy rendered",
    )
    installed.wait_for_webhook(namespace, pod("probe", LABELS))


def test_a_labelled_namespace_is_injected_and_a_disabled_one_left_alone(
    k8s: Cluster, namespace: str, installed: InstalledOperator
) -> None:
    label_namespace(k8s, namespace, "enabled")
    serve_policy(k8s, installed, namespace)
    created = k8s.create(pods(namespace), pod("db-0", LABELS))
    assert is_injected(created)
    assert sidecar_of(created)["image"] == SIDECAR_IMAGE

    # Disabled: the API server stops sending the namespace's pods (the entry's
    # namespaceSelector; the change reaches its namespace cache within moments).
    label_namespace(k8s, namespace, "disabled")
    wait_until(
        lambda: not is_injected(dry_run(k8s, namespace, pod("probe", LABELS))),
        what="the API server no longer calling the webhook for the disabled namespace",
    )
    left_alone = k8s.create(pods(namespace), pod("db-1", LABELS))
    assert not is_injected(left_alone)
    assert "initContainers" not in left_alone["spec"]
    # A pod that asks for the gateway is refused: the chart's entry sends it, and the
    # webhook reads the namespace's label itself.
    message = refusal(k8s, namespace, pod("asking", {**LABELS, INJECT: "true"}))
    assert f"namespace {namespace} is labelled {INJECT}=disabled" in message
    assert "would run without the querywarden gateway" in message

    # Unlabelled: in again (namespaces are in by default).
    label_namespace(k8s, namespace, None)
    installed.wait_for_webhook(namespace, pod("probe", LABELS))
    assert is_injected(k8s.create(pods(namespace), pod("db-2", LABELS)))

    # Any other value is a mistake: selected pods are refused until it is fixed.
    label_namespace(k8s, namespace, "true")
    message = wait_until(
        lambda: _refusal_or_none(k8s, namespace, pod("probe", LABELS)),
        what="the pod refused for the namespace's label",
    )
    assert f"the namespace's label {INJECT}='true' is neither 'enabled' nor 'disabled'" in message
    # Pods no policy selects are never sent to the webhook.
    assert not is_injected(k8s.create(pods(namespace), pod("web-0", {"app": "web"})))


def _refusal_or_none(k8s: Cluster, namespace: str, manifest: dict[str, Any]) -> str | None:
    try:
        dry_run(k8s, namespace, manifest)
    except KubeError as exc:
        return exc.message
    return None


def test_a_pod_opts_out_and_is_reported_without_the_gateway(
    k8s: Cluster, namespace: str, installed: InstalledOperator
) -> None:
    serve_policy(k8s, installed, namespace)
    opted_out = k8s.create(pods(namespace), annotated("db-0", {INJECT: "false"}))
    assert not is_injected(opted_out)
    assert "initContainers" not in opted_out["spec"]
    assert [c["name"] for c in opted_out["spec"]["containers"]] == ["postgres"]
    # The policy says so: the pod is selected and runs without the gateway.
    path = f"/apis/{GROUP}/v1alpha1/namespaces/{namespace}/databaseaccesspolicies/db"
    injected = wait_until(
        lambda: (
            c
            if (c := condition(k8s.get(path), "Injected")) and c["reason"] == "PodsWithoutGateway"
            else None
        ),
        what="the opted-out pod reported",
    )
    assert "db-0" in injected["message"]

    message = refusal(k8s, namespace, annotated("db-1", {INJECT: "off"}))
    assert f'annotation {INJECT}=\'off\' is neither "true" nor "false"' in message
    contradicting = annotated("db-2", {INJECT: "false"}, {**LABELS, INJECT: "true"})
    assert f'annotated {INJECT}="false": remove one of them' in refusal(
        k8s, namespace, contradicting
    )


def test_annotations_override_the_sidecars_resources_log_level_and_image(
    k8s: Cluster, namespace: str, installed: InstalledOperator
) -> None:
    serve_policy(k8s, installed, namespace)
    plain = k8s.create(pods(namespace), pod("db-0", LABELS))
    image = SIDECAR_IMAGE.rsplit(":", 1)[0] + ":debug"
    tuned = k8s.create(
        pods(namespace),
        annotated(
            "db-1",
            {
                f"{GROUP}/sidecar-cpu": "250m",
                f"{GROUP}/sidecar-memory": "96Mi",
                f"{GROUP}/sidecar-cpu-limit": "1",
                f"{GROUP}/sidecar-memory-limit": "384Mi",
                f"{GROUP}/log-level": "debug",
                f"{GROUP}/sidecar-image": image,
            },
        ),
    )
    before, after = sidecar_of(plain), sidecar_of(tuned)
    # The policy's resources (they replace the chart's), then the pod's, as stored.
    assert before["resources"] == {"requests": {"cpu": "50m"}}
    assert after["resources"] == {
        "requests": {"cpu": "250m", "memory": "96Mi"},
        "limits": {"cpu": "1", "memory": "384Mi"},
    }
    assert before["args"] == ["serve", "--config", "/etc/querywarden/gateway.yaml"]
    assert after["args"] == [
        "--log-level", "DEBUG", "serve", "--config", "/etc/querywarden/gateway.yaml"
    ]  # fmt: skip
    assert (before["image"], after["image"]) == (SIDECAR_IMAGE, image)
    # Both carry the policy's settings: neither is reported as outdated.
    assert (
        plain["metadata"]["annotations"][ANNOTATION_CONFIG_HASH]
        == tuned["metadata"]["annotations"][ANNOTATION_CONFIG_HASH]
    )


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({f"{GROUP}/sidecar-memory": "lots"}, "is not a Kubernetes quantity (e.g. 64Mi or 1Gi)"),
        ({f"{GROUP}/log-level": "verbose"}, "is not a log level (one of DEBUG, INFO"),
        ({f"{GROUP}/sidecar-cpus": "1"}, f"unknown annotation {GROUP}/sidecar-cpus"),
        (
            {f"{GROUP}/sidecar-image": "evil.example/fake-gateway:1"},
            "names an image the operator does not allow for the querywarden sidecar "
            "(allowed: registry.invalid/querywarden;",
        ),
    ],
    ids=["quantity", "log-level", "typo", "image"],
)
def test_invalid_or_disallowed_annotations_refuse_the_pod(
    k8s: Cluster,
    namespace: str,
    installed: InstalledOperator,
    annotations: dict[str, str],
    message: str,
) -> None:
    serve_policy(k8s, installed, namespace)
    refused = refusal(k8s, namespace, annotated("db-0", annotations))
    assert message in refused
    assert "denied the request" in refused
    # Nothing was stored, and the same pod without the annotation is admitted.
    assert k8s.get(pods(namespace))["items"] == []
    assert is_injected(k8s.create(pods(namespace), pod("db-0", LABELS)))


def test_another_namespaces_label_does_not_leak(
    k8s: Cluster, namespace: str, installed: InstalledOperator
) -> None:
    # A disabled namespace next door changes nothing here.
    other = create_namespace(k8s, "qw-other")
    try:
        label_namespace(k8s, other, "disabled")
        serve_policy(k8s, installed, namespace)
        assert is_injected(k8s.create(pods(namespace), pod("db-0", LABELS)))
    finally:
        k8s.delete(f"/api/v1/namespaces/{other}")
