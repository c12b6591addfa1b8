"""The sidecar RoleBinding's two writers, against the real API server.

On a real node (tests/k8s/node) the recount that follows a policy's creation unbound the
account the pod webhook had just bound: the webhook runs before the pod is stored, so the
recount's pod list did not show it, and its write replaced the subjects. The first
statements of the new database pod then could not open reviews (403 from the API server)
until the next recount, a minute later. These tests replay that interleaving
deterministically: the recount's pod listing is where the webhook's write lands.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from k8sharness.cluster import Cluster
from k8sharness.qwoperator import apply_crd, minimal_spec, policies, policy
from querywarden_operator import sidecar_binding
from querywarden_operator.kube import KubeClient, load_configuration, object_path
from querywarden_operator.render import PolicyRef, sidecar_role_binding_name

ROLE = "qw-test-sidecar"


@pytest.fixture
def setting(k8s: Cluster, namespace: str) -> Iterator[tuple[KubeClient, PolicyRef]]:
    apply_crd(k8s)
    stored = k8s.create(policies(namespace), policy("orders", minimal_spec()))
    kube = KubeClient(load_configuration(Path(k8s.kubeconfig)))
    try:
        yield kube, PolicyRef.from_body(stored)
    finally:
        kube.close()


def binding(kube: KubeClient, ref: PolicyRef) -> dict[str, Any]:
    path = object_path(
        "rbac.authorization.k8s.io/v1", "rolebindings", ref.namespace,
        sidecar_role_binding_name(ref.name),
    )  # fmt: skip
    found: dict[str, Any] = kube.get(path)
    return found


def subjects(kube: KubeClient, ref: PolicyRef) -> list[str]:
    return [s["name"] for s in binding(kube, ref).get("subjects") or []]


def test_a_recount_racing_the_webhook_keeps_the_account_it_admitted(
    setting: tuple[KubeClient, PolicyRef],
) -> None:
    kube, ref = setting
    at = datetime.datetime.now(datetime.UTC)
    sidecar_binding.write(kube, ref, ROLE, sidecar_binding.recount(lambda: [], at))
    assert subjects(kube, ref) == []
    listed = 0

    def pods_as_listed_before_the_pod_is_stored() -> list[str]:
        # The webhook admits a pod of account orders-db between the recount's read of the
        # binding and its write; that pod is not stored yet, so the listing misses it and
        # shows only an older pod, of reports-db.
        nonlocal listed
        listed += 1
        if listed == 1:
            sidecar_binding.write(kube, ref, ROLE, sidecar_binding.admit("orders-db", at))
        return ["reports-db"]

    sidecar_binding.write(
        kube, ref, ROLE, sidecar_binding.recount(pods_as_listed_before_the_pod_is_stored, at)
    )
    assert listed == 2  # the first write lost (409) and was decided again
    assert subjects(kube, ref) == ["orders-db", "reports-db"]


def test_an_admitted_account_no_pod_runs_as_is_unbound_after_the_grace(
    setting: tuple[KubeClient, PolicyRef],
) -> None:
    kube, ref = setting
    at = datetime.datetime.now(datetime.UTC)
    sidecar_binding.write(kube, ref, ROLE, sidecar_binding.admit("orders-db", at))
    sidecar_binding.write(kube, ref, ROLE, sidecar_binding.admit("reports-db", at))
    assert subjects(kube, ref) == ["orders-db", "reports-db"]
    # Within the grace, a recount that sees neither keeps both.
    soon = at + sidecar_binding.ADMISSION_GRACE / 2
    sidecar_binding.write(kube, ref, ROLE, sidecar_binding.recount(lambda: [], soon))
    assert subjects(kube, ref) == ["orders-db", "reports-db"]
    # After it, only the account a pod runs as stays, and its stamp is dropped.
    later = at + sidecar_binding.ADMISSION_GRACE * 2
    sidecar_binding.write(kube, ref, ROLE, sidecar_binding.recount(lambda: ["orders-db"], later))
    assert subjects(kube, ref) == ["orders-db"]
    stamps = binding(kube, ref)["metadata"]["annotations"][sidecar_binding.ANNOTATION_ADMITTED]
    assert stamps == "{}"
    assert binding(kube, ref)["metadata"]["ownerReferences"][0]["name"] == ref.name
