"""Pydantic models of the policy document.

One format serves three places: the file given to ``querywarden serve``, the
``.spec.policy`` of a DatabaseAccessPolicy resource, and the ConfigMap the operator renders
for the sidecar. Field names are camelCase, as in Kubernetes resources.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)
from pydantic.alias_generators import to_camel

from querywarden.approvals.model import ApprovalSettings
from querywarden.config import Duration, parse_duration

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _non_negative(value: timedelta) -> timedelta:
    if value.total_seconds() < 0:
        raise ValueError("duration must not be negative")
    return value


#: A duration that may be zero (``0s``).
NonNegativeDuration = Annotated[
    timedelta, BeforeValidator(parse_duration), AfterValidator(_non_negative)
]


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class _IssuerBase(_Model):
    #: A short name for the issuer: it appears in audit records and messages.
    name: str = Field(pattern=_NAME.pattern)


class _JwtIssuerBase(_IssuerBase):
    #: The ``iss`` claim tokens carry, and for OIDC the base of the discovery URL.
    issuer: str
    #: Accepted ``aud`` values; a token must name at least one of them.
    audiences: list[str] = Field(min_length=1)
    #: Claim with the groups: a dotted path (``realm_access.roles``); a list or a
    #: space-separated string.
    groups_claim: str = "groups"
    #: Refuse tokens whose ``exp - iat`` is longer: no long-lived static tokens.
    max_token_lifetime: Duration = timedelta(hours=1)
    #: Clock skew tolerated on ``exp``, ``nbf`` and ``iat``.
    leeway: NonNegativeDuration = timedelta(seconds=30)


class OidcIssuer(_JwtIssuerBase):
    """An OpenID Connect provider; keys from its discovery document's ``jwks_uri``."""

    kind: Literal["oidc"] = "oidc"
    #: Use this JWKS URL instead of discovery.
    jwks_uri: str | None = None
    #: CA bundle to verify the provider's HTTPS certificate (default: system CAs).
    ca_file: Path | None = None
    #: Bound on each discovery or JWKS fetch.
    fetch_timeout: Duration = timedelta(seconds=3)
    #: Minimum time between two JWKS refreshes caused by an unknown ``kid``.
    jwks_refresh_interval: NonNegativeDuration = timedelta(seconds=30)
    #: Claim with a human-readable name for audit records.
    display_name_claim: str = "name"

    @model_validator(mode="after")
    def _https_only(self) -> OidcIssuer:
        for url in (self.issuer, self.jwks_uri):
            if url is not None and not url.startswith("https://"):
                raise ValueError(f"{url!r}: keys are fetched over HTTPS only")
        return self


class KubernetesIssuer(OidcIssuer):
    """Projected service-account tokens, verified via the cluster's OIDC discovery.

    The subject is ``system:serviceaccount:NAMESPACE:NAME``; groups are
    ``system:serviceaccounts``, ``system:serviceaccounts:NAMESPACE`` and what
    ``groupMappings`` adds for the service account or its namespace.
    """

    kind: Literal["kubernetes"] = "kubernetes"  # type: ignore[assignment]
    #: Extra groups per service account (``system:serviceaccount:NS:NAME``) or
    #: namespace (``NS``).
    group_mappings: dict[str, list[str]] = {}
    #: A bearer token file for fetching discovery from the API server (in a pod: the
    #: mounted service-account token).
    bearer_token_file: Path | None = None


class DevIssuer(_IssuerBase):
    """A local signing key for demos and tests: ``querywarden token`` mints tokens."""

    kind: Literal["dev"] = "dev"
    key_file: Path
    issuer: str = "querywarden-dev"
    audiences: list[str] = Field(default=["querywarden"], min_length=1)
    groups_claim: str = "groups"
    max_token_lifetime: Duration = timedelta(hours=1)
    leeway: NonNegativeDuration = timedelta(seconds=30)


