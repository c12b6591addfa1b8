"""JWT verification (OIDC, Kubernetes, dev), no sockets: the JWKS comes from a fake fetch.

Tokens are made here with pyjwt and keys we control, including every kind an attacker or a
broken client would send. Each refusal must be an AuthenticationFailed with SQLSTATE 28P01
or 28000 and a message that says what was wrong without echoing the token or any key.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from identity_helpers import (
    AUDIENCE,
    FakeJwks,
    PrivateKey,
    assert_no_leak,
    b64url,
    b64url_decode,
    claims_for,
    corrupt_signature,
    ec_key,
    ed25519_key,
    hmac_jwt,
    key_material,
    public_jwk,
    public_pem,
    raw_jwt,
    rsa_key,
    self_signed_certificate,
    sign_jwt,
    tamper_payload,
)
from querywarden.errors import AuthenticationFailed
from querywarden.identity import MAX_SECRET_BYTES, Credentials, Principal
from querywarden.identity.authenticator import TokenAuthenticator
from querywarden.identity.dev import load_public_jwk, mint_token
from querywarden.identity.jwt_tokens import (
    KeyCache,
    algorithms_for,
    claim_path,
    groups_from,
    thumbprint_sha256,
)
from querywarden.policy.model import IdentitySection

ISS_A = "https://idp-a.example.test"
ISS_B = "https://idp-b.example.test"
ISS_K8S = "https://kubernetes.default.svc.cluster.local"
REFUSED = ("28P01", "28000")


class FakeClock:
    """A monotonic clock the test moves by hand (for the JWKS refresh rate limit)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Idp:
    """One trusted JWT issuer as the test sees it: its key, kid, fake JWKS and config."""

    def __init__(
        self,
        issuer: str,
        name: str,
        key: PrivateKey,
        alg: str,
        *,
        kind: str = "oidc",
        publish_alg: bool = True,
        **config: Any,
    ) -> None:
        self.issuer = issuer
        self.name = name
        self.key = key
        self.alg = alg
        self.kid = f"{name}-key-1"
        self.jwk = public_jwk(key, kid=self.kid, alg=alg if publish_alg else None)
        self.fetch = FakeJwks(self.jwk)
        self.config: dict[str, Any] = {
            "name": name,
            "kind": kind,
            "issuer": issuer,
            "audiences": [AUDIENCE],
            **config,
        }

    def token(self, sub: str = "agent-7", *, kid: str | None = "", **claims: Any) -> str:
        """A token of this issuer (``kid=""`` means its own kid, None means no kid)."""
        body = claims_for(self.issuer, sub, **claims)
        return sign_jwt(body, self.key, alg=self.alg, kid=self.kid if kid == "" else kid)


def make_authenticator(
    *idps: Idp, extra: list[dict[str, Any]] | None = None, clock: FakeClock | None = None
) -> TokenAuthenticator:
    """A TokenAuthenticator over these issuers, each fetching its JWKS from its FakeJwks."""
    identity = IdentitySection.model_validate(
        {"issuers": [idp.config for idp in idps] + (extra or [])}
    )
    auth = TokenAuthenticator(identity)
    for idp in idps:
        verifier = auth.verifiers[idp.issuer]
        interval = verifier.config.jwks_refresh_interval.total_seconds()  # type: ignore[union-attr]
        verifier.keys = KeyCache(idp.fetch, refresh_interval=interval, clock=clock or FakeClock())
    return auth


def credentials(secret: str | bytes, cert: bytes | None = None) -> Credentials:
    data = secret.encode() if isinstance(secret, str) else secret
    return Credentials("someone", data, "127.0.0.1:40000", client_certificate=cert)


def accept(auth: TokenAuthenticator, token: str | bytes, cert: bytes | None = None) -> Principal:
    return asyncio.run(auth.authenticate(credentials(token, cert)))


def refuse(
    auth: TokenAuthenticator,
    token: str | bytes,
    *,
    cert: bytes | None = None,
    material: tuple[PrivateKey, ...] = (),
    sqlstates: tuple[str, ...] = REFUSED,
) -> AuthenticationFailed:
    """Authenticate, expect a refusal; check its SQLSTATE and that it leaks nothing."""
    with pytest.raises(AuthenticationFailed) as caught:
        accept(auth, token, cert)
    error = caught.value
    assert error.sqlstate in sqlstates, (error.sqlstate, error.message)
    secret = token.decode(errors="replace") if isinstance(token, bytes) else token
    _assert_clean(error.message, secret, material)
    return error


def _assert_clean(message: str, token: str, keys: tuple[PrivateKey, ...]) -> None:
    assert_no_leak(message, token, *(m for key in keys for m in key_material(key)))


# --- fixtures: keys are slow to make, so one set per module ----------------------------


