"""The chart: helm lint, helm template (offline), and install/upgrade into the API server."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from cryptography import x509

from k8sharness.cluster import Cluster
from k8sharness.helm import Helm
from k8sharness.qwoperator import CHART, create_namespace
from querywarden_operator.config import OperatorConfig
from querywarden_operator.issuers import ISSUER_CRD_NAME
from querywarden_operator.spec import CRD_NAME

NAMESPACE = "qw-system"


def template(helm: Helm, *args: str, reviews: bool = False) -> list[dict[str, Any]]:
    """``helm template``; reviews off unless asked (their objects have tests of their own).

    ``reviews=True`` renders the chart's defaults as they are, reviews on.
    """
    off = () if reviews or any(a.startswith("reviews.") for a in args) else REVIEWS_OFF
    result = helm("template", "qw", str(CHART), "--namespace", NAMESPACE, *off, *args)
    return [d for d in yaml.safe_load_all(result.stdout) if d]


REVIEWS_OFF = ("--set", "reviews.enabled=false")


def by_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in documents if d["kind"] == kind]


def one(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(documents, kind)
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


def test_helm_lint(helm: Helm) -> None:
    result = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout


def test_helm_template_renders_the_operator(helm: Helm) -> None:
    documents = template(helm, "--include-crds")
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == sorted(
        [
            "ClusterKopfPeering",
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "Deployment",
            "MutatingWebhookConfiguration",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Secret",
            "Service",
            "ServiceAccount",
        ]
    )
    crds = {d["metadata"]["name"] for d in by_kind(documents, "CustomResourceDefinition")}
    assert crds == {
        CRD_NAME,
        ISSUER_CRD_NAME,
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    }

    deployment = one(documents, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["command"] == ["querywarden"]
    assert container["args"] == ["--log-level", "INFO", "operator"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["image"] == "ghcr.io/querywarden/querywarden:0.1.0"


def test_deployment_environment_is_a_valid_operator_config(
    helm: Helm, monkeypatch: pytest.MonkeyPatch
) -> None:
    documents = template(
        helm,
        "--set", "sidecar.otlpEndpoint=http://collector.observability:4318",
        "--set", "sidecar.nativeSidecars=false",
        "--set", "image.digest=sha256:" + "0" * 64,
    )  # fmt: skip
    container = one(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    config = operator_config(container, monkeypatch)
    assert config.namespace == NAMESPACE
    assert config.never_injected() == {NAMESPACE, "kube-system"}
    assert config.otlp_endpoint == "http://collector.observability:4318"
    assert config.native_sidecars is False
    assert config.sidecar_image == "ghcr.io/querywarden/querywarden:0.1.0@sha256:" + "0" * 64
    assert config.sidecar_resources.requests == {"cpu": "50m", "memory": "64Mi"}
    assert config.webhook_configuration == f"qw-querywarden-{NAMESPACE}"
    assert config.peering_name == f"qw-querywarden-{NAMESPACE}"
    assert str(config.webhook_cert_file) == "/etc/querywarden-operator/tls/tls.crt"
    assert config.liveness_endpoint == "http://0.0.0.0:8080/healthz"
    # The image the operator injects is the one the chart runs.
    assert container["image"] == config.sidecar_image


def test_injection_values_reach_the_operator(helm: Helm, monkeypatch: pytest.MonkeyPatch) -> None:
    documents = template(helm)
    container = one(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    config = operator_config(container, monkeypatch)
    assert config.enable_namespaces_by_default is True
    assert config.allow_pod_opt_out is True
    assert config.sidecar_log_level is None
    # Pods may choose another tag of the chart's own image, nothing else.
    assert config.sidecar_image_allow_list() == ("ghcr.io/querywarden/querywarden",)
    role = one(documents, "ClusterRole")
    assert {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]} in role["rules"]
    for item in container["env"]:
        monkeypatch.delenv(item["name"], raising=False)
    documents = template(
        helm,
        "--set", "injection.enableNamespacesByDefault=false",
        "--set", "injection.allowPodOptOut=false",
        "--set-json",
        'injection.allowedSidecarImages=["registry.corp/qw/","ghcr.io/querywarden/querywarden"]',
        "--set", "sidecar.logLevel=debug",
    )  # fmt: skip
    container = one(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    config = operator_config(container, monkeypatch)
    assert config.enable_namespaces_by_default is False
    assert config.allow_pod_opt_out is False
    assert config.sidecar_log_level == "DEBUG"
    assert config.sidecar_image_allow_list() == (
        "registry.corp/qw/",
        "ghcr.io/querywarden/querywarden",
    )
    for item in container["env"]:
        monkeypatch.delenv(item["name"], raising=False)
    container = one(
        template(helm, "--set-json", "injection.allowedSidecarImages=[]"),
        "Deployment",
    )["spec"]["template"]["spec"]["containers"][0]  # fmt: skip
    assert operator_config(container, monkeypatch).sidecar_image_allow_list() == ()


def operator_config(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> OperatorConfig:
    """The OperatorConfig the operator container reads from its environment."""
    for item in container["env"]:
        if "value" in item:
            monkeypatch.setenv(item["name"], item["value"])
        elif item["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}:
            monkeypatch.setenv(item["name"], NAMESPACE)
    return OperatorConfig()


def test_reviews_are_on_by_default_and_off_installs_nothing_for_them(
    helm: Helm, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default install can have statements approved: the QueryReview CRD, its two
    # webhook configurations, the sidecar RBAC and the operator's setting.
    defaults = template(helm, reviews=True)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in defaults}
    assert ("CustomResourceDefinition", "queryreviews.querywarden.io") in kinds
    assert ("MutatingWebhookConfiguration", f"qw-querywarden-{NAMESPACE}-reviews") in kinds
    assert ("ValidatingWebhookConfiguration", f"qw-querywarden-{NAMESPACE}-reviews") in kinds
    assert ("ClusterRole", "querywarden-approver") in kinds
    container = one(defaults, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert operator_config(container, monkeypatch).reviews is True
    # Off: none of it.
    off = template(helm, "--set", "reviews.enabled=false")
    off_kinds = {(d["kind"], d["metadata"]["name"]) for d in off}
    assert off_kinds < kinds
    assert not {k for k in off_kinds if k[0] == "CustomResourceDefinition"}
    assert not {k for k in off_kinds if "reviews" in k[1] or k[1] == "querywarden-approver"}
    monkeypatch.delenv("QUERYWARDEN_OPERATOR_REVIEWS", raising=False)
    monkeypatch.delenv("QUERYWARDEN_OPERATOR_SIDECAR_CLUSTER_ROLE", raising=False)
    container = one(off, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert operator_config(container, monkeypatch).reviews is False


def test_reviews_enabled_makes_the_operator_render_the_kubernetes_review_store(
    helm: Helm, monkeypatch: pytest.MonkeyPatch
) -> None:
    documents = template(helm, "--set", "reviews.enabled=true")
    container = one(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    config = operator_config(container, monkeypatch)
    assert config.reviews is True
    # The operator binds the chart's sidecar ClusterRole, and may bind that one only.
    sidecar_role = f"qw-querywarden-{NAMESPACE}-sidecar"
    assert config.sidecar_cluster_role == sidecar_role
    roles = {r["metadata"]["name"]: r for r in by_kind(documents, "ClusterRole")}
    assert sidecar_role in roles
    rules = roles[f"qw-querywarden-{NAMESPACE}"]["rules"]
    assert [r for r in rules if "bind" in r["verbs"]] == [
        {
            "apiGroups": ["rbac.authorization.k8s.io"],
            "resources": ["clusterroles"],
            "resourceNames": [sidecar_role],
            "verbs": ["bind"],
        }
    ]
    assert [r["verbs"] for r in rules if "rolebindings" in r["resources"]] == [
        ["get", "create", "patch"]
    ]
    # It deletes ended QueryReviews (after the policy's retention); nothing else.
    deletes = [(r["resources"], r["verbs"]) for r in rules if "delete" in r["verbs"]]
    assert deletes == [(["queryreviews"], ["delete"])]
    # bindSidecars off: the operator neither binds nor may.
    documents = template(
        helm, "--set", "reviews.enabled=true", "--set", "reviews.bindSidecars=false"
    )
    rules = one(
        [d for d in by_kind(documents, "ClusterRole") if d["metadata"]["name"].endswith(NAMESPACE)],
        "ClusterRole",
    )["rules"]
    assert not [r for r in rules if "bind" in r["verbs"] or "rolebindings" in r["resources"]]
    container = one(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    monkeypatch.delenv("QUERYWARDEN_OPERATOR_SIDECAR_CLUSTER_ROLE", raising=False)
    assert operator_config(container, monkeypatch).sidecar_cluster_role is None


def test_webhook_configuration_fails_closed_outside_excluded_namespaces(helm: Helm) -> None:
    documents = template(helm)
    configuration = one(documents, "MutatingWebhookConfiguration")
    (webhook,) = configuration["webhooks"]
    assert webhook["failurePolicy"] == "Fail"
    assert webhook["reinvocationPolicy"] == "IfNeeded"
    assert webhook["sideEffects"] == "NoneOnDryRun"
    assert webhook["rules"] == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["CREATE"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    assert webhook["namespaceSelector"] == {
        "matchExpressions": [
            {
                "key": "kubernetes.io/metadata.name",
                "operator": "NotIn",
                "values": [NAMESPACE, "kube-system"],
            }
        ]
    }
    assert webhook["objectSelector"] == {"matchLabels": {"querywarden.io/inject": "true"}}
    assert webhook["clientConfig"]["service"] == {
        "name": "qw-querywarden-webhook",
        "namespace": NAMESPACE,
        "path": "/inject",
        "port": 443,
    }


def test_helm_generated_certificate_matches_the_ca_bundle(helm: Helm) -> None:
    documents = template(helm)
    secret = one(documents, "Secret")
    assert secret["type"] == "kubernetes.io/tls"
    webhook = one(documents, "MutatingWebhookConfiguration")["webhooks"][0]
    ca_pem = base64.b64decode(webhook["clientConfig"]["caBundle"])
    assert base64.b64decode(secret["data"]["ca.crt"]) == ca_pem
    ca = x509.load_pem_x509_certificate(ca_pem)
    served = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    served.verify_directly_issued_by(ca)
    names = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"qw-querywarden-webhook.{NAMESPACE}.svc" in names.get_values_for_type(x509.DNSName)


def test_cert_manager_when_its_api_is_there(helm: Helm) -> None:
    documents = template(helm, "--api-versions", "cert-manager.io/v1")
    assert not by_kind(documents, "Secret")  # cert-manager writes it
    certificate = one(documents, "Certificate")
    assert certificate["spec"]["secretName"] == "qw-querywarden-webhook-tls"
    assert certificate["spec"]["issuerRef"]["name"] == "qw-querywarden-selfsigned"
    assert one(documents, "Issuer")["spec"] == {"selfSigned": {}}
    configuration = one(documents, "MutatingWebhookConfiguration")
    assert configuration["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": f"{NAMESPACE}/qw-querywarden-webhook"
    }
    assert "caBundle" not in configuration["webhooks"][0]["clientConfig"]
    # An issuer of the cluster's instead of the chart's own.
    documents = template(
        helm,
        "--set", "webhook.certificates=certManager",
        "--set", "webhook.certManagerIssuer.name=corp-ca",
        "--set", "webhook.certManagerIssuer.kind=ClusterIssuer",
    )  # fmt: skip
    assert not by_kind(documents, "Issuer")
    issuer_ref = one(documents, "Certificate")["spec"]["issuerRef"]
    assert (issuer_ref["name"], issuer_ref["kind"]) == ("corp-ca", "ClusterIssuer")


def test_rbac_is_least_privilege(helm: Helm) -> None:
    role = one(template(helm), "ClusterRole")
    grants = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    # Secrets are written, never read (a generated password, serving certificates of
    # gateways and sidecars); Services are only listed (a sidecar certificate's names);
    # the CA is read in the release's namespace only, by name.
    assert {verb for _, resource, verb in grants if resource == "secrets"} == {"create", "patch"}
    assert ("", "services", "list") in grants
    (ca_role,) = [
        r for r in by_kind(template(helm), "Role") if r["metadata"]["name"].endswith("-ca")
    ]
    assert ca_role["metadata"]["namespace"] == NAMESPACE
    assert {"resources": ["secrets"], "resourceNames": ["querywarden-ca"], "verbs": ["get"],
            "apiGroups": [""]} in ca_role["rules"]  # fmt: skip
    assert not any(
        verb in {"*", "delete", "deletecollection", "escalate", "bind"} for *_, verb in grants
    )
    assert not any(resource == "*" or group == "*" for group, resource, _ in grants)
    webhook_rules = [r for r in role["rules"] if "mutatingwebhookconfigurations" in r["resources"]]
    assert webhook_rules == [
        {
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["mutatingwebhookconfigurations"],
            "resourceNames": [f"qw-querywarden-{NAMESPACE}"],
            "verbs": ["get", "patch"],
        }
    ]
    # Without workload restarts, external targets and sidecar certificates, no access to
    # workloads or Secrets.
    documents = template(
        helm, "--set", "rbac.rolloutRestart=false", "--set", "rbac.externalTargets=false",
        "--set", "rbac.sidecarCertificates=false",
    )  # fmt: skip
    role = one(documents, "ClusterRole")
    assert not [r for r in role["rules"] if "apps" in r["apiGroups"]]
    assert not [r for r in role["rules"] if "secrets" in r["resources"]]
    assert not by_kind(documents, "Role")
    # Services: read and patched (never watched) for spec.target.services.switch, unless off.
    assert [r for r in role["rules"] if "services" in r["resources"]] == [
        {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "patch"]}
    ]
    role = one(
        template(
            helm, "--set", "rbac.externalTargets=false", "--set", "rbac.switchServices=false",
            "--set", "rbac.sidecarCertificates=false",
        ),
        "ClusterRole",
    )  # fmt: skip
    assert not [r for r in role["rules"] if "services" in r["resources"]]


def test_values_switch_parts_off(helm: Helm) -> None:
    documents = template(helm, "--set", "operator.replicas=1", "--set", "peering.enabled=false")
    assert not by_kind(documents, "PodDisruptionBudget")
    assert not by_kind(documents, "ClusterKopfPeering")
    env = one(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert "QUERYWARDEN_OPERATOR_PEERING_NAME" not in {e["name"] for e in env}
    notes = helm("install", "qw", str(CHART), "--dry-run=client", "--namespace", NAMESPACE)
    assert "kubectl -n DB_NAMESPACE apply -f databaseaccesspolicy.yaml" in notes.stdout
    assert "spec.target.services.switch: true" in notes.stdout
    assert "kubectl -n DB_NAMESPACE patch service SERVICE --type json" in notes.stdout


@pytest.fixture
def release_namespace(k8s: Cluster) -> Iterator[str]:
    namespace = create_namespace(k8s, "qw-helm")
    try:
        yield namespace
    finally:
        k8s.delete(f"/api/v1/namespaces/{namespace}")


def test_install_and_upgrade_keep_the_certificate(
    helm: Helm, k8s: Cluster, release_namespace: str
) -> None:
    namespace = release_namespace
    helm("install", "qw", str(CHART), "--namespace", namespace, "--wait=false")
    try:
        name = f"qw-querywarden-{namespace}"
        configuration_path = (
            f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}"
        )
        secret_path = f"/api/v1/namespaces/{namespace}/secrets/qw-querywarden-webhook-tls"
        bundle = k8s.get(configuration_path)["webhooks"][0]["clientConfig"]["caBundle"]
        secret = k8s.get(secret_path)["data"]
        assert secret["ca.crt"] == bundle
        # The chart's objects are in the API server, the CRDs among them.
        assert k8s.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}")
        assert k8s.get(f"/apis/kopf.dev/v1/clusterkopfpeerings/{name}")
        assert k8s.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/qw-querywarden")
        assert k8s.get(f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{name}")

        # An upgrade finds the Secret (helm lookup) and keeps the CA and certificate.
        helm("upgrade", "qw", str(CHART), "--namespace", namespace, "--wait=false",
             "--set", "operator.logLevel=DEBUG")  # fmt: skip
        assert k8s.get(configuration_path)["webhooks"][0]["clientConfig"]["caBundle"] == bundle
        assert k8s.get(secret_path)["data"] == secret
        deployment = k8s.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/qw-querywarden")
        assert deployment["spec"]["template"]["spec"]["containers"][0]["args"][1] == "DEBUG"
        releases = json.loads(helm("list", "--namespace", namespace, "--output", "json").stdout)
        assert [(r["name"], r["revision"]) for r in releases] == [("qw", "2")]
    finally:
        helm("uninstall", "qw", "--namespace", namespace, check=False)
