"""The mutating admission webhook: Pod CREATE → the pod with the gateway, or a refusal.

:func:`decide` is pure (the pod and the namespace's policies in, a patch or a refusal
out); :func:`admit_pod` reads the policies from the API server. The policies are read on
every request rather than from a cache of the watch: every replica serves the webhook, but
only the peering leader watches, so a cache would be stale on the others.

Fail closed: a pod that a policy selects gets the gateway or is refused, never admitted
without it, unless its namespace or the pod itself opts out (:mod:`.injection`: the
namespace label ``querywarden.io/inject: disabled``, the pod annotation
``querywarden.io/inject: "false"``). A pod labelled ``querywarden.io/inject: "true"`` that
would not get the gateway (no policy selects it, its namespace is off, it opts out) is
refused too: it asked for a gateway it would not get. Labels and annotations with values
the webhook does not know refuse the pod; they are never ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from querywarden_operator import sidecar_bootstrap
from querywarden_operator.config import OperatorConfig
from querywarden_operator.injection import (
    ANNOTATION_INJECT,
    NAMESPACE_DISABLED,
    NAMESPACE_ENABLED,
    NAMESPACE_LABEL,
    InjectionRefused,
    namespace_injects,
    pod_opts_out,
    pod_overrides,
)
from querywarden_operator.kube import object_path
from querywarden_operator.reconcile import Context, resolved_sidecar_spec, validation_message
from querywarden_operator.render import InjectionError, effective_sidecar, has_sidecar, pod_patch
from querywarden_operator.spec import (
    API_VERSION,
    LABEL_INJECT,
    PLURAL,
    DatabaseAccessPolicySpec,
    LabelSelector,
    Sidecar,
    Target,
)

#: The kopf handler id, and so the URL path (``/inject``) the webhook is served at.
WEBHOOK_ID = "inject"


@dataclass(frozen=True)
class Admission:
    """The answer for one pod: a merge patch (None: nothing to add) or a refusal."""

    patch: dict[str, Any] | None = None
    refusal: str | None = None
    policy: str | None = None
    #: The selecting DatabaseAccessPolicy object, when one selects the pod.
    policy_body: Mapping[str, Any] | None = None


def _selects(policy: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    raw = ((policy.get("spec") or {}).get("target") or {}).get("podSelector")
    try:
        selector = LabelSelector.model_validate(raw or {})
    except ValidationError:
        # A selector that cannot be read might select this pod: treat it as selecting,
        # so that the pod is refused (below) rather than admitted without a gateway.
        return True
    if not selector.match_labels and not selector.match_expressions:
        return False
    return selector.matches(dict(labels))


def decide(
    pod: Mapping[str, Any],
    namespace: str,
    policies: Sequence[Mapping[str, Any]],
    config: OperatorConfig,
    *,
    native_supported: bool,
    namespace_labels: Mapping[str, str] | None = None,
) -> Admission:
    """Decide for one pod, given the DatabaseAccessPolicies and the labels of its namespace."""
    if namespace in config.never_injected() or has_sidecar(pod):
        # Never twice: a reinvocation, or a pod created with the sidecar already in it.
        return Admission()
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    asked = labels.get(LABEL_INJECT) == "true"
    selecting = [
        p
        for p in policies
        if not (p.get("metadata") or {}).get("deletionTimestamp") and _selects(p, labels)
    ]
    if not selecting and not asked:
        return Admission()
    asking = f"the pod is labelled {LABEL_INJECT}=true but "
    try:
        namespace_on = namespace_injects(
            namespace_labels or {}, enabled_by_default=config.enable_namespaces_by_default
        )
        opted_out = namespace_on and pod_opts_out(annotations)
    except InjectionRefused as exc:
        return Admission(refusal=str(exc))
    if not namespace_on:
        # The namespace's choice comes first (as Istio's istio-injection=disabled).
        if asked:
            state = (
                f"labelled {NAMESPACE_LABEL}={NAMESPACE_DISABLED}"
                if (namespace_labels or {}).get(NAMESPACE_LABEL) == NAMESPACE_DISABLED
                else f"not labelled {NAMESPACE_LABEL}={NAMESPACE_ENABLED}"
            )
            return Admission(
                refusal=asking + f"namespace {namespace} is {state}: it would run without "
                "the querywarden gateway"
            )
        return Admission()
    if opted_out:
        if asked:
            return Admission(
                refusal=asking + f'annotated {ANNOTATION_INJECT}="false": remove one of them'
            )
        if not config.allow_pod_opt_out:
            selected_by = ", ".join(sorted(str(p["metadata"]["name"]) for p in selecting))
            return Admission(
                refusal=f'the pod is annotated {ANNOTATION_INJECT}="false", but pods may not '
                f"opt out of the querywarden gateway here (DatabaseAccessPolicy {selected_by} "
                "selects it; the operator's injection.allowPodOptOut is off)"
            )
        return Admission()
    if not selecting:
        return Admission(
            refusal=asking + f"no DatabaseAccessPolicy in namespace {namespace} selects it: "
            "it would run without the querywarden gateway"
        )
    names = sorted(str(p["metadata"]["name"]) for p in selecting)
    if len(selecting) > 1:
        return Admission(
            refusal=f"the pod is selected by several DatabaseAccessPolicies ({', '.join(names)}); "
            "a database pod can have one gateway: narrow their podSelectors"
        )
    policy = selecting[0]
    name = names[0]
    raw_spec = policy.get("spec") or {}
    try:
        # Only the target and the sidecar shape the pod. An invalid policy document does
        # not hold pods back: the sidecar loads the last good one from the ConfigMap.
        target = Target.model_validate(raw_spec.get("target") or {})
        sidecar_spec = Sidecar.model_validate(raw_spec.get("sidecar") or {})
    except ValidationError as exc:
        return Admission(
            refusal=f"DatabaseAccessPolicy {name} selects this pod but its spec is invalid: "
            f"{validation_message(exc)}",
            policy=name,
        )
    spec = DatabaseAccessPolicySpec.model_construct(target=target, sidecar=sidecar_spec)
    # No tlsSecretName: the certificate the operator issues; bootstrap: its password.
    spec = resolved_sidecar_spec(name, spec)
    sidecar = effective_sidecar(
        sidecar_spec, config, native_supported=native_supported, policy_name=name
    )
    try:
        overrides = pod_overrides(annotations, allowed_images=config.sidecar_image_allow_list())
        pod_sidecar = overrides.apply(sidecar)
        patch = pod_patch(pod, name, spec, sidecar, pod_sidecar=pod_sidecar)
        if patch is not None:
            patch = sidecar_bootstrap.add_to_patch(patch, spec, pod_sidecar)
    except InjectionRefused as exc:
        return Admission(refusal=str(exc), policy=name)
    except InjectionError as exc:
        return Admission(refusal=f"DatabaseAccessPolicy {name}: {exc}", policy=name)
    return Admission(patch=patch, policy=name, policy_body=policy)


def admit_pod(ctx: Context, pod: Mapping[str, Any], namespace: str) -> Admission:
    """Read the namespace's policies and labels, and decide."""
    if namespace in ctx.config.never_injected():
        return Admission()
    policies = ctx.kube.list(object_path(API_VERSION, PLURAL, namespace))
    found = ctx.kube.get(object_path("v1", "namespaces", None, namespace)) or {}
    return decide(
        pod,
        namespace,
        policies,
        ctx.config,
        native_supported=ctx.native_supported,
        namespace_labels=(found.get("metadata") or {}).get("labels") or {},
    )