@pytest.fixture(scope="module")
def rsa_a() -> PrivateKey:
    return rsa_key()


@pytest.fixture(scope="module")
def rsa_b() -> PrivateKey:
    return rsa_key()


@pytest.fixture(scope="module")
def ec_p256() -> PrivateKey:
    return ec_key()


@pytest.fixture
def idp_a(rsa_a: PrivateKey) -> Idp:
    return Idp(ISS_A, "idp-a", rsa_a, "RS256")


@pytest.fixture
def idp_b(rsa_b: PrivateKey) -> Idp:
    return Idp(ISS_B, "idp-b", rsa_b, "RS256")


@pytest.fixture
def auth_a(idp_a: Idp) -> TokenAuthenticator:
    return make_authenticator(idp_a)


# --- accepted tokens -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alg", "make_key", "publish_alg"),
    [
        ("RS256", rsa_key, True),
        ("RS256", rsa_key, False),
        ("PS256", rsa_key, False),
        ("RS512", rsa_key, False),
        ("ES256", ec_key, True),
        ("ES384", lambda: ec_key(ec.SECP384R1()), False),
        ("EdDSA", ed25519_key, False),
    ],
    ids=["RS256", "RS256-no-alg", "PS256", "RS512", "ES256", "ES384", "EdDSA"],
)
def test_valid_token_gives_its_principal(
    alg: str, make_key: Callable[[], PrivateKey], publish_alg: bool
) -> None:
    idp = Idp(ISS_A, "idp-a", make_key(), alg, publish_alg=publish_alg)
    auth = make_authenticator(idp)
    token = idp.token("agent-7", groups=["ai-agents", "readers"], name="Agent Seven")
    principal = accept(auth, token)
    exp = json.loads(_payload(token))["exp"]
    assert principal == Principal(
        subject="agent-7",
        groups=frozenset({"ai-agents", "readers"}),
        issuer="idp-a",
        display_name="Agent Seven",
        expires_at=float(exp),
    )
    assert idp.fetch.calls == 1  # keys fetched once, then cached
    accept(auth, idp.token("agent-8"))
    assert idp.fetch.calls == 1


def _payload(token: str) -> bytes:
    return b64url_decode(token.split(".")[1])


def test_display_name_defaults_to_the_subject(auth_a: TokenAuthenticator, idp_a: Idp) -> None:
    principal = accept(auth_a, idp_a.token("agent-7"))
    assert principal.display_name == "agent-7"
    assert principal.groups == frozenset()


def test_audience_list_containing_ours_is_accepted(auth_a: TokenAuthenticator, idp_a: Idp) -> None:
    assert accept(auth_a, idp_a.token(aud=["other-api", AUDIENCE])).subject == "agent-7"


def test_leeway_tolerates_small_clock_skew(auth_a: TokenAuthenticator, idp_a: Idp) -> None:
    # The issuer's clock is 10 s ahead: iat and nbf are in our future, within 30 s leeway.
    accept(auth_a, idp_a.token(now=time.time() + 10))


# --- time ------------------------------------------------------------------------------


def test_expired_token_is_refused_with_28000(
    auth_a: TokenAuthenticator, idp_a: Idp, rsa_a: PrivateKey
) -> None:
    token = idp_a.token(now=time.time() - 600, ttl=300)  # expired 5 minutes ago
    error = refuse(auth_a, token, material=(rsa_a,), sqlstates=("28000",))
    assert "expired" in error.message
    assert "reconnect" in error.message


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_token_not_valid_yet_is_refused(
    auth_a: TokenAuthenticator, idp_a: Idp, rsa_a: PrivateKey, claim: str
) -> None:
    now = int(time.time())
    token = idp_a.token(**{claim: now + 600})  # type: ignore[arg-type]
    error = refuse(auth_a, token, material=(rsa_a,), sqlstates=("28P01",))
    assert "not valid yet" in error.message


@pytest.mark.parametrize(("ttl", "ok"), [(3600, True), (3601, False), (86400 * 365, False)])
def test_lifetime_longer_than_max_token_lifetime_is_refused(
    auth_a: TokenAuthenticator, idp_a: Idp, rsa_a: PrivateKey, ttl: int, ok: bool
) -> None:
    token = idp_a.token(ttl=ttl)
    if ok:
        accept(auth_a, token)
        return
    error = refuse(auth_a, token, material=(rsa_a,), sqlstates=("28P01",))
    assert "maxTokenLifetime" in error.message
    assert "idp-a" in error.message


def test_lifetime_limit_is_per_issuer(rsa_a: PrivateKey) -> None:
    idp = Idp(ISS_A, "idp-a", rsa_a, "RS256", maxTokenLifetime="5m")
    auth = make_authenticator(idp)
    accept(auth, idp.token(ttl=300))
    error = refuse(auth, idp.token(ttl=301))
    assert "of 300s" in error.message


def test_an_accepted_token_is_not_already_expired(auth_a: TokenAuthenticator, idp_a: Idp) -> None:
    """The session ends at Principal.expires_at (the token's exp). A token that expired
    5 s ago (inside the 30 s leeway) must be refused as expired, not accepted with an
    expires_at in the past: the gateway would say AuthenticationOk and then refuse the
    first statement with 'your token has expired'."""
    token = idp_a.token(now=time.time() - 65, ttl=60)
    try:
        principal = accept(auth_a, token)
    except AuthenticationFailed as error:
        assert error.sqlstate == "28000"
        assert "expired" in error.message
        return
    assert principal.expires_at is not None
    assert principal.expires_at > time.time(), "accepted a token whose session is already over"


def test_verify_judges_time_by_the_clock_it_is_given(
    idp_a: Idp, auth_a: TokenAuthenticator
) -> None:
    """``JwtVerifier.verify(token, now=...)`` (what TokenAuthenticator's clock feeds) must
    judge exp/nbf at ``now``; SAML verification does, JWT verification must too."""
    token = idp_a.token(ttl=300)
    verifier = auth_a.verifiers[ISS_A]
    later = time.time() + 3600  # an hour after the token expired
    with pytest.raises(AuthenticationFailed, match="expired"):
        asyncio.run(verifier.verify(token, now=later))


# --- audience and issuer ---------------------------------------------------------------


def test_wrong_audience_is_refused(
    auth_a: TokenAuthenticator, idp_a: Idp, rsa_a: PrivateKey
) -> None:
    error = refuse(auth_a, idp_a.token(aud="https://graph.example.test"), material=(rsa_a,))
    assert error.sqlstate == "28P01"
    assert "audience" in error.message
    assert AUDIENCE in error.message  # says what would be accepted


def test_issuer_not_in_the_policy_is_refused_before_any_fetch(
    auth_a: TokenAuthenticator, idp_a: Idp, rsa_b: PrivateKey
) -> None:
    token = sign_jwt(claims_for("https://evil.example.test"), rsa_b, alg="RS256", kid="x")
    error = refuse(auth_a, token, material=(rsa_b,), sqlstates=("28P01",))
    assert "not trusted" in error.message
    assert idp_a.fetch.calls == 0


def test_token_of_one_trusted_issuer_claiming_another_fails_the_signature(
    idp_a: Idp, idp_b: Idp, rsa_a: PrivateKey, rsa_b: PrivateKey
) -> None:
    """Signed with A's key, but ``iss`` is B (and B's kid): B's key does not verify it."""
    auth = make_authenticator(idp_a, idp_b)
    forged = sign_jwt(claims_for(ISS_B), rsa_a, alg="RS256", kid=idp_b.kid)
    error = refuse(auth, forged, material=(rsa_a, rsa_b), sqlstates=("28P01",))
    assert error.message == "token signature is invalid"
    # With A's kid instead, B does not publish that key: refused after one refresh.
    forged = sign_jwt(claims_for(ISS_B), rsa_a, alg="RS256", kid=idp_a.kid)
    error = refuse(auth, forged, material=(rsa_a, rsa_b), sqlstates=("28P01",))
    assert "does not publish" in error.message
    assert idp_a.fetch.calls == 0  # A's keys were never consulted for a token naming B


def test_several_issuers_the_tokens_iss_picks_the_verifier(
    tmp_path: Path, rsa_a: PrivateKey, ec_p256: PrivateKey
) -> None:
    idp_a = Idp(ISS_A, "idp-a", rsa_a, "RS256")
    idp_b = Idp(ISS_B, "idp-b", ec_p256, "ES256", groupsClaim="roles")
    dev_key = tmp_path / "dev.pem"
    auth = make_authenticator(
        idp_a, idp_b, extra=[{"name": "dev", "kind": "dev", "keyFile": str(dev_key)}]
    )
    from_a = accept(auth, idp_a.token("a-user", groups=["g-a"]))
    from_b = accept(auth, idp_b.token("b-user", roles=["g-b"], groups=["ignored"]))
    from_dev = accept(auth, mint_token("dev-user", groups=["g-dev"], key_file=dev_key))
    assert (from_a.issuer, from_a.subject, from_a.groups) == ("idp-a", "a-user", frozenset({"g-a"}))
    assert (from_b.issuer, from_b.subject, from_b.groups) == ("idp-b", "b-user", frozenset({"g-b"}))
    assert (from_dev.issuer, from_dev.subject, from_dev.groups) == (
        "dev",
        "dev-user",
        frozenset({"g-dev"}),
    )
    assert (idp_a.fetch.calls, idp_b.fetch.calls) == (1, 1)


