"""Who gets the gateway, and how a pod may tune it: the namespace label and pod annotations.

Pure functions over labels and annotations; :mod:`querywarden_operator.admission` calls
them and turns :class:`InjectionRefused` into the admission refusal. The rules, in the
order the webhook applies them (docs/operator.md, "Injection"):

1. A namespace labelled ``querywarden.io/inject: disabled`` is never injected, whatever
   its policies and pods say (as Istio's ``istio-injection=disabled``). With
   ``enabled_by_default`` off (the chart's ``injection.enableNamespacesByDefault``, named
   after Istio's setting) only namespaces labelled ``enabled`` are injected.
2. A pod annotated ``querywarden.io/inject: "false"`` opts out (if the operator allows
   it: ``injection.allowPodOptOut``).
3. The policy selecting the pod decides the sidecar; the pod's annotations override its
   image (only from allowed images), resources and log level.

Every value is checked: an unknown one refuses the pod rather than being ignored.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from querywarden_operator.spec import GROUP, LABEL_INJECT, Resources

if TYPE_CHECKING:
    from querywarden_operator.render import EffectiveSidecar

#: Namespace label (the same key as the pod label ``LABEL_INJECT``) and its values.
NAMESPACE_LABEL = LABEL_INJECT
NAMESPACE_ENABLED = "enabled"
NAMESPACE_DISABLED = "disabled"

#: Pod annotation: ``"false"`` opts the pod out, ``"true"`` changes nothing.
ANNOTATION_INJECT = LABEL_INJECT
ANNOTATION_SIDECAR_IMAGE = f"{GROUP}/sidecar-image"
ANNOTATION_SIDECAR_CPU = f"{GROUP}/sidecar-cpu"
ANNOTATION_SIDECAR_MEMORY = f"{GROUP}/sidecar-memory"
ANNOTATION_SIDECAR_CPU_LIMIT = f"{GROUP}/sidecar-cpu-limit"
ANNOTATION_SIDECAR_MEMORY_LIMIT = f"{GROUP}/sidecar-memory-limit"
ANNOTATION_LOG_LEVEL = f"{GROUP}/log-level"

#: annotation → (``requests`` or ``limits``, resource name)
RESOURCE_ANNOTATIONS: dict[str, tuple[str, str]] = {
    ANNOTATION_SIDECAR_CPU: ("requests", "cpu"),
    ANNOTATION_SIDECAR_MEMORY: ("requests", "memory"),
    ANNOTATION_SIDECAR_CPU_LIMIT: ("limits", "cpu"),
    ANNOTATION_SIDECAR_MEMORY_LIMIT: ("limits", "memory"),
}
#: The ``querywarden.io/sidecar-*`` annotations there are: any other is a typo, refused.
SIDECAR_ANNOTATIONS = frozenset({ANNOTATION_SIDECAR_IMAGE, *RESOURCE_ANNOTATIONS})
#: What ``querywarden --log-level`` takes (Python's logging levels).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: A quantity a container's resources accept: Kubernetes' grammar without a sign.
_RESOURCE_QUANTITY = re.compile(
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
    r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
#: An image reference: [registry/]path[:tag][@digest], no whitespace or shell tricks.
_IMAGE = re.compile(
    r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@[a-z0-9]+:[a-f0-9]{32,})?$"
)


class InjectionRefused(ValueError):
    """A label or annotation says something the webhook will not do: the pod is refused."""


def namespace_injects(labels: Mapping[str, str], *, enabled_by_default: bool) -> bool:
    """Whether the namespace's pods may get the gateway, from its ``querywarden.io/inject``."""
    value = labels.get(NAMESPACE_LABEL)
    if value is None:
        return enabled_by_default
    if value == NAMESPACE_ENABLED:
        return True
    if value == NAMESPACE_DISABLED:
        return False
    raise InjectionRefused(
        f"the namespace's label {NAMESPACE_LABEL}={value!r} is neither "
        f"{NAMESPACE_ENABLED!r} nor {NAMESPACE_DISABLED!r}: fix the label"
    )


def namespace_selector_expression(*, enabled_by_default: bool) -> dict[str, object]:
    """The namespaceSelector expression of a policy's webhook entry (the same rule).

    The API server then never sends the webhook a pod of a namespace that is off, so an
    operator outage does not hold those pods back (``failurePolicy: Fail``).
    """
    if enabled_by_default:
        return {"key": NAMESPACE_LABEL, "operator": "NotIn", "values": [NAMESPACE_DISABLED]}
    return {"key": NAMESPACE_LABEL, "operator": "In", "values": [NAMESPACE_ENABLED]}


