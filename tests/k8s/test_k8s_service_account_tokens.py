"""Service-account tokens from the TokenRequest API, verified by the gateway.

The API server mints an audience-bound token for a ServiceAccount; the gateway's
``kind: kubernetes`` issuer finds the API server's keys through its OIDC discovery
document and JWKS, and a client connects through the gateway to the real PostgreSQL with
that token as its password.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from gateway_harness import RunningGateway
from identity_helpers import RecordPrincipals
from k8sharness.cluster import Cluster
from querywarden.devcluster import DATABASE
from querywarden.policy import PolicyDocument
from raw_client import gateway_errors

AUDIENCE = "querywarden"

#: The API server serves its JWKS as application/jwk-set+json only and answers 406 to the
#: gateway's "Accept: application/json", so the gateway cannot fetch the keys (found by
#: this harness). Strict: once proxy/querywarden/identity/jwt_tokens.py's _get_json also
#: accepts application/jwk-set+json these tests pass, and the marker must go.
SERVICE_ACCOUNT = "agent"
TOKEN_SECONDS = 600  # the shortest lifetime TokenRequest grants


@pytest.fixture(autouse=True)
def no_gateway_crash(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A refused token is handled: never an unexpected error in the gateway's log."""
    caplog.set_level(logging.INFO, logger="querywarden")
    yield
    assert not gateway_errors(caplog.get_records("call"))


def create_service_account(k8s: Cluster, namespace: str, name: str = SERVICE_ACCOUNT) -> Any:
    return k8s.create(
        f"/api/v1/namespaces/{namespace}/serviceaccounts",
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
    )


def request_token(
    k8s: Cluster,
    namespace: str,
    audiences: list[str] | None,
    *,
    name: str = SERVICE_ACCOUNT,
    seconds: int = TOKEN_SECONDS,
) -> str:
    """A token from the TokenRequest API (no audiences: the API server's own)."""
    spec: dict[str, Any] = {"expirationSeconds": seconds}
    if audiences is not None:
        spec["audiences"] = audiences
    answer = k8s.create(
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
    )
    assert answer["status"]["token"]
    return str(answer["status"]["token"])


def kubernetes_issuer(k8s: Cluster, namespace: str, workdir: Path) -> dict[str, Any]:
    """The gateway's policy entry for this cluster, as docs/identity.md describes it."""
    discovery = k8s.get("/.well-known/openid-configuration")
    issuer: dict[str, Any] = {
        "name": "cluster",
        "kind": "kubernetes",
        "issuer": discovery["issuer"],
        "audiences": [AUDIENCE],
        "groupMappings": {namespace: ["ai-agents"]},
    }
    if k8s.ca_file is not None:
        issuer["caFile"] = str(k8s.ca_file)
    if discovery["issuer"] != k8s.server:
        # An existing cluster (kind, k3d) names itself by its in-cluster URL, which this
        # machine cannot reach: read the keys through the API server's address instead,
        # with a service-account token as a pod would (service accounts may read them).
        token_file = workdir / f"discovery-token-{namespace}"
        token_file.write_text(request_token(k8s, namespace, None))
        issuer["jwksUri"] = f"{k8s.server}/openid/v1/jwks"
        issuer["bearerTokenFile"] = str(token_file)
    return issuer


def connect(gw: RunningGateway, token: str) -> psycopg.Connection[Any]:
    conninfo = make_conninfo(
        host=gw.host,
        port=gw.port,
        dbname=DATABASE,
        user=SERVICE_ACCOUNT,
        password=token,
        connect_timeout=10,
    )
    return psycopg.connect(conninfo, autocommit=True)


def test_token_request_mints_an_audience_bound_token(k8s: Cluster, namespace: str) -> None:
    account = create_service_account(k8s, namespace)
    token = request_token(k8s, namespace, [AUDIENCE])

    # Verify it as any relying party would, with the keys the API server publishes.
    discovery = k8s.get("/.well-known/openid-configuration")
    keys = jwt.PyJWKSet.from_dict(k8s.jwks())
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in keys.keys if k.key_id == kid)
    claims = jwt.decode(
        token, key=key.key, algorithms=["RS256"], audience=AUDIENCE, issuer=discovery["issuer"]
    )
    assert claims["aud"] == [AUDIENCE]
    assert claims["sub"] == f"system:serviceaccount:{namespace}:{SERVICE_ACCOUNT}"
    assert claims["exp"] - claims["iat"] == TOKEN_SECONDS
    assert claims["kubernetes.io"]["namespace"] == namespace
    assert claims["kubernetes.io"]["serviceaccount"] == {
        "name": SERVICE_ACCOUNT,
        "uid": account["metadata"]["uid"],
    }

    # The API server itself accepts it for that audience, and only for that audience.
    review = k8s.create(
        "/apis/authentication.k8s.io/v1/tokenreviews",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [AUDIENCE]},
        },
    )
    assert review["status"]["authenticated"] is True
    assert review["status"]["audiences"] == [AUDIENCE]
    assert review["status"]["user"]["username"] == claims["sub"]
    assert f"system:serviceaccounts:{namespace}" in review["status"]["user"]["groups"]
    elsewhere = k8s.create(
        "/apis/authentication.k8s.io/v1/tokenreviews",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": ["another-service"]},
        },
    )
    assert elsewhere["status"].get("authenticated") is not True


def test_gateway_accepts_service_account_token(
    k8s: Cluster,
    namespace: str,
    workdir: Path,
    make_gateway: Callable[..., RunningGateway],
) -> None:
    create_service_account(k8s, namespace)
    issuer = kubernetes_issuer(k8s, namespace, workdir)
    if k8s.local:
        # The harness's API server is its own issuer: the gateway uses plain discovery,
        # anonymously, as it would against a managed cluster's public issuer.
        assert issuer["issuer"] == k8s.server
        assert "jwksUri" not in issuer
    gate = RecordPrincipals()
    gw = make_gateway(
        gate=gate, policy=PolicyDocument.model_validate({"identity": {"issuers": [issuer]}})
    )

    token = request_token(k8s, namespace, [AUDIENCE])
    with connect(gw, token) as conn:
        row = conn.execute("SELECT current_database(), 6 * 7").fetchone()
    assert row == (DATABASE, 42)

    principal = gate.principals[-1]
    assert principal.issuer == "cluster"
    assert principal.subject == f"system:serviceaccount:{namespace}:{SERVICE_ACCOUNT}"
    assert principal.groups == {
        "system:serviceaccounts",
        f"system:serviceaccounts:{namespace}",
        "ai-agents",  # from groupMappings for the namespace
    }
    claims = jwt.decode(token, options={"verify_signature": False})
    assert principal.expires_at == claims["exp"]


@pytest.mark.parametrize(
    ("audiences", "fragment"),
    [
        (["another-service"], "token audience is not accepted"),
        (None, "token audience is not accepted"),  # the API server's own audience
    ],
    ids=["other-audience", "api-server-audience"],
)
def test_gateway_refuses_token_for_another_audience(
    k8s: Cluster,
    namespace: str,
    workdir: Path,
    make_gateway: Callable[..., RunningGateway],
    audiences: list[str] | None,
    fragment: str,
) -> None:
    create_service_account(k8s, namespace)
    issuer = kubernetes_issuer(k8s, namespace, workdir)
    gate = RecordPrincipals()
    gw = make_gateway(
        gate=gate, policy=PolicyDocument.model_validate({"identity": {"issuers": [issuer]}})
    )
    token = request_token(k8s, namespace, audiences)
    with pytest.raises(psycopg.OperationalError, match=fragment):
        connect(gw, token).close()
    assert gate.principals == []
