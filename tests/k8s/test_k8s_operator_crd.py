"""The DatabaseAccessPolicy CRD: generated from the pydantic models, enforced by the API server.

The committed CRD must be what the generator makes of the models today, and the API
server (structural schema, enums, patterns, CEL) must refuse what pydantic refuses, so
that a policy means the same in a file, in a resource and in the operator.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from k8sharness.cluster import Cluster, KubeError
from k8sharness.qwoperator import EXAMPLE_POLICY, apply_crd, minimal_spec, policies, policy
from k8sharness.tools import REPO
from querywarden.config import _DURATION
from querywarden.policy.model import OPERATIONS
from querywarden_operator import schema
from querywarden_operator.reconcile import InvalidPolicy, parse_spec
from querywarden_operator.spec import DatabaseAccessPolicySpec


@pytest.fixture(scope="module")
def crd(k8s: Cluster) -> Iterator[None]:
    apply_crd(k8s)
    yield


# --- generated, not hand-written --------------------------------------------------


def test_committed_crds_are_generated_from_the_models() -> None:
    generated = schema.render()
    for path in schema.CRD_FILES:
        assert path.read_text() == generated, (
            f"{path.relative_to(REPO)} differs from the models: run {schema.REGENERATE}"
        )


def _reachable_models() -> dict[str, type[BaseModel]]:
    return schema._models(DatabaseAccessPolicySpec)


def test_every_model_validator_has_a_cel_rule_or_a_reason() -> None:
    """A validator added to a model without a CEL counterpart fails here."""
    for name, model in _reachable_models().items():
        validators = model.__pydantic_decorators__.model_validators
        if not validators:
            continue
        if name in schema.POLICY_MODELS:
            covered = bool(schema.POLICY_RULES.get(name)) or name in schema.OPERATOR_ONLY
            covered = covered or name in {m for (m, _) in schema.POLICY_LIST_MAPS}
            assert covered, f"{name} validates more than the CRD says: add a rule to schema.py"
        else:
            extra = model.model_config.get("json_schema_extra") or {}
            assert isinstance(extra, dict)
            assert extra.get("x-kubernetes-validations"), f"{name}: no CEL rule"


def test_operation_and_duration_patterns_are_the_gateways() -> None:
    pattern = re.compile(schema.OPERATION_PATTERN)
    for operation in [*OPERATIONS, "ddl:drop", "ddl:create_table"]:
        assert pattern.match(operation), operation
    for bogus in ["drop", "SELECT", "select ", "ddl drop"]:
        assert pattern.match(bogus) is None, bogus
    assert _DURATION.pattern == schema.DURATION_PATTERN


def _defaults(node: Any, path: str = "") -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        if "default" in node:
            found.append(path)
        for key, value in node.items():
            if key != "default":
                found += _defaults(value, f"{path}.{key}")
    elif isinstance(node, list):
        for item in node:
            found += _defaults(item, path)
    return found


def test_spec_policy_has_no_defaults_and_no_refs() -> None:
    # The gateway's defaults stay the gateway's; only an issuer's kind has one, as the
    # model fills in "oidc" when it is left out.
    policy_schema = schema.spec_schema()["properties"]["policy"]
    assert _defaults(policy_schema) == [
        ".properties.identity.properties.issuers.items.properties.kind"
    ]
    assert "$ref" not in yaml.safe_dump(schema.crd())


# --- enforced by the API server ---------------------------------------------------


def valid_spec() -> dict[str, Any]:
    """The repository's policy file example as a resource's spec.policy."""
    document = yaml.safe_load((REPO / "examples" / "policy.yaml").read_text())
    spec = minimal_spec()
    spec["target"]["roles"] = [{"name": "ai_readonly", "secretName": "db-readonly"}]
    # The example masks with hash and digits, which need the masking key.
    spec["target"]["maskingKey"] = {"secretName": "querywarden-masking", "key": "key"}
    spec["policy"] = document
    return spec


def create(k8s: Cluster, namespace: str, name: str, spec: dict[str, Any], **meta: Any) -> Any:
    return k8s.request(
        "POST", policies(namespace), policy(name, spec, **meta), query={"dryRun": "All"}
    )


def test_the_policy_file_example_is_a_valid_resource(
    k8s: Cluster, crd: None, namespace: str
) -> None:
    spec = valid_spec()
    parse_spec(spec)  # pydantic agrees
    stored = create(k8s, namespace, "example", spec)
    # Schema defaults for the operator's part, none in the policy document.
    assert stored["spec"]["sidecar"]["gatewayPort"] == 6432
    assert stored["spec"]["target"]["databasePort"] == 5432
    assert stored["spec"]["target"]["credentials"]["usernameKey"] == "username"
    # The policy document comes back as written, but for the issuer kind the schema
    # fills in as the model does: the same document either way.
    assert stored["spec"]["policy"]["identity"]["issuers"][0]["kind"] == "oidc"
    stored["spec"]["policy"]["identity"]["issuers"][0].pop("kind")
    assert stored["spec"]["policy"] == spec["policy"]


def test_a_spec_without_a_policy_is_valid_as_pydantic_says(
    k8s: Cluster, crd: None, namespace: str
) -> None:
    # The CRD's CEL rules read self.policy; without has(self.policy) they failed such a
    # spec with "no such key: policy" while the operator's model accepted it.
    spec = minimal_spec()
    parse_spec(spec)
    stored = create(k8s, namespace, "no-policy", spec)
    assert "policy" not in stored["spec"]


def test_the_charts_example_policy_is_valid(k8s: Cluster, crd: None, namespace: str) -> None:
    example = yaml.safe_load(EXAMPLE_POLICY.read_text())
    parse_spec(example["spec"])
    k8s.request("POST", policies(namespace), example, query={"dryRun": "All"})


def _without_key(mutate: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """``mutate``, on a spec that gives no masking key."""

    def both(spec: dict[str, Any]) -> None:
        spec["target"].pop("maskingKey", None)
        mutate(spec)

    return both


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(spec: dict[str, Any]) -> None:
        node = spec
        *parents, last = path.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


_DELETE = object()
SAML = {"name": "saml", "kind": "saml", "entityId": "https://idp/saml", "audience": "qw"}

#: (mutation of valid_spec(), what the API server says): pydantic refuses each as well.
REFUSED: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("same ports", _set("sidecar.gatewayPort", 5432), "gatewayPort must differ"),
    ("unknown role", _set("policy.rules.0.upstreamRole", "nobody"), "upstreamRole must name"),
    (
        "hash without key",
        _without_key(
            _set("policy.masking", {"columns": [{"table": "t", "column": "c", "strategy": "hash"}]})
        ),
        "need target.maskingKey",
    ),
    ("http issuer", _set("policy.identity.issuers.0.issuer", "http://idp"), "HTTPS only"),
    (
        "saml without certificate",
        _set("policy.identity.issuers", [SAML]),
        "exactly one of certificate and certificateFile",
    ),
    ("nobody subject", _set("policy.rules.0.subjects", {"groups": []}), "at least one group"),
    (
        "duplicate rules",
        lambda s: s["policy"]["rules"].append(copy.deepcopy(s["policy"]["rules"][0])),
        "Duplicate value",
    ),
    ("bad operation", _set("policy.rules.0.allow.operations", ["drop"]), "should match"),
    ("bad duration", _set("policy.rules.0.limits.statementTimeout", "30 secs"), "should match"),
    ("bad enum", _set("policy.masking", {"detectors": ["phone"]}), "Unsupported value"),
    ("empty selector", _set("target.podSelector", {}), "podSelector must select something"),
    (
        "field of another kind",
        _set("policy.identity.issuers.0.keyFile", "/k"),
        "keyFile applies to kind dev only",
    ),
    (
        "kind needs fields",
        _set("policy.identity.issuers.0.issuer", _DELETE),
        "needs audiences, issuer",
    ),
    (
        "override for nobody",
        _set(
            "policy.masking",
            {"columns": [{"table": "t", "column": "c", "overrides": [{"strategy": "none"}]}]},
        ),
        "must name at least one group or user",
    ),
    (
        "files from two sources",
        _set("sidecar.files", [{"name": "x", "secretName": "a", "configMapName": "b"}]),
        "exactly one of secretName and configMapName",
    ),
    ("bad secret name", _set("target.credentials.secretName", "Not_A_Name"), "should match"),
    (
        "notify with two urls",
        _set("policy.approvals", {"notify": [{"name": "n", "url": "https://h", "urlEnv": "H"}]}),
        "exactly one of url, urlFile, urlEnv",
    ),
    (
        "notify without a url",
        _set("policy.approvals", {"notify": [{"name": "n", "kind": "slack"}]}),
        "exactly one of url, urlFile, urlEnv",
    ),
    (
        "notify to a file url",
        _set("policy.approvals", {"notify": [{"name": "n", "url": "file:///etc/passwd"}]}),
        "must be http(s)://",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "message"), [(m, msg) for _, m, msg in REFUSED], ids=[i for i, _, _ in REFUSED]
)
def test_api_server_and_pydantic_refuse_the_same_specs(
    k8s: Cluster, crd: None, namespace: str, mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    spec = valid_spec()
    mutate(spec)
    with pytest.raises(KubeError) as refused:
        create(k8s, namespace, "bad", spec)
    assert refused.value.status == 422
    assert message in refused.value.message
    with pytest.raises(InvalidPolicy):
        parse_spec(spec)


def test_name_must_fit_the_objects_it_names(k8s: Cluster, crd: None, namespace: str) -> None:
    with pytest.raises(KubeError) as refused:
        create(k8s, namespace, "x" * 64, valid_spec())
    assert "at most 63 characters" in refused.value.message


def test_what_only_the_operator_checks(k8s: Cluster, crd: None, namespace: str) -> None:
    """Two issuers with the same URL: the CRD cannot say it, the operator refuses it."""
    spec = valid_spec()
    twin = dict(spec["policy"]["identity"]["issuers"][0], name="corp-twin")
    spec["policy"]["identity"]["issuers"].append(twin)
    create(k8s, namespace, "twins", spec)
    with pytest.raises(InvalidPolicy, match="same issuer URL"):
        parse_spec(spec)
    assert "IdentitySection" in schema.OPERATOR_ONLY


def test_kubectl_explains_the_fields(k8s: Cluster, crd: None) -> None:
    explained = k8s.kubectl("explain", "databaseaccesspolicies.spec.target.directAccess").stdout
    assert "bypassing the gateway" in explained
    rules = k8s.kubectl("explain", "dap.spec.policy.rules.upstreamRole").stdout
    assert "Which upstream credential" in rules