def pod_opts_out(annotations: Mapping[str, str]) -> bool:
    """Whether the pod is annotated ``querywarden.io/inject: "false"``."""
    value = annotations.get(ANNOTATION_INJECT)
    if value is None or value == "true":
        return False
    if value == "false":
        return True
    raise InjectionRefused(
        f'the pod\'s annotation {ANNOTATION_INJECT}={value!r} is neither "true" nor "false"'
    )


def image_repository(image: str) -> str:
    """``registry/path`` of an image reference, without its tag and digest."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def image_allowed(image: str, allowed: Sequence[str]) -> bool:
    """Whether ``image`` is one of ``allowed``.

    An entry ending in ``/`` allows every image under it (``registry.corp/querywarden/``);
    any other entry is a repository (then any tag or digest of it) or an exact reference.
    ``ghcr.io/querywarden/querywarden`` does not allow ``ghcr.io/querywarden/querywarden-x``.
    """
    for entry in allowed:
        if entry.endswith("/"):
            if image.startswith(entry):
                return True
        elif image == entry or image_repository(image) == entry:
            return True
    return False


@dataclass(frozen=True, slots=True)
class PodOverrides:
    """What a pod's annotations change in its sidecar (None or empty: nothing)."""

    image: str | None = None
    requests: Mapping[str, str] = dataclasses.field(default_factory=dict)
    limits: Mapping[str, str] = dataclasses.field(default_factory=dict)
    log_level: str | None = None

    def apply(self, sidecar: EffectiveSidecar) -> EffectiveSidecar:
        """``sidecar`` with these overrides; each resource replaces only its own key."""
        if self == PodOverrides():
            return sidecar
        resources = sidecar.resources
        if self.requests or self.limits:
            resources = Resources(
                requests={**resources.requests, **self.requests},
                limits={**resources.limits, **self.limits},
            )
        return dataclasses.replace(
            sidecar,
            image=self.image or sidecar.image,
            resources=resources,
            log_level=self.log_level or sidecar.log_level,
        )


def pod_overrides(annotations: Mapping[str, str], *, allowed_images: Sequence[str]) -> PodOverrides:
    """Read the pod's sidecar annotations; an invalid or disallowed value is refused."""
    unknown = sorted(
        key
        for key in annotations
        if key.startswith(f"{GROUP}/sidecar-") and key not in SIDECAR_ANNOTATIONS
    )
    if unknown:
        known = ", ".join(sorted(SIDECAR_ANNOTATIONS))
        raise InjectionRefused(
            f"unknown annotation {', '.join(unknown)} (the sidecar's annotations are {known})"
        )
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    for key, (part, resource) in RESOURCE_ANNOTATIONS.items():
        value = annotations.get(key)
        if value is None:
            continue
        if not _RESOURCE_QUANTITY.match(value):
            raise InjectionRefused(
                f"annotation {key}={value!r} is not a Kubernetes quantity "
                f"({'e.g. 100m or 1' if resource == 'cpu' else 'e.g. 64Mi or 1Gi'})"
            )
        (requests if part == "requests" else limits)[resource] = value
    log_level = annotations.get(ANNOTATION_LOG_LEVEL)
    if log_level is not None:
        if log_level.upper() not in LOG_LEVELS:
            raise InjectionRefused(
                f"annotation {ANNOTATION_LOG_LEVEL}={log_level!r} is not a log level "
                f"(one of {', '.join(LOG_LEVELS)})"
            )
        log_level = log_level.upper()
    image = annotations.get(ANNOTATION_SIDECAR_IMAGE)
    if image is not None:
        if not _IMAGE.match(image):
            raise InjectionRefused(
                f"annotation {ANNOTATION_SIDECAR_IMAGE}={image!r} is not an image reference"
            )
        if not image_allowed(image, allowed_images):
            listed = ", ".join(allowed_images) or "none: image overrides are off"
            raise InjectionRefused(
                f"annotation {ANNOTATION_SIDECAR_IMAGE}={image!r} names an image the operator "
                f"does not allow for the querywarden sidecar (allowed: {listed}; the chart's "
                "injection.allowedSidecarImages)"
            )
    return PodOverrides(image=image, requests=requests, limits=limits, log_level=log_level)
