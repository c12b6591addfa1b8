"""ClusterTokenIssuer: one trusted token issuer, declared once, named by many policies.

A policy names shared issuers in ``spec.policy.identity.issuerRefs``; the operator reads
them when it renders the policy's ConfigMap and writes them into ``policy.yaml`` inline,
next to the policy's own ``issuers``, so the gateway never sees a reference (its policy
model refuses the field). The resource's ``spec`` is an issuer of the policy document
without its ``name``: the resource's own name is the issuer's name.

Fail closed: when a reference cannot be resolved (the ClusterTokenIssuer is missing, or
invalid, or clashes with another issuer of the policy), the operator does not render a
policy that trusts a subset of what it names, nor keep an older rendering that may trust
an issuer deleted since. It renders the policy *locked*: the same document with no issuer
at all, so every new sign-in is refused until the reference resolves (:func:`locked`).

Pure functions: :mod:`querywarden_operator.reconcile` fetches the resources.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from querywarden.policy import PolicyDocument
from querywarden_operator.spec import GROUP, VERSION

ISSUER_KIND = "ClusterTokenIssuer"
ISSUER_PLURAL = "clustertokenissuers"
ISSUER_SINGULAR = "clustertokenissuer"
ISSUER_CRD_NAME = f"{ISSUER_PLURAL}.{GROUP}"
ISSUER_API_VERSION = f"{GROUP}/{VERSION}"
#: The policy condition that says whether its ``issuerRefs`` resolve.
ISSUERS_RESOLVED = "IssuersResolved"
#: Why a policy is rendered locked (its Rendered and Ready conditions' reason).
LOCKED_REASON = "IssuersUnresolved"


def issuer_refs(raw_policy: Mapping[str, Any]) -> list[str]:
    """The ClusterTokenIssuer names a raw ``spec.policy`` references."""
    identity = raw_policy.get("identity") or {}
    refs = (identity.get("issuerRefs") or []) if isinstance(identity, Mapping) else []
    return [str(ref) for ref in refs]


def issuer_entry(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """A ClusterTokenIssuer as an entry of a policy's ``identity.issuers``."""
    return {"name": name, **{k: v for k, v in spec.items() if k != "name"}}


@dataclass(frozen=True)
class Resolution:
    """What a policy's ``policy.yaml`` becomes once its references are looked up."""

    #: The document to render: issuers inline, no ``issuerRefs``; locked if unresolved.
    policy: dict[str, Any]
    #: Referenced ClusterTokenIssuers that do not exist.
    missing: list[str] = field(default_factory=list)
    #: Why the resolved document is not valid (an invalid issuer, a clash), if it is not.
    invalid: str | None = None

    @property
    def resolved(self) -> bool:
        """Whether every reference resolved into a valid document."""
        return not self.missing and self.invalid is None

    def message(self) -> str:
        """What the IssuersResolved condition says."""
        if self.resolved:
            return "every issuerRef resolves"
        problems = []
        if self.missing:
            problems.append("ClusterTokenIssuer " + ", ".join(self.missing) + " not found")
        if self.invalid is not None:
            problems.append(self.invalid)
        return (
            "; ".join(problems) + ": the gateway trusts no issuer (every new sign-in is "
            "refused) until every issuerRef resolves"
        )


def locked(raw_policy: Mapping[str, Any]) -> dict[str, Any]:
    """The policy with no issuer at all: nobody can sign in, rules and masking unchanged."""
    return {**dict(raw_policy), "identity": {"issuers": []}}


def resolve(
    raw_policy: Mapping[str, Any], found: Mapping[str, Mapping[str, Any] | None]
) -> Resolution:
    """Inline the referenced issuers; ``found`` maps each referenced name to its object.

    The result is checked with the gateway's own model (``PolicyDocument``), so what is
    rendered is what the gateway will load: unique issuer names and issuer URLs across
    the policy's own issuers and the shared ones.
    """
    refs = issuer_refs(raw_policy)
    if not refs:
        return Resolution(policy=dict(raw_policy))
    missing = [name for name in refs if found.get(name) is None]
    if missing:
        return Resolution(policy=locked(raw_policy), missing=missing)
    identity = dict(raw_policy.get("identity") or {})
    identity.pop("issuerRefs", None)
    shared = []
    for name in refs:
        obj = found[name] or {}
        shared.append(issuer_entry(name, obj.get("spec") or {}))
    identity["issuers"] = [*(identity.get("issuers") or []), *shared]
    document = {**dict(raw_policy), "identity": identity}
    try:
        PolicyDocument.model_validate(document)
    except ValidationError as exc:
        return Resolution(policy=locked(raw_policy), invalid=_problem(exc, refs))
    return Resolution(policy=document)


def _problem(exc: ValidationError, refs: Sequence[str]) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        lines.append(f"{where}: {error['msg']}" if where else str(error["msg"]))
    return f"with ClusterTokenIssuer {', '.join(refs)} the policy is invalid: " + "; ".join(lines)


def references(raw_policy: Mapping[str, Any], issuer: str) -> bool:
    """Whether the raw ``spec.policy`` names the ClusterTokenIssuer ``issuer``."""
    return issuer in issuer_refs(raw_policy)
