"""Pointing a namespace's Services at the gateway port, and back (``spec.target.services``).

Opt-in (``switch: true``): a Service in the policy's namespace whose selector picks the
policy's pods and whose ports send traffic to the database port (by number, or by the
container port's name) gets the gateway port as ``targetPort`` instead. What it pointed
at before is recorded on the Service (:data:`ANNOTATION_SWITCHED`), and put back when the
option is turned off or the policy is deleted (kopf's finalizer holds the policy until
then).

Services the operator did not switch are never written. It does not fight: a Service a
controller owns (which would switch it back), one that also sends traffic to pods the
policy does not select (they have no gateway), one another policy switched, and a port
someone changed back after the switch are left as they are and reported in the
``ServicesSwitched`` condition. Each write is a merge patch carrying the
``resourceVersion`` read, so a Service changed in between is left for the next round.

:func:`plan` is pure; :func:`sync` and :func:`restore` read and write.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from querywarden_operator.kube import KubeApiError, KubeClient, object_path
from querywarden_operator.render import PolicyRef
from querywarden_operator.spec import GROUP, DatabaseAccessPolicySpec
from querywarden_operator.status import Condition, condition, drop_condition, set_condition

log = logging.getLogger(__name__)

#: Service annotation: which policy switched which ports, from what to what (JSON).
ANNOTATION_SWITCHED = f"{GROUP}/switched-by-policy"
SERVICES_SWITCHED = "ServicesSwitched"

#: How many names a condition message lists before it says "and N more".
_NAMES_SHOWN = 10


def _port_key(port: Mapping[str, Any]) -> str:
    """A Service port's identity (the API server's list-map key): ``5432/TCP``."""
    return f"{port.get('port')}/{port.get('protocol') or 'TCP'}"


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", "?"))


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def _container_port(pods: Iterable[Mapping[str, Any]], wanted: int | str) -> int | None:
    """The port number ``wanted`` (a number, or a container port's name) means in ``pods``."""
    if isinstance(wanted, int):
        return wanted
    if wanted.isdigit():
        return int(wanted)
    for pod in pods:
        spec = pod.get("spec") or {}
        for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
            for port in container.get("ports") or []:
                if port.get("name") == wanted:
                    return int(port["containerPort"])
    return None


@dataclass(frozen=True)
class Record:
    """What :data:`ANNOTATION_SWITCHED` holds: the policy, and per port what it was."""

    policy: str
    #: port key -> (original targetPort, the gateway port it was switched to)
    ports: dict[str, tuple[int | str, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, service: Mapping[str, Any]) -> Record | None:
        """The record on ``service`` (None: none, or not one of ours)."""
        raw = ((service.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_SWITCHED)
        if not raw:
            return None
        try:
            data = json.loads(raw)
            ports = {
                str(key): (entry["original"], int(entry["gateway"]))
                for key, entry in data["ports"].items()
            }
            return cls(policy=str(data["policy"]), ports=ports)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def encode(self) -> str:
        """The annotation's value."""
        ports = {
            key: {"original": original, "gateway": gateway}
            for key, (original, gateway) in sorted(self.ports.items())
        }
        return json.dumps({"policy": self.policy, "ports": ports}, sort_keys=True)


@dataclass(frozen=True)
class Plan:
    """What to do with one Service: a patch to send, and/or why it is left alone."""

    service: str
    #: The merge patch (None: nothing to write).
    patch: dict[str, Any] | None = None
    #: Whether the Service sends (or will send) traffic to the gateway on our behalf.
    switched: bool = False
    #: Why (some of) it is left alone (None: nothing to report).
    refused: str | None = None


def plan(
    service: Mapping[str, Any],
    namespace_pods: Sequence[Mapping[str, Any]],
    selected: Sequence[Mapping[str, Any]],
    *,
    policy: str,
    database_port: int,
    gateway_port: int,
) -> Plan | None:
    """What switching means for ``service`` (None: it does not concern the policy).

    ``namespace_pods`` are all pods of the namespace, ``selected`` those the policy
    selects.
    """
    name = _name(service)
    meta = service.get("metadata") or {}
    spec = service.get("spec") or {}
    selector = spec.get("selector") or {}
    record = Record.of(service)
    selected_names = {_name(p) for p in selected}
    routed = [p for p in namespace_pods if _selects(selector, _labels(p))] if selector else []
    ours = [p for p in routed if _name(p) in selected_names]
    if not ours:
        # Not (or no longer) in front of the policy's pods. One it switched stays
        # listed, so that turning the option off still restores it.
        mine = record is not None and record.policy == policy
        return Plan(name, switched=True) if mine else None
    if record is not None and record.policy != policy:
        return Plan(name, refused=f"switched by policy {record.policy}")
    ports: list[dict[str, Any]] = [dict(p) for p in spec.get("ports") or []]
    recorded = dict(record.ports) if record is not None else {}
    changed = False  # a recorded port follows a new gatewayPort
    reverted: list[str] = []
    new: list[str] = []
    for port in ports:
        key = _port_key(port)
        current = port.get("targetPort", port.get("port"))
        if key in recorded:
            original, switched_to = recorded[key]
            if current in (switched_to, gateway_port):
                if switched_to != gateway_port:  # the policy's gatewayPort changed
                    port["targetPort"] = gateway_port
                    recorded[key] = (original, gateway_port)
                    changed = True
            else:
                reverted.append(f"port {key} changed since it was switched (now {current})")
            continue
        if current is None or _container_port(ours, current) != database_port:
            continue
        new.append(key)
        port["targetPort"] = gateway_port
        recorded[key] = (current, gateway_port)
    if not recorded:
        return None  # no port reaches the database port
    if new:
        owner = next((o for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
        others = sorted(_name(p) for p in routed if _name(p) not in selected_names)
        refusal = None
        if owner is not None:
            refusal = (
                f"controlled by {owner.get('kind')} {owner.get('name')}, which would switch it back"
            )
        elif others:
            refusal = (
                "also sends traffic to pods the policy does not select (they have no "
                f"gateway): {', '.join(others[:_NAMES_SHOWN])}"
            )
        if refusal is not None:
            if record is None:
                return Plan(name, refused=refusal)
            # Keep what was switched before; switch nothing new.
            for port in ports:
                key = _port_key(port)
                if key in new:
                    port["targetPort"] = recorded.pop(key)[0]
            new = []
            reverted.append(refusal)
    changed = changed or bool(new)
    refused = "; ".join(reverted) or None
    if not changed:
        return Plan(name, switched=True, refused=refused)
    annotation = Record(policy=policy, ports=recorded).encode()
    patch = {
        "metadata": {
            "resourceVersion": meta.get("resourceVersion"),
            "annotations": {ANNOTATION_SWITCHED: annotation},
        },
        "spec": {"ports": ports},
    }
    return Plan(name, patch=patch, switched=True, refused=refused)


def plan_restore(service: Mapping[str, Any], *, policy: str) -> dict[str, Any] | None:
    """The merge patch that puts back what ``policy`` switched (None: nothing of ours)."""
    record = Record.of(service)
    if record is None or record.policy != policy:
        return None
    meta = service.get("metadata") or {}
    ports: list[dict[str, Any]] = [dict(p) for p in (service.get("spec") or {}).get("ports") or []]
    for port in ports:
        entry = record.ports.get(_port_key(port))
        # A port someone changed since keeps its new value: it is theirs now.
        if entry is not None and port.get("targetPort") == entry[1]:
            port["targetPort"] = entry[0]
    return {
        "metadata": {
            "resourceVersion": meta.get("resourceVersion"),
            "annotations": {ANNOTATION_SWITCHED: None},
        },
        "spec": {"ports": ports},
    }


# --- reading and writing --------------------------------------------------------------


def switching_requested(body: Mapping[str, Any]) -> bool:
    """Whether the policy asks for its Services to be switched (read without validation)."""
    target = (body.get("spec") or {}).get("target") or {}
    return bool((target.get("services") or {}).get("switch"))


def holds_services(body: Mapping[str, Any]) -> bool:
    """Whether the policy must have its Services restored before it goes.

    The deletion handler's filter: while switching is asked for, or the status still
    names switched Services (the option was just turned off).
    """
    if switching_requested(body):
        return True
    return bool((body.get("status") or {}).get("switchedServices"))


@dataclass(frozen=True)
class Outcome:
    """The switched Services (None: the policy never asked) and the condition."""

    switched: list[str] | None
    condition: Condition | None

    def conditions(self, existing: Sequence[Condition]) -> list[Condition]:
        """``existing`` with this outcome's condition (or without it)."""
        if self.condition is None:
            return drop_condition(existing, SERVICES_SWITCHED)
        return set_condition(existing, self.condition)


def _services(kube: KubeClient, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kube.list(object_path("v1", "services", namespace))
    return items


def _write(kube: KubeClient, namespace: str, name: str, patch: Mapping[str, Any]) -> bool:
    """Send ``patch``; False when the Service changed or went meanwhile (next round)."""
    try:
        kube.merge_patch(object_path("v1", "services", namespace, name), patch)
    except KubeApiError as exc:
        if exc.status in (404, 409):
            log.info("Service %s/%s changed meanwhile (next round): %s", namespace, name, exc)
            return False
        raise
    return True


def sync(
    kube: KubeClient,
    policy: PolicyRef,
    spec: DatabaseAccessPolicySpec,
    body: Mapping[str, Any],
    *,
    at: datetime.datetime,
) -> Outcome:
    """Switch the policy's Services (or restore them when the option was turned off)."""
    namespace = policy.namespace
    if not spec.target.services.switch:
        previously = (body.get("status") or {}).get("switchedServices")
        if previously is None:
            return Outcome(switched=None, condition=None)
        if previously:
            restore(kube, namespace, policy.name)
        return Outcome(switched=[], condition=None)
    try:
        return _switch(kube, policy, spec, at=at)
    except KubeApiError as exc:
        if exc.status != 403:
            raise
        # The chart's rbac.switchServices is off: said in the condition, nothing else
        # about the policy is held back.
        previously = (body.get("status") or {}).get("switchedServices")
        found = condition(
            SERVICES_SWITCHED, False, "Forbidden",
            f"the operator may not read or patch Services (the chart's rbac.switchServices): "
            f"{exc.message}",
            generation=policy.generation, at=at,
        )  # fmt: skip
        return Outcome(switched=list(previously or []), condition=found)


def _switch(
    kube: KubeClient, policy: PolicyRef, spec: DatabaseAccessPolicySpec, *, at: datetime.datetime
) -> Outcome:
    namespace = policy.namespace
    selector = spec.target.pod_selector
    if selector is None:
        # An external target: its clients reach the gateway's own Service, nothing to switch.
        return Outcome(switched=[], condition=None)
    # Finished and terminating pods receive no traffic: they neither count as the
    # policy's nor hold a Service back (as the pod census and the check count them).
    pods = [
        p
        for p in kube.list(object_path("v1", "pods", namespace))
        if not (p.get("metadata") or {}).get("deletionTimestamp")
        and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
    ]
    selected = [p for p in pods if selector.matches(dict(_labels(p)))]
    switched: list[str] = []
    refused: list[str] = []
    for service in _services(kube, namespace):
        step = plan(
            service, pods, selected, policy=policy.name,
            database_port=spec.target.database_port, gateway_port=spec.sidecar.gateway_port,
        )  # fmt: skip
        if step is None:
            continue
        if step.refused is not None:
            refused.append(f"{step.service} ({step.refused})")
        written = step.patch is None or _write(kube, namespace, step.service, step.patch)
        if step.patch is not None and written:
            log.info("policy %s/%s: Service %s switched to port %d", namespace,
                     policy.name, step.service, spec.sidecar.gateway_port)  # fmt: skip
        # A Service changed meanwhile is written next round; one switched before stays
        # listed in the meantime (turning the option off must still restore it).
        if step.switched and (written or Record.of(service) is not None):
            switched.append(step.service)
    switched.sort()
    port = spec.sidecar.gateway_port
    said = (
        f"pointed at the gateway port {port}: " + _list(switched)
        if switched
        else "no Service sends the database port of the selected pods"
    )
    if refused:
        found = condition(
            SERVICES_SWITCHED, False, "ServicesNotSwitched",
            f"{said}; not switched: {_list(refused)}",
            generation=policy.generation, at=at,
        )  # fmt: skip
    else:
        found = condition(
            SERVICES_SWITCHED, True, "Switched" if switched else "NoServices", said,
            generation=policy.generation, at=at,
        )  # fmt: skip
    return Outcome(switched=switched, condition=found)


def restore_before_deletion(kube: KubeClient, body: Mapping[str, Any]) -> list[str]:
    """:func:`restore` for a policy being deleted (the finalizer's handler).

    Without the right to read Services (the chart's ``rbac.switchServices`` off) the
    operator cannot have switched any, unless its status says otherwise: the policy is
    then let go rather than held forever.
    """
    meta = body.get("metadata") or {}
    try:
        return restore(kube, str(meta.get("namespace")), str(meta.get("name")))
    except KubeApiError as exc:
        if exc.status == 403 and not (body.get("status") or {}).get("switchedServices"):
            log.warning("policy %s/%s: Services not restored: %s",
                        meta.get("namespace"), meta.get("name"), exc)  # fmt: skip
            return []
        raise


def restore(kube: KubeClient, namespace: str, policy: str) -> list[str]:
    """Put back what ``policy`` switched in ``namespace``; the Services restored.

    Raises KubeApiError when a Service could not be written (the caller retries), so
    a policy is never let go with a Service it switched.
    """
    restored: list[str] = []
    pending: list[str] = []
    for service in _services(kube, namespace):
        patch = plan_restore(service, policy=policy)
        if patch is None:
            continue
        name = _name(service)
        if _write(kube, namespace, name, patch):
            log.info("policy %s/%s: Service %s restored", namespace, policy, name)
            restored.append(name)
        else:
            pending.append(name)
    if pending:
        raise KubeApiError(
            "PATCH", object_path("v1", "services", namespace), 409,
            json.dumps({"message": f"Services changed while being restored: {pending}"}).encode(),
        )  # fmt: skip
    return sorted(restored)


def _list(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown
