"""Reconciliation: read the cluster, apply what :mod:`render` says, report in the status.

Every function here is idempotent: it computes the desired objects from the policy and
server-side-applies them, whatever exists already, so a retry, a resumed operator or a
second event for the same change all converge on the same state.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from querywarden.approvals.kube_store import to_review
from querywarden_operator import external, services, sidecar_binding, sidecar_bootstrap, sidecar_tls
from querywarden_operator.certificates import KeyPair, issue_serving, needs_renewal, new_ca
from querywarden_operator.config import OperatorConfig
from querywarden_operator.issuers import (
    ISSUER_API_VERSION,
    ISSUER_PLURAL,
    ISSUERS_RESOLVED,
    LOCKED_REASON,
    Resolution,
    issuer_refs,
    resolve,
)
from querywarden_operator.kube import KubeApiError, KubeClient, object_path
from querywarden_operator.render import (
    EffectiveSidecar,
    PolicyRef,
    config_hash,
    configmap_name,
    effective_sidecar,
    network_policy_name,
    pod_service_account,
    render_configmap,
    render_network_policy,
    webhook_configuration,
    webhook_entry,
)
from querywarden_operator.review import LABEL_REVIEW_POLICY, REVIEW_API_VERSION, REVIEW_PLURAL
from querywarden_operator.spec import (
    ANNOTATION_RESTART,
    ANNOTATION_RESTARTED_FOR,
    API_VERSION,
    GROUP,
    PLURAL,
    DatabaseAccessPolicySpec,
    Target,
)
from querywarden_operator.status import (
    AVAILABLE,
    INJECTED_CONDITION,
    READY,
    RENDERED,
    Condition,
    PodCensus,
    PolicyStatus,
    available_condition,
    census,
    condition,
    drop_condition,
    injected_condition,
    now,
    parse_conditions,
    ready_condition,
    set_condition,
)

log = logging.getLogger(__name__)

#: Server versions from which ``restartPolicy: Always`` init containers run as sidecars
#: (beta and on by default in 1.29, GA in 1.33).
NATIVE_SIDECARS_SINCE = (1, 29)
WEBHOOK_SUFFIX = f".policies.{GROUP}"


class InvalidPolicy(ValueError):
    """The policy's spec cannot be rendered; the message says why, for the condition."""


@dataclass
class Context:
    """What every handler needs: the API client, the settings, what the cluster can do."""

    kube: KubeClient
    config: OperatorConfig
    native_supported: bool
    webhook_lock: threading.Lock = field(default_factory=threading.Lock)
    #: The operator's CA, once read (or made): it issues the gateways' certificates.
    ca: KeyPair | None = None
    ca_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def connect(cls, kube: KubeClient, config: OperatorConfig) -> Context:
        """Ask the API server what it supports."""
        return cls(
            kube=kube,
            config=config,
            native_supported=kube.server_version() >= NATIVE_SIDECARS_SINCE,
        )


def validation_message(exc: ValidationError) -> str:
    """A pydantic error as one line per problem, with the field path in camelCase."""
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        lines.append(f"{where}: {error['msg']}" if where else str(error["msg"]))
    return "; ".join(lines)


def parse_spec(raw_spec: Mapping[str, Any] | None) -> DatabaseAccessPolicySpec:
    """The spec, validated with the gateway's own models; InvalidPolicy says what is wrong."""
    try:
        return DatabaseAccessPolicySpec.model_validate(dict(raw_spec or {}))
    except ValidationError as exc:
        raise InvalidPolicy(f"spec is invalid: {validation_message(exc)}") from None


@dataclass(frozen=True)
class Outcome:
    """The status to write, and the reason the policy is refused (None: it is not)."""

    status: PolicyStatus
    error: str | None = None


def _status_of(body: Mapping[str, Any]) -> Mapping[str, Any]:
    return body.get("status") or {}


def resolved_sidecar_spec(policy: str, spec: DatabaseAccessPolicySpec) -> DatabaseAccessPolicySpec:
    """A sidecar policy's spec with what the operator provides: certificate, credentials.

    The webhook renders pods from it and the reconciler counts them by it (same hash).
    """
    return sidecar_tls.resolved_spec(policy, sidecar_bootstrap.resolved_spec(policy, spec))


