"""The gateway as a Deployment, for a database the cluster does not run (``target.external``).

Pure functions from the spec to Kubernetes objects, like :mod:`render`, whose sidecar
container, volumes, ConfigMap and settings they reuse: a gateway pod of the Deployment
runs the same container as an injected sidecar and reloads the same ConfigMap, only its
upstream is ``external.host`` instead of localhost. Every object is owned by the policy
(deleting the policy deletes them):

==========================================  =============================================
``<policy>-querywarden``                    ServiceAccount, Deployment, Service (the
                                            gateway port), PodDisruptionBudget
``<policy>-querywarden`` (ConfigMap)        policy.yaml and gateway.yaml, as for sidecars
``<policy>-querywarden-upstream``           Secret: the bootstrapped role and its
                                            generated password (``external.bootstrap``)
``<policy>-querywarden-tls``                Secret: the serving certificate the operator's
                                            CA issued (no ``tlsSecretName``), and its CA
``<policy>-querywarden-ca`` (ConfigMap)     ``ca.crt``, for clients to verify the gateway
==========================================  =============================================
"""

from __future__ import annotations

import base64
import dataclasses
import secrets
from typing import Any

from querywarden_operator.bootstrap import ENV_SETTINGS, SUPERUSER_DIR, Settings, grants
from querywarden_operator.certificates import KeyPair
from querywarden_operator.render import (
    CREDENTIALS_DIR,
    PORT_NAME,
    SIDECAR_UID,
    UPSTREAM_CA_DIR,
    UPSTREAM_CA_FILE,
    VOLUME_CREDENTIALS,
    EffectiveSidecar,
    PolicyRef,
    _drain_env,
    config_hash,
    gateway_pod_labels,
    owned_metadata,
    sidecar_container,
    sidecar_volumes,
)
from querywarden_operator.spec import (
    ANNOTATION_CONFIG_HASH,
    ANNOTATION_POLICY,
    GROUP,
    Bootstrap,
    DatabaseAccessPolicySpec,
    ExternalDatabase,
    SecretCredentials,
)

#: Pod template annotation: the serving certificate's expiry; a new certificate rolls
#: the gateway pods (they would reload it anyway; the roll keeps template and Secret in
#: step). Sidecars are not rolled: :mod:`sidecar_tls`.
ANNOTATION_CERTIFICATE = f"{GROUP}/certificate-not-after"
VOLUME_SUPERUSER = "querywarden-bootstrap-superuser"
VOLUME_UPSTREAM_CA = "querywarden-upstream-ca"
BOOTSTRAP_CONTAINER = "bootstrap"
#: Length of the generated password (URL-safe characters, about 190 bits).
PASSWORD_BYTES = 24


def gateway_name(policy: str) -> str:
    """Deployment, Service, PodDisruptionBudget and ServiceAccount of an external target."""
    return f"{policy}-querywarden"


def upstream_secret_name(policy: str) -> str:
    """The Secret with the bootstrapped role's generated password."""
    return f"{policy}-querywarden-upstream"


def serving_secret_name(policy: str) -> str:
    """The Secret with the certificate the operator issues (no ``tlsSecretName``)."""
    return f"{policy}-querywarden-tls"


def ca_configmap_name(policy: str) -> str:
    """The ConfigMap with the operator's CA certificate, for the gateway's clients."""
    return f"{policy}-querywarden-ca"


def external_of(spec: DatabaseAccessPolicySpec) -> ExternalDatabase:
    """``spec.target.external`` (the caller checked it is set)."""
    if spec.target.external is None:
        raise ValueError("the policy's target is not external")
    return spec.target.external


def dns_names(policy: PolicyRef, cluster_domain: str) -> list[str]:
    """The names clients reach the gateway Service by; the certificate carries them all."""
    service = gateway_name(policy.name)
    namespaced = f"{service}.{policy.namespace}"
    return [f"{namespaced}.svc.{cluster_domain}", f"{namespaced}.svc", namespaced, service]


