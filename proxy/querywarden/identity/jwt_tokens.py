"""JWT verification for OIDC, Kubernetes service-account and development issuers.

Keys come from the issuer's JWKS (found through OIDC discovery) and are cached; a token
signed by an unknown ``kid`` triggers one refresh, at most once per
``jwksRefreshInterval``. The accepted algorithm is fixed by the key's type: never
``none``, never an HMAC algorithm keyed with a public key.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import ssl
import time
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import jwt
from jwt import PyJWK

from querywarden.errors import AuthenticationFailed
from querywarden.policy.model import DevIssuer, KubernetesIssuer, OidcIssuer

log = logging.getLogger("querywarden.identity")

#: Algorithms accepted for each key type. The token's ``alg`` must be one of its key's.
_ALGORITHMS: Mapping[tuple[str, str | None], tuple[str, ...]] = {
    ("RSA", None): ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    ("EC", "P-256"): ("ES256",),
    ("EC", "P-384"): ("ES384",),
    ("EC", "P-521"): ("ES512",),
    ("OKP", "Ed25519"): ("EdDSA",),
}

#: Largest discovery document or JWKS we read.
_MAX_DOCUMENT = 1024 * 1024


def algorithms_for(jwk: Mapping[str, Any]) -> tuple[str, ...]:
    """The algorithms a key may verify, from its type (and its ``alg``, when it names one)."""
    kty = jwk.get("kty")
    crv = None if kty == "RSA" else jwk.get("crv")
    allowed = _ALGORITHMS.get((str(kty), crv), ())
    named = jwk.get("alg")
    if named:
        return (named,) if named in allowed else ()
    return allowed


def claim_path(claims: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path (``realm_access.roles``), or None."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def groups_from(value: Any) -> frozenset[str]:
    """Groups from a claim that holds a list or a space-separated string."""
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list):
        return frozenset(str(v) for v in value if isinstance(v, str | int))
    return frozenset()


def thumbprint_sha256(der: bytes) -> str:
    """The ``x5t#S256`` of a DER certificate (RFC 8705): base64url SHA-256, no padding."""
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