class SamlIssuer(_IssuerBase):
    """A SAML 2.0 identity provider whose signed assertions are presented base64-encoded."""

    kind: Literal["saml"] = "saml"
    #: The IdP's entity ID: the assertion's ``<Issuer>``.
    entity_id: str
    #: The IdP's signing certificate (PEM), inline or from a file.
    certificate: str | None = None
    certificate_file: Path | None = None
    #: The ``<Audience>`` the assertion must be restricted to.
    audience: str
    groups_attribute: str = "groups"
    max_token_lifetime: Duration = timedelta(hours=1)
    leeway: NonNegativeDuration = timedelta(seconds=30)

    @model_validator(mode="after")
    def _one_certificate(self) -> SamlIssuer:
        if (self.certificate is None) == (self.certificate_file is None):
            raise ValueError("give exactly one of certificate and certificateFile")
        return self

    def certificate_pem(self) -> str:
        """The IdP certificate as PEM text."""
        if self.certificate_file is not None:
            return self.certificate_file.read_text()
        assert self.certificate is not None
        return self.certificate


Issuer = Annotated[
    OidcIssuer | KubernetesIssuer | DevIssuer | SamlIssuer, Field(discriminator="kind")
]


def _default_kind(value: Any) -> Any:
    # ``kind`` may be left out for OIDC, the common case.
    if isinstance(value, dict) and "kind" not in value:
        return {**value, "kind": "oidc"}
    return value


class IdentitySection(_Model):
    """The trusted token issuers."""

    issuers: list[Annotated[Issuer, BeforeValidator(_default_kind)]] = []

    @model_validator(mode="after")
    def _unique(self) -> IdentitySection:
        names = [i.name for i in self.issuers]
        if len(names) != len(set(names)):
            raise ValueError("issuer names must be unique")
        keyed = [i.entity_id if isinstance(i, SamlIssuer) else i.issuer for i in self.issuers]
        if len(keyed) != len(set(keyed)):
            raise ValueError("two issuers share the same issuer URL or entity ID")
        return self


#: Operation names a rule may list. ``ddl`` covers every ``ddl:<kind>``; ``*`` covers all.
OPERATIONS = frozenset(
    {
        "*", "select", "insert", "update", "delete", "merge", "truncate", "ddl", "grant",
        "revoke", "copy_out", "copy_in", "copy_file", "copy_program", "call", "do", "prepare",
        "execute", "deallocate", "set", "reset", "set_role", "set_session_authorization",
        "set_search_path", "transaction", "lock", "listen", "notify", "unlisten", "vacuum",
        "analyze", "explain", "explain_analyze", "select_into", "row_lock", "alter_system",
        "discard", "checkpoint", "load", "reindex", "cluster", "refresh_materialized_view",
        "comment", "security_label", "create_extension", "fetch", "declare_cursor",
        "close_cursor", "show", "side_effects", "password",
    }
)  # fmt: skip


def _operation_names(values: list[str]) -> list[str]:
    for value in values:
        if value not in OPERATIONS and not value.startswith("ddl:"):
            raise ValueError(f"unknown operation {value!r}")
    return values


Operations = Annotated[list[str], AfterValidator(_operation_names)]


class Subjects(_Model):
    """Whom a rule applies to: any of these groups or users."""

    groups: list[str] = []
    users: list[str] = []

    @model_validator(mode="after")
    def _not_empty(self) -> Subjects:
        if not self.groups and not self.users:
            raise ValueError("name at least one group or user")
        return self


class AllowSection(_Model):
    """What a rule allows: operations on tables (glob patterns, ``schema.table``)."""

    operations: Operations = []
    tables: list[str] = []
    #: Functions allowed although a built-in denial covers them (``pg_read_file``, ...),
    #: and functions a rule vouches for: calling them is not counted as side_effects.
    functions: list[str] = []


class DenySection(_Model):
    """What a rule refuses, whatever else allows it."""

    operations: Operations = []
    tables: list[str] = []
    functions: list[str] = []


class FullTableScan(_Model):
    """Review statements whose plan scans more rows than this sequentially."""

    min_rows: int = Field(ge=1)


class ReviewSection(_Model):
    """What needs a human approver before it runs."""

    operations: Operations = []
    tables: list[str] = []
    full_table_scan: FullTableScan | None = None
    #: UPDATE or DELETE without WHERE.
    unbounded_write: bool = False


class Limits(_Model):
    """Bounds on what an allowed statement may do."""

    max_rows: int | None = Field(None, ge=1)
    statement_timeout: Duration | None = None


