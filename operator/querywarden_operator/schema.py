"""Generate the DatabaseAccessPolicy CRD from the pydantic models.

``spec`` comes from :class:`~querywarden_operator.spec.DatabaseAccessPolicySpec`, whose
``policy`` is the gateway's own :class:`~querywarden.policy.PolicyDocument`, so the
resource and the policy file cannot drift apart: change a model and the CRD changes with
it (``tests/k8s/test_k8s_operator_crd.py`` fails until the committed CRD is regenerated)::

    python -m querywarden_operator.schema --write

pydantic's JSON Schema is turned into a Kubernetes *structural* schema:

* ``$ref`` inlined; ``Optional`` (``anyOf`` with null) becomes the field, unrequired;
  ``const`` and unions of string literals become ``enum``; ``additionalProperties:
  false`` is dropped (the API server prunes unknown fields, and kubectl's strict field
  validation refuses them).
* The issuer union (``oneOf`` over ``kind``) becomes one object with every variant's
  fields and CEL rules saying which fields each kind needs and allows.
* Durations (``30s``, ``5m`` or seconds) become int-or-string with the gateway's own
  pattern; paths become strings; the operation names of a rule become a pattern built
  from :data:`querywarden.policy.model.OPERATIONS`.
* Model validators become CEL rules (:data:`POLICY_RULES`), name-keyed lists become
  ``x-kubernetes-list-type: map`` (unique names), and a few lists get ``maxItems`` so
  that the CEL rules stay within the API server's cost budget (:data:`POLICY_LIMITS`).
* Defaults: kept for ``target`` and ``sidecar``; none in ``policy`` (the gateway applies
  its own, and the rendered file stays what the user wrote).
"""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import inspect
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from querywarden.config import _DURATION
from querywarden.policy import PolicyDocument
from querywarden.policy import model as policy_model
from querywarden.policy.model import IdentitySection
from querywarden_operator.issuers import (
    ISSUER_CRD_NAME,
    ISSUER_KIND,
    ISSUER_PLURAL,
    ISSUER_SINGULAR,
)
from querywarden_operator.review import (
    REVIEW_CRD_NAME,
    REVIEW_KIND,
    REVIEW_PLURAL,
    REVIEW_SINGULAR,
    QueryReviewSpec,
    QueryReviewStatus,
)
from querywarden_operator.spec import (
    CRD_NAME,
    GROUP,
    ISSUER_NAME,
    KIND,
    PLURAL,
    SINGULAR,
    VERSION,
    DatabaseAccessPolicySpec,
)
from querywarden_operator.status import PolicyStatus

REPO = Path(__file__).resolve().parents[2]
REGENERATE = "python -m querywarden_operator.schema --write"
#: Where the CRD is committed: the repository's crds/ and the chart's copy (Helm installs
#: a chart's crds/ before its templates, and cannot reach outside the chart).
CRD_FILES = (
    REPO / "crds" / "databaseaccesspolicies.yaml",
    REPO / "charts" / "querywarden" / "crds" / "databaseaccesspolicies.yaml",
)

#: The ClusterTokenIssuer CRD's committed files (installed with the chart: policies may
#: name shared issuers whatever else is enabled).
ISSUER_CRD_FILES = (
    REPO / "crds" / "clustertokenissuers.yaml",
    REPO / "charts" / "querywarden" / "crds" / "clustertokenissuers.yaml",
)

#: The QueryReview CRD's committed files. (Kept apart from :data:`CRD_FILES`, whose
#: files all hold the DatabaseAccessPolicy CRD; :func:`generated` lists every file.) The
#: chart's copy is not in its crds/: approvals through Kubernetes are opt-in
#: (``reviews.enabled``), so the chart installs it from a template when they are on.
REVIEW_CRD_FILES = (
    REPO / "crds" / "queryreviews.yaml",
    REPO / "charts" / "querywarden" / "files" / "crds" / "queryreviews.yaml",
)

DURATION_PATTERN = _DURATION.pattern
OPERATION_PATTERN = (
    "^(" + "|".join(re.escape(op) for op in sorted(policy_model.OPERATIONS)) + "|ddl:.*)$"
)


def _cel(rule: str, message: str) -> dict[str, str]:
    return {"rule": rule, "message": message}