# --- algorithms and keys ---------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(
    auth_a: TokenAuthenticator, idp_a: Idp, rsa_a: PrivateKey, alg: str
) -> None:
    token = raw_jwt({"alg": alg, "typ": "JWT", "kid": idp_a.kid}, claims_for(ISS_A, "admin"))
    error = refuse(auth_a, token, material=(rsa_a,), sqlstates=("28P01",))
    assert "algorithm" in error.message


@pytest.mark.parametrize("publish_alg", [True, False], ids=["jwk-alg", "no-jwk-alg"])
@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_hs256_keyed_with_the_issuers_public_key_is_refused(
    kind: str, publish_alg: bool, rsa_a: PrivateKey, ec_p256: PrivateKey
) -> None:
    """The classic key confusion: HMAC with the public key (PEM or JWK) as the secret."""
    key = rsa_a if kind == "rsa" else ec_p256
    idp = Idp(ISS_A, "idp-a", key, "RS256" if kind == "rsa" else "ES256", publish_alg=publish_alg)
    auth = make_authenticator(idp)
    secrets = [public_pem(key), json.dumps(idp.jwk).encode(), public_pem(key).strip()]
    for secret in secrets:
        token = hmac_jwt(claims_for(ISS_A, "admin"), secret, kid=idp.kid)
        error = refuse(auth, token, material=(key,), sqlstates=("28P01",))
        assert "'HS256' is not accepted" in error.message


def test_symmetric_key_in_the_jwks_is_never_used(idp_a: Idp, rsa_a: PrivateKey) -> None:
    secret = b"a-shared-secret-that-the-issuer-should-never-publish"
    oct_key = {"kty": "oct", "kid": "hmac-1", "k": b64url(secret), "use": "sig"}
    idp_a.fetch.publish(idp_a.jwk, oct_key)
    auth = make_authenticator(idp_a)
    token = hmac_jwt(claims_for(ISS_A, "admin"), secret, kid="hmac-1")
    error = refuse(auth, token, material=(rsa_a,), sqlstates=("28P01",))
    assert "allows nothing" in error.message
    assert b64url(secret) not in error.message


def test_algorithm_must_match_the_keys_type(
    idp_a: Idp, auth_a: TokenAuthenticator, rsa_a: PrivateKey, ec_p256: PrivateKey
) -> None:
    # An ES256 token naming the RSA key's kid.
    token = sign_jwt(claims_for(ISS_A), ec_p256, alg="ES256", kid=idp_a.kid)
    error = refuse(auth_a, token, material=(rsa_a, ec_p256), sqlstates=("28P01",))
    assert "'ES256' is not accepted" in error.message
    # The JWK pins RS256: a PS256 token by the very same key is refused.
    token = sign_jwt(claims_for(ISS_A), rsa_a, alg="PS256", kid=idp_a.kid)
    error = refuse(auth_a, token, material=(rsa_a,), sqlstates=("28P01",))
    assert "'PS256' is not accepted" in error.message


def test_encryption_keys_are_not_used_for_signatures(rsa_a: PrivateKey) -> None:
    idp = Idp(ISS_A, "idp-a", rsa_a, "RS256")
    idp.fetch.publish({**idp.jwk, "use": "enc"})
    auth = make_authenticator(idp)
    error = refuse(auth, idp.token(), material=(rsa_a,), sqlstates=("28P01",))
    assert "does not publish" in error.message


def test_token_without_kid(rsa_a: PrivateKey, rsa_b: PrivateKey) -> None:
    idp = Idp(ISS_A, "idp-a", rsa_a, "RS256")
    auth = make_authenticator(idp)
    # One published key: a token without kid is verified with it.
    assert accept(auth, idp.token(kid=None)).subject == "agent-7"
    # Two published keys: which one is meant is not guessed.
    idp.fetch.publish(idp.jwk, public_jwk(rsa_b, kid="other", alg="RS256"))
    auth = make_authenticator(idp)
    error = refuse(auth, idp.token(kid=None), material=(rsa_a, rsa_b))
    assert "does not publish" in error.message


# --- signatures ------------------------------------------------------------------------


def test_tampered_payload_is_refused(
    auth_a: TokenAuthenticator, idp_a: Idp, rsa_a: PrivateKey
) -> None:
    token = idp_a.token("agent-7", groups=["readers"])
    for changes in ({"sub": "admin"}, {"groups": ["dba"]}, {"exp": int(time.time()) + 600}):
        forged = tamper_payload(token, **changes)
        error = refuse(auth_a, forged, material=(rsa_a,), sqlstates=("28P01",))
        assert error.message == "token signature is invalid"


