"""The API server enforces a CRD's openAPIV3Schema and its CEL rules.

The CRD is applied with kubectl, objects are written both with kubectl and through the
REST API: the API server, not a client, refuses what the schema forbids.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from k8sharness.cluster import Cluster, KubeError

GROUP = "harness.querywarden.dev"
PLURAL = "accessrules"
CRD_NAME = f"{PLURAL}.{GROUP}"

#: Shaped like the policy resources the operator will own: an action, the statements it
#: covers, approvers for reviews. The CEL rules are cross-field invariants that a plain
#: schema cannot express, plus one transition rule (an immutable field).
REVIEW_NEEDS_APPROVER = "self.action != 'review' || size(self.approvers) > 0"
CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": CRD_NAME},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {
            "plural": PLURAL,
            "singular": "accessrule",
            "kind": "AccessRule",
            "listKind": "AccessRuleList",
        },
        "versions": [
            {
                "name": "v1alpha1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "required": ["spec"],
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["action", "statements", "database"],
                                "x-kubernetes-validations": [
                                    {
                                        "rule": REVIEW_NEEDS_APPROVER,
                                        "message": "a review rule needs at least one approver",
                                    },
                                    {
                                        "rule": "!has(self.maxRows) || self.action == 'allow'",
                                        "messageExpression": (
                                            "'maxRows only applies to allow rules, not to ' "
                                            "+ self.action"
                                        ),
                                    },
                                ],
                                "properties": {
                                    "action": {
                                        "type": "string",
                                        "enum": ["allow", "deny", "review"],
                                    },
                                    "statements": {
                                        "type": "array",
                                        "minItems": 1,
                                        "maxItems": 5,
                                        "items": {
                                            "type": "string",
                                            "enum": ["SELECT", "INSERT", "UPDATE", "DELETE", "DDL"],
                                        },
                                    },
                                    "approvers": {
                                        "type": "array",
                                        "default": [],
                                        "maxItems": 10,
                                        "items": {"type": "string", "maxLength": 64},
                                    },
                                    "maxRows": {"type": "integer", "minimum": 1},
                                    "database": {
                                        "type": "string",
                                        "maxLength": 63,
                                        "x-kubernetes-validations": [
                                            {
                                                "rule": "self == oldSelf",
                                                "message": "database is immutable",
                                            }
                                        ],
                                    },
                                },
                            }
                        },
                    }
                },
            }
        ],
    },
}


@pytest.fixture(scope="module")
def crd(k8s: Cluster) -> Iterator[str]:
    """The AccessRule CRD, applied with kubectl and Established; removed afterwards."""
    k8s.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(CRD))
    try:
        k8s.wait_established(CRD_NAME)
        # Established means the API server serves the resource; discovery (which kubectl
        # uses to map the kind) may lag a moment behind it.
        k8s.wait_for(
            lambda: k8s.get(f"/apis/{GROUP}/v1alpha1").get("resources") or None,
            what=f"{GROUP}/v1alpha1 in discovery",
        )
        yield CRD_NAME
    finally:
        k8s.delete(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}")


def access_rule(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": "AccessRule",
        "metadata": {"name": name},
        "spec": {"database": "app", **spec},
    }


def collection(namespace: str) -> str:
    return f"/apis/{GROUP}/v1alpha1/namespaces/{namespace}/{PLURAL}"


def refusal(k8s: Cluster, namespace: str, obj: dict[str, Any]) -> KubeError:
    with pytest.raises(KubeError) as caught:
        k8s.create(collection(namespace), obj)
    return caught.value


def test_valid_object_is_stored_with_schema_defaults(
    k8s: Cluster, crd: str, namespace: str
) -> None:
    stored = k8s.create(
        collection(namespace),
        access_rule("reads", action="allow", statements=["SELECT"], maxRows=100),
    )
    assert stored["spec"]["approvers"] == []  # the structural schema's default, applied on write
    fetched = k8s.get(f"{collection(namespace)}/reads")
    assert fetched["spec"] == {
        "action": "allow",
        "statements": ["SELECT"],
        "maxRows": 100,
        "approvers": [],
        "database": "app",
    }


def test_cel_rule_refuses_invalid_object_through_kubectl(
    k8s: Cluster, crd: str, namespace: str
) -> None:
    obj = access_rule("drops", action="review", statements=["DDL"])
    result = k8s.kubectl(
        "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(obj), check=False
    )
    assert result.returncode != 0
    assert "a review rule needs at least one approver" in result.stderr
    assert k8s.kubectl("get", PLURAL, "-n", namespace, "-o", "name").stdout.strip() == ""


def test_cel_rule_refusal_is_an_invalid_status_naming_the_field(
    k8s: Cluster, crd: str, namespace: str
) -> None:
    error = refusal(k8s, namespace, access_rule("drops", action="review", statements=["DDL"]))
    assert error.status == 422
    assert error.body["reason"] == "Invalid"
    causes = error.body["details"]["causes"]
    assert {"field": "spec", "reason": "FieldValueInvalid"}.items() <= causes[0].items()
    assert "a review rule needs at least one approver" in causes[0]["message"]

    # With an approver the same rule is satisfied.
    stored = k8s.create(
        collection(namespace),
        access_rule("drops", action="review", statements=["DDL"], approvers=["dba-oncall"]),
    )
    assert stored["spec"]["approvers"] == ["dba-oncall"]


def test_cel_message_expression_is_evaluated(k8s: Cluster, crd: str, namespace: str) -> None:
    error = refusal(
        k8s, namespace, access_rule("capped", action="deny", statements=["DELETE"], maxRows=5)
    )
    assert error.status == 422
    assert "maxRows only applies to allow rules, not to deny" in error.message


def test_openapi_schema_refuses_bad_enum_and_missing_fields(
    k8s: Cluster, crd: str, namespace: str
) -> None:
    error = refusal(k8s, namespace, access_rule("odd", action="maybe", statements=["SELECT"]))
    assert error.status == 422
    assert 'spec.action: Unsupported value: "maybe"' in error.message

    error = refusal(k8s, namespace, access_rule("empty", action="allow", statements=[]))
    assert "spec.statements: Invalid value" in error.message

    error = refusal(k8s, namespace, access_rule("bare", action="allow"))
    assert "spec.statements: Required value" in error.message


def test_transition_rule_keeps_a_field_immutable(k8s: Cluster, crd: str, namespace: str) -> None:
    path = f"{collection(namespace)}/reads"
    k8s.create(collection(namespace), access_rule("reads", action="allow", statements=["SELECT"]))
    with pytest.raises(KubeError) as caught:
        k8s.request(
            "PATCH",
            path,
            {"spec": {"database": "billing"}},
            content_type="application/merge-patch+json",
        )
    assert caught.value.status == 422
    assert "database is immutable" in caught.value.message

    # Other fields may change.
    patched = k8s.request(
        "PATCH",
        path,
        {"spec": {"statements": ["SELECT", "INSERT"]}},
        content_type="application/merge-patch+json",
    )
    assert patched["spec"]["statements"] == ["SELECT", "INSERT"]
    assert patched["spec"]["database"] == "app"