def _sidecar_for(ctx: Context, name: str, spec: DatabaseAccessPolicySpec) -> EffectiveSidecar:
    return effective_sidecar(
        spec.sidecar, ctx.config, native_supported=ctx.native_supported, policy_name=name
    )


def reconcile_policy(ctx: Context, body: Mapping[str, Any]) -> Outcome:
    """Validate, render the ConfigMap and NetworkPolicy, register the webhook, count pods."""
    policy = PolicyRef.from_body(body)
    at = now()
    conditions = parse_conditions(_status_of(body).get("conditions"))
    generation = policy.generation

    def refused(reason: str, message: str) -> Outcome:
        updated = set_condition(
            conditions, condition(RENDERED, False, reason, message, generation=generation, at=at)
        )
        updated = set_condition(updated, ready_condition(updated, generation=generation, at=at))
        status = PolicyStatus(observed_generation=generation, conditions=updated)
        return Outcome(status=status, error=message)

    if policy.namespace in ctx.config.never_injected():
        return refused(
            "ExcludedNamespace",
            f"namespace {policy.namespace} is never injected (the operator's own, or "
            "excluded in its settings): create the policy next to the database",
        )
    try:
        spec = parse_spec(body.get("spec"))
    except InvalidPolicy as exc:
        # The ConfigMap keeps the last good rendering: running sidecars keep their policy.
        sync_webhooks(ctx)
        return refused("InvalidPolicy", str(exc))

    if spec.target.external is not None:
        sync_webhooks(ctx)  # a policy that was a sidecar's before loses its entry
        return Outcome(status=_external_status(ctx, body, spec, conditions, at=at))
    conditions = [c for c in conditions if c.type != AVAILABLE]
    try:
        if spec.target.bootstrap is not None:
            _ensure_upstream_secret(ctx, policy, spec.target.bootstrap.role)
        certificate = _sidecar_certificate(ctx, body, spec, at=at)
    except KubeApiError as exc:
        if exc.status != 403:
            raise
        sync_webhooks(ctx)
        return refused(
            FORBIDDEN,
            f"the operator may not write the sidecar's Secrets ({exc.message}): install "
            "the chart with rbac.sidecarCertificates=true, or name Secrets of yours in "
            "target.tlsSecretName and target.credentials",
        )
    spec = resolved_sidecar_spec(policy.name, spec)
    sidecar = _sidecar_for(ctx, policy.name, spec)
    raw_policy = (body.get("spec") or {}).get("policy") or {}
    resolution = resolve_issuers(ctx, raw_policy)
    configmap = render_configmap(
        policy, spec, resolution.policy, sidecar,
        locked=None if resolution.resolved else resolution.message(),
    )  # fmt: skip
    ctx.kube.apply(
        object_path("v1", "configmaps", policy.namespace, configmap_name(policy.name)), configmap
    )
    ctx.kube.apply(
        object_path(
            "networking.k8s.io/v1", "networkpolicies", policy.namespace,
            network_policy_name(policy.name),
        ),
        render_network_policy(policy, spec, sidecar),
    )  # fmt: skip
    conditions = _issuers_condition(conditions, spec, resolution, generation=generation, at=at)
    rendered = (
        condition(
            RENDERED,
            True,
            "Rendered",
            f"ConfigMap {configmap_name(policy.name)} and NetworkPolicy "
            f"{network_policy_name(policy.name)} are up to date",
            generation=generation,
            at=at,
        )
        if resolution.resolved
        else condition(
            RENDERED,
            False,
            LOCKED_REASON,
            f"ConfigMap {configmap_name(policy.name)} is rendered locked: " + resolution.message(),
            generation=generation,
            at=at,
        )
    )
    conditions = set_condition(conditions, rendered)
    sync_webhooks(ctx)
    status = _with_pods(ctx, body, spec=spec, sidecar=sidecar, conditions=conditions, at=at)
    status = status.model_copy(update=certificate)
    return Outcome(status=status, error=None if resolution.resolved else rendered.message)