def _someone(what: str) -> dict[str, str]:
    return _cel(
        "(has(self.groups) && size(self.groups) > 0) || (has(self.users) && size(self.users) > 0)",
        f"{what} must name at least one group or user",
    )


#: CEL rules that say what the policy models' validators say, by model name. Every model
#: validator must be here or in :data:`OPERATOR_ONLY` (a test checks).
POLICY_RULES: dict[str, list[dict[str, str]]] = {
    "Subjects": [_someone("subjects")],
    "MaskOverride": [_someone("a masking override")],
    "OidcIssuer": [
        _cel(
            "!(self.kind in ['oidc', 'kubernetes']) || ((!has(self.issuer) || "
            "self.issuer.startsWith('https://')) && (!has(self.jwksUri) || "
            "self.jwksUri.startsWith('https://')))",
            "oidc and kubernetes issuers are fetched over HTTPS only: issuer and jwksUri "
            "must start with https://",
        )
    ],
    "SamlIssuer": [
        _cel(
            "self.kind != 'saml' || has(self.certificate) != has(self.certificateFile)",
            "a saml issuer needs exactly one of certificate and certificateFile",
        )
    ],
    # Unique names: the lists are maps keyed by name (POLICY_LIST_MAPS).
    "PolicyDocument": [],
    "NotifyDestination": [
        _cel(
            "[has(self.url), has(self.urlFile), has(self.urlEnv)].filter(x, x).size() == 1",
            "a notify destination needs exactly one of url, urlFile, urlEnv",
        ),
        _cel(
            "!has(self.url) || self.url.startsWith('https://') || self.url.startsWith('http://')",
            "a notify destination's url must be http(s)://",
        ),
        _cel(
            "!(has(self.secretFile) && has(self.secretEnv))",
            "a notify destination takes at most one of secretFile, secretEnv",
        ),
    ],
}
#: Model validators the CRD does not repeat, and why (the operator's pydantic
#: validation still refuses them, with a False Rendered condition).
OPERATOR_ONLY: dict[str, str] = {
    "IdentitySection": "issuer names are unique by the list map; unique issuer URLs and "
    "entity IDs (defaults included) are checked by the operator",
    "KubernetesIssuer": "inherits OidcIssuer's HTTPS rule, which the merged issuer applies "
    "to kind kubernetes as well",
    "ApprovalSettings": "pendingTTL >= hold compares durations that may be bare seconds, "
    "which CEL's duration() cannot read; the operator checks it",
}
#: The resource's own subclasses of policy models (``spec.policy`` adds ``issuerRefs``),
#: and the policy model whose rules, list maps and limits they inherit.
POLICY_SUBCLASSES: dict[str, str] = {
    "ResourcePolicy": "PolicyDocument",
    "PolicyIdentity": "IdentitySection",
}
POLICY_RULES["ResourcePolicy"] = []
OPERATOR_ONLY["PolicyIdentity"] = (
    OPERATOR_ONLY["IdentitySection"] + "; issuerRefs are unique by list-type set"
)
#: (model, field) → the key of a list whose items must have unique names.
POLICY_LIST_MAPS: dict[tuple[str, str], str] = {
    ("PolicyDocument", "rules"): "name",
    ("IdentitySection", "issuers"): "name",
    ("ApprovalSettings", "notify"): "name",
}
#: (model, field) → bounds the CRD adds (the CEL cost budget needs bounded lists).
POLICY_LIMITS: dict[tuple[str, str], dict[str, int]] = {
    ("PolicyDocument", "rules"): {"maxItems": 256},
    ("IdentitySection", "issuers"): {"maxItems": 32},
    ("MaskingSection", "columns"): {"maxItems": 512},
    ("MaskedColumn", "overrides"): {"maxItems": 32},
    ("ApprovalSettings", "notify"): {"maxItems": 16},
    ("Rule", "upstreamRole"): {"maxLength": 63},
}


def _with_subclasses(table: dict[tuple[str, str], Any]) -> None:
    """Give the subclasses of :data:`POLICY_SUBCLASSES` their base model's entries."""
    for (model, key), value in list(table.items()):
        for sub, base in POLICY_SUBCLASSES.items():
            if model == base:
                table[(sub, key)] = value


