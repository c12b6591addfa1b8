"""The harness itself: pinned versions, a public OIDC issuer, RBAC in force."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

import pytest

from k8sharness.cluster import JWKS_MEDIA_TYPE, Cluster
from k8sharness.tools import tool, tools_dir, versions

#: Loopback requests must never go through a proxy the environment may name.
OPENER_HANDLERS: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]


def fetch(
    k8s: Cluster, path: str, token: str | None = None, *, accept: str = "application/json"
) -> tuple[int, Any]:
    """GET ``path`` as an anonymous client (or with a bearer token): (status, JSON body)."""
    context = ssl.create_default_context(cafile=str(k8s.ca_file) if k8s.ca_file else None)
    opener = urllib.request.build_opener(
        *OPENER_HANDLERS, urllib.request.HTTPSHandler(context=context)
    )
    request = urllib.request.Request(k8s.server + path, headers={"Accept": accept})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read() or b"null")


def test_api_server_and_kubectl_are_the_pinned_release(k8s: Cluster) -> None:
    pinned = versions()["KUBERNETES_VERSION"]
    server = k8s.get("/version")
    if k8s.local:
        assert server["gitVersion"] == pinned
        assert (server["major"], server["minor"]) == ("1", pinned.split(".")[1])
    else:
        # Native sidecars (restartPolicy on init containers) need 1.33 or later.
        assert (int(server["major"]), int(server["minor"].rstrip("+"))) >= (1, 33)

    both = json.loads(k8s.kubectl("version", "--output=json").stdout)
    assert both["serverVersion"]["gitVersion"] == server["gitVersion"]
    stamp = (tools_dir() / "stamps" / "kubectl").read_text()
    if stamp.startswith("version "):  # built by make tools, not taken from PATH
        assert both["clientVersion"]["gitVersion"] == pinned
        assert both["clientVersion"]["gitTreeState"] == "clean"
    assert tool("kubectl").exists()


def test_service_account_issuer_discovery_is_public(k8s: Cluster) -> None:
    if k8s.local:
        # Anyone may read the issuer's keys, as on managed clusters: the harness binds
        # system:service-account-issuer-discovery to system:unauthenticated.
        status, discovery = fetch(k8s, "/.well-known/openid-configuration")
        assert status == 200
        assert discovery["issuer"] == k8s.server
        assert discovery["jwks_uri"] == f"{k8s.server}/openid/v1/jwks"
        status, keys = fetch(k8s, "/openid/v1/jwks", accept=JWKS_MEDIA_TYPE)
        assert status == 200
        # What else anonymous users may do is unchanged: nothing.
        status, refusal = fetch(k8s, "/api/v1/namespaces")
        assert status == 403
        assert refusal["reason"] == "Forbidden"
        assert 'User "system:anonymous"' in refusal["message"]
    else:
        discovery = k8s.get("/.well-known/openid-configuration")
        keys = k8s.jwks()
    assert "RS256" in discovery["id_token_signing_alg_values_supported"]
    assert keys["keys"]
    assert all(key["use"] == "sig" and key["kid"] for key in keys["keys"])


@pytest.mark.timeout(120)
def test_rbac_is_enforced_for_service_accounts(k8s: Cluster, namespace: str) -> None:
    k8s.create(
        f"/api/v1/namespaces/{namespace}/serviceaccounts",
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}},
    )
    answer = k8s.create(
        f"/api/v1/namespaces/{namespace}/serviceaccounts/reader/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 600},
        },
    )
    token = answer["status"]["token"]
    configmaps = f"/api/v1/namespaces/{namespace}/configmaps"

    status, refusal = fetch(k8s, configmaps, token)
    assert status == 403
    assert f"system:serviceaccount:{namespace}:reader" in refusal["message"]

    k8s.create(
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "configmap-reader"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
        },
    )
    k8s.create(
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "reader"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "configmap-reader",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )

    # The authorizer reads RBAC objects from a cache: the grant lands a moment later.
    def allowed() -> Any:
        status, body = fetch(k8s, configmaps, token)
        return body if status == 200 else None

    listed = k8s.wait_for(allowed, what="the RoleBinding taking effect")
    assert listed["kind"] == "ConfigMapList"
    # Listing is all the Role grants.
    status, _ = fetch(k8s, f"/api/v1/namespaces/{namespace}/secrets", token)
    assert status == 403
