"""External targets on the real API server: the gateway as a Deployment the operator owns.

The chart is installed with helm and the operator runs in this process as the chart's
ServiceAccount (its RBAC is what the operator gets). No kubelet runs here, so the
Deployment's pods never start: the tests check what the operator wrote (Deployment,
Service, PodDisruptionBudget, ConfigMap, Secrets, owner references, no webhook entry),
and its conditions, first as the Deployment controller would leave them with no pod
available, then after the Deployment's status is written as it reports available
replicas. tests/k8s/node/test_node_external.py runs the same on a real node.
"""

from __future__ import annotations

import base64
import copy
import datetime
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from k8sharness.cluster import Cluster, KubeError
from k8sharness.helm import Helm
from k8sharness.qwoperator import (
    CHART,
    InstalledOperator,
    condition,
    create_namespace,
    installed_operator,
    policies,
    policy,
    renewed_certificate,
    wait_until,
)
from querywarden.config import GatewaySettings
from querywarden_operator.certificates import RENEW_BEFORE
from querywarden_operator.external import (
    ANNOTATION_CERTIFICATE,
    ca_configmap_name,
    gateway_name,
    serving_secret_name,
    upstream_secret_name,
)
from querywarden_operator.reconcile import InvalidPolicy, parse_spec

pytestmark = pytest.mark.slow

NAME = "billing"
EXAMPLE = CHART / "examples" / "external-database.yaml"


def external_spec(**external: Any) -> dict[str, Any]:
    return {
        "target": {
            "external": {
                "host": "billing.abc123.eu-west-1.rds.amazonaws.com",
                "port": 5432,
                "sslmode": "verify-full",
                "caSecret": "rds-ca",
                "bootstrap": {"superuserSecret": "billing-superuser"},
                **external,
            },
            "database": "billing",
            "clients": [{"namespaceSelector": {"matchLabels": {"team": "agents"}}}],
        },
        "sidecar": {"gatewayPort": 6432},
        "policy": {
            "rules": [
                {
                    "name": "agents-read",
                    "subjects": {"groups": ["ai-agents"]},
                    "allow": {"operations": ["select"], "tables": ["public.*", "sales.*"]},
                }
            ],
            "masking": {"columns": [{"table": "public.invoices", "column": "iban"}]},
        },
    }


@pytest.fixture(scope="module")
def installed(k8s: Cluster, helm: Helm, workdir: Path) -> Iterator[InstalledOperator]:
    with installed_operator(k8s, helm, workdir / "operator-external") as running:
        yield running


@pytest.fixture
def shop(k8s: Cluster, installed: InstalledOperator) -> Iterator[str]:
    name = create_namespace(k8s, "qw-ext")
    try:
        yield name
    finally:
        k8s.delete(f"/api/v1/namespaces/{name}")
        assert installed.operator.alive, f"the operator died: {installed.operator.error!r}"


def _get(k8s: Cluster, path: str) -> Any | None:
    try:
        return k8s.get(path)
    except KubeError as exc:
        if exc.status == 404:
            return None
        raise


def _owned_by(obj: dict[str, Any], stored_policy: dict[str, Any]) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(
        r["uid"] == stored_policy["metadata"]["uid"] and r["kind"] == "DatabaseAccessPolicy"
        and r.get("controller") is True
        for r in refs
    )  # fmt: skip