def test_bad_signature_is_refused(
    auth_a: TokenAuthenticator, idp_a: Idp, rsa_a: PrivateKey, rsa_b: PrivateKey
) -> None:
    error = refuse(auth_a, corrupt_signature(idp_a.token()), material=(rsa_a,))
    assert error.message == "token signature is invalid"
    # Signed by another key under the issuer's kid.
    forged = sign_jwt(claims_for(ISS_A, "admin"), rsa_b, alg="RS256", kid=idp_a.kid)
    error = refuse(auth_a, forged, material=(rsa_a, rsa_b), sqlstates=("28P01",))
    assert error.message == "token signature is invalid"
    # No signature at all.
    head, payload, _ = idp_a.token().split(".")
    error = refuse(auth_a, f"{head}.{payload}.", material=(rsa_a,), sqlstates=("28P01",))


# --- key cache: refresh, rotation, outages --------------------------------------------


def test_unknown_kid_gets_one_refresh_then_is_refused(idp_a: Idp, rsa_a: PrivateKey) -> None:
    clock = FakeClock()
    auth = make_authenticator(idp_a, clock=clock)  # jwksRefreshInterval: 30s (default)
    accept(auth, idp_a.token())
    assert idp_a.fetch.calls == 1
    clock.advance(31)
    ghost = sign_jwt(claims_for(ISS_A), rsa_a, alg="RS256", kid="ghost")
    error = refuse(auth, ghost, material=(rsa_a,), sqlstates=("28P01",))
    assert "does not publish" in error.message
    assert "ghost" in error.message  # the kid is no secret, and helps the operator
    assert idp_a.fetch.calls == 2  # exactly one refresh
    # Within the refresh interval, unknown kids do not make the gateway fetch again.
    for _ in range(5):
        refuse(auth, ghost)
    assert idp_a.fetch.calls == 2
    clock.advance(31)
    refuse(auth, ghost)
    assert idp_a.fetch.calls == 3
    # Known keys never wait for any of this.
    accept(auth, idp_a.token())
    assert idp_a.fetch.calls == 3


def test_rotated_key_is_picked_up_with_one_refresh(
    idp_a: Idp, rsa_a: PrivateKey, rsa_b: PrivateKey
) -> None:
    clock = FakeClock()
    auth = make_authenticator(idp_a, clock=clock)
    old = idp_a.token()
    accept(auth, old)
    clock.advance(31)
    new_jwk = public_jwk(rsa_b, kid="idp-a-key-2", alg="RS256")
    idp_a.fetch.publish(new_jwk)  # the old key is retired
    new = sign_jwt(claims_for(ISS_A, "rotated"), rsa_b, alg="RS256", kid="idp-a-key-2")
    assert accept(auth, new).subject == "rotated"
    assert idp_a.fetch.calls == 2
    # The refresh replaced the key set: the retired key's tokens are no longer accepted.
    clock.advance(31)
    refuse(auth, old, material=(rsa_a, rsa_b))


def test_concurrent_unknown_kids_share_one_fetch(idp_a: Idp, rsa_b: PrivateKey) -> None:
    clock = FakeClock()
    auth = make_authenticator(idp_a, clock=clock)
    accept(auth, idp_a.token())
    assert idp_a.fetch.calls == 1
    clock.advance(31)
    new_jwk = public_jwk(rsa_b, kid="idp-a-key-2", alg="RS256")
    tokens = [
        sign_jwt(claims_for(ISS_A, f"agent-{i}"), rsa_b, alg="RS256", kid="idp-a-key-2")
        for i in range(20)
    ]

    async def scenario() -> list[Principal]:
        idp_a.fetch.block()
        idp_a.fetch.publish(idp_a.jwk, new_jwk)
        pending = [asyncio.ensure_future(auth.authenticate(credentials(t))) for t in tokens]
        assert idp_a.fetch.started is not None
        await idp_a.fetch.started.wait()
        await asyncio.sleep(0.01)
        assert not any(p.done() for p in pending)  # all of them wait for the one refresh
        idp_a.fetch.release()
        return list(await asyncio.gather(*pending))

    principals = asyncio.run(scenario())
    assert [p.subject for p in principals] == [f"agent-{i}" for i in range(20)]
    assert idp_a.fetch.calls == 2  # one refresh for all twenty


def test_cached_keys_are_not_stalled_by_a_slow_refresh(idp_a: Idp, rsa_a: PrivateKey) -> None:
    clock = FakeClock()
    auth = make_authenticator(idp_a, clock=clock)
    accept(auth, idp_a.token())
    clock.advance(31)
    ghost = sign_jwt(claims_for(ISS_A), rsa_a, alg="RS256", kid="ghost")

    async def scenario() -> None:
        idp_a.fetch.block()
        slow = asyncio.ensure_future(auth.authenticate(credentials(ghost)))
        assert idp_a.fetch.started is not None
        await idp_a.fetch.started.wait()
        # While the refresh hangs, tokens with cached keys are verified at once.
        for i in range(10):
            principal = await asyncio.wait_for(
                auth.authenticate(credentials(idp_a.token(f"agent-{i}"))), 5
            )
            assert principal.subject == f"agent-{i}"
        assert not slow.done()
        idp_a.fetch.release()
        with pytest.raises(AuthenticationFailed, match="does not publish"):
            await slow

    asyncio.run(scenario())
    assert idp_a.fetch.calls == 2


def test_unreachable_jwks_fails_closed_and_keeps_the_cached_keys(
    idp_a: Idp, rsa_a: PrivateKey
) -> None:
    clock = FakeClock()
    auth = make_authenticator(idp_a, clock=clock)
    accept(auth, idp_a.token())
    clock.advance(31)
    idp_a.fetch.fail_with = ConnectionRefusedError(111, "Connection refused by 10.9.8.7")
    # A cached key still verifies.
    assert accept(auth, idp_a.token("still-fine")).subject == "still-fine"
    # An unknown kid cannot be looked up: refused, with a message that says why.
    ghost = sign_jwt(claims_for(ISS_A), rsa_a, alg="RS256", kid="ghost")
    with pytest.raises(AuthenticationFailed) as caught:
        accept(auth, ghost)
    assert caught.value.sqlstate == "08004"
    assert "could not fetch the issuer's signing keys" in caught.value.message
    assert "10.9.8.7" not in caught.value.message
    _assert_clean(caught.value.message, ghost, (rsa_a,))
    # The failed refresh did not throw the cached keys away.
    assert accept(auth, idp_a.token("after-outage")).subject == "after-outage"


# --- malformed input -------------------------------------------------------------------


def _segment(value: Any) -> str:
    return b64url(json.dumps(value).encode())


MALFORMED = {
    "garbage": b"not-a-token",
    "static-password": b"hunter2",
    "three-empty-parts": b"..",
    "not-base64": b"@@@.@@@.@@@",
    "header-not-json": f"{b64url(b'{nope')}.{_segment({'iss': ISS_A})}.AAAA".encode(),
    "header-is-a-list": f"{_segment([1, 2])}.{_segment({'iss': ISS_A})}.AAAA".encode(),
    "payload-is-a-list": f"{_segment({'alg': 'RS256'})}.{_segment([ISS_A])}.AAAA".encode(),
    "iss-not-a-string": f"{_segment({'alg': 'RS256'})}.{_segment({'iss': 7})}.AAAA".encode(),
    "kid-not-a-string": f"{_segment({'kid': [1]})}.{_segment({'iss': ISS_A})}.AAAA".encode(),
    "two-parts": f"{_segment({'alg': 'RS256'})}.{_segment({'iss': ISS_A})}".encode(),
    "five-parts-jwe": b"eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d",
    "non-ascii": "eyJhbGciOiJSUzI1NiJ9.é.x".encode(),
    "binary": bytes(range(1, 256)),
    "whitespace-only": b"   \t ",
}


@pytest.mark.parametrize("secret", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_token_is_refused(auth_a: TokenAuthenticator, idp_a: Idp, secret: bytes) -> None:
    error = refuse(auth_a, secret, sqlstates=("28P01",))
    assert "malformed" in error.message or "not trusted" in error.message
    assert idp_a.fetch.calls == 0


@pytest.mark.parametrize("size", [0, MAX_SECRET_BYTES + 1, 1024 * 1024])
def test_empty_or_oversized_password_is_refused(
    auth_a: TokenAuthenticator, idp_a: Idp, size: int
) -> None:
    secret = b"A" * size
    with pytest.raises(AuthenticationFailed) as caught:
        accept(auth_a, secret)
    assert caught.value.sqlstate == "28P01"
    assert ("empty password" if size == 0 else "over the limit") in caught.value.message
    assert "AAAAAAAA" not in caught.value.message
    assert idp_a.fetch.calls == 0


@pytest.mark.parametrize("claim", ["sub", "exp", "iat", "aud"])
def test_missing_required_claim_is_refused(
    auth_a: TokenAuthenticator, idp_a: Idp, rsa_a: PrivateKey, claim: str
) -> None:
    body = claims_for(ISS_A)
    del body[claim]
    token = sign_jwt(body, rsa_a, alg="RS256", kid=idp_a.kid)
    error = refuse(auth_a, token, material=(rsa_a,), sqlstates=("28P01",))
    assert repr(claim) in error.message


# --- groups ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("groups_claim", "claims", "expected"),
    [
        ("groups", {"groups": ["a", "b"]}, {"a", "b"}),
        ("groups", {"groups": "a b  c"}, {"a", "b", "c"}),
        ("scope", {"scope": "db:read db:write"}, {"db:read", "db:write"}),
        ("realm_access.roles", {"realm_access": {"roles": ["dba", "x"]}}, {"dba", "x"}),
        ("realm_access.roles", {"realm_access": {"roles": "dba x"}}, {"dba", "x"}),
        ("realm_access.roles", {"realm_access": ["dba"]}, set()),
        ("realm_access.roles", {"groups": ["dba"]}, set()),
        ("groups", {}, set()),
        ("groups", {"groups": {"dba": True}}, set()),
        ("groups", {"groups": ["ok", {"nested": 1}, None]}, {"ok"}),
    ],
    ids=[
        "list",
        "space-separated",
        "scope-string",
        "dotted-path",
        "dotted-path-string",
        "dotted-path-through-a-list",
        "dotted-path-missing",
        "missing",
        "object",
        "mixed-list",
    ],
)
def test_groups_claim(
    rsa_a: PrivateKey, groups_claim: str, claims: dict[str, Any], expected: set[str]
) -> None:
    idp = Idp(ISS_A, "idp-a", rsa_a, "RS256", groupsClaim=groups_claim)
    auth = make_authenticator(idp)
    assert accept(auth, idp.token(**claims)).groups == expected


