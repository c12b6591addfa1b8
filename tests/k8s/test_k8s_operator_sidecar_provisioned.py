"""What the operator provides to sidecar policies, on the real API server.

Without ``tlsSecretName``: a certificate from the operator's CA. With ``bootstrap``: the
gateway's role, made by a container of the database pod. The chart is installed with
helm and the operator runs in this process as the chart's ServiceAccount, serving the
webhook (no kubelet: pods are stored, never started). The tests check the certificate
the operator issues for the Services that select the database pods, the CA ConfigMap,
what the webhook mounts in the sidecar, renewal on resync (near expiry, and when the
Services change), and the bootstrap container the webhook adds.
tests/test_tls_reload.py shows the gateway serving a renewed certificate without a
restart; tests/test_operator_bootstrap.py the bootstrap waiting for the database.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from k8sharness.cluster import Cluster, KubeError
from k8sharness.helm import Helm
from k8sharness.qwoperator import (
    InstalledOperator,
    condition,
    create_secret,
    installed_operator,
    pod,
    policies,
    policy,
    renewed_certificate,
    wait_until,
)
from querywarden_operator import sidecar_bootstrap, sidecar_tls
from querywarden_operator.certificates import RENEW_BEFORE
from querywarden_operator.config import OperatorConfig
from querywarden_operator.external import (
    ca_configmap_name,
    serving_secret_name,
    upstream_secret_name,
)
from querywarden_operator.reconcile import InvalidPolicy, parse_spec, resolved_sidecar_spec
from querywarden_operator.render import effective_sidecar, pod_patch

pytestmark = pytest.mark.slow

NAME = "orders"
LABELS = {"app": "orders-db"}


@pytest.fixture(scope="module")
def installed(k8s: Cluster, helm: Helm, workdir: Path) -> Iterator[InstalledOperator]:
    with installed_operator(k8s, helm, workdir / "operator-sidecar-provisioned") as running:
        yield running


@pytest.fixture(autouse=True)
def operator_alive(installed: InstalledOperator) -> Iterator[None]:
    yield
    assert installed.operator.alive, f"the operator died: {installed.operator.error!r}"


def sidecar_spec() -> dict[str, Any]:
    return {
        "target": {
            "podSelector": {"matchLabels": dict(LABELS)},
            "databasePort": 5432,
            "database": "orders",
            "credentials": {"secretName": "orders-gateway"},
        },
        "sidecar": {"gatewayPort": 6432},
        "policy": {
            "rules": [
                {
                    "name": "agents-read",
                    "subjects": {"groups": ["ai-agents"]},
                    "allow": {"operations": ["select"], "tables": ["public.*"]},
                }
            ]
        },
    }


def service(name: str, selector: dict[str, str] | None, *, headless: bool = False) -> Any:
    spec: dict[str, Any] = {"ports": [{"name": "postgres", "port": 6432}]}
    if selector is not None:
        spec["selector"] = selector
    if headless:
        spec["clusterIP"] = "None"
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}


def _get(k8s: Cluster, path: str) -> Any | None:
    try:
        return k8s.get(path)
    except KubeError as exc:
        if exc.status == 404:
            return None
        raise


def _names(secret: dict[str, Any]) -> list[str]:
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.DNSName))


def test_a_sidecar_without_a_tls_secret_gets_one_from_the_operators_ca(
    k8s: Cluster, installed: InstalledOperator, namespace: str
) -> None:
    services = f"/api/v1/namespaces/{namespace}/services"
    k8s.create(services, service("orders-db", {"app": "orders-db"}))
    k8s.create(services, service("orders-db-hl", {"app": "orders-db"}, headless=True))
    k8s.create(services, service("web", {"app": "web"}))  # selects other pods
    k8s.create(services, service("by-hand", None))  # no selector: endpoints by hand
    create_secret(k8s, namespace, "orders-gateway", {"username": "gw", "password": "pw"})
    created = k8s.create(policies(namespace), policy(NAME, sidecar_spec()))

    secret_path = f"/api/v1/namespaces/{namespace}/secrets/{serving_secret_name(NAME)}"
    tls = wait_until(lambda: _get(k8s, secret_path), what="the sidecar's certificate")
    assert tls["type"] == "kubernetes.io/tls"
    assert tls["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    assert _names(tls) == [
        f"orders-db.{namespace}.svc.cluster.local",
        f"orders-db.{namespace}.svc",
        f"orders-db.{namespace}",
        "orders-db",
        f"orders-db-hl.{namespace}.svc.cluster.local",
        f"orders-db-hl.{namespace}.svc",
        f"orders-db-hl.{namespace}",
        "orders-db-hl",
        # The headless Service's pods (a StatefulSet's orders-db-0.orders-db-hl...).
        f"*.orders-db-hl.{namespace}.svc.cluster.local",
        f"*.orders-db-hl.{namespace}.svc",
    ]
    # Issued by the operator's CA, which clients get from a ConfigMap.
    ca_secret = k8s.get(f"/api/v1/namespaces/{installed.namespace}/secrets/querywarden-ca")
    ca_pem = base64.b64decode(ca_secret["data"]["tls.crt"])
    cert = x509.load_pem_x509_certificate(base64.b64decode(tls["data"]["tls.crt"]))
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    ca_map = k8s.get(f"/api/v1/namespaces/{namespace}/configmaps/{ca_configmap_name(NAME)}")
    assert ca_map["data"]["ca.crt"] == ca_pem.decode()

    # The gateway serves TLS with it, and may require it.
    configmap = k8s.get(f"/api/v1/namespaces/{namespace}/configmaps/{NAME}-querywarden")
    settings = yaml.safe_load(configmap["data"]["gateway.yaml"])
    assert settings["tls"] == {
        "certFile": "/etc/querywarden/tls/tls.crt",
        "keyFile": "/etc/querywarden/tls/tls.key",
    }
    path = f"{policies(namespace)}/{NAME}"

    def status_of() -> dict[str, Any] | None:
        status = k8s.get(path).get("status") or {}
        return status if status.get("certificateNotAfter") else None

    status = wait_until(status_of, what="the certificate in the status")
    assert status["certificateSecret"] == serving_secret_name(NAME)
    assert status["certificateNames"] == _names(tls)
    assert condition(k8s.get(path), "Rendered")["status"] == "True"  # type: ignore[index]

    # The webhook mounts it in the sidecar (a volume of the Secret, updated in place by
    # the kubelet on renewal: no subPath).
    installed.wait_for_webhook(namespace, pod("probe", LABELS))
    injected = k8s.create(f"/api/v1/namespaces/{namespace}/pods", pod("orders-db-0", LABELS))
    pod_spec = injected["spec"]
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    assert volumes["querywarden-tls"]["secret"]["secretName"] == serving_secret_name(NAME)
    sidecar = next(
        c for c in [*(pod_spec.get("initContainers") or []), *pod_spec["containers"]]
        if c["name"] == "querywarden"
    )  # fmt: skip
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "querywarden-tls")
    assert mount["mountPath"] == "/etc/querywarden/tls" and "subPath" not in mount

    # Near expiry, the resync issues a new certificate; the pod is not rolled (the
    # gateway reloads the files).
    renewed = renewed_certificate(k8s, path, secret_path)
    assert renewed["data"]["tls.crt"] != tls["data"]["tls.crt"]
    not_after = x509.load_pem_x509_certificate(
        base64.b64decode(renewed["data"]["tls.crt"])
    ).not_valid_after_utc
    assert not_after - datetime.datetime.now(datetime.UTC) > RENEW_BEFORE
    annotations = k8s.get(f"/api/v1/namespaces/{namespace}/pods/orders-db-0")["metadata"][
        "annotations"
    ]
    assert annotations == injected["metadata"]["annotations"]

    # A new Service for the pods: the next resync issues a certificate with its names.
    k8s.create(services, service("orders-primary", {"app": "orders-db"}))
    again = wait_until(
        lambda: (s := k8s.get(secret_path)) and "orders-primary" in _names(s) and s,
        what="a certificate for the new Service",
    )
    assert f"orders-primary.{namespace}.svc" in _names(again)


def test_without_a_service_the_certificate_is_for_localhost(
    k8s: Cluster, installed: InstalledOperator, namespace: str
) -> None:
    create_secret(k8s, namespace, "orders-gateway", {"username": "gw", "password": "pw"})
    k8s.create(policies(namespace), policy(NAME, sidecar_spec()))
    secret_path = f"/api/v1/namespaces/{namespace}/secrets/{serving_secret_name(NAME)}"
    tls = wait_until(lambda: _get(k8s, secret_path), what="the sidecar's certificate")
    assert _names(tls) == ["localhost"]


def test_a_named_tls_secret_is_used_and_nothing_is_issued(
    k8s: Cluster, installed: InstalledOperator, namespace: str
) -> None:
    create_secret(k8s, namespace, "orders-gateway", {"username": "gw", "password": "pw"})
    spec = sidecar_spec()
    spec["target"]["tlsSecretName"] = "my-cert"
    k8s.create(policies(namespace), policy(NAME, spec))
    path = f"{policies(namespace)}/{NAME}"
    wait_until(lambda: condition(k8s.get(path), "Rendered"), what="the policy rendered")
    assert "certificateSecret" not in (k8s.get(path).get("status") or {})
    assert _get(k8s, f"/api/v1/namespaces/{namespace}/secrets/{serving_secret_name(NAME)}") is None


def test_a_sidecar_bootstrap_adds_a_container_that_waits_for_the_database(
    k8s: Cluster, installed: InstalledOperator, namespace: str
) -> None:
    spec = sidecar_spec()
    del spec["target"]["credentials"]
    spec["target"]["bootstrap"] = {"superuserSecret": "orders-superuser"}
    created = k8s.create(policies(namespace), policy(NAME, spec))
    upstream_path = f"/api/v1/namespaces/{namespace}/secrets/{upstream_secret_name(NAME)}"
    upstream = wait_until(lambda: _get(k8s, upstream_path), what="the generated password")
    assert upstream["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    assert base64.b64decode(upstream["data"]["username"]) == b"querywarden_gateway"

    installed.wait_for_webhook(namespace, pod("probe", LABELS))
    injected = k8s.create(f"/api/v1/namespaces/{namespace}/pods", pod("orders-db-0", LABELS))
    pod_spec = injected["spec"]
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    assert volumes["querywarden-bootstrap-superuser"]["secret"]["secretName"] == (
        "orders-superuser"
    )
    # Native sidecars (this API server has them): right after the gateway, without a
    # startup probe, so the database container starts while it waits for it.
    gateway, bootstrap, *_ = pod_spec["initContainers"]
    assert gateway["name"] == "querywarden" and bootstrap["name"] == "querywarden-bootstrap"
    assert bootstrap["restartPolicy"] == "Always"
    assert "startupProbe" not in bootstrap
    assert bootstrap["readinessProbe"]["exec"]["command"][-1] == "--check"
    settings = yaml.safe_load(
        next(e["value"] for e in bootstrap["env"] if e["name"] == "QUERYWARDEN_BOOTSTRAP")
    )
    assert settings["host"] == "127.0.0.1" and settings["port"] == 5432
    assert settings["database"] == "orders" and settings["stay"] is True
    # The superuser Secret reaches the bootstrap container alone.
    assert "querywarden-bootstrap-superuser" in {m["name"] for m in bootstrap["volumeMounts"]}
    assert "querywarden-bootstrap-superuser" not in {m["name"] for m in gateway["volumeMounts"]}
    # The gateway logs in as the role, with the generated password.
    env = {e["name"]: e for e in gateway["env"]}
    assert env["QUERYWARDEN_UPSTREAM__USER"]["valueFrom"]["secretKeyRef"] == {
        "name": upstream_secret_name(NAME), "key": "username",
    }  # fmt: skip
    assert [c["name"] for c in pod_spec["containers"]] == ["postgres"]
    path = f"{policies(namespace)}/{NAME}"
    wait_until(
        lambda: (condition(k8s.get(path), "Rendered") or {}).get("status") == "True" or None,
        what="the policy rendered",
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"database": None}, "needs target.database"),
        ({"credentials": None, "bootstrap": None}, "credentials is required"),
    ],
    ids=["bootstrap-without-database", "neither-credentials-nor-bootstrap"],
)
def test_api_server_and_pydantic_refuse_the_same_sidecar_bootstraps(
    k8s: Cluster,
    installed: InstalledOperator,
    namespace: str,
    change: dict[str, Any],
    message: str,
) -> None:
    spec = sidecar_spec()
    spec["target"]["bootstrap"] = {"superuserSecret": "orders-superuser"}
    for key in change:
        spec["target"].pop(key, None)
    with pytest.raises(KubeError) as refused:
        k8s.create(policies(namespace), policy("bad", spec))
    assert refused.value.status == 422
    assert message in refused.value.message
    with pytest.raises(InvalidPolicy):
        parse_spec(spec)


# --- pure: the names, and where the bootstrap container goes --------------------------


def test_only_services_whose_selector_selects_the_pods_name_the_certificate() -> None:
    services = [
        service("b-db", {"app": "orders-db"}),
        service("a-primary", {"app": "orders-db", "role": "primary"}),
        service("other", {"app": "orders-db", "role": "replica"}),
        service("manual", None),
    ]
    pods = [{"app": "orders-db", "role": "primary", "pod-template-hash": "x"}]
    found = sidecar_tls.selecting_services(services, pods)
    assert [s["metadata"]["name"] for s in found] == ["b-db", "a-primary"]
    names = sidecar_tls.dns_names(found, "shop", "corp.example")
    assert names[:4] == [
        "a-primary.shop.svc.corp.example", "a-primary.shop.svc", "a-primary.shop", "a-primary",
    ]  # fmt: skip
    assert sidecar_tls.dns_names([], "shop", "cluster.local") == ["localhost"]


def test_without_native_sidecars_the_bootstrap_runs_next_to_the_database() -> None:
    raw = sidecar_spec()
    del raw["target"]["credentials"]
    raw["target"]["bootstrap"] = {"superuserSecret": "orders-superuser", "role": "gw_role"}
    spec = resolved_sidecar_spec(NAME, parse_spec(raw))
    assert spec.target.credentials is not None
    assert spec.target.credentials.secret_name == upstream_secret_name(NAME)
    assert spec.target.tls_secret_name == serving_secret_name(NAME)
    sidecar = effective_sidecar(spec.sidecar, OperatorConfig(), native_supported=False)
    patch = pod_patch(pod("db-0", LABELS), NAME, spec, sidecar)
    assert patch is not None
    patch = sidecar_bootstrap.add_to_patch(patch, spec, sidecar)
    names = [c["name"] for c in patch["spec"]["containers"]]
    assert names == ["postgres", "querywarden", "querywarden-bootstrap"]
    bootstrap = patch["spec"]["containers"][-1]
    assert "restartPolicy" not in bootstrap and "startupProbe" not in bootstrap
    assert '"role": "gw_role"' in bootstrap["env"][0]["value"]
    # A policy without bootstrap: the patch is left as it is.
    plain = parse_spec(sidecar_spec())
    untouched = pod_patch(pod("db-1", LABELS), NAME, plain, sidecar)
    assert untouched is not None
    assert sidecar_bootstrap.add_to_patch(untouched, plain, sidecar) == untouched