def resolved_spec(policy: str, spec: DatabaseAccessPolicySpec) -> DatabaseAccessPolicySpec:
    """The spec with what the operator provides filled in: credentials and TLS Secret."""
    external = external_of(spec)
    update: dict[str, Any] = {}
    if spec.target.credentials is None or external.bootstrap is not None:
        update["credentials"] = SecretCredentials(secret_name=upstream_secret_name(policy))
    if spec.target.tls_secret_name is None and spec.sidecar.plaintext != "always":
        update["tls_secret_name"] = serving_secret_name(policy)
    if not update:
        return spec
    return spec.model_copy(update={"target": spec.target.model_copy(update=update)})


def issues_certificate(spec: DatabaseAccessPolicySpec) -> bool:
    """Whether the operator's CA makes the gateway's certificate (none named)."""
    return spec.target.tls_secret_name is None and spec.sidecar.plaintext != "always"


def generated_password() -> str:
    """A new password for the bootstrapped role."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def render_upstream_secret(policy: PolicyRef, role: str, password: str) -> dict[str, Any]:
    """The bootstrapped role's credentials (created once, never overwritten)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": owned_metadata(policy, upstream_secret_name(policy.name)),
        "type": "Opaque",
        "data": {"username": _b64(role.encode()), "password": _b64(password.encode())},
    }


def render_serving_secret(policy: PolicyRef, pair: KeyPair, ca_pem: bytes) -> dict[str, Any]:
    """The gateway's serving certificate, with the CA that issued it (``ca.crt``)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": owned_metadata(policy, serving_secret_name(policy.name)),
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": _b64(pair.cert_pem),
            "tls.key": _b64(pair.key_pem),
            "ca.crt": _b64(ca_pem),
        },
    }


def render_ca_configmap(policy: PolicyRef, ca_pem: bytes) -> dict[str, Any]:
    """The operator's CA certificate for clients (``sslrootcert``)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": owned_metadata(policy, ca_configmap_name(policy.name)),
        "data": {"ca.crt": ca_pem.decode()},
    }


def render_service_account(policy: PolicyRef) -> dict[str, Any]:
    """The gateway pods' ServiceAccount (their token verifies clients' tokens; reviews)."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": owned_metadata(policy, gateway_name(policy.name)),
        # The gateway container mounts a projected token of its own (render.py).
        "automountServiceAccountToken": False,
    }


def render_service(policy: PolicyRef, sidecar: EffectiveSidecar) -> dict[str, Any]:
    """The Service clients connect to: the gateway port of the Deployment's pods."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owned_metadata(policy, gateway_name(policy.name)),
        "spec": {
            "type": "ClusterIP",
            "selector": gateway_pod_labels(policy.name),
            "ports": [
                {
                    "name": "postgres",
                    "protocol": "TCP",
                    "port": sidecar.gateway_port,
                    "targetPort": PORT_NAME,
                }
            ],
        },
    }


