"""A policy's status: conditions (Ready, Rendered, Injected, IssuersResolved) and its pods.

Pure functions: the handlers feed them what they read from the API server and write back
what they return. Conditions follow ``metav1.Condition``: ``lastTransitionTime`` changes
only when a condition's status does.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from querywarden_operator.render import has_sidecar
from querywarden_operator.spec import ANNOTATION_CONFIG_HASH, ANNOTATION_POLICY

READY = "Ready"
RENDERED = "Rendered"
INJECTED_CONDITION = "Injected"
#: External targets: the gateway Deployment's replicas are available.
AVAILABLE = "Available"
ConditionStatus = Literal["True", "False", "Unknown"]

#: How many pod names a condition message lists before it says "and N more".
_NAMES_SHOWN = 5


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)


class Condition(_Model):
    """One condition, as ``metav1.Condition``."""

    type: str = Field(
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
        r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
    )
    status: ConditionStatus
    observed_generation: int | None = Field(None, ge=0)
    last_transition_time: datetime.datetime
    reason: str = Field(
        min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
    )
    message: str = Field(max_length=32768)


class PolicyStatus(_Model):
    """``status`` of a DatabaseAccessPolicy."""

    #: The generation the conditions describe.
    observed_generation: int | None = None
    #: Pods the podSelector selects (running or about to).
    targets: int | None = None
    #: Of those, pods that carry this policy's gateway.
    injected: int | None = None
    #: The rendered ConfigMap.
    config_map: str | None = None
    #: External targets: the gateway Service (``host:port`` clients connect to).
    gateway_service: str | None = None
    #: External targets: gateway replicas wanted, and available.
    replicas: int | None = None
    available_replicas: int | None = None
    #: The Secret with the serving certificate the operator issued, and its expiry.
    certificate_secret: str | None = None
    certificate_not_after: datetime.datetime | None = None
    #: Services whose targetPort the operator pointed at the gateway
    #: (``spec.target.services.switch``); restored before the policy goes.
    switched_services: list[str] | None = None
    #: The names the issued certificate carries (a change issues a new one).
    certificate_names: list[str] | None = None
    conditions: list[Condition] = Field(
        [],
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )

    def manifest(self) -> dict[str, Any]:
        """The status as written to the API server (RFC 3339 times, camelCase)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def now() -> datetime.datetime:
    """The current time, to the second (as the API server stores it)."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def condition(
    type_: str, status: bool, reason: str, message: str, *, generation: int, at: datetime.datetime
) -> Condition:
    """A condition (True/False) observed for ``generation``."""
    return Condition(
        type=type_,
        status="True" if status else "False",
        reason=reason,
        message=message,
        observed_generation=generation,
        last_transition_time=at,
    )


def parse_conditions(raw: Iterable[Mapping[str, Any]] | None) -> list[Condition]:
    """Conditions as read from a resource (malformed entries are dropped)."""
    out: list[Condition] = []
    for item in raw or ():
        try:
            out.append(Condition.model_validate(item))
        except ValueError:
            continue
    return out


def set_condition(existing: Sequence[Condition], new: Condition) -> list[Condition]:
    """``existing`` with ``new`` in place of its type.

    The transition time stays if the status did not change (as
    ``meta.SetStatusCondition`` does).
    """
    out: list[Condition] = []
    replaced = False
    for current in existing:
        if current.type != new.type:
            out.append(current)
            continue
        replaced = True
        if current.status == new.status:
            new = new.model_copy(update={"last_transition_time": current.last_transition_time})
        out.append(new)
    if not replaced:
        out.append(new)
    order = {READY: 0, RENDERED: 1, INJECTED_CONDITION: 2, AVAILABLE: 2}
    return sorted(out, key=lambda c: (order.get(c.type, 9), c.type))


def drop_condition(existing: Sequence[Condition], type_: str) -> list[Condition]:
    """``existing`` without the condition of ``type_`` (one that no longer applies)."""
    return [c for c in existing if c.type != type_]


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


@dataclass(frozen=True)
class PodCensus:
    """The pods a policy selects, by whether they carry its current gateway."""

    #: Carry this policy's gateway with the current settings.
    current: list[str] = field(default_factory=list)
    #: Carry this policy's gateway with settings from before a change (need a restart).
    outdated: list[str] = field(default_factory=list)
    #: Have no gateway (created before the policy, or while its webhook was not yet
    #: in place).
    missing: list[str] = field(default_factory=list)
    #: Carry the gateway of another policy (two policies select them).
    foreign: list[str] = field(default_factory=list)

    @property
    def targets(self) -> int:
        """Pods selected."""
        return len(self.current) + len(self.outdated) + len(self.missing) + len(self.foreign)

    @property
    def injected(self) -> int:
        """Pods with this policy's gateway, current or not."""
        return len(self.current) + len(self.outdated)


