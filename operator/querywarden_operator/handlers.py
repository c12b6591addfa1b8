"""The kopf handlers: thin wrappers that call :mod:`reconcile` and :mod:`admission`.

They are registered on a registry of their own (:func:`build_registry`), not kopf's
global one, so that importing this package registers nothing and several operators can
run in one process (the tests do).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from querywarden_operator.admission import WEBHOOK_ID, admit_pod
from querywarden_operator.issuers import ISSUER_PLURAL, issuer_refs
from querywarden_operator.kube import object_path
from querywarden_operator.reconcile import (
    Context,
    bind_pod_account,
    reconcile_policy,
    refresh_pods,
    rerender_referencing,
    sync_webhooks,
)
from querywarden_operator.review import (
    CHECK_WEBHOOK_ID,
    LABEL_REVIEW_POLICY,
    REVIEW_PLURAL,
    STAMP_WEBHOOK_ID,
    ReviewRefused,
    approval_settings,
    check,
    stamp,
)
from querywarden_operator.services import holds_services, restore_before_deletion
from querywarden_operator.spec import API_VERSION, GROUP, PLURAL, VERSION
from querywarden_operator.status import PolicyStatus

log = logging.getLogger(__name__)

#: Seconds before a failed (not permanently) handler is retried.
RETRY_BACKOFF = 10.0


def connection_info(configuration: Any) -> kopf.ConnectionInfo:
    """Kopf's credentials from the client library's configuration.

    As kopf's own ``login_via_client`` does, but for this configuration rather than the
    library's global one.
    """
    hook = getattr(configuration, "refresh_api_key_hook", None)
    if hook is not None:
        # In a pod the service-account token rotates: read it again.
        hook(configuration)
    header: str | None = configuration.get_api_key_with_prefix(
        "BearerToken"
    ) or configuration.get_api_key_with_prefix("authorization")
    scheme: str | None = None
    token: str | None = None
    if header:
        parts = header.split(" ", 1)
        scheme, token = (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme,
        token=token,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


def build_registry(ctx: Context) -> kopf.OperatorRegistry:
    """Register the operator's handlers, bound to ``ctx``, on a new registry."""
    registry = kopf.OperatorRegistry()
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.login(registry=registry, id="login")
    def login(**_: Any) -> kopf.ConnectionInfo:
        return connection_info(ctx.kube.configuration)

    @kopf.on.startup(registry=registry, id="prune-webhooks")
    def prune_webhooks(**_: Any) -> None:
        # Entries of policies deleted while no operator ran go now.
        sync_webhooks(ctx)

    @kopf.on.resume(*resource, registry=registry, id="reconcile", backoff=RETRY_BACKOFF)
    @kopf.on.create(*resource, registry=registry, id="reconcile", backoff=RETRY_BACKOFF)
    @kopf.on.update(*resource, registry=registry, id="reconcile", backoff=RETRY_BACKOFF)
    def reconcile(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        outcome = reconcile_policy(ctx, body)
        patch.status.update(outcome.status.manifest())
        if outcome.error is not None:
            raise kopf.PermanentError(outcome.error)

    @kopf.on.delete(*resource, registry=registry, id="forget", optional=True)
    def forget(**_: Any) -> None:
        # The ConfigMap and NetworkPolicy are owned by the policy (garbage-collected);
        # only its webhook entry is the operator's to remove. Optional: it asks for no
        # finalizer of its own (the recount timer has kopf keep one in any case).
        sync_webhooks(ctx)

    @kopf.on.delete(
        *resource, registry=registry, id="restore-services", backoff=RETRY_BACKOFF,
        when=lambda body, **_: holds_services(body),
    )  # fmt: skip
    def restore_services(body: kopf.Body, **_: Any) -> None:
        # Not optional, for the policies that switch Services (the filter): the
        # finalizer holds the policy until each Service points at the database again
        # (a failure is retried).
        restore_before_deletion(ctx.kube, body)

    @kopf.timer(
        *resource,
        registry=registry,
        id="recount",
        interval=ctx.config.resync_interval,
        initial_delay=ctx.config.resync_interval,
        backoff=RETRY_BACKOFF,
    )
    def recount(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        if issuer_refs((body.get("spec") or {}).get("policy") or {}):
            # Shared issuers may have changed while no event reached this operator (or
            # while re-rendering after one failed): render again, fail closed.
            status: PolicyStatus | None = reconcile_policy(ctx, body).status
        else:
            status = refresh_pods(ctx, body)
        if status is None:
            return
        wanted = status.manifest()
        current = dict(body.get("status") or {})
        if any(current.get(key) != value for key, value in wanted.items()):
            patch.status.update(wanted)

    @kopf.on.event(GROUP, VERSION, ISSUER_PLURAL, registry=registry, id="issuer-changed")
    def issuer_changed(name: str, **_: Any) -> None:
        # Every event, the deletion included (no finalizer: deleting an issuer is never
        # held up by the operator): the policies naming it are rendered again.
        rerender_referencing(ctx, name)

    @kopf.on.mutate("v1", "pods", id=WEBHOOK_ID, operations=["CREATE"], registry=registry)
    def inject(body: kopf.Body, patch: kopf.Patch, dryrun: bool, **_: Any) -> None:
        namespace = str(body.get("metadata", {}).get("namespace") or "")
        admission = admit_pod(ctx, body, namespace)
        if admission.refusal is not None:
            raise kopf.AdmissionError(admission.refusal, code=403)
        if admission.patch is not None:
            patch.update(admission.patch)
            if admission.policy_body is not None and not dryrun:
                # The webhook's one side effect (sideEffects: NoneOnDryRun).
                bind_pod_account(ctx, admission.policy_body, body)

    review = (GROUP, VERSION, REVIEW_PLURAL)

    @kopf.on.mutate(
        *review, id=STAMP_WEBHOOK_ID, operations=["CREATE", "UPDATE"], registry=registry
    )
    def stamp_review(
        body: kopf.Body, userinfo: kopf.UserInfo, patch: kopf.Patch, **kwargs: Any
    ) -> None:
        # kopf passes the old object of an UPDATE as ``old`` (None on CREATE).
        old = kwargs.get("old")
        previous = dict(old) if old else None
        try:
            # The policy as the stored review names it (the label is immutable too).
            settings = approval_settings(_review_policy(ctx, previous)) if previous else None
            changes = stamp(previous, body, userinfo, settings, now=datetime.now(UTC))
        except (ReviewRefused, ValueError) as exc:
            raise kopf.AdmissionError(str(exc), code=403) from exc
        patch.update(changes)

    @kopf.on.validate(
        *review, id=CHECK_WEBHOOK_ID, operations=["CREATE", "UPDATE"], registry=registry
    )
    def check_review(body: kopf.Body, userinfo: kopf.UserInfo, **kwargs: Any) -> None:
        old = kwargs.get("old")
        previous = dict(old) if old else None
        try:
            # The policy as the stored review names it (the label is immutable too).
            settings = approval_settings(_review_policy(ctx, previous)) if previous else None
            check(previous, body, userinfo, settings)
        except ReviewRefused as exc:
            raise kopf.AdmissionError(str(exc), code=403) from exc

    return registry


def _review_policy(ctx: Context, review: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The DatabaseAccessPolicy a QueryReview's label names (None: none, or gone)."""
    meta = review.get("metadata") or {}
    name = (meta.get("labels") or {}).get(LABEL_REVIEW_POLICY)
    namespace = meta.get("namespace")
    if not name or not namespace:
        return None
    found: Mapping[str, Any] | None = ctx.kube.get(
        object_path(API_VERSION, PLURAL, str(namespace), str(name))
    )
    return found


def build_settings(ctx: Context) -> kopf.OperatorSettings:
    """Kopf settings: where its bookkeeping goes, the webhook server, peering."""
    config = ctx.config
    settings = kopf.OperatorSettings()
    # Bookkeeping in annotations under our own prefix; the status holds only what the
    # CRD's schema declares.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    # Only warnings and errors become Events: the resync timer would flood them.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 8
    settings.admission.server = kopf.WebhookServer(
        addr=config.webhook_host,
        port=config.webhook_port,
        certfile=str(config.webhook_cert_file) if config.webhook_cert_file else None,
        pkeyfile=str(config.webhook_key_file) if config.webhook_key_file else None,
    )
    # The chart ships the webhook configuration (namespaceSelector, reinvocation and
    # failure policy are ours to choose, not kopf's); the operator adds policy entries.
    settings.admission.managed = None
    settings.peering.clusterwide = True
    if config.peering_name is None:
        settings.peering.standalone = True
    else:
        settings.peering.name = config.peering_name
        settings.peering.mandatory = True
    return settings