def test_an_external_target_gets_a_gateway_deployment_service_pdb_and_certificate(
    k8s: Cluster, installed: InstalledOperator, shop: str
) -> None:
    created = k8s.create(policies(shop), policy(NAME, external_spec(replicas=3)))
    gateway = gateway_name(NAME)
    apps = f"/apis/apps/v1/namespaces/{shop}/deployments/{gateway}"
    deployment = wait_until(lambda: _get(k8s, apps), what="the gateway Deployment")
    service = k8s.get(f"/api/v1/namespaces/{shop}/services/{gateway}")
    pdb = k8s.get(f"/apis/policy/v1/namespaces/{shop}/poddisruptionbudgets/{gateway}")
    account = k8s.get(f"/api/v1/namespaces/{shop}/serviceaccounts/{gateway}")
    configmap = k8s.get(f"/api/v1/namespaces/{shop}/configmaps/{NAME}-querywarden")
    tls = wait_until(
        lambda: _get(k8s, f"/api/v1/namespaces/{shop}/secrets/{serving_secret_name(NAME)}"),
        what="the serving certificate",
    )
    upstream = k8s.get(f"/api/v1/namespaces/{shop}/secrets/{upstream_secret_name(NAME)}")
    ca_map = k8s.get(f"/api/v1/namespaces/{shop}/configmaps/{ca_configmap_name(NAME)}")
    for obj in (deployment, service, pdb, account, configmap, tls, upstream, ca_map):
        assert _owned_by(obj, created), obj["metadata"]

    # The Deployment: replicas from the spec, the same container as a sidecar.
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "querywarden" and "restartPolicy" not in container
    assert container["args"] == ["serve", "--config", "/etc/querywarden/gateway.yaml"]
    assert pod["serviceAccountName"] == gateway
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["querywarden-policy"]["configMap"]["name"] == f"{NAME}-querywarden"
    assert volumes["querywarden-tls"]["secret"]["secretName"] == serving_secret_name(NAME)
    assert volumes["querywarden-upstream-ca"]["secret"]["secretName"] == "rds-ca"
    # The superuser Secret reaches the bootstrap init container alone.
    superuser = volumes["querywarden-bootstrap-superuser"]["secret"]
    assert superuser["secretName"] == "billing-superuser"
    (init,) = pod["initContainers"]
    assert init["name"] == "bootstrap"
    assert "querywarden-bootstrap-superuser" in {m["name"] for m in init["volumeMounts"]}
    assert "querywarden-bootstrap-superuser" not in {m["name"] for m in container["volumeMounts"]}
    settings_json = next(e["value"] for e in init["env"] if e["name"] == "QUERYWARDEN_BOOTSTRAP")
    assert '"schemas": ["public", "sales"]' in settings_json
    env = {e["name"]: e for e in container["env"]}
    assert env["QUERYWARDEN_UPSTREAM__USER"]["valueFrom"]["secretKeyRef"] == {
        "name": upstream_secret_name(NAME), "key": "username",
    }  # fmt: skip
    template_annotations = spec["template"]["metadata"]["annotations"]
    assert ANNOTATION_CERTIFICATE in template_annotations

    # The gateway's settings: upstream is the external host, verified with its CA.
    settings = yaml.safe_load(configmap["data"]["gateway.yaml"])
    GatewaySettings.model_validate(settings)
    assert settings["upstream"]["host"] == "billing.abc123.eu-west-1.rds.amazonaws.com"
    assert settings["upstream"]["sslmode"] == "verify-full"
    assert settings["upstream"]["sslrootcert"] == "/etc/querywarden/upstream-ca/ca.crt"
    assert settings["tls"]["certFile"] == "/etc/querywarden/tls/tls.crt"

    # Service and PodDisruptionBudget select the gateway pods.
    labels = spec["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == labels == spec["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == 6432
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    assert pdb["spec"]["maxUnavailable"] == 1

    # The generated password: a Secret the operator made, with the role's name.
    assert base64.b64decode(upstream["data"]["username"]) == b"querywarden_gateway"
    assert len(base64.b64decode(upstream["data"]["password"])) >= 24

    # The certificate: the Service's names, issued by the operator's CA.
    cert = x509.load_pem_x509_certificate(base64.b64decode(tls["data"]["tls.crt"]))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"{gateway}.{shop}.svc.cluster.local" in names.get_values_for_type(x509.DNSName)
    ca_secret = k8s.get(f"/api/v1/namespaces/{installed.namespace}/secrets/querywarden-ca")
    ca_pem = base64.b64decode(ca_secret["data"]["tls.crt"])
    assert base64.b64decode(tls["data"]["ca.crt"]) == ca_pem
    assert ca_map["data"]["ca.crt"] == ca_pem.decode()
    ca = x509.load_pem_x509_certificate(ca_pem)
    cert.verify_directly_issued_by(ca)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime > RENEW_BEFORE + datetime.timedelta(days=30)

    # No pod is injected for an external target: no webhook entry.
    webhooks = k8s.get(
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/"
        + installed.webhook_configuration
    )
    assert not any(shop in w["name"] for w in webhooks.get("webhooks") or [])

    # Status: rendered, but not rolled out (no controller manager runs here).
    path = f"{policies(shop)}/{NAME}"

    def reported(type_: str, reason: str) -> dict[str, Any] | None:
        found = condition(k8s.get(path), type_)
        return found if found is not None and found["reason"] == reason else None

    wait_until(lambda: reported("Available", "DeploymentPending"), what="DeploymentPending")
    stored = k8s.get(path)
    assert condition(stored, "Rendered")["status"] == "True"  # type: ignore[index]
    ready = condition(stored, "Ready")
    assert ready is not None and ready["status"] == "False"
    assert ready["reason"] == "DeploymentPending"
    assert stored["status"]["gatewayService"] == f"{gateway}.{shop}.svc:6432"
    assert stored["status"]["certificateSecret"] == serving_secret_name(NAME)

    # What the Deployment controller reports: no pod available yet, one of three, all.
    def report(available: int) -> None:
        current = k8s.get(apps)
        k8s.request(
            "PATCH", f"{apps}/status",
            {"status": {
                "observedGeneration": current["metadata"]["generation"], "replicas": 3,
                "updatedReplicas": 3, "readyReplicas": available,
                "availableReplicas": available,
            }},
            content_type="application/merge-patch+json",
        )  # fmt: skip

    report(0)
    wait_until(lambda: reported("Ready", "NoReplicasAvailable"), what="NoReplicasAvailable")
    report(1)
    found = wait_until(lambda: reported("Ready", "ReplicasUnavailable"), what="1 of 3")
    assert "1 of 3" in found["message"]
    report(3)
    wait_until(lambda: reported("Ready", "Ready"), what="Ready once the replicas are available")
    assert k8s.get(path)["status"]["availableReplicas"] == 3

    # The password Secret is made once: a new reconcile keeps it.
    k8s.request(
        "PATCH", path, {"spec": {"target": {"external": {"replicas": 2}}}},
        content_type="application/merge-patch+json",
    )  # fmt: skip
    wait_until(lambda: k8s.get(apps)["spec"]["replicas"] == 2 or None, what="replicas: 2")
    again = k8s.get(f"/api/v1/namespaces/{shop}/secrets/{upstream_secret_name(NAME)}")
    assert again["data"] == upstream["data"]
    # The certificate is not issued again while it is far from expiry.
    tls_again = k8s.get(f"/api/v1/namespaces/{shop}/secrets/{serving_secret_name(NAME)}")
    assert tls_again["data"]["tls.crt"] == tls["data"]["tls.crt"]


def test_a_certificate_close_to_expiry_is_issued_again(
    k8s: Cluster, installed: InstalledOperator, shop: str
) -> None:
    spec = external_spec()
    del spec["target"]["external"]["bootstrap"]
    spec["target"]["credentials"] = {"secretName": "billing-gateway"}
    k8s.create(policies(shop), policy(NAME, spec))
    secret_path = f"/api/v1/namespaces/{shop}/secrets/{serving_secret_name(NAME)}"
    first = wait_until(lambda: _get(k8s, secret_path), what="the first certificate")
    path = f"{policies(shop)}/{NAME}"
    wait_until(lambda: k8s.get(path).get("status", {}).get("certificateNotAfter"), what="status")
    # As if it had been issued long ago: the resync finds it inside the renewal window.
    renewed = renewed_certificate(k8s, path, secret_path)
    assert renewed["data"]["tls.crt"] != first["data"]["tls.crt"]
    not_after = x509.load_pem_x509_certificate(
        base64.b64decode(renewed["data"]["tls.crt"])
    ).not_valid_after_utc
    assert not_after - datetime.datetime.now(datetime.UTC) > RENEW_BEFORE
    # The new certificate rolls the gateway pods (it is read at start).
    deployment = k8s.get(f"/apis/apps/v1/namespaces/{shop}/deployments/{gateway_name(NAME)}")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    wait_until(
        lambda: k8s.get(f"/apis/apps/v1/namespaces/{shop}/deployments/{gateway_name(NAME)}")[
            "spec"]["template"]["metadata"]["annotations"][ANNOTATION_CERTIFICATE]
        == not_after.isoformat() or None,
        what="the Deployment rolled for the new certificate",
    )  # fmt: skip
    assert annotations is not None
    # Without bootstrap, the user's credentials Secret is used and none is generated.
    assert _get(k8s, f"/api/v1/namespaces/{shop}/secrets/{upstream_secret_name(NAME)}") is None


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(spec: dict[str, Any]) -> None:
        node = spec
        *parents, last = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value

    return mutate


REFUSED: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("both targets", _set("target.podSelector", {"matchLabels": {"app": "db"}}),
     "exactly one of podSelector"),
    ("no target", _set("target.external", None), "exactly one of podSelector"),
    ("no credentials", _set("target.external.bootstrap", None), "credentials is required"),
    ("bootstrap without database", _set("target.database", None), "needs target.database"),
    ("no replicas", _set("target.external.replicas", 0), "should be greater than or equal"),
    ("a sidecar's bootstrap", _set("target.bootstrap", {"superuserSecret": "su"}),
     "bootstrap is for podSelector targets"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "message"), [(m, msg) for _, m, msg in REFUSED], ids=[i for i, _, _ in REFUSED]
)
def test_api_server_and_pydantic_refuse_the_same_external_specs(
    k8s: Cluster, installed: InstalledOperator, namespace: str,
    mutate: Callable[[dict[str, Any]], None], message: str,
) -> None:  # fmt: skip
    spec = copy.deepcopy(external_spec())
    mutate(spec)
    with pytest.raises(KubeError) as refused:
        k8s.create(policies(namespace), policy("bad", spec))
    assert refused.value.status == 422
    assert message in refused.value.message
    with pytest.raises(InvalidPolicy):
        parse_spec(spec)


