"""The pure side of switching Services (:mod:`querywarden_operator.services`), no cluster.

What a Service becomes for a policy with ``target.services.switch``: which ports are
switched, which Services are left alone and why, what the record says, and what
restoring puts back. test_k8s_service_switch.py does the same through the API server.
"""

from __future__ import annotations

import json
from typing import Any

from querywarden_operator.services import (
    ANNOTATION_SWITCHED,
    Plan,
    Record,
    holds_services,
    plan,
    plan_restore,
)

DB = {"app": "db"}


def pod(name: str, labels: dict[str, str], **ports: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "containers": [
                {"name": "pg", "ports": [{"name": n, "containerPort": p} for n, p in ports.items()]}
            ]
        },
    }


DATABASE = pod("db-0", DB, postgres=5432, metrics=9187)
WEB = pod("web-0", {"app": "web"})


def service(*ports: tuple[int, int | str], selector: dict[str, str] | None = None,
            **meta: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "metadata": {"name": "db", "resourceVersion": "7", **meta},
        "spec": {
            "selector": DB if selector is None else selector,
            "ports": [{"port": p, "protocol": "TCP", "targetPort": t} for p, t in ports],
        },
    }


def planned(svc: dict[str, Any], gateway_port: int = 6432, policy: str = "orders") -> Plan | None:
    return plan(
        svc, [DATABASE, WEB], [DATABASE],
        policy=policy, database_port=5432, gateway_port=gateway_port,
    )  # fmt: skip


def applied(svc: dict[str, Any], step: Plan | None) -> dict[str, Any]:
    """``svc`` after the merge patch (as the API server merges these two fields)."""
    assert step is not None and step.patch is not None
    annotations = {**(svc["metadata"].get("annotations") or {})}
    for key, value in step.patch["metadata"]["annotations"].items():
        if value is None:
            annotations.pop(key, None)
        else:
            annotations[key] = value
    return {
        "metadata": {**svc["metadata"], "annotations": annotations},
        "spec": {**svc["spec"], "ports": step.patch["spec"]["ports"]},
    }


def test_ports_to_the_database_port_by_number_or_name_are_switched_and_recorded() -> None:
    svc = service((5432, "postgres"), (9187, "metrics"), (5433, 5432))
    step = planned(svc)
    assert step is not None and step.switched and step.refused is None
    assert step.patch is not None
    assert step.patch["metadata"]["resourceVersion"] == "7"  # a precondition
    assert [p["targetPort"] for p in step.patch["spec"]["ports"]] == [6432, "metrics", 6432]
    record = Record.of(applied(svc, step))
    assert record == Record("orders", {"5432/TCP": ("postgres", 6432), "5433/TCP": (5432, 6432)})
    # Switched once: the next round writes nothing.
    again = planned(applied(svc, step))
    assert again == Plan("db", patch=None, switched=True, refused=None)


def test_services_that_do_not_concern_the_policy_are_none() -> None:
    assert planned(service((5432, 5432), selector={})) is None  # no selector
    assert planned(service((5432, 5432), selector={"app": "web"})) is None  # other pods
    assert planned(service((9187, "metrics"))) is None  # no port to the database
    assert planned(service((5432, "unknown"))) is None  # a name no container has


def test_services_left_alone_say_why() -> None:
    owner = {"kind": "Cluster", "name": "pg", "controller": True, "uid": "u", "apiVersion": "x/v1"}
    step = planned(service((5432, 5432), ownerReferences=[owner]))
    assert step == Plan("db", refused="controlled by Cluster pg, which would switch it back")
    both = plan(
        service((5432, 5432)), [DATABASE, pod("db-copy", DB)], [DATABASE],
        policy="orders", database_port=5432, gateway_port=6432,
    )  # fmt: skip
    assert both is not None and both.patch is None and not both.switched
    assert both.refused is not None and "does not select" in both.refused
    assert "db-copy" in both.refused
    theirs = service((5432, 6432), annotations={ANNOTATION_SWITCHED: Record(
        "other", {"5432/TCP": (5432, 6432)}).encode()})  # fmt: skip
    assert planned(theirs) == Plan("db", refused="switched by policy other")


def test_a_switched_service_that_no_longer_selects_the_pods_stays_listed() -> None:
    svc = service((5432, 5432))
    switched = applied(svc, planned(svc))
    switched["spec"]["selector"] = {"app": "elsewhere"}
    assert planned(switched) == Plan("db", switched=True)
    switched["spec"]["selector"] = {}
    assert planned(switched) == Plan("db", switched=True)
    assert planned(switched, policy="another") is None


def test_a_new_gateway_port_moves_switched_ports_and_a_reverted_port_is_not_fought() -> None:
    svc = service((5432, 5432))
    switched = applied(svc, planned(svc))
    moved = planned(switched, gateway_port=7000)
    assert moved is not None and moved.patch is not None
    assert moved.patch["spec"]["ports"][0]["targetPort"] == 7000
    assert json.loads(moved.patch["metadata"]["annotations"][ANNOTATION_SWITCHED])["ports"] == {
        "5432/TCP": {"original": 5432, "gateway": 7000}
    }
    reverted = json.loads(json.dumps(switched))
    reverted["spec"]["ports"][0]["targetPort"] = 5432
    step = planned(reverted)
    assert step is not None and step.patch is None
    assert step.refused == "port 5432/TCP changed since it was switched (now 5432)"


def test_restoring_puts_back_what_was_switched_and_keeps_later_changes() -> None:
    svc = service((5432, "postgres"), (5433, 5432))
    switched = applied(svc, planned(svc))
    switched["spec"]["ports"][1]["targetPort"] = 5999  # someone's since
    patch = plan_restore(switched, policy="orders")
    assert patch is not None
    assert patch["metadata"] == {"resourceVersion": "7", "annotations": {ANNOTATION_SWITCHED: None}}
    assert [p["targetPort"] for p in patch["spec"]["ports"]] == ["postgres", 5999]
    assert plan_restore(switched, policy="another") is None
    assert plan_restore(svc, policy="orders") is None


def test_the_deletion_filter() -> None:
    on = {"spec": {"target": {"services": {"switch": True}}}}
    assert holds_services(on)
    assert not holds_services({"spec": {"target": {}}})
    # Turned off, not yet restored: still held.
    assert holds_services({"spec": {"target": {}}, "status": {"switchedServices": ["db"]}})
    assert not holds_services({"spec": {"target": {}}, "status": {"switchedServices": []}})
