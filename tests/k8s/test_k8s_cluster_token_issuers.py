"""ClusterTokenIssuer: shared issuers that policies name, resolved by the operator.

The CRD refuses what the gateway's issuer models refuse; the operator writes the named
issuers inline into each policy's ConfigMap, renders the policies again when an issuer
changes, and, fail closed, renders a policy *locked* (no issuer trusted) while one of
its references cannot be resolved.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from k8sharness.cluster import Cluster, KubeError
from k8sharness.helm import Helm
from k8sharness.qwoperator import (
    InstalledOperator,
    condition,
    installed_operator,
    minimal_spec,
    policies,
    policy,
    wait_until,
)
from k8sharness.tools import REPO
from querywarden.policy import PolicyDocument
from querywarden.policy.model import IdentitySection
from querywarden_operator import schema
from querywarden_operator.issuers import (
    ISSUER_API_VERSION,
    ISSUER_CRD_NAME,
    ISSUER_KIND,
    ISSUER_PLURAL,
    resolve,
)

ISSUERS = f"/apis/{ISSUER_API_VERSION}/{ISSUER_PLURAL}"
CORP = {"issuer": "https://idp.example.com", "audiences": ["querywarden"]}
PARTNER = {"kind": "oidc", "issuer": "https://partner.example.com", "audiences": ["qw"]}


def issuer(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": ISSUER_API_VERSION,
        "kind": ISSUER_KIND,
        "metadata": {"name": name},
        "spec": spec,
    }


def apply_issuer_crd(k8s: Cluster) -> None:
    k8s.kubectl("apply", "--server-side", "--force-conflicts", "-f",
                str(REPO / "crds" / "clustertokenissuers.yaml"))  # fmt: skip
    k8s.wait_established(ISSUER_CRD_NAME)


# --- resolution, without a cluster ----------------------------------------------------


def test_committed_crds_are_generated() -> None:
    text = schema.render_issuer()
    for path in schema.ISSUER_CRD_FILES:
        assert path.read_text() == text, f"{path} is stale: run {schema.REGENERATE}"


def test_references_are_written_inline_after_the_policys_own_issuers() -> None:
    own = {"name": "dev", "kind": "dev", "keyFile": "/etc/querywarden/files/dev/key.pem"}
    raw = {"identity": {"issuers": [own], "issuerRefs": ["corp"]}, "rules": []}
    resolution = resolve(raw, {"corp": issuer("corp", {**CORP, "kind": "oidc"})})
    assert resolution.resolved
    assert resolution.policy["identity"] == {
        "issuers": [own, {"name": "corp", "kind": "oidc", **CORP}]
    }
    # What the gateway loads: its own model, which has no issuerRefs.
    PolicyDocument.model_validate(resolution.policy)


def test_a_missing_or_clashing_issuer_locks_the_policy() -> None:
    raw = {"identity": {"issuerRefs": ["corp", "partner"]}, "rules": [{"name": "r",
           "subjects": {"groups": ["g"]}, "allow": {"operations": ["select"]}}]}  # fmt: skip
    missing = resolve(raw, {"corp": issuer("corp", CORP), "partner": None})
    assert not missing.resolved and missing.missing == ["partner"]
    assert missing.policy == {"identity": {"issuers": []}, "rules": raw["rules"]}
    assert "ClusterTokenIssuer partner not found" in missing.message()
    # Two issuers with one issuer URL: the gateway would refuse the file; locked too.
    clash = resolve(raw, {"corp": issuer("corp", CORP), "partner": issuer("partner", CORP)})
    assert not clash.resolved and clash.missing == []
    assert "same issuer URL" in (clash.invalid or "")
    assert clash.policy["identity"] == {"issuers": []}


# --- the CRD ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def issuer_crd(k8s: Cluster) -> Iterator[None]:
    apply_issuer_crd(k8s)
    yield


@pytest.mark.parametrize(
    ("name", "spec"),
    [
        ("corp", CORP),
        ("cluster", {"kind": "kubernetes", "issuer": "https://kubernetes.default.svc",
                     "audiences": ["querywarden"], "caFile": "/etc/ca.crt"}),
        ("saml-idp", {"kind": "saml", "entityId": "https://idp/saml", "audience": "qw",
                      "certificate": "-----BEGIN CERTIFICATE-----"}),
        ("dev", {"kind": "dev", "keyFile": "/etc/querywarden/files/dev/key.pem"}),
    ],
)  # fmt: skip
def test_valid_issuers_are_accepted(
    k8s: Cluster, issuer_crd: None, name: str, spec: dict[str, Any]
) -> None:
    IdentitySection.model_validate({"issuers": [{"name": name, **spec}]})
    k8s.request("POST", ISSUERS, issuer(name, spec), query={"dryRun": "All"})


@pytest.mark.parametrize(
    ("name", "spec", "message"),
    [
        ("corp", {"issuer": "http://idp.example.com", "audiences": ["q"]}, "HTTPS"),
        ("corp", {"issuer": "https://idp.example.com"}, "audiences"),
        ("corp", {"kind": "saml", "entityId": "e", "audience": "a"}, "certificate"),
        ("corp", {"kind": "dev", "keyFile": "/k", "caFile": "/c"}, "caFile"),
        ("corp", {"kind": "ldap", "issuer": "https://x", "audiences": ["q"]}, "kind"),
        ("corp.example", CORP, "name"),
    ],
)
def test_invalid_issuers_are_refused_by_both(
    k8s: Cluster, issuer_crd: None, name: str, spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError):
        IdentitySection.model_validate({"issuers": [{"name": name, **spec}]})
    with pytest.raises(KubeError) as refused:
        k8s.request("POST", ISSUERS, issuer(name, spec), query={"dryRun": "All"})
    assert message in str(refused.value)


# --- the operator -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(
    k8s: Cluster, helm: Helm, workdir: Path, issuer_crd: None
) -> Iterator[InstalledOperator]:
    with installed_operator(k8s, helm, workdir / "operator-issuers") as running:
        yield running


def get_policy(k8s: Cluster, namespace: str, name: str) -> Any:
    return k8s.get(f"{policies(namespace)}/{name}")


def wait_for_condition(
    k8s: Cluster, namespace: str, name: str, type_: str, status: str, reason: str
) -> dict[str, Any]:
    def fetch() -> dict[str, Any] | None:
        current = get_policy(k8s, namespace, name)
        found = condition(current, type_)
        ok = (
            found is not None
            and found["status"] == status
            and found["reason"] == reason
            and current["status"].get("observedGeneration") == current["metadata"]["generation"]
        )
        return current if ok else None

    try:
        return wait_until(fetch, timeout=45, what=f"{type_}={status} ({reason})")
    except TimeoutError as exc:
        status_now = json.dumps(get_policy(k8s, namespace, name).get("status"), indent=1)
        raise AssertionError(f"{exc}; the status is {status_now}") from None


def rendered_policy(k8s: Cluster, namespace: str, name: str) -> tuple[str, dict[str, Any]]:
    configmap = k8s.get(f"/api/v1/namespaces/{namespace}/configmaps/{name}-querywarden")
    text = configmap["data"]["policy.yaml"]
    return text, yaml.safe_load(text)


def wait_for_issuers(k8s: Cluster, namespace: str, name: str, issuers: list[str]) -> dict[str, Any]:
    def fetch() -> dict[str, Any] | None:
        _, document = rendered_policy(k8s, namespace, name)
        names = [i["name"] for i in document["identity"]["issuers"]]
        return document if names == issuers else None

    return wait_until(fetch, timeout=45, what=f"the ConfigMap trusting {issuers}")


def test_policies_get_shared_issuers_and_lock_while_one_is_missing(
    k8s: Cluster, namespace: str, installed: InstalledOperator
) -> None:
    for name in ("corp", "partner"):
        k8s.delete(f"{ISSUERS}/{name}")
    k8s.create(ISSUERS, issuer("corp", CORP))
    spec = minimal_spec()
    spec["policy"] = {
        "identity": {"issuerRefs": ["corp", "partner"]},
        "rules": [{"name": "read", "subjects": {"groups": ["agents"]},
                   "allow": {"operations": ["select"]}}],
    }  # fmt: skip
    k8s.create(policies(namespace), policy("orders", spec))

    # partner does not exist: locked, and the status names it.
    current = wait_for_condition(
        k8s, namespace, "orders", "IssuersResolved", "False", "IssuersUnresolved"
    )
    assert "partner" in condition(current, "IssuersResolved")["message"]  # type: ignore[index]
    assert condition(current, "Rendered")["reason"] == "IssuersUnresolved"  # type: ignore[index]
    assert condition(current, "Ready")["status"] == "False"  # type: ignore[index]
    text, document = rendered_policy(k8s, namespace, "orders")
    assert "# LOCKED, no issuer is trusted" in text
    assert document["identity"] == {"issuers": []}
    assert document["rules"] == spec["policy"]["rules"]

    # partner appears: the policy is rendered with both, inline, as the gateway reads it.
    k8s.create(ISSUERS, issuer("partner", PARTNER))
    wait_for_condition(k8s, namespace, "orders", "IssuersResolved", "True", "Resolved")
    wait_for_condition(k8s, namespace, "orders", "Rendered", "True", "Rendered")
    document = wait_for_issuers(k8s, namespace, "orders", ["corp", "partner"])
    loaded = PolicyDocument.model_validate(document)
    assert [i.issuer for i in loaded.identity.issuers] == [  # type: ignore[union-attr]
        "https://idp.example.com",
        "https://partner.example.com",
    ]

    # An issuer changes: every policy naming it follows.
    changed = k8s.get(f"{ISSUERS}/corp")
    changed["spec"]["audiences"] = ["querywarden", "reporting"]
    k8s.request("PUT", f"{ISSUERS}/corp", changed)

    def audiences() -> list[str] | None:
        _, document = rendered_policy(k8s, namespace, "orders")
        found: list[str] = document["identity"]["issuers"][0]["audiences"]
        return found if "reporting" in found else None

    wait_until(audiences, timeout=45, what="the ConfigMap following the issuer")

    # An issuer is deleted: fail closed, the gateway trusts no issuer (not the deleted
    # one, as a last good rendering would, nor corp alone).
    k8s.delete(f"{ISSUERS}/partner")
    wait_for_issuers(k8s, namespace, "orders", [])
    wait_for_condition(k8s, namespace, "orders", "IssuersResolved", "False", "IssuersUnresolved")


def test_a_policy_without_references_has_no_issuer_condition(
    k8s: Cluster, namespace: str, installed: InstalledOperator
) -> None:
    k8s.create(policies(namespace), policy("plain", minimal_spec()))
    current = wait_for_condition(k8s, namespace, "plain", "Rendered", "True", "Rendered")
    assert condition(current, "IssuersResolved") is None


def test_an_external_targets_gateway_gets_shared_issuers_and_locks_without_them(
    k8s: Cluster, namespace: str, installed: InstalledOperator
) -> None:
    """The gateway Deployment of an external target reads the same ConfigMap: its issuer
    references are resolved, and locked while one is missing, as for a sidecar's."""
    k8s.delete(f"{ISSUERS}/ext-corp")
    spec = {
        "target": {
            "external": {"host": "db.example.internal", "port": 5432, "sslmode": "require"},
            "database": "billing",
            "credentials": {"secretName": "billing-gateway"},
        },
        "policy": {
            "identity": {"issuerRefs": ["ext-corp"]},
            "rules": [{"name": "read", "subjects": {"groups": ["agents"]},
                       "allow": {"operations": ["select"]}}],
        },
    }  # fmt: skip
    k8s.create(policies(namespace), policy("billing", spec))
    wait_for_condition(k8s, namespace, "billing", "IssuersResolved", "False", "IssuersUnresolved")
    wait_for_condition(k8s, namespace, "billing", "Rendered", "False", "IssuersUnresolved")
    text, document = rendered_policy(k8s, namespace, "billing")
    assert "# LOCKED, no issuer is trusted" in text and document["identity"] == {"issuers": []}

    k8s.create(ISSUERS, issuer("ext-corp", CORP))
    wait_for_condition(k8s, namespace, "billing", "IssuersResolved", "True", "Resolved")
    document = wait_for_issuers(k8s, namespace, "billing", ["ext-corp"])
    PolicyDocument.model_validate(document)  # what the gateway Deployment loads
    k8s.delete(f"{ISSUERS}/ext-corp")