# --- certificate-bound tokens (RFC 8705) ------------------------------------------------


def test_certificate_bound_token(idp_a: Idp, auth_a: TokenAuthenticator) -> None:
    cert, _ = self_signed_certificate(ec_key(), "client-1")
    other, _ = self_signed_certificate(ec_key(), "client-2")
    from cryptography.hazmat.primitives.serialization import Encoding

    der, other_der = cert.public_bytes(Encoding.DER), other.public_bytes(Encoding.DER)
    token = idp_a.token(cnf={"x5t#S256": thumbprint_sha256(der)})
    assert accept(auth_a, token, cert=der).subject == "agent-7"
    error = refuse(auth_a, token, cert=other_der, sqlstates=("28000",))
    assert "different client certificate" in error.message
    error = refuse(auth_a, token, cert=None, sqlstates=("28000",))
    assert "bound to a client certificate" in error.message
    # An unbound token is fine with or without a certificate.
    assert accept(auth_a, idp_a.token(), cert=der).subject == "agent-7"


def test_thumbprint_is_rfc8705_x5t_s256() -> None:
    cert, _ = self_signed_certificate(ec_key(), "client-1")
    from cryptography.hazmat.primitives.serialization import Encoding

    expected = b64url(cert.fingerprint(hashes.SHA256()))
    assert thumbprint_sha256(cert.public_bytes(Encoding.DER)) == expected
    assert "=" not in expected and len(expected) == 43


# --- Kubernetes service-account tokens --------------------------------------------------

NS = "agents"


def sa_claims(
    namespace: str = NS, name: str = "coder", *, claim_namespace: str | None = None, **extra: Any
) -> dict[str, Any]:
    """Claims shaped like a projected, audience-bound service-account token."""
    return {
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "kubernetes.io": {
            "namespace": claim_namespace or namespace,
            "pod": {"name": f"{name}-7d9f", "uid": "0b5c9a52-5d7e-4c65-9a1e-c1f5e0a0c0de"},
            "serviceaccount": {"name": name, "uid": "7e1c1d34-8a0b-4a73-9a8b-4d2a7d1e6f00"},
        },
        **extra,
    }


@pytest.fixture
def k8s(rsa_a: PrivateKey) -> Idp:
    return Idp(
        ISS_K8S,
        "cluster",
        rsa_a,
        "RS256",
        kind="kubernetes",
        groupMappings={
            "system:serviceaccount:agents:coder": ["ai-agents"],
            "analytics": ["analysts"],
        },
    )


def k8s_token(idp: Idp, claims: dict[str, Any], **kwargs: Any) -> str:
    sub = claims.pop("sub")
    body = claims_for(ISS_K8S, sub, aud=[AUDIENCE], **kwargs)
    body.update(claims)
    return sign_jwt(body, idp.key, alg="RS256", kid=idp.kid)


def test_service_account_token_groups_and_mapping(k8s: Idp) -> None:
    auth = make_authenticator(k8s)
    principal = accept(auth, k8s_token(k8s, sa_claims()))
    assert principal.subject == "system:serviceaccount:agents:coder"
    assert principal.issuer == "cluster"
    assert principal.groups == {
        "system:serviceaccounts",
        "system:serviceaccounts:agents",
        "ai-agents",  # mapped by service account
    }
    # Another service account of the same namespace gets no SA mapping.
    other = accept(auth, k8s_token(k8s, sa_claims(name="runner")))
    assert other.groups == {"system:serviceaccounts", "system:serviceaccounts:agents"}
    # A namespace mapping applies to every service account in it.
    analyst = accept(auth, k8s_token(k8s, sa_claims("analytics", "notebook")))
    assert analyst.groups == {
        "system:serviceaccounts",
        "system:serviceaccounts:analytics",
        "analysts",
    }