class KeyCache:
    """One issuer's verification keys, fetched over HTTPS and cached by ``kid``."""

    def __init__(
        self,
        fetch: Callable[[], Any],
        *,
        refresh_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._refresh_interval = refresh_interval
        self._clock = clock
        self._keys: dict[str | None, dict[str, Any]] = {}
        self._fetched_at: float | None = None
        self._inflight: asyncio.Future[None] | None = None

    async def key(self, kid: str | None) -> dict[str, Any]:
        """The JWK for ``kid``; refresh once if unknown and the rate limit allows."""
        found = self._lookup(kid)
        if found is not None:
            return found
        due = self._fetched_at is None or self._clock() - self._fetched_at >= self._refresh_interval
        if due:
            await self.refresh()
            found = self._lookup(kid)
            if found is not None:
                return found
        raise AuthenticationFailed(
            f"token is signed by a key the issuer does not publish (kid {kid!r})"
        )

    def _lookup(self, kid: str | None) -> dict[str, Any] | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    async def refresh(self) -> None:
        """Fetch the JWKS once, however many connections ask at the same time."""
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
            return
        loop = asyncio.get_running_loop()
        self._inflight = loop.create_future()
        try:
            document = await self._fetch()
            keys = {k.get("kid"): k for k in document.get("keys", []) if isinstance(k, dict)}
            usable = {kid: k for kid, k in keys.items() if k.get("use", "sig") == "sig"}
            self._keys = usable
        except AuthenticationFailed:
            raise
        except Exception as exc:  # network, TLS, JSON: keep the keys we had, fail closed
            log.warning("could not refresh signing keys: %s", exc)
            raise AuthenticationFailed(
                "the gateway could not fetch the issuer's signing keys and has none cached "
                "for this token; try again shortly",
                sqlstate="08004",
            ) from exc
        finally:
            self._fetched_at = self._clock()
            self._inflight.set_result(None)
            self._inflight = None


def _get_json(url: str, *, context: ssl.SSLContext, timeout: float, token: str | None) -> Any:
    if not url.startswith("https://"):
        raise ValueError(f"{url}: keys are fetched over HTTPS only")
    # kube-apiserver serves its JWKS only as application/jwk-set+json (406 otherwise).
    accept = "application/json, application/jwk-set+json"
    request = urllib.request.Request(url, headers={"Accept": accept})  # noqa: S310
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    # Only https URLs get here: the policy model and discovery check both refuse others.
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:  # noqa: S310
        body = response.read(_MAX_DOCUMENT + 1)
    if len(body) > _MAX_DOCUMENT:
        raise ValueError(f"{url}: document larger than {_MAX_DOCUMENT} bytes")
    return json.loads(body)


class JwtVerifier:
    """Verifies tokens of one JWT issuer (OIDC, Kubernetes or development)."""

    def __init__(self, config: OidcIssuer | KubernetesIssuer | DevIssuer) -> None:
        self.config = config
        self.keys: KeyCache | None = None
        self._static_key: dict[str, Any] | None = None
        self._discovered_jwks_uri: str | None = None
        if isinstance(config, DevIssuer):
            from querywarden.identity.dev import load_public_jwk

            self._static_key = load_public_jwk(config.key_file)
        else:
            self.keys = KeyCache(
                self._fetch_jwks,
                refresh_interval=config.jwks_refresh_interval.total_seconds(),
            )

    # key fetching -------------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        assert not isinstance(self.config, DevIssuer)
        context = ssl.create_default_context()
        if self.config.ca_file is not None:
            context.load_verify_locations(cafile=str(self.config.ca_file))
        return context

    async def _fetch_jwks(self) -> Any:
        config = self.config
        assert not isinstance(config, DevIssuer)
        context = self._tls_context()
        timeout = config.fetch_timeout.total_seconds()
        bearer = None
        if isinstance(config, KubernetesIssuer) and config.bearer_token_file is not None:
            bearer = config.bearer_token_file.read_text().strip()
        jwks_uri = config.jwks_uri or self._discovered_jwks_uri
        if jwks_uri is None:
            url = config.issuer.rstrip("/") + "/.well-known/openid-configuration"
            discovery = await asyncio.wait_for(
                asyncio.to_thread(_get_json, url, context=context, timeout=timeout, token=bearer),
                timeout,
            )
            if discovery.get("issuer") != config.issuer:
                raise ValueError(f"discovery at {url} names another issuer")
            jwks_uri = str(discovery.get("jwks_uri", ""))
            if not jwks_uri.startswith("https://"):
                raise ValueError(f"discovery at {url} has no HTTPS jwks_uri")
            # Discovery once: a refresh then costs one fetch, bounded by fetchTimeout.
            self._discovered_jwks_uri = jwks_uri
        return await asyncio.wait_for(
            asyncio.to_thread(_get_json, jwks_uri, context=context, timeout=timeout, token=bearer),
            timeout,
        )

    # verification -------------------------------------------------------------------

    async def verify(self, token: str, *, now: float | None = None) -> dict[str, Any]:
        """Check signature and claims; return the claims. Raises AuthenticationFailed."""
        config = self.config
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthenticationFailed("malformed token: not a valid JWT") from exc
        alg = header.get("alg")
        if self._static_key is not None:
            jwk = self._static_key
        else:
            assert self.keys is not None
            jwk = await self.keys.key(header.get("kid"))
        allowed = algorithms_for(jwk)
        if alg not in allowed:
            raise AuthenticationFailed(
                f"token algorithm {alg!r} is not accepted for issuer {config.name!r} "
                f"(its key allows {', '.join(allowed) or 'nothing'})"
            )
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=PyJWK(jwk, algorithm=alg).key,
                algorithms=[alg],
                audience=config.audiences,
                issuer=config.issuer,
                # Times are judged below, against ``now`` (the authenticator's clock).
                options={
                    "require": ["exp", "iat", "iss", "aud", "sub"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidAudienceError as exc:
            raise AuthenticationFailed(
                f"token audience is not accepted: issuer {config.name!r} requires one of "
                f"{', '.join(config.audiences)}"
            ) from exc
        except jwt.InvalidIssuerError as exc:
            raise AuthenticationFailed("token issuer does not match") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthenticationFailed("token signature is invalid") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationFailed(f"token lacks the required claim {exc.claim!r}") from exc
        except jwt.PyJWTError as exc:
            raise AuthenticationFailed(f"token is invalid: {type(exc).__name__}") from exc
        now = time.time() if now is None else now
        leeway = config.leeway.total_seconds()
        exp, iat = _numeric_date(claims, "exp"), _numeric_date(claims, "iat")
        nbf = _numeric_date(claims, "nbf") if "nbf" in claims else iat
        # No leeway on exp: the session ends at exp (Principal.expires_at), so a token
        # already past it would be authenticated only to have its first statement refused.
        if now >= exp:
            raise AuthenticationFailed(
                "token has expired: get a fresh one and reconnect", sqlstate="28000"
            )
        if max(nbf, iat) > now + leeway:
            raise AuthenticationFailed("token is not valid yet (nbf/iat in the future)")
        lifetime = exp - iat
        limit = config.max_token_lifetime.total_seconds()
        if lifetime > limit:
            raise AuthenticationFailed(
                f"token lifetime of {lifetime:.0f}s exceeds issuer {config.name!r}'s "
                f"maxTokenLifetime of {limit:.0f}s: long-lived tokens are not accepted"
            )
        return claims


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthenticationFailed(f"token claim {name!r} is not a NumericDate")
    return float(value)


def unverified_issuer(token: str) -> str | None:
    """The ``iss`` a JWT claims (unverified: only to pick which issuer verifies it)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    iss = claims.get("iss")
    return iss if isinstance(iss, str) else None