def test_the_external_example_is_one_apply(k8s: Cluster, installed: InstalledOperator) -> None:
    """charts/querywarden/examples/external-database.yaml: one kubectl apply, rendered."""
    documents = list(yaml.safe_load_all(EXAMPLE.read_text()))
    assert documents[0]["kind"] == "Namespace"
    (example,) = [d for d in documents if d["kind"] == "DatabaseAccessPolicy"]
    namespace = example["metadata"]["namespace"]
    parse_spec(example["spec"])
    try:
        k8s.kubectl("apply", "-f", str(EXAMPLE))
        path = f"{policies(namespace)}/{example['metadata']['name']}"
        wait_until(
            lambda: (condition(k8s.get(path), "Rendered") or {}).get("status") == "True" or None,
            what="the example policy rendered",
        )
        gateway = gateway_name(example["metadata"]["name"])
        deployment = k8s.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/{gateway}")
        assert deployment["spec"]["replicas"] == 2
        # The agent mounts the CA ConfigMap the operator made.
        agent = k8s.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/coder-agent")
        volumes = {v["name"]: v for v in agent["spec"]["template"]["spec"]["volumes"]}
        ca_map = ca_configmap_name(example["metadata"]["name"])
        assert volumes["gateway-ca"]["configMap"]["name"] == ca_map
        assert _get(k8s, f"/api/v1/namespaces/{namespace}/configmaps/{ca_map}") is not None
        # The superuser's password is in its own Secret and nowhere the operator wrote.
        password = next(d for d in documents if d["kind"] == "Secret")["stringData"]["password"]
        for kind in ("configmaps", "secrets"):
            items = k8s.get(f"/api/v1/namespaces/{namespace}/{kind}")["items"]
            holders = [
                i["metadata"]["name"] for i in items
                if password in yaml.safe_dump(i) or any(
                    password.encode() in base64.b64decode(v)
                    for v in (i.get("data") or {}).values() if kind == "secrets"
                )
            ]  # fmt: skip
            assert holders == ([] if kind == "configmaps" else ["billing-db-superuser"])
        assert password not in yaml.safe_dump(deployment)
    finally:
        k8s.delete(f"/api/v1/namespaces/{namespace}")