def render_pdb(policy: PolicyRef) -> dict[str, Any]:
    """At most one gateway pod down at a time in voluntary disruptions (drains)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": owned_metadata(policy, gateway_name(policy.name)),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": gateway_pod_labels(policy.name)},
        },
    }


def _security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": SIDECAR_UID,
        "runAsGroup": SIDECAR_UID,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def bootstrap_container_with(
    name: str, settings: Settings, sidecar: EffectiveSidecar, mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    """A container running the bootstrap with ``settings`` (external targets and sidecars).

    It mounts the superuser Secret and the generated password (plus ``mounts``).
    """
    return {
        "name": name,
        "image": sidecar.image,
        "imagePullPolicy": sidecar.image_pull_policy,
        "command": ["python", "-m", "querywarden_operator.bootstrap"],
        "env": [
            {"name": ENV_SETTINGS, "value": settings.as_json()},
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        ],
        "volumeMounts": [
            {"name": VOLUME_SUPERUSER, "mountPath": str(SUPERUSER_DIR), "readOnly": True},
            {"name": VOLUME_CREDENTIALS, "mountPath": CREDENTIALS_DIR, "readOnly": True},
            *mounts,
        ],
        "resources": sidecar.resources.model_dump(by_alias=True, exclude_defaults=True),
        "securityContext": _security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def superuser_volume(bootstrap: Bootstrap) -> dict[str, Any]:
    """The superuser Secret, for the bootstrap container alone."""
    return {
        "name": VOLUME_SUPERUSER,
        "secret": {
            "secretName": bootstrap.superuser_secret,
            "items": [
                {"key": bootstrap.username_key, "path": "username"},
                {"key": bootstrap.password_key, "path": "password"},
            ],
        },
    }


def bootstrap_container(
    spec: DatabaseAccessPolicySpec, sidecar: EffectiveSidecar
) -> dict[str, Any] | None:
    """The init container that creates the gateway's role (None: no bootstrap asked)."""
    external = external_of(spec)
    bootstrap = external.bootstrap
    if bootstrap is None or spec.target.database is None:
        return None
    wanted = grants(spec.policy)
    settings = Settings(
        host=external.host,
        port=external.port,
        database=spec.target.database,
        sslmode=external.sslmode,
        role=bootstrap.role,
        schemas=wanted.schemas,
        privileges=wanted.privileges,
        sslrootcert=UPSTREAM_CA_FILE if external.ca_secret is not None else None,
    )
    mounts = []
    if external.ca_secret is not None:
        mounts.append({"name": VOLUME_UPSTREAM_CA, "mountPath": UPSTREAM_CA_DIR, "readOnly": True})
    return bootstrap_container_with(BOOTSTRAP_CONTAINER, settings, sidecar, mounts)


def render_deployment(
    policy: PolicyRef,
    spec: DatabaseAccessPolicySpec,
    sidecar: EffectiveSidecar,
    *,
    certificate_not_after: str | None = None,
) -> dict[str, Any]:
    """The gateway Deployment; ``spec`` as :func:`resolved_spec` returns it."""
    external = external_of(spec)
    sidecar = dataclasses.replace(sidecar, native=False)
    container = sidecar_container(spec, sidecar)
    container.pop("restartPolicy", None)
    pod_spec: dict[str, Any] = {"terminationGracePeriodSeconds": 30}
    container["env"] = [*container["env"], _drain_env(pod_spec)]
    volumes = sidecar_volumes(policy.name, spec, sidecar)
    if external.ca_secret is not None:
        container["volumeMounts"].append(
            {"name": VOLUME_UPSTREAM_CA, "mountPath": UPSTREAM_CA_DIR, "readOnly": True}
        )
        volumes.append(
            {
                "name": VOLUME_UPSTREAM_CA,
                "secret": {
                    "secretName": external.ca_secret,
                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                },
            }
        )
    init = bootstrap_container(spec, sidecar)
    if init is not None and external.bootstrap is not None:
        volumes.append(superuser_volume(external.bootstrap))
        pod_spec["initContainers"] = [init]
    labels = gateway_pod_labels(policy.name)
    annotations = {
        ANNOTATION_POLICY: policy.name,
        ANNOTATION_CONFIG_HASH: config_hash(spec, sidecar),
    }
    if certificate_not_after is not None:
        annotations[ANNOTATION_CERTIFICATE] = certificate_not_after
    pod_spec.update(
        {
            "serviceAccountName": gateway_name(policy.name),
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
            "volumes": volumes,
            # Replicas on different nodes where there are several.
            "affinity": {
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 100,
                            "podAffinityTerm": {
                                "topologyKey": "kubernetes.io/hostname",
                                "labelSelector": {"matchLabels": labels},
                            },
                        }
                    ]
                }
            },
        }
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": owned_metadata(policy, gateway_name(policy.name)),
        "spec": {
            "replicas": external.replicas,
            "selector": {"matchLabels": labels},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }
