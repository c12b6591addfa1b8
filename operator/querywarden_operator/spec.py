"""The DatabaseAccessPolicy resource: names, annotations and the pydantic models of its spec.

``spec.policy`` is the gateway's own :class:`~querywarden.policy.PolicyDocument`, the same
model that reads a policy file, so a policy means the same thing in a file and in a
resource (a resource may also name shared ClusterTokenIssuers in
``identity.issuerRefs``, which the operator writes inline when it renders the policy:
:mod:`querywarden_operator.issuers`). ``spec.target`` says which pods get the gateway
and with which credentials; ``spec.sidecar`` how the gateway runs. The CRD's
openAPIV3Schema is generated from these models (:mod:`querywarden_operator.schema`),
including the CEL rules attached here as ``x-kubernetes-validations``: the API server
refuses what they forbid before the operator ever sees it, and the operator validates
again with pydantic (a resource written before a rule existed, or a check CEL cannot
express, ends in a False condition).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel

from querywarden.policy import PolicyDocument
from querywarden.policy.model import IdentitySection

GROUP = "querywarden.io"
VERSION = "v1alpha1"
KIND = "DatabaseAccessPolicy"
PLURAL = "databaseaccesspolicies"
SINGULAR = "databaseaccesspolicy"
CRD_NAME = f"{PLURAL}.{GROUP}"
API_VERSION = f"{GROUP}/{VERSION}"

#: Pod annotation: ``injected`` once the webhook added the gateway (never twice).
ANNOTATION_STATUS = f"{GROUP}/status"
#: Pod annotation: the policy whose gateway the pod carries.
ANNOTATION_POLICY = f"{GROUP}/policy"
#: Pod annotation: hash of the gateway settings the sidecar was started with (settings,
#: unlike the policy, need a restart to change).
ANNOTATION_CONFIG_HASH = f"{GROUP}/config-hash"
#: Policy annotation (opt-in, ``"true"``): restart the workloads that own pods still
#: without the gateway or with outdated gateway settings.
ANNOTATION_RESTART = f"{GROUP}/restart-workloads"
#: Pod template annotation the operator sets to roll a workload (like ``kubectl rollout
#: restart``); its value says for which policy and settings, so each change rolls once.
ANNOTATION_RESTARTED_FOR = f"{GROUP}/restarted-for"
#: Pod label (opt-in, ``"true"``): the pod must get the gateway. The chart's webhook
#: always sees such pods, and refuses them when no policy selects them.
LABEL_INJECT = f"{GROUP}/inject"
INJECTED = "injected"

#: The sidecar container's name (and how "already injected" is recognized).
SIDECAR_NAME = "querywarden"

#: A ClusterTokenIssuer's name is the issuer's name in the policy: the policy's grammar.
ISSUER_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_SECRET_KEY = r"^[-._a-zA-Z0-9]+$"  # noqa: S105 - a pattern for key names
#: Upstream role names become environment variable names
#: (``QUERYWARDEN_UPSTREAM__ROLES__<NAME>__USER``): lower case, single underscores.
ROLE_NAME = r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$"
#: The same grammar as Kubernetes' resource.Quantity.
_QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
    r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY_RE = re.compile(_QUANTITY)
#: Bounds that keep the CRD's CEL rules within the API server's cost budget.
MAX_ROLES = 16
MAX_PEERS = 32


def _quantity(value: str | int) -> str | int:
    if isinstance(value, str) and not _QUANTITY_RE.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 100m, 64Mi, 1)")
    return value


#: A Kubernetes quantity (``100m``, ``64Mi``, ``2``), as ``resource.Quantity`` is declared.
Quantity = Annotated[
    str | int,
    AfterValidator(_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": _QUANTITY,
            "x-kubernetes-int-or-string": True,
        }
    ),
]


def _cel(rule: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"rule": rule, "message": message, **extra}


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class LabelSelectorRequirement(_Model):
    """One expression of a label selector (``metav1.LabelSelectorRequirement``)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0)"
                    " : (!has(self.values) || size(self.values) == 0)",
                    "In and NotIn need values; Exists and DoesNotExist take none",
                )
            ]
        }
    )

    key: str = Field(min_length=1, max_length=317)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[Annotated[str, Field(max_length=63)]] = []