_with_subclasses(POLICY_LIST_MAPS)
_with_subclasses(POLICY_LIMITS)

_DROP = frozenset({"title", "discriminator", "examples"})
_KEY_ORDER = (
    "description",
    "type",
    "format",
    "enum",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "default",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "anyOf",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-validations",
)


class _Generator(GenerateJsonSchema):
    """pydantic's generator, plus the operation-name check of the policy's rules."""

    def function_after_schema(
        self, schema: core_schema.AfterValidatorFunctionSchema
    ) -> JsonSchemaValue:
        inner = self.generate_inner(schema["schema"])
        function: Callable[..., Any] = schema["function"]["function"]
        if (
            getattr(function, "__qualname__", "") == "_operation_names"
            and inner.get("type") == "array"
        ):
            inner = {**inner, "items": {"type": "string", "pattern": OPERATION_PATTERN}}
        return inner


def field_docs(cls: type[BaseModel]) -> dict[str, str]:
    """``#:`` comments above each field of ``cls`` and its bases, by field name."""
    return dict(_field_docs(cls))


@functools.cache
def _field_docs(cls: type[BaseModel]) -> dict[str, str]:
    # Parsed once per class and process: inspect.getsource parses the whole module, and
    # CPython 3.11's parser keeps its recursion count per interpreter, not per thread,
    # so fewer parses leave less room to meet one in another thread (an operator run
    # in the test process) ("AST constructor recursion depth mismatch").
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, BaseModel)) or klass is BaseModel:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        tree = ast.parse(source)
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                comment: list[str] = []
                index = node.lineno - 2
                while index >= 0 and lines[index].strip().startswith("#:"):
                    comment.insert(0, lines[index].strip()[2:].strip())
                    index -= 1
                if comment:
                    docs[node.target.id] = " ".join(comment)
    return docs


