"""The test OIDC provider harness: a real oidc-provider issuing verifiable JWT access tokens."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from oidc_provider import AUDIENCE, DEFAULT_TTL, OidcError, OidcProvider

CLIENTS = {"agent-1": ["ai-agents"], "dba-1": ["dba", "dba-oncall"]}


@pytest.fixture
def fresh_oidc(tmp_path: Path) -> Iterator[OidcProvider]:
    """A provider of its own, for tests that change its keys."""
    provider = OidcProvider(ttl=120).start(tmp_path, {"agent-1": ["ai-agents"]})
    try:
        yield provider
    finally:
        provider.stop()


def verify(
    provider: OidcProvider, token: str, jwks: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Verify a token as a resource server would: JWKS by kid, RS256, aud, iss."""
    keys = jwt.PyJWKSet.from_dict(jwks if jwks is not None else provider.jwks())
    kid = jwt.get_unverified_header(token)["kid"]
    key = next((k for k in keys.keys if k.key_id == kid), None)
    if key is None:
        raise LookupError(f"kid {kid} is not in the JWKS")
    claims: dict[str, Any] = jwt.decode(
        token,
        key=key,
        algorithms=["RS256"],
        audience=AUDIENCE,
        issuer=provider.issuer,
        options={"require": ["exp", "iat", "iss", "aud", "sub"]},
    )
    return claims


def test_discovery_document(oidc: OidcProvider) -> None:
    doc = oidc.discovery()
    assert doc["issuer"] == oidc.issuer
    assert oidc.issuer.startswith("https://127.0.0.1:")
    assert doc["jwks_uri"].startswith(oidc.issuer + "/")
    assert doc["token_endpoint"].startswith(oidc.issuer + "/")
    assert "client_credentials" in doc["grant_types_supported"]
    # the JWKS serves public RSA keys only
    jwks = oidc.jwks()
    assert jwks["keys"]
    for key in jwks["keys"]:
        assert key["kty"] == "RSA"
        assert key["kid"]
        assert "d" not in key


def test_tls_is_verified_against_the_ca_file(oidc: OidcProvider) -> None:
    untrusting = ssl.create_default_context()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(oidc.issuer + "/jwks", context=untrusting, timeout=5)
    assert oidc.ca_file is not None and oidc.ca_file.exists()


@pytest.mark.parametrize("client_id", sorted(CLIENTS))
def test_token_verifies_and_carries_groups(oidc: OidcProvider, client_id: str) -> None:
    token = oidc.token(client_id)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256"
    assert header["typ"] == "at+jwt"
    claims = verify(oidc, token)
    assert claims["aud"] == AUDIENCE
    assert claims["iss"] == oidc.issuer
    assert claims["sub"] == client_id
    assert claims["client_id"] == client_id
    assert claims["groups"] == CLIENTS[client_id]
    assert claims["exp"] - claims["iat"] == DEFAULT_TTL
    assert claims["jti"]


@pytest.mark.parametrize("resource", [None, "querywarden", "urn:querywarden"])
def test_resource_is_querywarden_with_or_without_asking(
    oidc: OidcProvider, resource: str | None
) -> None:
    response = oidc.token_response("agent-1", resource=resource)
    assert response["token_type"] == "Bearer"
    assert response["expires_in"] == DEFAULT_TTL
    assert verify(oidc, response["access_token"])["aud"] == AUDIENCE


def test_per_token_ttl(oidc: OidcProvider) -> None:
    claims = verify(oidc, oidc.token("dba-1", ttl=7))
    assert claims["exp"] - claims["iat"] == 7


def test_token_for_another_audience_fails(oidc: OidcProvider) -> None:
    token = oidc.token("agent-1")
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(
            token,
            key=jwt.PyJWKSet.from_dict(oidc.jwks()).keys[0],
            algorithms=["RS256"],
            audience="someone-else",
        )


def test_unknown_resource_is_refused(oidc: OidcProvider) -> None:
    with pytest.raises(OidcError) as caught:
        oidc.token_response("agent-1", resource="https://elsewhere.example/")
    assert caught.value.status == 400
    assert caught.value.error == "invalid_target"


def test_wrong_secret_is_refused(oidc: OidcProvider) -> None:
    with pytest.raises(OidcError) as caught:
        oidc.token_response("agent-1", client_secret="not-the-secret")
    assert caught.value.status == 401
    assert caught.value.error == "invalid_client"


def test_rotation_brings_a_new_kid(fresh_oidc: OidcProvider) -> None:
    old_jwks = fresh_oidc.jwks()
    old_token = fresh_oidc.token("agent-1")
    old_kid = jwt.get_unverified_header(old_token)["kid"]
    assert verify(fresh_oidc, old_token, old_jwks)["sub"] == "agent-1"

    new_kid = fresh_oidc.rotate_keys()
    assert new_kid != old_kid
    new_token = fresh_oidc.token("agent-1")
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    # a verifier holding the old JWKS does not know the kid: it must refresh
    with pytest.raises(LookupError):
        verify(fresh_oidc, new_token, old_jwks)
    refreshed = fresh_oidc.jwks()
    assert [k["kid"] for k in refreshed["keys"]] == [new_kid]
    claims = verify(fresh_oidc, new_token, refreshed)
    assert claims["groups"] == ["ai-agents"]
    assert claims["exp"] - claims["iat"] == 120
    # the old key is gone: tokens it signed no longer verify
    with pytest.raises(LookupError):
        verify(fresh_oidc, old_token, refreshed)
    # the issuer stays the same across the rotation
    assert fresh_oidc.discovery()["issuer"] == fresh_oidc.issuer


def test_rotation_can_keep_the_old_key_published(fresh_oidc: OidcProvider) -> None:
    old_token = fresh_oidc.token("agent-1")
    old_kid = jwt.get_unverified_header(old_token)["kid"]
    new_kid = fresh_oidc.rotate_keys(keep_old=True)
    jwks = fresh_oidc.jwks()
    assert [k["kid"] for k in jwks["keys"]] == [new_kid, old_kid]
    assert verify(fresh_oidc, old_token, jwks)["sub"] == "agent-1"
    new_token = fresh_oidc.token("agent-1")
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    assert verify(fresh_oidc, new_token, jwks)["sub"] == "agent-1"


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    provider = OidcProvider().start(tmp_path, {"agent-1": []})
    assert provider.is_running()
    assert verify(provider, provider.token("agent-1"))["groups"] == []
    provider.stop()
    assert not provider.is_running()
    assert provider.returncode() == 0  # it exited by itself when its stdin closed