# --- the pure functions, without a cluster ----------------------------------------------


def test_without_bootstrap_or_ca_the_deployment_uses_the_users_secrets() -> None:
    from querywarden_operator.config import OperatorConfig
    from querywarden_operator.external import issues_certificate, render_deployment, resolved_spec
    from querywarden_operator.render import PolicyRef, effective_sidecar, gateway_settings

    raw = external_spec()
    del raw["target"]["external"]["bootstrap"], raw["target"]["external"]["caSecret"]
    raw["target"]["external"]["sslmode"] = "require"
    raw["target"]["credentials"] = {"secretName": "billing-gateway", "usernameKey": "user"}
    raw["target"]["tlsSecretName"] = "my-cert"
    spec = parse_spec(raw)
    assert not issues_certificate(spec)
    sidecar = effective_sidecar(
        spec.sidecar, OperatorConfig(sidecar_image="registry.invalid/qw:t"), native_supported=True
    )
    ref = PolicyRef(name=NAME, namespace="shop", uid="u-1", generation=1)
    resolved = resolved_spec(NAME, spec)
    assert resolved.target.tls_secret_name == "my-cert"
    deployment = render_deployment(ref, resolved, sidecar)
    pod = deployment["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["QUERYWARDEN_UPSTREAM__USER"]["valueFrom"]["secretKeyRef"] == {
        "name": "billing-gateway", "key": "user",
    }  # fmt: skip
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["querywarden-tls"]["secret"]["secretName"] == "my-cert"
    assert "querywarden-upstream-ca" not in volumes
    upstream = gateway_settings(resolved, sidecar)["upstream"]
    assert (upstream["host"], upstream["sslmode"]) == (
        "billing.abc123.eu-west-1.rds.amazonaws.com", "require",
    )  # fmt: skip
    assert "sslrootcert" not in upstream
    # A pod-selector policy keeps its localhost upstream.
    sidecar_spec = parse_spec(
        {"target": {"podSelector": {"matchLabels": {"app": "db"}},
                    "credentials": {"secretName": "s"}},
         "sidecar": {"plaintext": "always"}}
    )  # fmt: skip
    assert gateway_settings(sidecar_spec, sidecar)["upstream"]["host"] == "127.0.0.1"


