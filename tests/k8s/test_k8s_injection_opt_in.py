"""Namespaces off by default (``injection.enableNamespacesByDefault=false``), as in Istio.

The real API server and the operator's real webhook (as test_k8s_injection_webhook.py),
the operator set as the chart sets it with that value and with pods not allowed to opt
out (``injection.allowPodOptOut=false``): only a namespace labelled
``querywarden.io/inject=enabled`` gets the gateway, and an opted-out pod is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from k8sharness.cluster import Cluster
from k8sharness.helm import Helm
from k8sharness.qwoperator import InstalledOperator, installed_operator, pod, wait_until
from test_k8s_injection_webhook import (
    INJECT,
    LABELS,
    annotated,
    dry_run,
    is_injected,
    label_namespace,
    pods,
    refusal,
    serve_policy,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(k8s: Cluster, helm: Helm, workdir: Path) -> Iterator[InstalledOperator]:
    with installed_operator(
        k8s,
        helm,
        workdir / "operator-injection-opt-in",
        extra_values={
            "injection.enableNamespacesByDefault": "false",
            "injection.allowPodOptOut": "false",
        },
        config_changes={"enable_namespaces_by_default": False, "allow_pod_opt_out": False},
    ) as running:
        yield running


@pytest.fixture(autouse=True)
def operator_alive(installed: InstalledOperator) -> Iterator[None]:
    yield
    assert installed.operator.alive, f"the operator died: {installed.operator.error!r}"


def test_only_namespaces_labelled_enabled_are_injected(
    k8s: Cluster, namespace: str, installed: InstalledOperator
) -> None:
    label_namespace(k8s, namespace, "enabled")
    serve_policy(k8s, installed, namespace)
    assert is_injected(k8s.create(pods(namespace), pod("db-0", LABELS)))

    # Without the label the namespace is out: the API server stops sending its pods.
    label_namespace(k8s, namespace, None)
    wait_until(
        lambda: not is_injected(dry_run(k8s, namespace, pod("probe", LABELS))),
        what="the API server no longer calling the webhook for the unlabelled namespace",
    )
    left_alone = k8s.create(pods(namespace), pod("db-1", LABELS))
    assert not is_injected(left_alone)
    message = refusal(k8s, namespace, pod("asking", {**LABELS, INJECT: "true"}))
    assert f"namespace {namespace} is not labelled {INJECT}=enabled" in message


def test_pods_may_not_opt_out_when_the_chart_says_so(
    k8s: Cluster, namespace: str, installed: InstalledOperator
) -> None:
    label_namespace(k8s, namespace, "enabled")
    serve_policy(k8s, installed, namespace)
    message = refusal(k8s, namespace, annotated("db-0", {INJECT: "false"}))
    assert "may not opt out of the querywarden gateway here" in message
    assert "DatabaseAccessPolicy db selects it" in message
