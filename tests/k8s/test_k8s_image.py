"""The operator from the built image, against the real API server, as the chart runs it.

The chart is installed with helm as in the other operator tests, but the operator is the
image's ``querywarden operator`` in a podman container (read-only, uid 65532), configured
by the environment the chart's Deployment sets. Its webhook injects the same image as the
sidecar.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from image_harness import IMAGE, built_image
from k8sharness.cluster import Cluster
from k8sharness.helm import Helm
from k8sharness.qwoperator import (
    InstalledOperator,
    OperatorContainer,
    condition,
    create_secret,
    installed_operator,
    pod,
    policies,
    policy,
    wait_until,
)
from querywarden_operator.spec import GROUP

pytestmark = pytest.mark.slow

LABELS = {"app": "image-db"}


@pytest.fixture(scope="module")
def installed(k8s: Cluster, helm: Helm, workdir: Path) -> Iterator[InstalledOperator]:
    image = built_image()
    with installed_operator(
        k8s,
        helm,
        workdir / "image-operator",
        runner=OperatorContainer.factory(image),
        sidecar_image=image,
    ) as running:
        yield running


def test_the_operator_image_reconciles_and_injects_itself(
    k8s: Cluster, namespace: str, installed: InstalledOperator
) -> None:
    operator = installed.operator
    assert isinstance(operator, OperatorContainer)
    create_secret(k8s, namespace, "image-gateway", {"username": "gw", "password": "pw"})
    spec = {
        "target": {
            "podSelector": {"matchLabels": dict(LABELS)},
            "databasePort": 5432,
            "credentials": {"secretName": "image-gateway"},
            "tlsSecretName": "image-gateway-tls",
        },
        "policy": {
            "rules": [
                {
                    "name": "agents-read",
                    "subjects": {"groups": ["ai-agents"]},
                    "allow": {"operations": ["select"], "tables": ["public.*"]},
                }
            ]
        },
    }
    k8s.create(policies(namespace), policy("image", spec))

    def ready() -> dict[str, object] | None:
        current = k8s.get(f"{policies(namespace)}/image")
        found = condition(current, "Ready")
        return current if found is not None and found["status"] == "True" else None

    try:
        wait_until(ready, timeout=60, what="the policy Ready, from the operator's container")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{operator.logs()}") from None
    configmap = k8s.get(f"/api/v1/namespaces/{namespace}/configmaps/image-querywarden")
    assert "policy.yaml" in configmap["data"]

    installed.wait_for_webhook(namespace, pod("probe", LABELS))
    created = k8s.create(f"/api/v1/namespaces/{namespace}/pods", pod("image-db-0", LABELS))
    assert created["metadata"]["annotations"][f"{GROUP}/status"] == "injected"
    (sidecar,) = created["spec"]["initContainers"]
    assert sidecar["image"] == IMAGE
    assert operator.alive, operator.logs()