def _models(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every model reachable from ``root``, by class name."""
    found: dict[str, type[BaseModel]] = {}

    def visit(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation.__name__ in found:
                return
            found[annotation.__name__] = annotation
            for info in annotation.model_fields.values():
                visit(info.annotation)
            return
        for arg in getattr(annotation, "__args__", ()) or ():
            visit(arg)
        origin = getattr(annotation, "__origin__", None)
        if origin is not None and origin is not annotation:
            visit(origin)

    visit(root)
    return found


#: The models of the policy document, wherever in the gateway they are defined (their
#: defaults are the gateway's business, not the CRD's).
POLICY_MODELS = frozenset(_models(PolicyDocument)) | frozenset(POLICY_SUBCLASSES)


class _Structural:
    """Turns one pydantic JSON Schema (with ``$defs``) into a structural schema."""

    def __init__(self, document: dict[str, Any], models: dict[str, type[BaseModel]]) -> None:
        self.defs: dict[str, Any] = document.get("$defs", {})
        self.models = models
        self.docs = {name: field_docs(cls) for name, cls in models.items()}

    def model(self, name: str, *, in_policy: bool) -> dict[str, Any]:
        node = copy.deepcopy(self.defs[name])
        in_policy = in_policy or name in POLICY_MODELS
        out = self.convert(node, in_policy=in_policy, owner=name)
        rules = [*out.get("x-kubernetes-validations", []), *POLICY_RULES.get(name, [])]
        if rules:
            out["x-kubernetes-validations"] = rules
        return out

    def convert(
        self, node: dict[str, Any], *, in_policy: bool, owner: str | None = None
    ) -> dict[str, Any]:
        node = dict(node)
        for key in _DROP:
            node.pop(key, None)
        if "$ref" in node:
            name = node.pop("$ref").rsplit("/", 1)[-1]
            resolved = self.model(name, in_policy=in_policy)
            return self._siblings(resolved, node, in_policy=in_policy or name in POLICY_MODELS)
        if "allOf" in node and len(node["allOf"]) == 1:
            inner = node.pop("allOf")[0]
            return self._siblings(
                self.convert(inner, in_policy=in_policy), node, in_policy=in_policy
            )
        if node.get("x-kubernetes-int-or-string"):
            if in_policy:
                node.pop("default", None)
            return _ordered(node)
        for union in ("oneOf", "anyOf"):
            if union in node:
                return self._union(node, union, in_policy=in_policy)
        if "const" in node:
            node["enum"] = [node.pop("const")]
        if node.get("format") == "duration":
            node.pop("format")
            node.pop("type", None)
            node.pop("default", None)
            return _ordered(
                {
                    **node,
                    "anyOf": [{"type": "integer"}, {"type": "string"}],
                    "pattern": DURATION_PATTERN,
                    "x-kubernetes-int-or-string": True,
                }
            )
        if node.get("format") == "path":
            node.pop("format")
        self._default(node, in_policy=in_policy)
        if node.get("type") == "object":
            if node.get("additionalProperties") is False:
                # Structural schemas prune unknown fields (and kubectl's strict field
                # validation refuses them); "false" cannot sit next to "properties".
                del node["additionalProperties"]
            if isinstance(node.get("additionalProperties"), dict):
                node["additionalProperties"] = self.convert(
                    node["additionalProperties"], in_policy=in_policy
                )
            if "properties" in node:
                docs = self.docs.get(owner or "", {})
                by_alias = self._field_names(owner)
                properties = {}
                for key, value in node["properties"].items():
                    converted = self.convert(value, in_policy=in_policy)
                    field = by_alias.get(key, key)
                    if owner is not None and field in docs:
                        # The field's own comment says more than its type's docstring.
                        converted = _ordered({**converted, "description": docs[field]})
                    if owner is not None:
                        converted = self._policy_extras(owner, key, converted)
                    properties[key] = converted
                node["properties"] = properties
        if node.get("type") == "array" and "items" in node:
            node["items"] = self.convert(node["items"], in_policy=in_policy)
        return _ordered(node)

    def _field_names(self, owner: str | None) -> dict[str, str]:
        cls = self.models.get(owner or "")
        if cls is None:
            return {}
        return {(info.alias or name): name for name, info in cls.model_fields.items()}

    def _policy_extras(self, owner: str, key: str, node: dict[str, Any]) -> dict[str, Any]:
        extra: dict[str, Any] = dict(POLICY_LIMITS.get((owner, key), {}))
        map_key = POLICY_LIST_MAPS.get((owner, key))
        if map_key is not None:
            extra["x-kubernetes-list-type"] = "map"
            extra["x-kubernetes-list-map-keys"] = [map_key]
        return _ordered({**node, **extra}) if extra else node

    def _siblings(
        self, resolved: dict[str, Any], siblings: dict[str, Any], *, in_policy: bool
    ) -> dict[str, Any]:
        out = dict(resolved)
        for key, value in siblings.items():
            if key == "default":
                continue
            out[key] = value
        if "default" in siblings and not in_policy and siblings["default"] is not None:
            if out.get("type") == "object" and isinstance(siblings["default"], dict):
                # An object default of {} lets the API server apply its fields' defaults.
                out["default"] = {}
            else:
                out["default"] = siblings["default"]
        return _ordered(out)

    def _default(self, node: dict[str, Any], *, in_policy: bool) -> None:
        if "default" not in node:
            return
        value = node["default"]
        if in_policy or value is None or (isinstance(value, list | dict) and not value):
            del node["default"]

    def _union(self, node: dict[str, Any], union: str, *, in_policy: bool) -> dict[str, Any]:
        options = node.pop(union)
        non_null = [o for o in options if o.get("type") != "null"]
        if len(non_null) == 1:
            merged = self.convert(non_null[0], in_policy=in_policy)
            return self._siblings(merged, node, in_policy=in_policy)
        converted = [self.convert(o, in_policy=in_policy) for o in non_null]
        if all(c.get("type") == "string" and "enum" in c and len(c) <= 2 for c in converted):
            values: list[Any] = []
            for c in converted:
                values += [v for v in c["enum"] if v not in values]
            merged = {"type": "string", "enum": values}
            return self._siblings(merged, node, in_policy=in_policy)
        if all(c.get("type") == "object" for c in converted):
            return self._siblings(
                _merge_variants(converted, node.get("description")),
                node,
                in_policy=in_policy,
            )
        raise ValueError(f"cannot express this union structurally: {options}")


def _merge_variants(variants: list[dict[str, Any]], description: str | None) -> dict[str, Any]:
    """One object for a union discriminated by ``kind``.

    It has every variant's fields, and CEL rules for what each kind requires and allows.
    """
    kinds = [v["properties"]["kind"]["enum"][0] for v in variants]
    properties: dict[str, Any] = {}
    declared: dict[str, list[str]] = {}
    for kind, variant in zip(kinds, variants, strict=True):
        for key, value in variant["properties"].items():
            if key in properties and key != "kind" and _shape(properties[key]) != _shape(value):
                raise ValueError(f"issuer field {key} has two different types")
            if key != "kind":
                properties.setdefault(key, value)
            declared.setdefault(key, []).append(kind)
    properties["kind"] = {"type": "string", "enum": kinds, "default": kinds[0]}
    required_sets = [set(v.get("required", [])) for v in variants]
    common = set.intersection(*required_sets)
    rules: list[dict[str, str]] = []
    for key in sorted(declared):
        allowed = declared[key]
        if key == "kind" or len(allowed) == len(kinds):
            continue
        listed = ", ".join(f"'{k}'" for k in allowed)
        rules.append(
            _cel(
                f"!has(self.{key}) || self.kind in [{listed}]",
                f"{key} applies to kind {', '.join(allowed)} only",
            )
        )
    for kind, required in zip(kinds, required_sets, strict=True):
        extra = sorted(required - common)
        if extra:
            condition = " && ".join(f"has(self.{key})" for key in extra)
            rules.append(
                _cel(
                    f"self.kind != '{kind}' || ({condition})",
                    f"kind {kind} needs {', '.join(extra)}",
                )
            )
    for variant in variants:
        for rule in variant.get("x-kubernetes-validations", []):
            if rule not in rules:
                rules.append(rule)
    merged: dict[str, Any] = {
        "type": "object",
        "required": sorted(common),
        "properties": dict(
            sorted(properties.items(), key=lambda kv: (kv[0] != "name", kv[0] != "kind", kv[0]))
        ),
        "x-kubernetes-validations": rules,
    }
    merged["description"] = description or (
        "A trusted token issuer; kind is one of " + ", ".join(kinds) + " (default oidc)."
    )
    return _ordered(merged)


def _shape(node: dict[str, Any]) -> Any:
    return (
        node.get("type"),
        node.get("x-kubernetes-int-or-string"),
        _shape(node["items"]) if "items" in node else None,
    )


_RULE_ORDER = ("rule", "message", "messageExpression", "reason", "fieldPath")


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    rank = {key: i for i, key in enumerate(_KEY_ORDER)}
    out = dict(sorted(node.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    if isinstance(out.get("description"), str):
        out["description"] = _prose(out["description"])
    if "x-kubernetes-validations" in out:
        out["x-kubernetes-validations"] = [
            dict(sorted(rule.items(), key=lambda kv: _RULE_ORDER.index(kv[0])))
            for rule in out["x-kubernetes-validations"]
        ]
    return out


def _prose(text: str) -> str:
    """A docstring as one paragraph per line, with Markdown-style backticks."""
    paragraphs = [" ".join(p.split()) for p in text.strip().split("\n\n")]
    return "\n".join(p for p in paragraphs if p).replace("``", "`")


def _schema_of(model: type[BaseModel]) -> dict[str, Any]:
    document = model.model_json_schema(
        by_alias=True, mode="validation", schema_generator=_Generator
    )
    structural = _Structural(document, _models(model))
    top = {k: v for k, v in document.items() if k != "$defs"}
    return structural.convert(top, in_policy=False, owner=model.__name__)


def spec_schema() -> dict[str, Any]:
    """The structural schema of ``spec``."""
    return _schema_of(DatabaseAccessPolicySpec)


def status_schema() -> dict[str, Any]:
    """The structural schema of ``status``."""
    return _schema_of(PolicyStatus)


def crd() -> dict[str, Any]:
    """The DatabaseAccessPolicy CustomResourceDefinition."""
    ready = '.status.conditions[?(@.type=="Ready")]'
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {
                "app.kubernetes.io/name": "querywarden",
                "app.kubernetes.io/component": "crd",
            },
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": PLURAL,
                "singular": SINGULAR,
                "kind": KIND,
                "listKind": f"{KIND}List",
                "shortNames": ["dap", "dbpolicy"],
                "categories": ["querywarden"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {
                            "name": "Targets",
                            "type": "integer",
                            "jsonPath": ".status.targets",
                            "description": "Pods the podSelector selects",
                        },
                        {
                            "name": "Injected",
                            "type": "integer",
                            "jsonPath": ".status.injected",
                            "description": "Selected pods that carry this policy's gateway",
                        },
                        {"name": "Ready", "type": "string", "jsonPath": f"{ready}.status"},
                        {
                            "name": "Reason",
                            "type": "string",
                            "jsonPath": f"{ready}.reason",
                            "priority": 1,
                        },
                        {
                            "name": "Port",
                            "type": "integer",
                            "jsonPath": ".spec.sidecar.gatewayPort",
                            "description": "The gateway's port",
                            "priority": 1,
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "description": "The querywarden gateway in front of the database "
                            "pods a podSelector selects, with the policy it enforces.",
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                            "x-kubernetes-validations": [
                                _cel(
                                    "size(self.metadata.name) <= 63",
                                    "the name must be at most 63 characters: it names the "
                                    "ConfigMap, the NetworkPolicy and a webhook",
                                )
                            ],
                        }
                    },
                }
            ],
        },
    }


def issuer_spec_schema() -> dict[str, Any]:
    """A ClusterTokenIssuer's ``spec``: an issuer of the policy document, without a name."""
    issuer = copy.deepcopy(_schema_of(IdentitySection)["properties"]["issuers"]["items"])
    del issuer["properties"]["name"]
    issuer["required"] = [key for key in issuer.get("required", []) if key != "name"]
    if not issuer["required"]:
        del issuer["required"]
    issuer["description"] = (
        "A trusted token issuer that policies name in spec.policy.identity.issuerRefs; "
        "the resource's name is the issuer's name. The fields are those of an entry of "
        "a policy's identity.issuers (docs/identity.md); kind is one of oidc, "
        "kubernetes, dev, saml (default oidc). File paths (caFile, keyFile, "
        "certificateFile, bearerTokenFile) are read in the gateway's container: each "
        "referencing policy mounts them (spec.sidecar.files)."
    )
    return _ordered(issuer)


def issuer_crd() -> dict[str, Any]:
    """The ClusterTokenIssuer CustomResourceDefinition (cluster-scoped)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": ISSUER_CRD_NAME,
            "labels": {
                "app.kubernetes.io/name": "querywarden",
                "app.kubernetes.io/component": "crd",
            },
        },
        "spec": {
            "group": GROUP,
            "scope": "Cluster",
            "names": {
                "plural": ISSUER_PLURAL,
                "singular": ISSUER_SINGULAR,
                "kind": ISSUER_KIND,
                "listKind": f"{ISSUER_KIND}List",
                "shortNames": ["cti"],
                "categories": ["querywarden"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "additionalPrinterColumns": [
                        {"name": "Kind", "type": "string", "jsonPath": ".spec.kind"},
                        {"name": "Issuer", "type": "string", "jsonPath": ".spec.issuer"},
                        {
                            "name": "Entity ID",
                            "type": "string",
                            "jsonPath": ".spec.entityId",
                            "priority": 1,
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "description": "A token issuer the querywarden gateway trusts, "
                            "shared by the DatabaseAccessPolicies that name it.",
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": issuer_spec_schema(),
                            },
                            "x-kubernetes-validations": [
                                _cel(
                                    f"self.metadata.name.matches('{ISSUER_NAME}')",
                                    "the name is the issuer's name in the policies: lower "
                                    "case letters, digits and '-', at most 63 characters",
                                )
                            ],
                        }
                    },
                }
            ],
        },
    }


def review_crd() -> dict[str, Any]:
    """The QueryReview CustomResourceDefinition.

    No status subresource: the admission webhook stamps ``status`` on the update that
    decides a review, which the API server would reset if status were a subresource
    (see :mod:`querywarden_operator.review`).
    """
    spec = _schema_of(QueryReviewSpec)
    decided = '.status.conditions[?(@.type=="Decided")]'
    # A NULL parameter is null: structural schemas say so with nullable.
    spec["properties"]["parameters"]["items"]["nullable"] = True
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": REVIEW_CRD_NAME,
            "labels": {
                "app.kubernetes.io/name": "querywarden",
                "app.kubernetes.io/component": "crd",
            },
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": REVIEW_PLURAL,
                "singular": REVIEW_SINGULAR,
                "kind": REVIEW_KIND,
                "listKind": f"{REVIEW_KIND}List",
                "shortNames": ["qr", "qreview"],
                "categories": ["querywarden"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    # The state (the Decided condition's reason), who asked, which rule
                    # held it and the statement: what an approver decides on. The
                    # statement comes last, where a long one wraps without pushing the
                    # other columns apart.
                    "additionalPrinterColumns": [
                        {
                            "name": "State",
                            "type": "string",
                            "jsonPath": f"{decided}.reason",
                            "description": "Pending, Approved, Denied, Withdrawn or Expired",
                        },
                        {
                            "name": "Requester",
                            "type": "string",
                            "jsonPath": ".spec.requester.subject",
                        },
                        {"name": "Database", "type": "string", "jsonPath": ".spec.database"},
                        {
                            "name": "Rule",
                            "type": "string",
                            "jsonPath": ".spec.rule",
                            "description": "The policy rule that held the statement",
                        },
                        {
                            "name": "Approver",
                            "type": "string",
                            "jsonPath": ".status.approver.subject",
                        },
                        {
                            "name": "Uses Left",
                            "type": "integer",
                            "jsonPath": ".status.usesLeft",
                            "priority": 1,
                        },
                        {
                            "name": "Reason",
                            "type": "string",
                            "jsonPath": ".spec.reason",
                            "priority": 1,
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                        {"name": "Statement", "type": "string", "jsonPath": ".spec.statement"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "description": "One statement the querywarden gateway held for "
                            "review, and the approver's decision.",
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": _schema_of(QueryReviewStatus),
                            },
                        }
                    },
                }
            ],
        },
    }


_HEADER = (
    "# Generated by `python -m querywarden_operator.schema --write` from the pydantic\n"
    "# models (operator/querywarden_operator/{models}).\n"
    "# Do not edit: change the models and regenerate.\n"
)


def render() -> str:
    """The DatabaseAccessPolicy CRD as the committed YAML text."""
    header = (
        "# Generated by `python -m querywarden_operator.schema --write` from the pydantic\n"
        "# models (operator/querywarden_operator/spec.py, proxy/querywarden/policy/model.py).\n"
        "# Do not edit: change the models and regenerate.\n"
    )
    return header + yaml.safe_dump(crd(), sort_keys=False, width=4096, allow_unicode=True)


def render_issuer() -> str:
    """The ClusterTokenIssuer CRD as the committed YAML text."""
    header = (
        "# Generated by `python -m querywarden_operator.schema --write` from the pydantic\n"
        "# models (proxy/querywarden/policy/model.py issuers, without their name).\n"
        "# Do not edit: change the models and regenerate.\n"
    )
    return header + yaml.safe_dump(issuer_crd(), sort_keys=False, width=4096, allow_unicode=True)


def render_review() -> str:
    """The QueryReview CRD as the committed YAML text."""
    header = _HEADER.format(models="review.py")
    return header + yaml.safe_dump(review_crd(), sort_keys=False, width=4096, allow_unicode=True)


def generated() -> dict[Path, str]:
    """Every committed CRD file and the text it must hold."""
    policy, review, issuer = render(), render_review(), render_issuer()
    return {
        **{path: policy for path in CRD_FILES},
        **{path: review for path in REVIEW_CRD_FILES},
        **{path: issuer for path in ISSUER_CRD_FILES},
    }


def main(argv: list[str] | None = None) -> int:
    """Print the CRD, write it (``--write``), or check the committed files (``--check``)."""
    parser = argparse.ArgumentParser(prog="python -m querywarden_operator.schema")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write crds/ and the chart's copy")
    mode.add_argument("--check", action="store_true", help="fail if a committed file differs")
    args = parser.parse_args(argv)
    files = generated()
    if args.write:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
        return 0
    if args.check:
        stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
        for path in stale:
            print(f"{path.relative_to(REPO)} is stale: run {REGENERATE}")
        return 1 if stale else 0
    sys.stdout.write(render() + "---\n" + render_review() + "---\n" + render_issuer())
    return 0


if __name__ == "__main__":
    sys.exit(main())