@pytest.mark.parametrize(
    "subject",
    [
        "alice",
        "system:node:worker-1",
        "system:serviceaccount:agents",
        "system:serviceaccount:agents:coder:extra",
        "system:serviceaccounts:agents:coder",
        "user:serviceaccount:agents:coder",
    ],
)
def test_subject_that_is_not_a_service_account_is_refused(k8s: Idp, subject: str) -> None:
    auth = make_authenticator(k8s)
    claims = sa_claims()
    claims["sub"] = subject
    error = refuse(auth, k8s_token(k8s, claims), material=(k8s.key,), sqlstates=("28P01",))
    assert "not a service account" in error.message


def test_namespace_claim_must_match_the_subject(k8s: Idp) -> None:
    auth = make_authenticator(k8s)
    token = k8s_token(k8s, sa_claims("agents", "coder", claim_namespace="kube-system"))
    error = refuse(auth, token, material=(k8s.key,), sqlstates=("28P01",))
    assert "namespace does not match" in error.message


def test_service_account_token_for_the_api_server_audience_is_refused(k8s: Idp) -> None:
    auth = make_authenticator(k8s)
    claims = sa_claims()
    sub = claims.pop("sub")
    body = claims_for(ISS_K8S, sub, aud=["https://kubernetes.default.svc.cluster.local"])
    body.update(claims)
    token = sign_jwt(body, k8s.key, alg="RS256", kid=k8s.kid)
    error = refuse(auth, token, material=(k8s.key,), sqlstates=("28P01",))
    assert "audience" in error.message


def test_expired_service_account_token_is_refused(k8s: Idp) -> None:
    auth = make_authenticator(k8s)
    token = k8s_token(k8s, sa_claims(), now=time.time() - 1200, ttl=600)
    error = refuse(auth, token, material=(k8s.key,), sqlstates=("28000",))
    assert "expired" in error.message


def test_legacy_secret_based_token_lifetime_is_refused(k8s: Idp) -> None:
    # Long-lived tokens (legacy Secret-based ones last for ever) are refused.
    auth = make_authenticator(k8s)
    token = k8s_token(k8s, sa_claims(), ttl=86400 * 365)
    error = refuse(auth, token, material=(k8s.key,), sqlstates=("28P01",))
    assert "long-lived tokens are not accepted" in error.message


# --- dev issuer and the small pure functions -------------------------------------------


def test_dev_issuer_token_verifies_and_other_keys_do_not(tmp_path: Path) -> None:
    key_file = tmp_path / "dev.pem"
    auth = make_authenticator(extra=[{"name": "dev", "kind": "dev", "keyFile": str(key_file)}])
    principal = accept(auth, mint_token("alice", groups=["ai-agents"], key_file=key_file))
    assert (principal.subject, principal.groups, principal.issuer) == (
        "alice",
        frozenset({"ai-agents"}),
        "dev",
    )
    stranger = tmp_path / "stranger.pem"
    forged = mint_token("admin", groups=["dba"], key_file=stranger)
    error = refuse(auth, forged, sqlstates=("28P01",))
    assert error.message == "token signature is invalid"
    assert load_public_jwk(key_file)["kid"] != load_public_jwk(stranger)["kid"]


def test_algorithms_for_keys() -> None:
    assert algorithms_for({"kty": "RSA"}) == ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    assert algorithms_for({"kty": "RSA", "alg": "PS256"}) == ("PS256",)
    assert algorithms_for({"kty": "RSA", "alg": "HS256"}) == ()
    assert algorithms_for({"kty": "EC", "crv": "P-256"}) == ("ES256",)
    assert algorithms_for({"kty": "EC", "crv": "P-256", "alg": "ES384"}) == ()
    assert algorithms_for({"kty": "OKP", "crv": "Ed25519"}) == ("EdDSA",)
    assert algorithms_for({"kty": "oct", "alg": "HS256"}) == ()
    assert algorithms_for({}) == ()


def test_claim_path_and_groups_from() -> None:
    claims = {"a": {"b": {"c": ["x"]}}, "s": "p q", "kubernetes.io": {"namespace": "n"}}
    assert claim_path(claims, "a.b.c") == ["x"]
    assert claim_path(claims, "a.b.missing") is None
    assert claim_path(claims, "s.deeper") is None
    assert groups_from(["x", "y", "x"]) == {"x", "y"}
    assert groups_from("p  q\tr") == {"p", "q", "r"}
    assert groups_from(None) == frozenset()
    assert groups_from(42) == frozenset()