def census(pods: Iterable[Mapping[str, Any]], policy_name: str, current_hash: str) -> PodCensus:
    """Sort the selected pods; finished and terminating pods do not count."""
    result = PodCensus()
    for pod in pods:
        meta = pod.get("metadata") or {}
        phase = (pod.get("status") or {}).get("phase")
        if meta.get("deletionTimestamp") or phase in ("Succeeded", "Failed"):
            continue
        name = str(meta.get("name", "?"))
        annotations = meta.get("annotations") or {}
        if not has_sidecar(pod):
            result.missing.append(name)
        elif annotations.get(ANNOTATION_POLICY) != policy_name:
            result.foreign.append(name)
        elif annotations.get(ANNOTATION_CONFIG_HASH) != current_hash:
            result.outdated.append(name)
        else:
            result.current.append(name)
    for names in (result.current, result.outdated, result.missing, result.foreign):
        names.sort()
    return result


def injected_condition(
    pods: PodCensus, *, restart_enabled: bool, generation: int, at: datetime.datetime
) -> Condition:
    """``Injected``: True when every selected pod carries this policy's current gateway."""
    if pods.targets == 0:
        return condition(
            INJECTED_CONDITION,
            True,
            "NoTargets",
            "no pod matches spec.target.podSelector yet",
            generation=generation,
            at=at,
        )
    problems: list[str] = []
    reason = "AllInjected"
    if pods.foreign:
        reason = "SelectedByAnotherPolicy"
        problems.append(
            f"{len(pods.foreign)} pods carry another policy's gateway: {_names(pods.foreign)}"
        )
    if pods.outdated:
        reason = "OutdatedSettings"
        problems.append(
            f"{len(pods.outdated)} pods run older gateway settings (a restart applies the "
            f"new ones): {_names(pods.outdated)}"
        )
    if pods.missing:
        reason = "PodsWithoutGateway"
        problems.append(
            f"{len(pods.missing)} of {pods.targets} pods have no gateway (created before "
            f"the policy, or opted out): {_names(pods.missing)}"
        )
    if not problems:
        return condition(
            INJECTED_CONDITION,
            True,
            reason,
            f"all {pods.targets} selected pods carry the gateway",
            generation=generation,
            at=at,
        )
    hint = (
        "; their workloads are being restarted"
        if restart_enabled
        else "; restart their workloads, or annotate the policy querywarden.io/"
        'restart-workloads="true" to let the operator do it'
    )
    return condition(
        INJECTED_CONDITION,
        False,
        reason,
        "; ".join(problems) + hint,
        generation=generation,
        at=at,
    )


def available_condition(
    deployment: Mapping[str, Any] | None, *, generation: int, at: datetime.datetime
) -> Condition:
    """``Available`` (external targets): the gateway Deployment's replicas are available."""

    def made(status: bool, reason: str, message: str) -> Condition:
        return condition(AVAILABLE, status, reason, message, generation=generation, at=at)

    if deployment is None:
        return made(False, "DeploymentMissing", "the gateway Deployment does not exist yet")
    name = (deployment.get("metadata") or {}).get("name", "?")
    wanted = int((deployment.get("spec") or {}).get("replicas") or 0)
    status = deployment.get("status") or {}
    available = int(status.get("availableReplicas") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    meta_generation = int((deployment.get("metadata") or {}).get("generation") or 0)
    if int(status.get("observedGeneration") or 0) < meta_generation:
        return made(
            False, "DeploymentPending", f"Deployment {name}: the change is not rolled out yet"
        )
    for item in status.get("conditions") or []:
        if item.get("type") == "Progressing" and item.get("reason") == "ProgressDeadlineExceeded":
            return made(False, "ProgressDeadlineExceeded",
                        f"Deployment {name}: {item.get('message', 'no progress')}")  # fmt: skip
    if available == 0:
        return made(
            False, "NoReplicasAvailable",
            f"Deployment {name}: 0 of {wanted} gateway pods available (see its pods' events "
            "and logs; with bootstrap, the logs of their init container 'bootstrap')",
        )  # fmt: skip
    if available < wanted or updated < wanted:
        return made(
            False, "ReplicasUnavailable",
            f"Deployment {name}: {available} of {wanted} gateway pods available, "
            f"{updated} up to date",
        )  # fmt: skip
    return made(
        True, "ReplicasAvailable", f"Deployment {name}: all {wanted} gateway pods available"
    )


def ready_condition(
    conditions: Sequence[Condition], *, generation: int, at: datetime.datetime
) -> Condition:
    """``Ready``: the policy is rendered and its gateway runs (injected, or available)."""
    external = any(c.type == AVAILABLE for c in conditions)
    for type_ in (RENDERED, AVAILABLE if external else INJECTED_CONDITION):
        found = next((c for c in conditions if c.type == type_), None)
        if found is None:
            return condition(
                READY, False, "Pending", f"{type_} is not known yet", generation=generation, at=at
            )
        if found.status != "True":
            return condition(
                READY, False, found.reason, found.message, generation=generation, at=at
            )
    message = (
        "the gateway Deployment serves the external database"
        if external
        else "the gateway guards every selected pod"
    )
    return condition(READY, True, "Ready", message, generation=generation, at=at)
