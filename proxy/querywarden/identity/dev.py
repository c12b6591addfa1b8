"""The development issuer: a local ES256 key that mints short-lived tokens.

For demos and tests only. A policy trusts these tokens only when it lists an issuer of
kind ``dev`` with the same key file. ``querywarden token`` mints them.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

DEFAULT_KEY_FILE = Path(".querywarden/dev-issuer.pem")
DEFAULT_ISSUER = "querywarden-dev"
DEFAULT_AUDIENCE = "querywarden"


def ensure_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load the signing key, creating it (mode 0600) on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first: use theirs
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: the development issuer key must be an EC P-256 key")
    return loaded


def _kid(public_jwk: dict[str, Any]) -> str:
    # RFC 7638 thumbprint of the public key: stable across processes.
    canonical = json.dumps(
        {k: public_jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":")
    )
    import base64
    import hashlib

    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def load_public_jwk(path: Path) -> dict[str, Any]:
    """The public half of the key as a JWK (with ``alg`` ES256 and its ``kid``)."""
    key = ensure_key(path)
    jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(alg="ES256", use="sig", kid=_kid(jwk))
    return jwk


def mint_token(
    subject: str,
    *,
    groups: list[str] | tuple[str, ...] = (),
    ttl: float = 600.0,
    key_file: Path = DEFAULT_KEY_FILE,
    issuer: str = DEFAULT_ISSUER,
    audience: str = DEFAULT_AUDIENCE,
    extra: dict[str, Any] | None = None,
    now: float | None = None,
) -> str:
    """A signed JWT for ``subject`` with ``groups``, valid for ``ttl`` seconds."""
    key = ensure_key(key_file)
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl),
        "jti": secrets.token_hex(8),
        "groups": list(groups),
        **(extra or {}),
    }
    kid = load_public_jwk(key_file)["kid"]
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})
