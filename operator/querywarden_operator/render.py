"""What a DatabaseAccessPolicy becomes: pure functions from the spec to Kubernetes objects.

Nothing here does I/O. The same functions serve the operator (the ConfigMap and the
NetworkPolicy it applies), the admission webhook (the sidecar it adds to a Pod) and the
tests, which can check a rendering without a cluster.

The sidecar's file layout:

=====================================  ==============================================
``/etc/querywarden/gateway.yaml``      gateway settings (ConfigMap key ``gateway.yaml``)
``/etc/querywarden/policy/``           the ConfigMap directory; ``policy.yaml`` in it
                                       (kubelet swaps ``..data`` on change, the
                                       gateway polls and reloads)
``/etc/querywarden/credentials/``      passwords (and the masking key) from Secrets
``/etc/querywarden/tls/``              the listener's certificate (``tls.crt``/``.key``)
``/var/lib/querywarden/audit``         the audit log (emptyDir) until it is exported
=====================================  ==============================================
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from querywarden_operator.config import OperatorConfig
from querywarden_operator.injection import namespace_selector_expression
from querywarden_operator.spec import (
    ANNOTATION_CONFIG_HASH,
    ANNOTATION_POLICY,
    ANNOTATION_STATUS,
    API_VERSION,
    GROUP,
    INJECTED,
    KIND,
    SIDECAR_NAME,
    DatabaseAccessPolicySpec,
    LabelSelector,
    MountedFiles,
    Resources,
    SecretCredentials,
    Sidecar,
    Target,
    role_env_name,
)

CONFIG_DIR = "/etc/querywarden"
SETTINGS_FILE = f"{CONFIG_DIR}/gateway.yaml"
POLICY_DIR = f"{CONFIG_DIR}/policy"
POLICY_FILE = f"{POLICY_DIR}/policy.yaml"
CREDENTIALS_DIR = f"{CONFIG_DIR}/credentials"
TLS_DIR = f"{CONFIG_DIR}/tls"
FILES_DIR = f"{CONFIG_DIR}/files"
#: The external database's CA (``target.external.caSecret``), gateway Deployments only.
UPSTREAM_CA_DIR = f"{CONFIG_DIR}/upstream-ca"
UPSTREAM_CA_FILE = f"{UPSTREAM_CA_DIR}/ca.crt"
AUDIT_DIR = "/var/lib/querywarden/audit"
TMP_DIR = "/tmp"  # noqa: S108 - an emptyDir of the sidecar's own
#: Where the sidecar finds its ServiceAccount token, CA and namespace: the path every
#: in-cluster client (and a policy's Kubernetes issuer, `caFile`/`bearerTokenFile`)
#: reads. The kubelet's automount never reaches an injected container (admission adds it
#: before the webhook runs, and a pod may switch it off), so the sidecar gets a projected
#: volume of its own there, always: the Kubernetes issuer works out of the box, and with
#: reviews the sidecar creates QueryReviews as the pod's ServiceAccount.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
#: Lifetime of that token; the kubelet renews it at 80 %.
SERVICE_ACCOUNT_TOKEN_SECONDS = 3600

POLICY_KEY = "policy.yaml"
SETTINGS_KEY = "gateway.yaml"
#: The user the image runs as (Dockerfile); set explicitly so runAsNonRoot can verify it.
SIDECAR_UID = 65532
#: How often the gateway looks at the policy file.
POLICY_RELOAD_INTERVAL = "2s"
PORT_NAME = "qw-postgres"

#: Volume names the sidecar adds to a pod.
VOLUME_SETTINGS = "querywarden-settings"
VOLUME_POLICY = "querywarden-policy"
VOLUME_CREDENTIALS = "querywarden-credentials"
VOLUME_TLS = "querywarden-tls"
VOLUME_AUDIT = "querywarden-audit"
VOLUME_TMP = "querywarden-tmp"
VOLUME_SERVICE_ACCOUNT = "querywarden-serviceaccount"
VOLUME_FILES_PREFIX = "querywarden-files-"

LABELS = {"app.kubernetes.io/managed-by": "querywarden-operator"}


class InjectionError(ValueError):
    """The pod cannot take the sidecar as it is (a name it would add is taken)."""


@dataclass(frozen=True, slots=True)
class PolicyRef:
    """The identity of a DatabaseAccessPolicy object."""

    name: str
    namespace: str
    uid: str
    generation: int = 0

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PolicyRef:
        """From a resource body (``metadata`` with name, namespace, uid, generation)."""
        meta = body["metadata"]
        return cls(
            name=str(meta["name"]),
            namespace=str(meta["namespace"]),
            uid=str(meta.get("uid", "")),
            generation=int(meta.get("generation") or 0),
        )


@dataclass(frozen=True, slots=True)
class EffectiveSidecar:
    """The sidecar's settings once the operator's defaults fill what the policy leaves out."""

    image: str
    image_pull_policy: str
    gateway_port: int
    otlp_endpoint: str | None
    native: bool
    plaintext: str
    resources: Resources
    audit_volume_size: str | int
    files: tuple[MountedFiles, ...] = ()
    #: An existing PersistentVolumeClaim for the audit log (None: an emptyDir).
    audit_claim_name: str | None = None
    #: The DatabaseAccessPolicy whose QueryReviews hold the sidecar's reviews; None: the
    #: sidecar keeps them in its own SQLite store.
    review_policy: str | None = None
    #: ``querywarden --log-level`` (None: the gateway's default, INFO).
    log_level: str | None = None


def effective_sidecar(
    sidecar: Sidecar,
    config: OperatorConfig,
    *,
    native_supported: bool,
    policy_name: str | None = None,
) -> EffectiveSidecar:
    """Resolve ``spec.sidecar`` against the operator's defaults and the cluster's abilities.

    ``policy_name``: the DatabaseAccessPolicy's name, which the sidecar labels its
    QueryReviews with when the operator runs with reviews on.
    """
    if config.native_sidecars is not None:
        native_supported = native_supported and config.native_sidecars
    native = native_supported if sidecar.native_sidecar is None else sidecar.native_sidecar
    return EffectiveSidecar(
        image=sidecar.image or config.sidecar_image,
        image_pull_policy=sidecar.image_pull_policy or config.sidecar_image_pull_policy,
        gateway_port=sidecar.gateway_port,
        otlp_endpoint=sidecar.otlp_endpoint or config.otlp_endpoint,
        # A cluster without native sidecars would run an init container that never ends:
        # the pod would never start. Fall back to a regular container there.
        native=native and native_supported,
        plaintext=sidecar.plaintext,
        resources=sidecar.resources or config.sidecar_resources,
        audit_volume_size=sidecar.audit_volume_size,
        files=tuple(sidecar.files),
        audit_claim_name=sidecar.audit_claim_name,
        review_policy=policy_name if config.reviews else None,
        log_level=config.sidecar_log_level,
    )


# --- names ------------------------------------------------------------------------------


def configmap_name(policy: str) -> str:
    """The ConfigMap a policy renders (the policy's name is at most 63 characters)."""
    return f"{policy}-querywarden"


def gateway_pod_labels(policy: str) -> dict[str, str]:
    """Labels of the pods of an external target's gateway Deployment."""
    return {"app.kubernetes.io/name": "querywarden-gateway", ANNOTATION_POLICY: policy}


def network_policy_name(policy: str) -> str:
    """The NetworkPolicy a policy renders."""
    return f"{policy}-querywarden"


def webhook_name(policy: PolicyRef) -> str:
    """The name of a policy's entry in the MutatingWebhookConfiguration."""
    return f"{policy.name}.{policy.namespace}.policies.{GROUP}"


def sidecar_role_binding_name(policy: str) -> str:
    """The RoleBinding that lets a policy's sidecars keep their QueryReviews."""
    return f"{policy}-querywarden-sidecar"


def owner_reference(policy: PolicyRef) -> dict[str, Any]:
    """Makes the policy the owner: its objects go when it goes (garbage collection)."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": policy.name,
        "uid": policy.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owned_metadata(policy: PolicyRef, name: str) -> dict[str, Any]:
    """Metadata of an object a policy renders: in its namespace, labelled, owned by it."""
    return {
        "name": name,
        "namespace": policy.namespace,
        "labels": {**LABELS, ANNOTATION_POLICY: policy.name},
        "ownerReferences": [owner_reference(policy)],
    }


# --- the ConfigMap --------------------------------------------------------------------


def policy_yaml(raw_policy: Mapping[str, Any], *, locked: str | None = None) -> str:
    """``policy.yaml``: the resource's ``spec.policy`` as the user wrote it.

    Written as stored rather than re-serialized from the model, so durations stay
    ``30s`` and the file reads like the resource. Keys are sorted: the same policy always
    renders the same bytes, so an unchanged policy never touches the ConfigMap.
    ``locked``: why the document trusts no issuer (:func:`querywarden_operator.issuers.locked`),
    said in a comment at its top.
    """
    header = "# Rendered by querywarden-operator from spec.policy; edit the resource, not this.\n"
    if locked is not None:
        header += f"# LOCKED, no issuer is trusted: {' '.join(locked.split())}\n"
    return header + yaml.safe_dump(dict(raw_policy), sort_keys=True, default_flow_style=False)


def gateway_settings(spec: DatabaseAccessPolicySpec, sidecar: EffectiveSidecar) -> dict[str, Any]:
    """The gateway settings (docs/configuration.md) of the sidecar.

    Usernames are not here: the container's environment carries them from the Secrets
    (``QUERYWARDEN_UPSTREAM__USER``, ``QUERYWARDEN_UPSTREAM__ROLES__<ROLE>__USER``), so
    the operator never reads a Secret. Passwords are files, read at each connection.
    """
    target = spec.target
    upstream: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": target.database_port,
        "passwordFile": f"{CREDENTIALS_DIR}/default/password",
        "sslmode": target.sslmode,
    }
    if target.external is not None:
        # The gateway as a Deployment (external.py): the database is elsewhere.
        upstream["host"] = target.external.host
        upstream["port"] = target.external.port
        upstream["sslmode"] = target.external.sslmode
        if target.external.ca_secret is not None:
            upstream["sslrootcert"] = UPSTREAM_CA_FILE
    if target.database is not None:
        upstream["database"] = target.database
    if target.roles:
        upstream["roles"] = {
            role.name: {"passwordFile": f"{CREDENTIALS_DIR}/roles/{role.name}/password"}
            for role in target.roles
        }
    settings: dict[str, Any] = {
        "listen": {"host": "0.0.0.0", "port": sidecar.gateway_port, "plaintext": sidecar.plaintext},  # noqa: S104
        "upstream": upstream,
    }
    if target.tls_secret_name is not None:
        settings["tls"] = {"certFile": f"{TLS_DIR}/tls.crt", "keyFile": f"{TLS_DIR}/tls.key"}
    if target.masking_key is not None:
        settings["masking"] = {"hashKeyFile": f"{CREDENTIALS_DIR}/masking/hash-key"}
    audit: dict[str, Any] = {"directory": AUDIT_DIR}
    if sidecar.otlp_endpoint:
        audit["otlpEndpoint"] = sidecar.otlp_endpoint
    settings["audit"] = audit
    if sidecar.review_policy is not None:
        # The namespace comes from $POD_NAMESPACE (the downward API, see _env).
        settings["approvals"] = {
            "store": "kubernetes",
            "policy": sidecar.review_policy,
            "serviceAccountDirectory": SERVICE_ACCOUNT_DIR,
        }
    settings["policyFile"] = POLICY_FILE
    settings["policyReloadInterval"] = POLICY_RELOAD_INTERVAL
    return settings


def gateway_yaml(spec: DatabaseAccessPolicySpec, sidecar: EffectiveSidecar) -> str:
    """``gateway.yaml``, the file ``querywarden serve --config`` reads."""
    header = "# Rendered by querywarden-operator from spec.target and spec.sidecar.\n"
    return header + yaml.safe_dump(gateway_settings(spec, sidecar), sort_keys=False)


def config_hash(spec: DatabaseAccessPolicySpec, sidecar: EffectiveSidecar) -> str:
    """A short hash of everything a running sidecar only picks up at a restart.

    The gateway settings, and the container's own spec: the image, resources, ports.
    The policy document is not in it: the gateway reloads that live.
    """
    container = sidecar_container(spec, sidecar)
    restart_bound: dict[str, Any] = {
        "settings": gateway_settings(spec, sidecar),
        "container": container,
    }
    if sidecar.audit_claim_name is not None:
        # (Only when set: every existing pod's hash stays what it was.)
        restart_bound["audit"] = _audit_source(sidecar)
    material = yaml.safe_dump(restart_bound, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def render_configmap(
    policy: PolicyRef,
    spec: DatabaseAccessPolicySpec,
    raw_policy: Mapping[str, Any],
    sidecar: EffectiveSidecar,
    *,
    locked: str | None = None,
) -> dict[str, Any]:
    """The ConfigMap the sidecar mounts: ``policy.yaml`` and ``gateway.yaml``.

    ``raw_policy`` has its shared issuers inline (:func:`querywarden_operator.issuers.resolve`).
    """
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            **owned_metadata(policy, configmap_name(policy.name)),
            "annotations": {ANNOTATION_CONFIG_HASH: config_hash(spec, sidecar)},
        },
        "data": {
            POLICY_KEY: policy_yaml(raw_policy, locked=locked),
            SETTINGS_KEY: gateway_yaml(spec, sidecar),
        },
    }


# --- the NetworkPolicy ----------------------------------------------------------------


def render_sidecar_role_binding(
    policy: PolicyRef, cluster_role: str, service_accounts: Iterable[str]
) -> dict[str, Any]:
    """The sidecar ClusterRole bound, in the policy's namespace, to its pods' accounts.

    The sidecar creates and watches QueryReviews as its pod's ServiceAccount; these are
    the accounts of the pods the policy selects (``default`` for a pod that names none),
    and nobody else: other workloads of the namespace get nothing.
    """
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": owned_metadata(policy, sidecar_role_binding_name(policy.name)),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": cluster_role,
        },
        "subjects": [
            {"kind": "ServiceAccount", "name": account, "namespace": policy.namespace}
            for account in sorted(set(service_accounts))
        ],
    }


def pod_service_account(pod: Mapping[str, Any]) -> str:
    """The ServiceAccount a pod runs as."""
    return str((pod.get("spec") or {}).get("serviceAccountName") or "default")


def render_network_policy(
    policy: PolicyRef, spec: DatabaseAccessPolicySpec, sidecar: EffectiveSidecar
) -> dict[str, Any]:
    """Ingress to the database pods: the gateway port only (from ``target.clients``).

    The database port is in no rule, so nothing from outside the pod reaches it; the
    gateway connects over localhost, which a NetworkPolicy does not filter.
    ``target.directAccess`` peers (replication, backups) may reach it directly.
    """
    target = spec.target
    gateway_rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": sidecar.gateway_port}]}
    if target.clients:
        gateway_rule["from"] = [peer.as_manifest() for peer in target.clients]
    ingress = [gateway_rule]
    if target.direct_access and target.external is None:
        ingress.append(
            {
                "ports": [{"protocol": "TCP", "port": target.database_port}],
                "from": [peer.as_manifest() for peer in target.direct_access],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": owned_metadata(policy, network_policy_name(policy.name)),
        "spec": {
            "podSelector": (
                target.pod_selector.as_manifest()
                if target.pod_selector is not None
                else {"matchLabels": gateway_pod_labels(policy.name)}
            ),
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


# --- the sidecar ----------------------------------------------------------------------


def credentials_of(target: Target) -> SecretCredentials:
    """The gateway's default credentials (an external target's are filled in first)."""
    if target.credentials is None:
        raise InjectionError("spec.target.credentials is not set")
    return target.credentials


def _env(target: Target, sidecar: EffectiveSidecar) -> list[dict[str, Any]]:
    def from_secret(name: str, secret: str, key: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}

    env = [
        from_secret(
            "QUERYWARDEN_UPSTREAM__USER",
            credentials_of(target).secret_name,
            credentials_of(target).username_key,
        )
    ]
    env += [
        from_secret(role_env_name(role.name), role.secret_name, role.username_key)
        for role in target.roles
    ]
    env += [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "OTEL_SERVICE_NAME", "value": "querywarden"},
        {
            "name": "OTEL_RESOURCE_ATTRIBUTES",
            "value": "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)",
        },
        # Read-only root filesystem: no bytecode cache to write.
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
    ]
    return env


def _tcp_probe(port: int, *, period: int, failures: int, delay: int = 0) -> dict[str, Any]:
    probe: dict[str, Any] = {
        "tcpSocket": {"port": port},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 2,
    }
    if delay:
        probe["initialDelaySeconds"] = delay
    return probe


def sidecar_container(spec: DatabaseAccessPolicySpec, sidecar: EffectiveSidecar) -> dict[str, Any]:
    """The gateway container: native sidecar (``restartPolicy: Always``) or regular."""
    target = spec.target
    mounts: list[dict[str, Any]] = [
        {
            "name": VOLUME_SETTINGS,
            "mountPath": SETTINGS_FILE,
            "subPath": SETTINGS_KEY,
            "readOnly": True,
        },
        # The whole directory, never a subPath: only a directory mount follows the
        # ConfigMap's updates (kubelet swaps the ..data symlink).
        {"name": VOLUME_POLICY, "mountPath": POLICY_DIR, "readOnly": True},
        {"name": VOLUME_CREDENTIALS, "mountPath": CREDENTIALS_DIR, "readOnly": True},
    ]
    if target.tls_secret_name is not None:
        mounts.append({"name": VOLUME_TLS, "mountPath": TLS_DIR, "readOnly": True})
    mounts += [
        {
            "name": VOLUME_FILES_PREFIX + files.name,
            "mountPath": f"{FILES_DIR}/{files.name}",
            "readOnly": True,
        }
        for files in sidecar.files
    ]
    mounts.append(
        {"name": VOLUME_SERVICE_ACCOUNT, "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True}
    )
    mounts += [
        {"name": VOLUME_AUDIT, "mountPath": AUDIT_DIR},
        {"name": VOLUME_TMP, "mountPath": TMP_DIR},
    ]
    port = sidecar.gateway_port
    container: dict[str, Any] = {
        "name": SIDECAR_NAME,
        "image": sidecar.image,
        "imagePullPolicy": sidecar.image_pull_policy,
        "command": ["querywarden"],
        "args": [
            *(["--log-level", sidecar.log_level] if sidecar.log_level else []),
            "serve",
            "--config",
            SETTINGS_FILE,
        ],
        "ports": [{"name": PORT_NAME, "containerPort": port, "protocol": "TCP"}],
        "env": _env(target, sidecar),
        "volumeMounts": mounts,
        # The database container starts once the gateway listens (native sidecars wait
        # for the startup probe), so no client ever finds the pod without it.
        "startupProbe": _tcp_probe(port, period=1, failures=60),
        "readinessProbe": _tcp_probe(port, period=5, failures=3),
        "livenessProbe": _tcp_probe(port, period=10, failures=3),
        "resources": sidecar.resources.model_dump(by_alias=True, exclude_defaults=True),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if sidecar.native:
        container["restartPolicy"] = "Always"
    return container


def sidecar_volumes(
    policy_name: str, spec: DatabaseAccessPolicySpec, sidecar: EffectiveSidecar
) -> list[dict[str, Any]]:
    """The volumes the sidecar mounts."""
    target = spec.target
    configmap = configmap_name(policy_name)

    def secret_source(secret: str, key: str, path: str) -> dict[str, Any]:
        return {"secret": {"name": secret, "items": [{"key": key, "path": path}]}}

    sources = [
        secret_source(
            credentials_of(target).secret_name,
            credentials_of(target).password_key,
            "default/password",
        )
    ]
    sources += [
        secret_source(role.secret_name, role.password_key, f"roles/{role.name}/password")
        for role in target.roles
    ]
    if target.masking_key is not None:
        sources.append(
            secret_source(
                target.masking_key.secret_name, target.masking_key.key, "masking/hash-key"
            )
        )
    volumes: list[dict[str, Any]] = [
        {
            "name": VOLUME_SETTINGS,
            "configMap": {
                "name": configmap,
                "items": [{"key": SETTINGS_KEY, "path": SETTINGS_KEY}],
            },
        },
        {
            "name": VOLUME_POLICY,
            "configMap": {"name": configmap, "items": [{"key": POLICY_KEY, "path": POLICY_KEY}]},
        },
        {"name": VOLUME_CREDENTIALS, "projected": {"sources": sources}},
    ]
    if target.tls_secret_name is not None:
        volumes.append(
            {
                "name": VOLUME_TLS,
                "secret": {
                    "secretName": target.tls_secret_name,
                    "items": [
                        {"key": "tls.crt", "path": "tls.crt"},
                        {"key": "tls.key", "path": "tls.key"},
                    ],
                },
            }
        )
    for files in sidecar.files:
        source: dict[str, Any] = (
            {"secret": {"secretName": files.secret_name}}
            if files.secret_name is not None
            else {"configMap": {"name": files.config_map_name}}
        )
        volumes.append({"name": VOLUME_FILES_PREFIX + files.name, **source})
    # What the kubelet's automount holds, for the sidecar alone (SERVICE_ACCOUNT_DIR).
    volumes.append({"name": VOLUME_SERVICE_ACCOUNT, "projected": {"sources": [
        {"serviceAccountToken": {
            "path": "token", "expirationSeconds": SERVICE_ACCOUNT_TOKEN_SECONDS,
        }},
        {"configMap": {"name": "kube-root-ca.crt",
                       "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [
            {"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}},
        ]}},
    ]}})  # fmt: skip
    volumes += [
        {"name": VOLUME_AUDIT, **_audit_source(sidecar)},
        {"name": VOLUME_TMP, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]
    return volumes


def has_sidecar(pod: Mapping[str, Any]) -> bool:
    """Whether the pod already has the gateway (as a regular or an init container)."""
    spec = pod.get("spec") or {}
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    return any(c.get("name") == SIDECAR_NAME for c in containers)


def _audit_source(sidecar: EffectiveSidecar) -> dict[str, Any]:
    """Where the audit log lives: the named claim, or an emptyDir.

    An emptyDir goes with the pod; the sidecar drains what it has not exported yet to the
    Collector when it is stopped (within the pod's termination grace period).
    """
    if sidecar.audit_claim_name is not None:
        return {"persistentVolumeClaim": {"claimName": sidecar.audit_claim_name}}
    return {"emptyDir": {"sizeLimit": sidecar.audit_volume_size}}


#: The pod's own default (Kubernetes): seconds from SIGTERM to SIGKILL.
DEFAULT_GRACE_SECONDS = 30
#: Of the grace period, what the database container (stopped first, with a native
#: sidecar) and the gateway's session shutdown are left.
DRAIN_RESERVE_SECONDS = 5


def _drain_env(pod_spec: Mapping[str, Any]) -> dict[str, str]:
    """How long the sidecar drains its audit export on shutdown: within the pod's grace.

    An emptyDir audit log is deleted with the pod; the kubelet kills the sidecar when the
    pod's terminationGracePeriodSeconds are up, so the drain must end before that.
    """
    grace = pod_spec.get("terminationGracePeriodSeconds")
    seconds = DEFAULT_GRACE_SECONDS if grace is None else int(grace)
    drain = max(1, seconds - DRAIN_RESERVE_SECONDS)
    return {"name": "QUERYWARDEN_AUDIT__DRAIN_TIMEOUT", "value": f"{drain}s"}


def pod_patch(
    pod: Mapping[str, Any],
    policy_name: str,
    spec: DatabaseAccessPolicySpec,
    sidecar: EffectiveSidecar,
    *,
    pod_sidecar: EffectiveSidecar | None = None,
) -> dict[str, Any] | None:
    """A JSON merge patch that adds the sidecar to ``pod``; None if it is there already.

    Lists are replaced whole by a merge patch, so they are the pod's own plus ours. The
    native sidecar goes first among the init containers: it is up before any of them.
    ``pod_sidecar``: ``sidecar`` as the pod's annotations change it (image, resources,
    log level). The container is that one, but the config hash stays the policy's: the
    pod runs what it asked for, which is not outdated settings.
    """
    if has_sidecar(pod):
        return None
    pod_spec = pod.get("spec") or {}
    ours = sidecar_volumes(policy_name, spec, sidecar)
    existing = list(pod_spec.get("volumes") or [])
    if any(v.get("name") == VOLUME_AUDIT for v in existing):
        # The pod's own audit volume (a StatefulSet's claim template): the sidecar
        # writes its log there, where it outlives the pod.
        ours = [v for v in ours if v["name"] != VOLUME_AUDIT]
    taken = {v.get("name") for v in existing} & {v["name"] for v in ours}
    if taken:
        raise InjectionError(
            f"the pod already has volumes named {', '.join(sorted(str(t) for t in taken))}, "
            "which the querywarden sidecar needs"
        )
    container = sidecar_container(spec, pod_sidecar or sidecar)
    container["env"] = [*container["env"], _drain_env(pod_spec)]
    patch_spec: dict[str, Any] = {"volumes": existing + ours}
    if not pod_spec.get("serviceAccountName"):
        # The sidecar's projected token needs a named account. The ServiceAccount
        # admission plugin names "default" before any webhook runs, so this only fills
        # in what an API server without that plugin leaves out.
        patch_spec["serviceAccountName"] = pod_service_account(pod)
    if sidecar.native:
        patch_spec["initContainers"] = [container, *(pod_spec.get("initContainers") or [])]
    else:
        patch_spec["containers"] = [*(pod_spec.get("containers") or []), container]
    annotations = {
        ANNOTATION_STATUS: INJECTED,
        ANNOTATION_POLICY: policy_name,
        ANNOTATION_CONFIG_HASH: config_hash(spec, sidecar),
    }
    return {"metadata": {"annotations": annotations}, "spec": patch_spec}


# --- the webhook entry ----------------------------------------------------------------


def webhook_entry(
    policy: PolicyRef,
    spec: DatabaseAccessPolicySpec,
    client_config: Mapping[str, Any],
    *,
    enabled_by_default: bool = True,
) -> dict[str, Any]:
    """The policy's own webhook: Pod CREATE in its namespace, matching its podSelector.

    The API server then calls the webhook only for the pods a policy selects, so that
    ``failurePolicy: Fail`` holds back exactly those pods while the operator is away
    and no others (docs/operator.md). A namespace that the ``querywarden.io/inject``
    label turns off is not selected (``enabled_by_default``: see :mod:`.injection`).
    """
    return {
        "name": webhook_name(policy),
        "admissionReviewVersions": ["v1"],
        # Admitting a pod may add its ServiceAccount to the sidecar RoleBinding (reviews
        # on), never for a dry run.
        "sideEffects": "NoneOnDryRun",
        "failurePolicy": "Fail",
        "reinvocationPolicy": "IfNeeded",
        "matchPolicy": "Equivalent",
        "timeoutSeconds": 10,
        "clientConfig": dict(client_config),
        "rules": [
            {
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["CREATE"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ],
        "namespaceSelector": {
            "matchExpressions": [
                {
                    "key": "kubernetes.io/metadata.name",
                    "operator": "In",
                    "values": [policy.namespace],
                },
                namespace_selector_expression(enabled_by_default=enabled_by_default),
            ]
        },
        "objectSelector": (spec.target.pod_selector or LabelSelector()).as_manifest(),
    }


def webhook_configuration(name: str, entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the operator applies to the chart's MutatingWebhookConfiguration: its entries.

    Server-side apply owns exactly these entries (``webhooks`` is a map keyed by
    name): the chart's own entry stays the chart's, and an entry left out of the next
    apply is removed.
    """
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [dict(entry) for entry in entries],
    }