def _issuers_condition(
    conditions: list[Condition],
    spec: DatabaseAccessPolicySpec,
    resolution: Resolution,
    *,
    generation: int,
    at: datetime.datetime,
) -> list[Condition]:
    """``IssuersResolved`` as ``resolution`` says (absent when the policy names none)."""
    if not spec.policy.identity.issuer_refs:
        return drop_condition(conditions, ISSUERS_RESOLVED)
    return set_condition(
        conditions,
        condition(
            ISSUERS_RESOLVED,
            resolution.resolved,
            "Resolved" if resolution.resolved else LOCKED_REASON,
            resolution.message(),
            generation=generation,
            at=at,
        ),
    )


def resolve_issuers(ctx: Context, raw_policy: Mapping[str, Any]) -> Resolution:
    """The policy with its ClusterTokenIssuers inline (locked if one cannot be resolved).

    A missing resource (or a missing CRD) is a missing issuer; any other API error is
    raised, so the handler retries rather than rendering a policy without its issuers.
    """
    found = {
        name: ctx.kube.get(object_path(ISSUER_API_VERSION, ISSUER_PLURAL, None, name))
        for name in issuer_refs(raw_policy)
    }
    return resolve(raw_policy, found)


def rerender_referencing(ctx: Context, issuer: str) -> list[str]:
    """Render again every policy that names the ClusterTokenIssuer ``issuer``.

    Called when the issuer is created, changed or deleted; writes each policy's status.
    A failure for one policy is logged and the others still go; the policy's resync
    (every ``resyncInterval``) renders it again in any case.
    """
    rendered: list[str] = []
    for item in ctx.kube.list(object_path(API_VERSION, PLURAL, None)):
        meta = item.get("metadata") or {}
        raw_policy = (item.get("spec") or {}).get("policy") or {}
        if meta.get("deletionTimestamp") or issuer not in issuer_refs(raw_policy):
            continue
        where = f"{meta.get('namespace')}/{meta.get('name')}"
        try:
            outcome = reconcile_policy(ctx, item)
            ctx.kube.merge_patch(
                object_path(API_VERSION, PLURAL, str(meta["namespace"]), str(meta["name"]))
                + "/status",
                {"status": outcome.status.manifest()},
            )
        except KubeApiError as exc:
            log.warning("policy %s: rendering after ClusterTokenIssuer %s changed failed "
                        "(the resync will): %s", where, issuer, exc)  # fmt: skip
            continue
        if outcome.error is not None:
            log.warning("policy %s: %s", where, outcome.error)
        rendered.append(where)
    return rendered


def refresh_pods(ctx: Context, body: Mapping[str, Any]) -> PolicyStatus | None:
    """Count the policy's pods again (and restart workloads if asked).

    None if the spec cannot be rendered (the create/update handler reported that).
    """
    status = _status_of(body)
    conditions = parse_conditions(status.get("conditions"))
    rendered = next((c for c in conditions if c.type == RENDERED), None)
    if rendered is None or (rendered.status != "True" and rendered.reason != FORBIDDEN):
        return None
    try:
        spec = parse_spec(body.get("spec"))
    except InvalidPolicy:
        return None
    if spec.target.external is not None:
        # Availability and the certificate's renewal are checked on every resync; the
        # rendering is applied again too (server-side apply: a no-op when unchanged), and
        # retried after a Forbidden (the chart's RBAC fixed meanwhile).
        return _external_status(ctx, body, spec, conditions, at=now())
    if rendered.status != "True":
        # A sidecar's certificate was Forbidden: tried again (the RBAC may be fixed).
        return reconcile_policy(ctx, body).status
    at = now()
    # The certificate's renewal (and new Service names) is checked on every resync too.
    certificate = _sidecar_certificate(ctx, body, spec, at=at)
    spec = resolved_sidecar_spec(PolicyRef.from_body(body).name, spec)
    return _with_pods(
        ctx,
        body,
        spec=spec,
        sidecar=_sidecar_for(ctx, PolicyRef.from_body(body).name, spec),
        conditions=conditions,
        at=at,
    ).model_copy(update=certificate)


