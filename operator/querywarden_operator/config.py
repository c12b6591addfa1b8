"""Settings of ``querywarden operator``: from ``QUERYWARDEN_OPERATOR_*`` environment variables.

The Helm chart sets them on the operator's Deployment (see charts/querywarden/values.yaml
and docs/operator.md). What a DatabaseAccessPolicy leaves out of ``spec.sidecar`` comes
from here: the sidecar image, the OTLP endpoint, the resources.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from querywarden import __version__
from querywarden_operator.injection import image_repository
from querywarden_operator.spec import Resources

DEFAULT_IMAGE = f"ghcr.io/querywarden/querywarden:{__version__}"


class OperatorConfig(BaseSettings):
    """Everything the operator process needs to know that is not in a policy resource."""

    model_config = SettingsConfigDict(
        env_prefix="QUERYWARDEN_OPERATOR_", env_nested_delimiter="__", frozen=True
    )

    #: The operator's own namespace: never injected (nor is kube-system).
    namespace: str = "querywarden-system"
    #: More namespaces whose pods are never injected.
    excluded_namespaces: tuple[str, ...] = ("kube-system",)
    #: A kubeconfig file; unset: the in-cluster service account, else ``$KUBECONFIG``.
    kubeconfig: Path | None = None

    # What a policy's spec.sidecar does not say.
    sidecar_image: str = DEFAULT_IMAGE
    sidecar_image_pull_policy: str = "IfNotPresent"
    otlp_endpoint: str | None = None
    sidecar_resources: Resources = Resources(
        requests={"cpu": "50m", "memory": "64Mi"}, limits={"memory": "256Mi"}
    )
    #: Force native sidecars on or off; unset: on when the API server is 1.29 or later.
    native_sidecars: bool | None = None
    #: The sidecar's ``--log-level``; unset: the gateway's default (INFO).
    sidecar_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] | None = None

    # Injection controls (docs/operator.md, "Injection"; :mod:`.injection`).
    #: Namespaces without the ``querywarden.io/inject`` label are injected (Istio's
    #: ``enableNamespacesByDefault``); off: only those labelled ``enabled``.
    enable_namespaces_by_default: bool = True
    #: A pod annotated ``querywarden.io/inject: "false"`` is admitted without the
    #: gateway; off: such a pod is refused if a policy selects it.
    allow_pod_opt_out: bool = True
    #: Images a pod's ``querywarden.io/sidecar-image`` may name (see
    #: :func:`~.injection.image_allowed`); unset: any tag or digest of the repository
    #: of ``sidecar_image``; empty: none.
    allowed_sidecar_images: tuple[str, ...] | None = None
    #: The chart's ``reviews.enabled``: sidecars keep the reviews of held statements as
    #: QueryReview resources of their policy (decided with kubectl) instead of in their
    #: own SQLite file. Needs the QueryReview CRD, its webhooks and the sidecar RBAC.
    reviews: bool = False
    #: With reviews on: the chart's sidecar ClusterRole, which the operator binds in each
    #: policy's namespace to the ServiceAccounts of the policy's pods (a RoleBinding the
    #: policy owns). Unset: you bind it yourself (reviews.sidecarServiceAccounts).
    sidecar_cluster_role: str | None = None

    # The admission webhook (served by every replica).
    #: The chart's MutatingWebhookConfiguration: the operator adds one webhook per
    #: policy to it (objectSelector = the policy's podSelector), copying the client
    #: configuration of the chart's own webhook entry.
    webhook_configuration: str = "querywarden"
    webhook_host: str = "0.0.0.0"  # noqa: S104 - the webhook must be reachable in-cluster
    webhook_port: int = Field(9443, ge=1, le=65535)
    #: The serving certificate (``tls.crt``/``tls.key`` of the chart's Secret); kopf
    #: reloads it when the files change. Unset: kopf makes a self-signed one.
    webhook_cert_file: Path | None = None
    webhook_key_file: Path | None = None

    # High availability: kopf peering (one replica handles events, all serve webhooks).
    #: The ClusterKopfPeering object; unset: no peering (a single replica).
    peering_name: str | None = None
    #: This replica's peering priority; unset: random, so replicas never tie (a tie
    #: pauses them all).
    priority: int | None = None

    #: ``http://0.0.0.0:8080/healthz`` for the Deployment's probes; unset: none.
    liveness_endpoint: str | None = None
    #: How often each policy's pods are counted again (and workloads restarted if asked);
    #: for external targets, how often the gateway Deployment's availability is read
    #: and its certificate checked for renewal.
    resync_interval: float = Field(60.0, gt=0)

    # External targets (docs/operator.md#databases-the-cluster-does-not-run).
    #: The Secret, in ``namespace``, with the operator's CA (``tls.crt``/``tls.key``),
    #: which issues the gateway Deployments' serving certificates; made when missing.
    ca_secret: str = "querywarden-ca"  # noqa: S105 - a Secret's name
    #: The cluster's DNS domain, in the names of the serving certificates.
    cluster_domain: str = "cluster.local"

    def sidecar_image_allow_list(self) -> tuple[str, ...]:
        """Images a pod annotation may choose for its sidecar."""
        if self.allowed_sidecar_images is None:
            return (image_repository(self.sidecar_image),)
        return self.allowed_sidecar_images

    def never_injected(self) -> frozenset[str]:
        """Namespaces whose pods never get the gateway."""
        return frozenset({self.namespace, *self.excluded_namespaces})