class LabelSelector(_Model):
    """Which pods (or namespaces): ``metav1.LabelSelector``, both parts ANDed."""

    match_labels: dict[str, Annotated[str, Field(max_length=63)]] = {}
    match_expressions: list[LabelSelectorRequirement] = []

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether ``labels`` are selected (as the API server evaluates a selector)."""
        for key, wanted in self.match_labels.items():
            if labels.get(key) != wanted:
                return False
        for expression in self.match_expressions:
            present = expression.key in labels
            value = labels.get(expression.key)
            if expression.operator == "In" and value not in expression.values:
                return False
            if expression.operator == "NotIn" and present and value in expression.values:
                return False
            if expression.operator == "Exists" and not present:
                return False
            if expression.operator == "DoesNotExist" and present:
                return False
        return True

    def as_query(self) -> str:
        """The selector as a ``labelSelector`` query parameter."""
        parts = [f"{key}={value}" for key, value in sorted(self.match_labels.items())]
        for expression in self.match_expressions:
            values = ",".join(expression.values)
            match expression.operator:
                case "In":
                    parts.append(f"{expression.key} in ({values})")
                case "NotIn":
                    parts.append(f"{expression.key} notin ({values})")
                case "Exists":
                    parts.append(expression.key)
                case "DoesNotExist":
                    parts.append(f"!{expression.key}")
        return ",".join(parts)

    def as_manifest(self) -> dict[str, Any]:
        """The selector as it is written in a Kubernetes object."""
        return self.model_dump(by_alias=True, exclude_defaults=True)


class IPBlock(_Model):
    """A CIDR range (``networking.k8s.io/v1`` IPBlock)."""

    cidr: str = Field(min_length=1, max_length=64)
    except_: list[Annotated[str, Field(max_length=64)]] = Field([], alias="except")


class NetworkPeer(_Model):
    """Who may connect: pods and/or namespaces by label, or an IP block (NetworkPolicyPeer)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "has(self.podSelector) || has(self.namespaceSelector) || has(self.ipBlock)",
                    "name podSelector, namespaceSelector or ipBlock",
                ),
                _cel(
                    "!has(self.ipBlock) || "
                    "(!has(self.podSelector) && !has(self.namespaceSelector))",
                    "ipBlock cannot be combined with podSelector or namespaceSelector",
                ),
            ]
        }
    )

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None

    def as_manifest(self) -> dict[str, Any]:
        """The peer as a NetworkPolicy writes it."""
        return self.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True)


class SecretCredentials(_Model):
    """A database role's credentials: a Secret in the policy's namespace and two of its keys.

    The username is given to the gateway as an environment variable; the password as a
    file, which the gateway reads when it connects, so a rotated Secret takes effect
    without a restart.
    """

    secret_name: str = Field(max_length=253, pattern=_DNS_SUBDOMAIN)
    username_key: str = Field("username", max_length=253, pattern=_SECRET_KEY)
    password_key: str = Field("password", max_length=253, pattern=_SECRET_KEY)


class UpstreamRole(SecretCredentials):
    """Named credentials that a rule's ``upstreamRole`` selects."""

    name: str = Field(max_length=63, pattern=ROLE_NAME)


class SecretKeyRef(_Model):
    """One key of a Secret in the policy's namespace."""

    secret_name: str = Field(max_length=253, pattern=_DNS_SUBDOMAIN)
    key: str = Field(max_length=253, pattern=_SECRET_KEY)


class Bootstrap(_Model):
    """Create the gateway's login role, from a superuser Secret (opt-in).

    A container of its own (an external target's init container; next to a sidecar, a
    container that waits for the database in the pod) connects with the superuser's
    credentials (mounted into it alone), creates or updates the login
    role ``role`` with the password of a Secret the operator generates and owns
    (``<policy>-querywarden-upstream``) and grants it what the policy needs
    (docs/operator.md#bootstrap). The operator itself never reads the superuser Secret.
    """

    #: A Secret in the policy's namespace with the superuser's credentials.
    superuser_secret: str = Field(max_length=253, pattern=_DNS_SUBDOMAIN)
    username_key: str = Field("username", max_length=253, pattern=_SECRET_KEY)
    password_key: str = Field("password", max_length=253, pattern=_SECRET_KEY)
    #: The login role the gateway connects as.
    role: str = Field("querywarden_gateway", max_length=63, pattern=ROLE_NAME)