def _with_pods(
    ctx: Context,
    body: Mapping[str, Any],
    *,
    spec: DatabaseAccessPolicySpec,
    sidecar: EffectiveSidecar,
    conditions: list[Condition],
    at: datetime.datetime,
) -> PolicyStatus:
    policy = PolicyRef.from_body(body)
    current_hash = config_hash(spec, sidecar)
    selected = _selected_pods(ctx, policy, spec)
    found = census(selected, policy.name, current_hash)
    if ctx.config.reviews:
        prune_reviews(ctx, policy, spec, at=at)
    cluster_role = ctx.config.sidecar_cluster_role
    if ctx.config.reviews and cluster_role is not None:
        # Before the pods need it where possible: on every reconcile and resync, so a
        # pod with a new ServiceAccount is bound within resyncInterval.
        sidecar_binding.write(
            ctx.kube, policy, cluster_role,
            sidecar_binding.recount(
                lambda: (pod_service_account(p) for p in _selected_pods(ctx, policy, spec)), at
            ),
        )  # fmt: skip
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    restart = annotations.get(ANNOTATION_RESTART) == "true"
    if restart and (found.missing or found.outdated):
        restart_workloads(ctx, policy, selected, found, key=f"{policy.name}/{current_hash}")
    switching = services.sync(ctx.kube, policy, spec, body, at=at)
    conditions = switching.conditions(conditions)
    conditions = set_condition(
        conditions,
        injected_condition(found, restart_enabled=restart, generation=policy.generation, at=at),
    )
    conditions = set_condition(
        conditions, ready_condition(conditions, generation=policy.generation, at=at)
    )
    return PolicyStatus(
        observed_generation=policy.generation,
        targets=found.targets,
        injected=found.injected,
        config_map=configmap_name(policy.name),
        switched_services=switching.switched,
        conditions=conditions,
    )


def _selected_pods(
    ctx: Context, policy: PolicyRef, spec: DatabaseAccessPolicySpec
) -> list[dict[str, Any]]:
    """The pods the policy selects, as stored now."""
    selector = spec.target.pod_selector
    if selector is None:
        return []
    pods = ctx.kube.list(
        object_path("v1", "pods", policy.namespace), label_selector=selector.as_query()
    )
    # The API server applied the selector; applying it here too keeps a selector the
    # query syntax cannot say exactly from counting the wrong pods.
    return [p for p in pods if selector.matches((p.get("metadata") or {}).get("labels") or {})]


def bind_pod_account(ctx: Context, policy_body: Mapping[str, Any], pod: Mapping[str, Any]) -> None:
    """Add a pod's ServiceAccount to its policy's sidecar RoleBinding, as it is admitted.

    The resync would bind it within ``resyncInterval``; doing it at admission means the
    sidecar can open reviews from its first statement (:mod:`sidecar_binding` keeps a
    recount racing with this from undoing it). Best effort: a failure is logged and the
    resync catches up; the pod is never held back for it.
    """
    cluster_role = ctx.config.sidecar_cluster_role
    if not ctx.config.reviews or cluster_role is None:
        return
    policy = PolicyRef.from_body(policy_body)
    account = pod_service_account(pod)
    try:
        sidecar_binding.write(ctx.kube, policy, cluster_role, sidecar_binding.admit(account, now()))
    except KubeApiError as exc:
        log.warning(
            "policy %s/%s: binding ServiceAccount %s for the sidecar failed (the resync "
            "will): %s", policy.namespace, policy.name, account, exc,
        )  # fmt: skip


# --- external targets: the gateway as a Deployment ------------------------------------


def operator_ca(ctx: Context) -> KeyPair:
    """The operator's CA from its Secret in the operator's namespace; made when missing.

    Replicas that race to make it agree on the first one stored (create fails with 409
    for the others, which then read it).
    """
    with ctx.ca_lock:
        if ctx.ca is not None:
            return ctx.ca
        path = object_path("v1", "secrets", ctx.config.namespace, ctx.config.ca_secret)
        found = ctx.kube.get(path)
        if found is None:
            made = new_ca(at=now())
            manifest = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": ctx.config.ca_secret,
                    "namespace": ctx.config.namespace,
                    "labels": {"app.kubernetes.io/managed-by": "querywarden-operator"},
                },
                "type": "kubernetes.io/tls",
                "data": {
                    "tls.crt": base64.b64encode(made.cert_pem).decode(),
                    "tls.key": base64.b64encode(made.key_pem).decode(),
                },
            }
            try:
                ctx.kube.request("POST", path.rsplit("/", 1)[0], manifest)
                log.info("made the operator's CA in Secret %s/%s", ctx.config.namespace,
                         ctx.config.ca_secret)  # fmt: skip
                found = manifest
            except KubeApiError as exc:
                if exc.status != 409:
                    raise
                found = ctx.kube.get(path)
                if found is None:
                    raise TemporaryFailure("the operator's CA Secret vanished") from exc
        data = found.get("data") or {}
        ctx.ca = KeyPair(base64.b64decode(data["tls.crt"]), base64.b64decode(data["tls.key"]))
        return ctx.ca