class Rule(_Model):
    """One rule: who, where, and what is allowed, refused or reviewed."""

    name: str = Field(pattern=_NAME.pattern)
    subjects: Subjects
    #: Database names (glob patterns); default: any.
    databases: list[str] = ["*"]
    allow: AllowSection = AllowSection()
    deny: DenySection = DenySection()
    review: ReviewSection = ReviewSection()
    limits: Limits = Limits()
    #: Which upstream credential this rule's sessions connect with.
    upstream_role: str | None = None


MaskStrategyName = Literal["redact", "null", "partial", "email", "hash", "digits"]
DetectorName = Literal["ssn", "credit_card", "api_key", "jwt", "private_key", "email"]


class MaskStrategy(_Model):
    """How a masked value is replaced."""

    #: redact (a constant), null, partial (keep the first/last characters), email (keep
    #: the domain), hash (keyed HMAC: stable, so joins and GROUP BY still match), digits
    #: (format-preserving: same length and separators, other digits).
    strategy: MaskStrategyName = "redact"
    keep_first: int = Field(0, ge=0)
    keep_last: int = Field(0, ge=0)
    #: The constant of ``redact``.
    replacement: str = "****"


class MaskOverride(MaskStrategy):
    """Another strategy for some groups or users (``none``: they see the real value)."""

    strategy: MaskStrategyName | Literal["none"] = "redact"  # type: ignore[assignment]
    groups: list[str] = []
    users: list[str] = []

    @model_validator(mode="after")
    def _names_someone(self) -> MaskOverride:
        if not self.groups and not self.users:
            raise ValueError("name at least one group or user")
        return self


class MaskedColumn(MaskStrategy):
    """A sensitive column: masked wherever its values reach a client."""

    #: ``schema.table`` (an unqualified name means ``public``).
    table: str = Field(min_length=1)
    column: str = Field(min_length=1)
    overrides: list[MaskOverride] = []

    @property
    def qualified_table(self) -> str:
        """``schema.table``."""
        return self.table if "." in self.table else f"public.{self.table}"


class Exemption(_Model):
    """Identities masking does not apply to."""

    groups: list[str] = []
    users: list[str] = []


class MaskingSection(_Model):
    """Which values are masked, for whom, and what may not be used in predicates."""

    columns: list[MaskedColumn] = []
    #: Content detectors run on text values of columns that are not marked.
    detectors: list[DetectorName] = []
    #: ``deny``: a statement may not use a masked column in WHERE, JOIN, GROUP BY, ORDER
    #: BY, HAVING or a window, nor store it elsewhere (INSERT ... SELECT, UPDATE SET),
    #: because such uses reveal or copy values bit by bit.
    predicates: Literal["deny", "allow"] = "deny"
    exempt: Exemption = Exemption()

    @property
    def uses_key(self) -> bool:
        """Whether any strategy needs the gateway's key (``hash`` and ``digits``)."""
        keyed = ("hash", "digits")
        return any(
            c.strategy in keyed or any(o.strategy in keyed for o in c.overrides)
            for c in self.columns
        )


class PolicyDocument(_Model):
    """The whole policy document."""

    identity: IdentitySection = IdentitySection()
    #: Evaluated for every statement; anything no rule allows is refused.
    rules: list[Rule] = []
    masking: MaskingSection = MaskingSection()
    #: Who approves held statements, and how long statements and grants wait.
    approvals: ApprovalSettings = ApprovalSettings()

    @model_validator(mode="after")
    def _unique_rules(self) -> PolicyDocument:
        names = [r.name for r in self.rules]
        if len(names) != len(set(names)):
            raise ValueError("rule names must be unique")
        return self


def load_policy(path: Path) -> PolicyDocument:
    """Read and validate a policy file (YAML); relative paths are anchored at the file."""
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the policy must be a mapping")
    for issuer in (data.get("identity") or {}).get("issuers") or []:
        if isinstance(issuer, dict):
            for key in ("keyFile", "caFile", "certificateFile", "bearerTokenFile"):
                value = issuer.get(key)
                if isinstance(value, str) and not Path(value).is_absolute():
                    issuer[key] = str(path.parent / value)
    return PolicyDocument.model_validate(data)