class ExternalDatabase(_Model):
    """A database the cluster does not run (RDS, Cloud SQL, a CloudNativePG ``-rw`` Service).

    The operator runs the gateway as a Deployment and a Service of its own in the
    policy's namespace, in front of ``host:port``; no pod is injected.
    """

    #: DNS name or address of the database.
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(5432, ge=1, le=65535)
    #: TLS from the gateway to the database.
    sslmode: Literal["disable", "prefer", "require", "verify-ca", "verify-full"] = "prefer"
    #: A Secret (key ``ca.crt``) with the CA that signed the database's certificate,
    #: for ``verify-ca`` and ``verify-full``.
    ca_secret: str | None = Field(None, max_length=253, pattern=_DNS_SUBDOMAIN)
    #: Gateway replicas (a PodDisruptionBudget keeps all but one up during drains).
    replicas: int = Field(2, ge=1, le=20)
    #: Create the gateway's login role from a superuser Secret (instead of
    #: ``target.credentials``).
    bootstrap: Bootstrap | None = None


class ServiceSwitching(_Model):
    """Whether the operator points the namespace's Services at the gateway port."""

    #: ``true``: the Services in the policy's namespace that send a port to the selected
    #: pods' database port (by number or by the container port's name) are pointed at
    #: the gateway port; the original targetPort is kept in an annotation and restored
    #: when this is turned off or the policy is deleted (:mod:`querywarden_operator.services`).
    switch: bool = False