class TemporaryFailure(RuntimeError):
    """Something to retry (the handler's backoff)."""


def _ensure_upstream_secret(ctx: Context, policy: PolicyRef, role: str) -> None:
    """The bootstrapped role's Secret: created once with a new password, never replaced.

    Only ``create`` is needed (a 409 means it exists): the operator never reads it.
    """
    manifest = external.render_upstream_secret(policy, role, external.generated_password())
    try:
        ctx.kube.request("POST", object_path("v1", "secrets", policy.namespace), manifest)
        log.info("policy %s/%s: generated the password of role %s in Secret %s",
                 policy.namespace, policy.name, role, manifest["metadata"]["name"])  # fmt: skip
    except KubeApiError as exc:
        if exc.status != 409:
            raise


def _certificate(
    ctx: Context,
    policy: PolicyRef,
    previous: Mapping[str, Any],
    at: datetime.datetime,
    names: list[str],
) -> datetime.datetime:
    """Issue the gateway's serving certificate when it is missing, due or misnamed.

    Misnamed: ``names`` differ from ``status.certificateNames`` (when recorded). Returns
    the certificate's expiry. External targets and sidecars alike: the Secret
    ``<policy>-querywarden-tls`` and the ConfigMap ``<policy>-querywarden-ca``.
    """
    raw = previous.get("certificateNotAfter")
    not_after = datetime.datetime.fromisoformat(str(raw)) if raw else None
    if previous.get("certificateSecret") != external.serving_secret_name(policy.name):
        not_after = None
    recorded = previous.get("certificateNames")
    if recorded is not None and list(recorded) != names:
        not_after = None
    if not needs_renewal(not_after, at=at) and not_after is not None:
        return not_after
    ca = operator_ca(ctx)
    pair = issue_serving(ca, names, at=at)
    ctx.kube.apply(
        object_path("v1", "secrets", policy.namespace, external.serving_secret_name(policy.name)),
        external.render_serving_secret(policy, pair, ca.cert_pem),
    )
    ctx.kube.apply(
        object_path("v1", "configmaps", policy.namespace, external.ca_configmap_name(policy.name)),
        external.render_ca_configmap(policy, ca.cert_pem),
    )
    log.info("policy %s/%s: issued the gateway's certificate for %s, valid until %s",
             policy.namespace, policy.name, ", ".join(names),
             pair.not_after.isoformat())  # fmt: skip
    return pair.not_after


def _sidecar_certificate(
    ctx: Context,
    body: Mapping[str, Any],
    spec: DatabaseAccessPolicySpec,
    *,
    at: datetime.datetime,
) -> dict[str, Any]:
    """Issue (or renew) an injected sidecar's certificate (:mod:`sidecar_tls`).

    Returns the status fields to set: none when the policy names its own Secret.
    """
    if not sidecar_tls.issues_certificate(spec):
        return {"certificate_secret": None, "certificate_not_after": None,
                "certificate_names": None}  # fmt: skip
    policy = PolicyRef.from_body(body)
    selector = spec.target.pod_selector
    label_sets = [
        (p.get("metadata") or {}).get("labels") or {} for p in _selected_pods(ctx, policy, spec)
    ]
    if selector is not None and selector.match_labels:
        label_sets.append(selector.match_labels)  # pods not created yet
    services = sidecar_tls.selecting_services(
        ctx.kube.list(object_path("v1", "services", policy.namespace)), label_sets
    )
    names = sidecar_tls.dns_names(services, policy.namespace, ctx.config.cluster_domain)
    not_after = _certificate(ctx, policy, _status_of(body), at, names)
    return {
        "certificate_secret": external.serving_secret_name(policy.name),
        "certificate_not_after": not_after,
        "certificate_names": names,
    }


#: Rendered=False reason when the operator's RBAC does not cover what a policy needs.
FORBIDDEN = "Forbidden"


