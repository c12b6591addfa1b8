"""``spec.target.services.switch``: the operator points Services at the gateway and back.

The real API server and the real operator, run as the chart's ServiceAccount (so the
chart's RBAC is what it has), as in test_k8s_operator_e2e.py. A Service that sends its
port to the database port by number and one that does so by the container port's name
are switched to the gateway port, with the original recorded on them; an unrelated
Service, and one that also sends traffic to pods the policy does not select, are never
written; turning the option off, or deleting the policy, puts the originals back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from k8sharness.cluster import Cluster, KubeError
from k8sharness.helm import Helm
from k8sharness.qwoperator import (
    InstalledOperator,
    condition,
    installed_operator,
    pod,
    policies,
    policy,
    wait_until,
)
from querywarden_operator.services import ANNOTATION_SWITCHED
from test_k8s_operator_e2e import LABELS, get_policy, kubectl_apply, secrets_for, spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(k8s: Cluster, helm: Helm, workdir: Path) -> Iterator[InstalledOperator]:
    with installed_operator(k8s, helm, workdir / "operator-service-switch") as running:
        yield running


@pytest.fixture(autouse=True)
def operator_alive(installed: InstalledOperator) -> Iterator[None]:
    yield
    assert installed.operator.alive, f"the operator died: {installed.operator.error!r}"


def switching(switch: bool = True, **sidecar: Any) -> dict[str, Any]:
    wanted = spec(**sidecar)
    wanted["target"]["services"] = {"switch": switch}
    return wanted


def service(
    name: str, selector: dict[str, str], *ports: tuple[str, int, int | str]
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {
            "selector": selector,
            "ports": [
                {"name": port_name, "port": port, "targetPort": target, "protocol": "TCP"}
                for port_name, port, target in ports
            ],
        },
    }


def services_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/services"


def target_ports(k8s: Cluster, namespace: str, name: str) -> dict[str, int | str]:
    found = k8s.get(f"{services_path(namespace)}/{name}")
    return {p["name"]: p["targetPort"] for p in found["spec"]["ports"]}


def annotations(k8s: Cluster, namespace: str, name: str) -> dict[str, str]:
    found = k8s.get(f"{services_path(namespace)}/{name}")
    return dict(found["metadata"].get("annotations") or {})


def database_pods(k8s: Cluster, namespace: str) -> None:
    """A database pod whose container port is named, and a web pod: both ``tier: data``."""
    container = {
        "name": "postgres",
        "image": "registry.invalid/postgres:17",
        "ports": [
            {"name": "postgres", "containerPort": 5432},
            {"name": "metrics", "containerPort": 9187},
        ],
    }
    pods = f"/api/v1/namespaces/{namespace}/pods"
    k8s.create(pods, pod("orders-db-0", {**LABELS, "tier": "data"}, containers=[container]))
    k8s.create(pods, pod("web-0", {"app": "web", "tier": "data"}))


def switched_services(k8s: Cluster, namespace: str, name: str) -> list[str] | None:
    return (get_policy(k8s, namespace, name).get("status") or {}).get("switchedServices")


def test_services_are_switched_to_the_gateway_and_back_when_the_option_is_off(
    k8s: Cluster, namespace: str, installed: InstalledOperator
) -> None:
    secrets_for(k8s, namespace)
    database_pods(k8s, namespace)
    path = services_path(namespace)
    k8s.create(path, service("orders-db", LABELS, ("postgres", 5432, 5432)))
    k8s.create(
        path,
        service("orders-named", LABELS, ("postgres", 5432, "postgres"), ("metrics", 9187, 9187)),
    )
    unrelated = k8s.create(path, service("web", {"app": "web"}, ("postgres", 5432, 5432)))
    shared = k8s.create(path, service("data", {"tier": "data"}, ("postgres", 5432, 5432)))

    kubectl_apply(k8s, namespace, policy("orders", switching()))
    switched = wait_until(
        lambda: switched_services(k8s, namespace, "orders") or None,
        timeout=45, what="the Services switched",
    )  # fmt: skip
    assert switched == ["orders-db", "orders-named"]

    # By number and by name: the gateway port now; the metrics port is left alone.
    assert target_ports(k8s, namespace, "orders-db") == {"postgres": 6432}
    assert target_ports(k8s, namespace, "orders-named") == {"postgres": 6432, "metrics": 9187}
    # The original, recorded on the Service.
    record = json.loads(annotations(k8s, namespace, "orders-named")[ANNOTATION_SWITCHED])
    assert record == {
        "policy": "orders",
        "ports": {"5432/TCP": {"original": "postgres", "gateway": 6432}},
    }
    record = json.loads(annotations(k8s, namespace, "orders-db")[ANNOTATION_SWITCHED])
    assert record["ports"] == {"5432/TCP": {"original": 5432, "gateway": 6432}}
    # Never written: a Service of other pods, and one that also sends traffic to them.
    for before in (unrelated, shared):
        after = k8s.get(f"{path}/{before['metadata']['name']}")
        assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]

    current = get_policy(k8s, namespace, "orders")
    reported = condition(current, "ServicesSwitched")
    assert reported is not None
    assert (reported["status"], reported["reason"]) == ("False", "ServicesNotSwitched")
    assert "orders-db, orders-named" in reported["message"]
    assert (
        "not switched: data (also sends traffic to pods the policy does not select"
        in (reported["message"])
    )
    assert "web-0" in reported["message"]

    # A new gateway port: the switched Services follow it.
    kubectl_apply(k8s, namespace, policy("orders", switching(gatewayPort=6433)))
    wait_until(
        lambda: target_ports(k8s, namespace, "orders-named")["postgres"] == 6433 or None,
        timeout=45, what="the Service following the new gateway port",
    )  # fmt: skip
    assert target_ports(k8s, namespace, "orders-db") == {"postgres": 6433}

    # Off: the originals are back, the records and the condition gone.
    kubectl_apply(k8s, namespace, policy("orders", switching(False, gatewayPort=6433)))
    wait_until(
        lambda: switched_services(k8s, namespace, "orders") == [] or None,
        timeout=45, what="the Services restored",
    )  # fmt: skip
    assert target_ports(k8s, namespace, "orders-db") == {"postgres": 5432}
    assert target_ports(k8s, namespace, "orders-named") == {"postgres": "postgres", "metrics": 9187}
    for name in ("orders-db", "orders-named"):
        assert ANNOTATION_SWITCHED not in annotations(k8s, namespace, name)
    assert condition(get_policy(k8s, namespace, "orders"), "ServicesSwitched") is None
    for before in (unrelated, shared):
        after = k8s.get(f"{path}/{before['metadata']['name']}")
        assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def test_deleting_the_policy_restores_the_services(
    k8s: Cluster, namespace: str, installed: InstalledOperator
) -> None:
    secrets_for(k8s, namespace)
    database_pods(k8s, namespace)
    path = services_path(namespace)
    k8s.create(path, service("orders-db", LABELS, ("postgres", 5432, "postgres")))
    kubectl_apply(k8s, namespace, policy("orders", switching()))
    wait_until(
        lambda: switched_services(k8s, namespace, "orders") or None,
        timeout=45, what="the Service switched",
    )  # fmt: skip
    assert target_ports(k8s, namespace, "orders-db") == {"postgres": 6432}
    reported = condition(get_policy(k8s, namespace, "orders"), "ServicesSwitched")
    assert reported is not None
    assert (reported["status"], reported["reason"]) == ("True", "Switched")
    assert "orders-db" in reported["message"]

    k8s.delete(f"{policies(namespace)}/orders")

    def gone() -> bool | None:
        try:
            get_policy(k8s, namespace, "orders")
        except KubeError as exc:
            if exc.status == 404:
                return True
            raise
        return None

    wait_until(gone, timeout=45, what="the policy deleted")
    assert target_ports(k8s, namespace, "orders-db") == {"postgres": "postgres"}
    assert ANNOTATION_SWITCHED not in annotations(k8s, namespace, "orders-db")