class Target(_Model):
    """Which pods get the gateway (or which external database), and the credentials."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!has(self.podSelector) || "
                    "(has(self.podSelector.matchLabels) && size(self.podSelector.matchLabels) > 0)"
                    " || (has(self.podSelector.matchExpressions)"
                    " && size(self.podSelector.matchExpressions) > 0)",
                    "podSelector must select something: an empty selector would put the "
                    "gateway in every pod of the namespace",
                ),
                _cel(
                    "has(self.podSelector) != has(self.external)",
                    "name exactly one of podSelector (the gateway as a sidecar) and "
                    "external (the gateway as a Deployment)",
                ),
                _cel(
                    "has(self.credentials) || has(self.bootstrap) "
                    "|| (has(self.external) && has(self.external.bootstrap))",
                    "credentials is required unless bootstrap (or external.bootstrap) creates them",
                ),
                _cel(
                    "!has(self.external) || !has(self.external.bootstrap) || has(self.database)",
                    "external.bootstrap needs target.database (the database to grant on)",
                ),
                _cel(
                    "!has(self.bootstrap) || (has(self.podSelector) && has(self.database))",
                    "bootstrap is for podSelector targets (external ones: external.bootstrap) "
                    "and needs target.database (the database to grant on)",
                ),
            ]
        }
    )

    #: The database pods, in the policy's namespace.
    pod_selector: LabelSelector | None = None
    #: Or: a database outside the cluster's pods; the gateway runs as a Deployment.
    external: ExternalDatabase | None = None
    #: The port the database container listens on; the gateway connects to it on
    #: localhost and the NetworkPolicy closes it to everyone else.
    database_port: int = Field(5432, ge=1, le=65535)
    #: Pin every session to this database (unset: the client's ``dbname``).
    database: str | None = Field(None, min_length=1, max_length=63)
    #: TLS to the database inside the pod (over localhost).
    sslmode: Literal["disable", "prefer", "require"] = "prefer"
    #: The gateway's own database role (sessions whose rules name no ``upstreamRole``).
    #: With ``bootstrap`` or ``external.bootstrap``: leave it out, the operator's
    #: generated Secret is used.
    credentials: SecretCredentials | None = None
    #: podSelector targets: create the gateway's login role from a superuser Secret
    #: (instead of ``credentials``), from a container of the database pod once the
    #: database accepts connections (docs/operator.md#bootstrap).
    bootstrap: Bootstrap | None = None
    #: More roles, selected by the rules' ``upstreamRole``.
    roles: list[UpstreamRole] = Field(
        [],
        max_length=MAX_ROLES,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )
    #: A ``kubernetes.io/tls`` Secret with the gateway's serving certificate; without it
    #: the operator's CA issues one (docs/operator.md#tls-for-the-gateway).
    tls_secret_name: str | None = Field(None, max_length=253, pattern=_DNS_SUBDOMAIN)
    #: The key of the keyed masking strategies (``hash``, ``digits``), at least 16 bytes.
    masking_key: SecretKeyRef | None = None
    #: Who may reach the gateway port; empty: anyone.
    clients: list[NetworkPeer] = Field([], max_length=MAX_PEERS)
    #: Who may reach the database port directly, bypassing the gateway (replication,
    #: backups). Empty: only the pod itself, over localhost.
    direct_access: list[NetworkPeer] = Field([], max_length=MAX_PEERS)
    #: Whether the operator switches the Services of the selected pods to the gateway.
    services: ServiceSwitching = ServiceSwitching()

    @model_validator(mode="after")
    def _selects_something(self) -> Target:
        if (self.pod_selector is None) == (self.external is None):
            raise ValueError(
                "name exactly one of podSelector (the gateway as a sidecar) and external "
                "(the gateway as a Deployment)"
            )
        selector = self.pod_selector
        if selector is not None and not selector.match_labels and not selector.match_expressions:
            raise ValueError(
                "podSelector must select something: an empty selector would put the gateway "
                "in every pod of the namespace"
            )
        bootstrap = self.external.bootstrap if self.external is not None else None
        if self.credentials is None and bootstrap is None and self.bootstrap is None:
            raise ValueError(
                "credentials is required unless bootstrap (or external.bootstrap) creates them"
            )
        if bootstrap is not None and self.database is None:
            raise ValueError("external.bootstrap needs target.database (the database to grant on)")
        if self.bootstrap is not None and (self.pod_selector is None or self.database is None):
            raise ValueError(
                "bootstrap is for podSelector targets (external ones: external.bootstrap) "
                "and needs target.database (the database to grant on)"
            )
        return self


class Resources(_Model):
    """Compute resources of the sidecar container."""

    requests: dict[str, Quantity] = {}
    limits: dict[str, Quantity] = {}


class MountedFiles(_Model):
    """A Secret or ConfigMap mounted at ``/etc/querywarden/files/<name>/``.

    For the files a policy names: an issuer's ``keyFile``, ``caFile`` or
    ``certificateFile``.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "has(self.secretName) != has(self.configMapName)",
                    "name exactly one of secretName and configMapName",
                )
            ]
        }
    )

    #: The directory under ``/etc/querywarden/files/``.
    name: str = Field(max_length=40, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    secret_name: str | None = Field(None, max_length=253, pattern=_DNS_SUBDOMAIN)
    config_map_name: str | None = Field(None, max_length=253, pattern=_DNS_SUBDOMAIN)

    @model_validator(mode="after")
    def _one_source(self) -> MountedFiles:
        if (self.secret_name is None) == (self.config_map_name is None):
            raise ValueError("name exactly one of secretName and configMapName")
        return self


class Sidecar(_Model):
    """How the gateway runs next to the database."""

    #: The querywarden image (default: the operator's ``sidecarImage``).
    image: str | None = Field(None, min_length=1, max_length=512)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    #: The port clients connect to.
    gateway_port: int = Field(6432, ge=1, le=65535)
    #: OTLP/HTTP endpoint for audit spans and metrics (default: the operator's).
    otlp_endpoint: str | None = Field(None, max_length=2048, pattern=r"^https?://")
    #: ``true``: an init container with ``restartPolicy: Always`` (starts before the
    #: database, stops after it); ``false``: a regular container. Unset: native where the
    #: cluster supports it (1.29+).
    native_sidecar: bool | None = None
    #: ``never``: clients must use TLS (needs ``target.tlsSecretName``); ``always``:
    #: plaintext is accepted too (tokens then cross the network in clear).
    plaintext: Literal["never", "always"] = "never"
    resources: Resources | None = None
    #: Size bound of the emptyDir that holds the audit log until it is exported.
    audit_volume_size: Quantity = "1Gi"
    #: An existing PersistentVolumeClaim for the audit log instead of the emptyDir, so
    #: that records not yet exported survive the pod (one pod: a claim is per pod). A pod
    #: that brings its own volume named ``querywarden-audit`` (a StatefulSet's
    #: volumeClaimTemplates entry of that name, one claim per replica) keeps it, and the
    #: sidecar writes there; this field is then not needed.
    audit_claim_name: str | None = Field(None, max_length=253, pattern=_DNS_SUBDOMAIN)
    #: Secrets and ConfigMaps mounted for the policy's files.
    files: list[MountedFiles] = Field(
        [],
        max_length=8,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )


#: A rule's upstreamRole must name one of target.roles.
#: (Each rule guards ``has(self.policy)``: a spec may leave the policy out, and CEL fails
#: a rule that selects a field of an absent object, with "no such key: policy".)
_ROLES_KNOWN = (
    "!has(self.policy) || !has(self.policy.rules) || self.policy.rules.all(r, "
    "!has(r.upstreamRole) || "
    "(has(self.target.roles) && self.target.roles.exists(x, x.name == r.upstreamRole)))"
)
_KEYED = "['hash', 'digits']"
#: hash and digits need the masking key.
_KEY_GIVEN = (
    "has(self.target.maskingKey) || !has(self.policy) || !has(self.policy.masking) "
    "|| !has(self.policy.masking.columns) || !self.policy.masking.columns.exists(c, "
    f"(has(c.strategy) && c.strategy in {_KEYED}) || (has(c.overrides) && "
    f"c.overrides.exists(o, has(o.strategy) && o.strategy in {_KEYED})))"
)


class PolicyIdentity(IdentitySection):
    """The trusted token issuers: the policy's own, and shared ClusterTokenIssuers."""

    #: ClusterTokenIssuers (by name) the gateway trusts besides ``issuers``. The operator
    #: writes them inline into the rendered policy; while one cannot be resolved the
    #: gateway trusts no issuer at all (docs/operator.md).
    issuer_refs: list[Annotated[str, Field(max_length=63, pattern=ISSUER_NAME)]] = Field(
        [], max_length=16, json_schema_extra={"x-kubernetes-list-type": "set"}
    )

    @model_validator(mode="after")
    def _refs_unique(self) -> PolicyIdentity:
        if len(set(self.issuer_refs)) != len(self.issuer_refs):
            raise ValueError("issuerRefs must be unique")
        return self


class ResourcePolicy(PolicyDocument):
    """The policy document of a resource: a policy file's, plus ``identity.issuerRefs``."""

    identity: PolicyIdentity = PolicyIdentity()


class DatabaseAccessPolicySpec(_Model):
    """The desired state: the gateway in front of the selected database pods."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "self.sidecar.gatewayPort != self.target.databasePort",
                    "sidecar.gatewayPort must differ from target.databasePort",
                ),
                _cel(_ROLES_KNOWN, "every rule's upstreamRole must name one of target.roles"),
                _cel(
                    _KEY_GIVEN,
                    "masking strategies hash and digits need target.maskingKey",
                ),
            ]
        }
    )

    target: Target
    #: The policy document, as in a policy file (docs/policy.md, docs/masking.md), whose
    #: identity may also name shared ClusterTokenIssuers (``identity.issuerRefs``).
    policy: ResourcePolicy = ResourcePolicy()
    sidecar: Sidecar = Sidecar()

    @model_validator(mode="after")
    def _consistent(self) -> DatabaseAccessPolicySpec:
        # The same rules as the CEL above, for resources the API server stored before a
        # rule existed (and so that the operator never trusts the schema alone).
        if self.sidecar.gateway_port == self.target.database_port:
            raise ValueError("sidecar.gatewayPort must differ from target.databasePort")
        roles = {role.name for role in self.target.roles}
        if len(roles) != len(self.target.roles):
            raise ValueError("target.roles names must be unique")
        if len({f.name for f in self.sidecar.files}) != len(self.sidecar.files):
            raise ValueError("sidecar.files names must be unique")
        for rule in self.policy.rules:
            if rule.upstream_role is not None and rule.upstream_role not in roles:
                raise ValueError(
                    f"rule {rule.name!r} names upstreamRole {rule.upstream_role!r}, "
                    "which is not one of target.roles"
                )
        if self.policy.masking.uses_key and self.target.masking_key is None:
            raise ValueError("masking strategies hash and digits need target.maskingKey")
        return self


def role_env_name(role: str) -> str:
    """The environment variable that carries a role's username into the gateway."""
    return f"QUERYWARDEN_UPSTREAM__ROLES__{role.upper()}__USER"