def _external_status(
    ctx: Context,
    body: Mapping[str, Any],
    spec: DatabaseAccessPolicySpec,
    conditions: list[Condition],
    *,
    at: datetime.datetime,
) -> PolicyStatus:
    """:func:`reconcile_external`, a Forbidden reported as a condition.

    The resync retries it (the chart's RBAC may be fixed meanwhile) instead of kopf
    retrying it silently.
    """
    try:
        return reconcile_external(ctx, body, spec, conditions, at=at)
    except KubeApiError as exc:
        if exc.status != 403:
            raise
        generation = PolicyRef.from_body(body).generation
        message = (
            f"the operator may not create the gateway's objects ({exc.message}): install "
            "the chart with rbac.externalTargets=true"
        )
        updated = set_condition(
            conditions,
            condition(RENDERED, False, FORBIDDEN, message, generation=generation, at=at),
        )
        updated = set_condition(updated, ready_condition(updated, generation=generation, at=at))
        return PolicyStatus(observed_generation=generation, conditions=updated)


def reconcile_external(
    ctx: Context,
    body: Mapping[str, Any],
    spec: DatabaseAccessPolicySpec,
    conditions: list[Condition],
    *,
    at: datetime.datetime,
) -> PolicyStatus:
    """Apply the gateway Deployment of an external target and report its availability."""
    policy = PolicyRef.from_body(body)
    generation = policy.generation
    previous = _status_of(body)
    ext = external.external_of(spec)
    sidecar = dataclasses.replace(_sidecar_for(ctx, policy.name, spec), native=False)
    resolved = external.resolved_spec(policy.name, spec)
    name = external.gateway_name(policy.name)

    def at_path(api_version: str, plural: str, object_name: str = name) -> str:
        return object_path(api_version, plural, policy.namespace, object_name)

    ctx.kube.apply(at_path("v1", "serviceaccounts"), external.render_service_account(policy))
    if ext.bootstrap is not None:
        _ensure_upstream_secret(ctx, policy, ext.bootstrap.role)
    names = external.dns_names(policy, ctx.config.cluster_domain)
    not_after = (
        _certificate(ctx, policy, previous, at, names)
        if external.issues_certificate(spec)
        else None
    )
    raw_policy = (body.get("spec") or {}).get("policy") or {}
    # Shared issuers are resolved as for a sidecar's ConfigMap, locked when one is missing.
    resolution = resolve_issuers(ctx, raw_policy)
    ctx.kube.apply(
        at_path("v1", "configmaps", configmap_name(policy.name)),
        render_configmap(
            policy, resolved, resolution.policy, sidecar,
            locked=None if resolution.resolved else resolution.message(),
        ),
    )  # fmt: skip
    ctx.kube.apply(
        at_path("networking.k8s.io/v1", "networkpolicies", network_policy_name(policy.name)),
        render_network_policy(policy, resolved, sidecar),
    )
    ctx.kube.apply(at_path("v1", "services"), external.render_service(policy, sidecar))
    ctx.kube.apply(at_path("policy/v1", "poddisruptionbudgets"), external.render_pdb(policy))
    deployment = ctx.kube.apply(
        at_path("apps/v1", "deployments"),
        external.render_deployment(
            policy, resolved, sidecar,
            certificate_not_after=not_after.isoformat() if not_after else None,
        ),
    )  # fmt: skip
    cluster_role = ctx.config.sidecar_cluster_role
    if ctx.config.reviews and cluster_role is not None:
        # The gateway pods keep QueryReviews as their own ServiceAccount.
        sidecar_binding.write(ctx.kube, policy, cluster_role, lambda _read: ({name}, {}))
    conditions = [c for c in conditions if c.type != INJECTED_CONDITION]
    conditions = _issuers_condition(conditions, spec, resolution, generation=generation, at=at)
    rendered = (
        condition(
            RENDERED, True, "Rendered",
            f"ConfigMap {configmap_name(policy.name)}, Deployment, Service and "
            f"PodDisruptionBudget {name} are up to date (upstream {ext.host}:{ext.port})",
            generation=generation, at=at,
        )
        if resolution.resolved
        else condition(
            RENDERED, False, LOCKED_REASON,
            f"ConfigMap {configmap_name(policy.name)} is rendered locked: " + resolution.message(),
            generation=generation, at=at,
        )
    )  # fmt: skip
    conditions = set_condition(conditions, rendered)
    conditions = set_condition(
        conditions, available_condition(deployment, generation=generation, at=at)
    )
    conditions = set_condition(
        conditions, ready_condition(conditions, generation=generation, at=at)
    )
    status = (deployment or {}).get("status") or {}
    return PolicyStatus(
        observed_generation=generation,
        config_map=configmap_name(policy.name),
        gateway_service=f"{name}.{policy.namespace}.svc:{sidecar.gateway_port}",
        replicas=ext.replicas,
        available_replicas=int(status.get("availableReplicas") or 0),
        certificate_secret=(
            external.serving_secret_name(policy.name) if not_after is not None else None
        ),
        certificate_not_after=not_after,
        certificate_names=names if not_after is not None else None,
        conditions=conditions,
    )