def test_renewal_window_and_ready_for_an_external_target() -> None:
    from querywarden_operator.certificates import (
        CERTIFICATE_LIFETIME,
        issue_serving,
        needs_renewal,
        new_ca,
    )
    from querywarden_operator.status import (
        AVAILABLE,
        INJECTED_CONDITION,
        available_condition,
        ready_condition,
    )
    from querywarden_operator.status import (
        condition as make_condition,
    )

    at = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    assert needs_renewal(None, at=at)
    assert needs_renewal(at + RENEW_BEFORE - datetime.timedelta(seconds=1), at=at)
    assert not needs_renewal(at + RENEW_BEFORE + datetime.timedelta(seconds=1), at=at)
    ca = new_ca(at=at)
    pair = issue_serving(ca, ["gw.shop.svc.cluster.local", "gw"], at=at)
    assert pair.not_after == at + CERTIFICATE_LIFETIME
    # Ready follows Available (not Injected) once the target is external.
    rendered = make_condition("Rendered", True, "Rendered", "", generation=1, at=at)
    stale = make_condition(INJECTED_CONDITION, True, "AllInjected", "", generation=1, at=at)
    available = available_condition(
        {"metadata": {"name": "gw", "generation": 2}, "spec": {"replicas": 2},
         "status": {"observedGeneration": 2, "availableReplicas": 2, "updatedReplicas": 2}},
        generation=1, at=at,
    )  # fmt: skip
    assert (available.type, available.status) == (AVAILABLE, "True")
    ready = ready_condition([rendered, stale, available], generation=1, at=at)
    assert ready.status == "True" and "Deployment" in ready.message
    down = available_condition(
        {"metadata": {"name": "gw", "generation": 2}, "spec": {"replicas": 2},
         "status": {"observedGeneration": 2}},
        generation=1, at=at,
    )  # fmt: skip
    assert ready_condition([rendered, stale, down], generation=1, at=at).reason == (
        "NoReplicasAvailable"
    )


def test_without_the_charts_external_rbac_the_policy_says_forbidden(
    k8s: Cluster, helm: Helm, workdir: Path
) -> None:
    with installed_operator(
        k8s, helm, workdir / "operator-external-norbac",
        extra_values={"rbac.externalTargets": "false"},
    ) as running:  # fmt: skip
        namespace = create_namespace(k8s, "qw-ext-norbac")
        try:
            k8s.create(policies(namespace), policy(NAME, external_spec()))
            path = f"{policies(namespace)}/{NAME}"
            found = wait_until(
                lambda: (c := condition(k8s.get(path), "Rendered")) and c["reason"] == "Forbidden"
                and c,
                what="Rendered=False, Forbidden",
            )  # fmt: skip
            assert found["status"] == "False"
            assert "rbac.externalTargets=true" in found["message"]
            ready = condition(k8s.get(path), "Ready")
            assert ready is not None and ready["reason"] == "Forbidden"
            assert running.operator.alive
        finally:
            k8s.delete(f"/api/v1/namespaces/{namespace}")
