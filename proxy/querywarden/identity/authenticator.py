"""The token authenticator: picks the trusted issuer a token names and verifies it."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from typing import Any

from querywarden.errors import AuthenticationFailed
from querywarden.identity import saml
from querywarden.identity.jwt_tokens import (
    JwtVerifier,
    claim_path,
    groups_from,
    thumbprint_sha256,
    unverified_issuer,
)
from querywarden.identity.principal import Credentials, Principal, check_secret_shape
from querywarden.policy.model import IdentitySection, KubernetesIssuer, OidcIssuer, SamlIssuer

#: What a client that sent anything but a token is told. Most often it is a database
#: password (a saved one, or one just set with psql's \password), so the message says
#: where a token comes from.
_UNRECOGNIZED = (
    "malformed token: not a JWT or SAML assertion; the password field takes a token "
    "from an identity provider this gateway trusts, not a database password"
)


class TokenAuthenticator:
    """Verifies OIDC, Kubernetes service-account, SAML and development tokens.

    The token's own (unverified) issuer only selects which trusted issuer's keys verify
    it; a token naming no trusted issuer is refused without further parsing.
    """

    def __init__(
        self, identity: IdentitySection, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._clock = clock
        self._jwt: dict[str, JwtVerifier] = {}
        self._saml: dict[str, SamlIssuer] = {}
        for issuer in identity.issuers:
            if isinstance(issuer, SamlIssuer):
                self._saml[issuer.entity_id] = issuer
            else:
                self._jwt[issuer.issuer] = JwtVerifier(issuer)

    @property
    def verifiers(self) -> dict[str, JwtVerifier]:
        """The JWT verifiers by issuer URL (for warming caches and tests)."""
        return self._jwt

    async def authenticate(self, credentials: Credentials) -> Principal:
        """Verify the password-slot token and return its Principal."""
        check_secret_shape(credentials.secret)
        secret = credentials.secret.strip()
        xml = saml.decode_assertion(secret) if secret.count(b".") != 2 else None
        if xml is not None:
            return self._saml_principal(xml)
        try:
            token = secret.decode("ascii")
        except UnicodeDecodeError as exc:
            raise AuthenticationFailed(_UNRECOGNIZED) from exc
        iss = unverified_issuer(token)
        if iss is None:
            raise AuthenticationFailed(_UNRECOGNIZED)
        verifier = self._jwt.get(iss)
        if verifier is None:
            raise AuthenticationFailed("token issuer is not trusted by this gateway's policy")
        claims = await verifier.verify(token, now=self._clock())
        _check_confirmation(claims, credentials.client_certificate)
        return _jwt_principal(verifier, claims)

    def _saml_principal(self, xml: bytes) -> Principal:
        entity = saml.unverified_issuer(xml)
        config = self._saml.get(entity or "")
        if config is None:
            raise AuthenticationFailed("SAML issuer is not trusted by this gateway's policy")
        return saml.verify_assertion(xml, config, now=self._clock())


def _check_confirmation(claims: dict[str, Any], certificate: bytes | None) -> None:
    """RFC 8705: a token bound to a certificate is only good with that certificate."""
    cnf = claims.get("cnf")
    if not isinstance(cnf, dict) or "x5t#S256" not in cnf:
        return
    if certificate is None:
        raise AuthenticationFailed(
            "token is bound to a client certificate (cnf x5t#S256): connect over TLS "
            "with that certificate",
            sqlstate="28000",
        )
    if not hmac.compare_digest(str(cnf["x5t#S256"]), thumbprint_sha256(certificate)):
        raise AuthenticationFailed(
            "token is bound to a different client certificate than the one presented",
            sqlstate="28000",
        )


def _jwt_principal(verifier: JwtVerifier, claims: dict[str, Any]) -> Principal:
    config = verifier.config
    subject = str(claims["sub"])
    groups = groups_from(claim_path(claims, config.groups_claim))
    display = ""
    if isinstance(config, OidcIssuer):
        display = str(claim_path(claims, config.display_name_claim) or "")
    if isinstance(config, KubernetesIssuer):
        groups = groups | _service_account_groups(config, subject, claims)
    return Principal(
        subject=subject,
        groups=groups,
        issuer=config.name,
        display_name=display or subject,
        expires_at=float(claims["exp"]),
    )


def _service_account_groups(
    config: KubernetesIssuer, subject: str, claims: dict[str, Any]
) -> frozenset[str]:
    parts = subject.split(":")
    if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
        raise AuthenticationFailed("Kubernetes token subject is not a service account")
    namespace = parts[2]
    # The claim's key itself contains a dot, so no dotted path here.
    k8s = claims.get("kubernetes.io")
    declared = k8s.get("namespace") if isinstance(k8s, dict) else None
    if declared is not None and declared != namespace:
        raise AuthenticationFailed("Kubernetes token namespace does not match its subject")
    groups = {"system:serviceaccounts", f"system:serviceaccounts:{namespace}"}
    groups.update(config.group_mappings.get(subject, ()))
    groups.update(config.group_mappings.get(namespace, ()))
    return frozenset(groups)