# --- ended reviews --------------------------------------------------------------------


def prune_reviews(
    ctx: Context, policy: PolicyRef, spec: DatabaseAccessPolicySpec, *, at: datetime.datetime
) -> list[str]:
    """Delete the policy's QueryReviews that ended more than ``approvals.retention`` ago.

    The operator does it, not the sidecars: they never get the right to delete reviews.
    Each delete carries the resourceVersion read, so a review that changed meanwhile is
    left for the next round. Failures are logged, never raised: pruning is housekeeping.
    """
    cutoff = at - spec.policy.approvals.retention
    collection = object_path(REVIEW_API_VERSION, REVIEW_PLURAL, policy.namespace)
    try:
        items = ctx.kube.list(collection, label_selector=f"{LABEL_REVIEW_POLICY}={policy.name}")
    except KubeApiError as exc:
        log.warning(
            "policy %s/%s: listing QueryReviews failed: %s", policy.namespace, policy.name, exc
        )
        return []
    deleted: list[str] = []
    for obj in items:
        try:
            ended = to_review(obj).ended_at()
        except (KeyError, TypeError, ValueError):
            continue  # malformed (the CRD schema let it through): not ours to judge
        if ended is None or ended >= cutoff:
            continue
        meta = obj["metadata"]
        options = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": {"resourceVersion": meta["resourceVersion"]},
        }
        try:
            ctx.kube.request("DELETE", f"{collection}/{meta['name']}", options)
        except KubeApiError as exc:
            if exc.status not in (404, 409):
                log.warning("policy %s/%s: deleting QueryReview %s failed: %s",
                            policy.namespace, policy.name, meta["name"], exc)  # fmt: skip
            continue
        deleted.append(meta["name"])
    if deleted:
        log.info("policy %s/%s: deleted %d ended QueryReviews",
                 policy.namespace, policy.name, len(deleted))  # fmt: skip
    return deleted


# --- rolling workloads ----------------------------------------------------------------


