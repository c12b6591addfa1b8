"""Bootstrap next to an injected sidecar (``target.bootstrap``): the role, made in the pod.

An external target's gateway pods make the role in an init container, before the
gateway starts: the database is elsewhere and already up. In an injected pod the
database is one of the pod's own containers, and the kubelet starts those only after
every init container has finished (a native sidecar: started), so an init container
that waits for the database would wait forever. Nor can the gateway wait for it before
listening: the database container starts once the native gateway's startup probe (its
port) passes. So the bootstrap is a container of its own that starts with the database:

- native sidecars: an init container with ``restartPolicy: Always`` right after the
  gateway, without a startup probe (the database does not wait for it);
- otherwise: a regular container next to the database.

It retries until the database accepts connections on ``localhost:databasePort`` (also
while it answers "the database system is starting up"), makes the role as an external
target's bootstrap does (:mod:`bootstrap`), then stays up doing nothing (a container that
exits is restarted); its readiness probe reports the role made, so the pod turns Ready
only then. The superuser Secret is mounted into this container alone.
"""

from __future__ import annotations

from typing import Any

from querywarden_operator.bootstrap import STATE_DIR, Settings, grants
from querywarden_operator.external import (
    bootstrap_container_with,
    superuser_volume,
    upstream_secret_name,
)
from querywarden_operator.render import EffectiveSidecar
from querywarden_operator.spec import DatabaseAccessPolicySpec, SecretCredentials

CONTAINER = "querywarden-bootstrap"
VOLUME_STATE = "querywarden-bootstrap-state"


def resolved_spec(policy: str, spec: DatabaseAccessPolicySpec) -> DatabaseAccessPolicySpec:
    """The spec with the generated password's Secret as the gateway's credentials."""
    if spec.target.bootstrap is None or spec.target.external is not None:
        return spec
    credentials = SecretCredentials(secret_name=upstream_secret_name(policy))
    target = spec.target.model_copy(update={"credentials": credentials})
    return spec.model_copy(update={"target": target})


def container(spec: DatabaseAccessPolicySpec, sidecar: EffectiveSidecar) -> dict[str, Any] | None:
    """The bootstrap container of an injected pod (None: no ``target.bootstrap``)."""
    target = spec.target
    if target.bootstrap is None or target.database is None or target.external is not None:
        return None
    wanted = grants(spec.policy)
    settings = Settings(
        host="127.0.0.1",
        port=target.database_port,
        database=target.database,
        sslmode=target.sslmode,
        role=target.bootstrap.role,
        schemas=wanted.schemas,
        privileges=wanted.privileges,
        stay=True,
    )
    made = bootstrap_container_with(
        CONTAINER, settings, sidecar, [{"name": VOLUME_STATE, "mountPath": str(STATE_DIR)}]
    )
    made["readinessProbe"] = {
        "exec": {"command": ["python", "-m", "querywarden_operator.bootstrap", "--check"]},
        "periodSeconds": 5,
        "timeoutSeconds": 5,
    }
    if sidecar.native:
        made["restartPolicy"] = "Always"
    return made


def add_to_patch(
    patch: dict[str, Any], spec: DatabaseAccessPolicySpec, sidecar: EffectiveSidecar
) -> dict[str, Any]:
    """``patch`` (:func:`render.pod_patch`'s) with the bootstrap container and its volumes."""
    made = container(spec, sidecar)
    if made is None or spec.target.bootstrap is None:
        return patch
    pod_spec = patch["spec"]
    pod_spec["volumes"] = [
        *pod_spec["volumes"],
        superuser_volume(spec.target.bootstrap),
        {"name": VOLUME_STATE, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
    ]
    if "initContainers" in pod_spec and sidecar.native:
        # Right after the gateway (first): both are up before the pod's own init
        # containers run, and the database container does not wait for it.
        gateway, *rest = pod_spec["initContainers"]
        pod_spec["initContainers"] = [gateway, made, *rest]
    else:
        pod_spec["containers"] = [*pod_spec["containers"], made]
    return patch