def _controller(meta: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller"):
            return dict(ref)
    return None


def owning_workload(
    kube: KubeClient, namespace: str, pod: Mapping[str, Any]
) -> tuple[str, str, str] | None:
    """(api version, plural, name) of the Deployment, StatefulSet or DaemonSet of a pod."""
    owner = _controller(pod.get("metadata") or {})
    if owner is None:
        return None
    kind, name = owner.get("kind"), str(owner.get("name"))
    if kind == "StatefulSet":
        return ("apps/v1", "statefulsets", name)
    if kind == "DaemonSet":
        return ("apps/v1", "daemonsets", name)
    if kind == "ReplicaSet":
        replicaset = kube.get(object_path("apps/v1", "replicasets", namespace, name))
        if replicaset is None:
            return None
        parent = _controller(replicaset.get("metadata") or {})
        if parent is not None and parent.get("kind") == "Deployment":
            return ("apps/v1", "deployments", str(parent.get("name")))
    return None


def restart_workloads(
    ctx: Context,
    policy: PolicyRef,
    pods: Iterable[Mapping[str, Any]],
    found: PodCensus,
    *,
    key: str,
) -> list[str]:
    """Roll the workloads of pods without the current gateway, once per ``key``.

    As ``kubectl rollout restart`` does: a pod template annotation changes, and the
    workload's controller replaces its pods, which the webhook injects. The annotation's
    value is the policy and its settings hash, so a workload is rolled once per change,
    however often this runs.
    """
    wanted = set(found.missing) | set(found.outdated)
    rolled: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    for pod in pods:
        if (pod.get("metadata") or {}).get("name") not in wanted:
            continue
        workload = owning_workload(ctx.kube, policy.namespace, pod)
        if workload is None or workload in seen:
            continue
        seen.add(workload)
        api_version, plural, name = workload
        path = object_path(api_version, plural, policy.namespace, name)
        current = ctx.kube.get(path)
        if current is None:
            continue
        template_annotations = (
            ((current.get("spec") or {}).get("template") or {}).get("metadata") or {}
        ).get("annotations") or {}
        if template_annotations.get(ANNOTATION_RESTARTED_FOR) == key:
            continue
        ctx.kube.merge_patch(
            path,
            {"spec": {"template": {"metadata": {"annotations": {ANNOTATION_RESTARTED_FOR: key}}}}},
        )
        log.info("restarted %s/%s for policy %s", plural, name, policy.name)
        rolled.append(f"{plural}/{name}")
    return rolled


# --- the webhook configuration --------------------------------------------------------


def sync_webhooks(ctx: Context) -> list[str]:
    """Make the MutatingWebhookConfiguration hold one entry per policy; return their names.

    The client configuration (service or URL, and CA bundle) is copied from the chart's
    own entry, so certificates stay the chart's business (cert-manager or Helm).
    """
    config = ctx.config
    path = object_path(
        "admissionregistration.k8s.io/v1", "mutatingwebhookconfigurations", None,
        config.webhook_configuration,
    )  # fmt: skip
    with ctx.webhook_lock:
        current = ctx.kube.get(path)
        if current is None:
            log.warning(
                "MutatingWebhookConfiguration %s not found: pods cannot be injected",
                config.webhook_configuration,
            )
            return []
        template = next(
            (w for w in current.get("webhooks") or [] if not w["name"].endswith(WEBHOOK_SUFFIX)),
            None,
        )
        if template is None:
            log.warning(
                "MutatingWebhookConfiguration %s has no entry of the chart's to copy the "
                "client configuration from",
                config.webhook_configuration,
            )
            return []
        entries = []
        excluded = config.never_injected()
        for item in ctx.kube.list(object_path(API_VERSION, PLURAL, None)):
            meta = item.get("metadata") or {}
            if meta.get("deletionTimestamp") or meta.get("namespace") in excluded:
                continue
            try:
                spec = parse_spec(item.get("spec"))
            except InvalidPolicy:
                # Keep a policy's entry while its document is invalid: its pods must
                # still get the gateway (with the last good ConfigMap). Only a target
                # that cannot be read has no entry.
                entry = _entry_from_target(item, template["clientConfig"], config)
                if entry is not None:
                    entries.append(entry)
                continue
            if spec.target.external is not None:
                continue  # a gateway Deployment: no pod to inject
            entries.append(
                webhook_entry(
                    PolicyRef.from_body(item),
                    spec,
                    template["clientConfig"],
                    enabled_by_default=config.enable_namespaces_by_default,
                )
            )
        entries.sort(key=lambda e: str(e["name"]))
        try:
            ctx.kube.apply(path, webhook_configuration(config.webhook_configuration, entries))
        except KubeApiError as exc:
            log.error("could not update the webhook configuration: %s", exc)
            raise
        return [str(e["name"]) for e in entries]


def _entry_from_target(
    item: Mapping[str, Any], client_config: Mapping[str, Any], config: OperatorConfig
) -> dict[str, Any] | None:
    raw = dict(item.get("spec") or {})
    try:
        target = Target.model_validate(raw.get("target") or {})
    except ValidationError:
        return None
    if target.pod_selector is None:
        return None
    # Only the target matters for the entry: a stand-in spec with an empty policy.
    stand_in = DatabaseAccessPolicySpec.model_construct(target=target)
    return webhook_entry(
        PolicyRef.from_body(item),
        stand_in,
        client_config,
        enabled_by_default=config.enable_namespaces_by_default,
    )


__all__ = [
    "INJECTED_CONDITION",
    "READY",
    "RENDERED",
    "Context",
    "InvalidPolicy",
    "Outcome",
    "parse_spec",
    "reconcile_policy",
    "refresh_pods",
    "rerender_referencing",
    "resolve_issuers",
    "restart_workloads",
    "sync_webhooks",
]
