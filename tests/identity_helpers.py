"""Material for the identity tests: keys, JWKS documents, hand-made JWTs, SAML, a small PKI.

Everything here is made with the same libraries a real issuer would use (cryptography,
pyjwt, signxml), so the verifiers are tested against tokens and assertions they did not
make themselves. The JWT helpers can also build what no honest issuer would: ``alg: none``,
HMAC keyed with a public key, tampered payloads, wrapped SAML assertions.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from lxml import etree
from signxml.signer import XMLSigner

from querywarden.hooks import ALLOW, Decision, SessionInfo, StatementRequest
from querywarden.identity import Principal
from querywarden.tlsutil import CA_KEY_USAGE

AUDIENCE = "querywarden"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

# --- keys and JWKS ---------------------------------------------------------------------


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def ed25519_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_jwk(
    key: PrivateKey, *, kid: str | None, alg: str | None = None, use: str | None = "sig"
) -> dict[str, Any]:
    """The public half of ``key`` as a JWK, as an issuer publishes it in its JWKS."""
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    jwk.pop("key_ops", None)
    if kid is not None:
        jwk["kid"] = kid
    if alg is not None:
        jwk["alg"] = alg
    if use is not None:
        jwk["use"] = use
    return jwk


def jwks(*keys: dict[str, Any]) -> dict[str, Any]:
    return {"keys": [dict(k) for k in keys]}


def key_material(key: PrivateKey) -> list[str]:
    """Strings that must never appear in an error: PEM bodies and the JWK's numbers."""
    material = [
        line
        for pem in (public_pem(key), private_pem(key))
        for line in pem.decode().splitlines()
        if line and not line.startswith("-----")
    ]
    jwk = public_jwk(key, kid=None, use=None)
    material += [str(jwk[k]) for k in ("n", "x", "y") if k in jwk]
    return material


class FakeJwks:
    """An in-memory JWKS fetch for a KeyCache: counts calls, can fail or block.

    ``block()`` makes every fetch wait until ``release()``; ``fail_with`` makes it raise,
    as a network error would.
    """

    def __init__(self, *keys: dict[str, Any]) -> None:
        self.document = jwks(*keys)
        self.calls = 0
        self.fail_with: BaseException | None = None
        self._gate: asyncio.Event | None = None
        self.started: asyncio.Event | None = None

    def publish(self, *keys: dict[str, Any]) -> None:
        self.document = jwks(*keys)

    def block(self) -> None:
        self._gate = asyncio.Event()
        self.started = asyncio.Event()

    def release(self) -> None:
        assert self._gate is not None
        self._gate.set()

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.started is not None:
            self.started.set()
        if self._gate is not None:
            await self._gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return copy.deepcopy(self.document)


# --- JWTs ------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _json_segment(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def claims_for(
    iss: str,
    sub: str = "agent-7",
    *,
    aud: str | list[str] = AUDIENCE,
    ttl: float = 300,
    now: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Claims of a well-formed access token: iat/nbf now, exp after ``ttl`` seconds."""
    issued = int(time.time() if now is None else now)
    return {
        "iss": iss,
        "sub": sub,
        "aud": aud,
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl),
        "jti": uuid.uuid4().hex,
        **extra,
    }


def sign_jwt(
    claims: dict[str, Any],
    key: PrivateKey,
    *,
    alg: str,
    kid: str | None = None,
    headers: dict[str, Any] | None = None,
) -> str:
    """A JWT signed by ``key`` with pyjwt, as an issuer signs it."""
    extra = dict(headers or {})
    if kid is not None:
        extra["kid"] = kid
    return jwt.encode(claims, key, algorithm=alg, headers=extra)


def raw_jwt(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A JWT assembled by hand: any header (``alg: none``), any signature bytes."""
    return f"{_json_segment(header)}.{_json_segment(claims)}.{b64url(signature)}"


def hmac_jwt(claims: dict[str, Any], secret: bytes, *, kid: str | None = None) -> str:
    """HS256 keyed with ``secret`` (e.g. the issuer's public key PEM: key confusion)."""
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = f"{_json_segment(header)}.{_json_segment(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def tamper_payload(token: str, **changes: Any) -> str:
    """The same header and signature over a changed payload."""
    header, payload, signature = token.split(".")
    claims = json.loads(b64url_decode(payload))
    claims.update(changes)
    return f"{header}.{_json_segment(claims)}.{signature}"


def corrupt_signature(token: str) -> str:
    """The same header and payload with one bit of the signature flipped."""
    header, payload, signature = token.split(".")
    raw = bytearray(b64url_decode(signature))
    raw[len(raw) // 2] ^= 0x01
    return f"{header}.{payload}.{b64url(bytes(raw))}"


def assert_no_leak(message: str, token: str | bytes, *material: str | bytes) -> None:
    """The refusal must not echo the token (or any part of it) nor any key material."""
    text = token.decode(errors="replace") if isinstance(token, bytes) else token
    pieces = [text, *(p for p in text.split(".") if len(p) >= 16)]
    for item in material:
        pieces.append(item.decode(errors="replace") if isinstance(item, bytes) else item)
    for piece in pieces:
        if len(piece) >= 16:
            assert piece not in message, f"the error echoes secret material: {message!r}"
            # Also no recognisable fragment of it.
            assert piece[:32] not in message, f"the error echoes secret material: {message!r}"


# --- X.509: a CA, client certificates, a self-signed IdP certificate -------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder, days: int = 7) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(
        now + datetime.timedelta(days=days)
    )


def self_signed_certificate(key: PrivateKey, common_name: str) -> tuple[x509.Certificate, str]:
    """A self-signed certificate for ``key`` (an IdP's signing certificate) and its PEM."""
    builder = _validity(
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    cert = builder.sign(key, algorithm)
    return cert, cert.public_bytes(serialization.Encoding.PEM).decode()


def write_private_key(path: Path, key: PrivateKey) -> Path:
    """Write a PEM private key with mode 0600 (libpq refuses a key others can read)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem(key))
    return path


@dataclass
class ClientCertificate:
    cert_file: Path
    key_file: Path
    der: bytes


@dataclass
class Pki:
    """A throw-away CA that issues TLS client certificates."""

    directory: Path
    ca_key: ec.EllipticCurvePrivateKey = field(default_factory=ec_key)
    ca_cert: x509.Certificate | None = None

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        builder = _validity(
            x509.CertificateBuilder()
            .subject_name(_name("querywarden test client CA"))
            .issuer_name(_name("querywarden test client CA"))
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(CA_KEY_USAGE, critical=True)
        )
        self.ca_cert = builder.sign(self.ca_key, hashes.SHA256())
        self.ca_file.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))

    @property
    def ca_file(self) -> Path:
        return self.directory / "client-ca.crt"

    def issue(self, common_name: str) -> ClientCertificate:
        """A client certificate (and its 0600 key file) signed by this CA."""
        assert self.ca_cert is not None
        key = ec_key()
        cert = _validity(
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        ).sign(self.ca_key, hashes.SHA256())
        cert_file = self.directory / f"{common_name}.crt"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file = write_private_key(self.directory / f"{common_name}.key", key)
        return ClientCertificate(cert_file, key_file, cert.public_bytes(serialization.Encoding.DER))


# --- SAML ------------------------------------------------------------------------------

SAML_NS = "urn:oasis:names:tc:SAML:2.0:assertion"
SAMLP_NS = "urn:oasis:names:tc:SAML:2.0:protocol"
DS_NS = "http://www.w3.org/2000/09/xmldsig#"
EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"


def _saml(tag: str) -> str:
    return f"{{{SAML_NS}}}{tag}"


def _samlp(tag: str) -> str:
    return f"{{{SAMLP_NS}}}{tag}"


def saml_instant(when: float) -> str:
    moment = datetime.datetime.fromtimestamp(when, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class _Sha1Signer(XMLSigner):
    """signxml refuses SHA-1 unless told otherwise (its documented way): an old IdP."""

    def check_deprecated_methods(self) -> None:
        return None


class SamlIdp:
    """A SAML identity provider: an RSA signing key, its self-signed certificate, an entity ID."""

    def __init__(self, entity_id: str = "https://idp.example.test/saml") -> None:
        self.entity_id = entity_id
        self.key = rsa_key()
        self.cert, self.cert_pem = self_signed_certificate(self.key, "saml-idp")

    def issuer_config(self, name: str = "corp-saml", **overrides: Any) -> dict[str, Any]:
        """The policy entry (camelCase, as in policy.yaml) that trusts this IdP."""
        return {
            "name": name,
            "kind": "saml",
            "entityId": self.entity_id,
            "certificate": self.cert_pem,
            "audience": AUDIENCE,
            "groupsAttribute": "groups",
            **overrides,
        }

    def assertion(
        self,
        subject: str = "alice",
        *,
        groups: Iterable[str] = ("ai-agents",),
        audience: str = AUDIENCE,
        issuer: str | None = None,
        now: float | None = None,
        not_before: float | None = None,
        not_on_or_after: float | None = None,
        issue_instant: float | None = None,
        ttl: float = 300,
        assertion_id: str | None = None,
        groups_attribute: str = "groups",
    ) -> etree._Element:
        """An unsigned ``<saml:Assertion>`` with Issuer, Subject, Conditions, attributes."""
        now = time.time() if now is None else now
        issued = now if issue_instant is None else issue_instant
        begins = now if not_before is None else not_before
        ends = now + ttl if not_on_or_after is None else not_on_or_after
        root = etree.Element(_saml("Assertion"), nsmap={"saml": SAML_NS})
        root.set("ID", assertion_id or f"_{uuid.uuid4().hex}")
        root.set("Version", "2.0")
        root.set("IssueInstant", saml_instant(issued))
        etree.SubElement(root, _saml("Issuer")).text = issuer or self.entity_id
        subject_el = etree.SubElement(root, _saml("Subject"))
        name_id = etree.SubElement(subject_el, _saml("NameID"))
        name_id.set("Format", "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified")
        name_id.text = subject
        conditions = etree.SubElement(root, _saml("Conditions"))
        conditions.set("NotBefore", saml_instant(begins))
        conditions.set("NotOnOrAfter", saml_instant(ends))
        restriction = etree.SubElement(conditions, _saml("AudienceRestriction"))
        etree.SubElement(restriction, _saml("Audience")).text = audience
        statement = etree.SubElement(root, _saml("AttributeStatement"))
        attribute = etree.SubElement(statement, _saml("Attribute"))
        attribute.set("Name", groups_attribute)
        for group in groups:
            etree.SubElement(attribute, _saml("AttributeValue")).text = group
        return root

    def response(self, *assertions: etree._Element, issuer: str | None = None) -> etree._Element:
        """A ``<samlp:Response>`` wrapping the given assertions (unsigned)."""
        root = etree.Element(_samlp("Response"), nsmap={"samlp": SAMLP_NS, "saml": SAML_NS})
        root.set("ID", f"_{uuid.uuid4().hex}")
        root.set("Version", "2.0")
        root.set("IssueInstant", saml_instant(time.time()))
        etree.SubElement(root, _saml("Issuer")).text = issuer or self.entity_id
        for assertion in assertions:
            root.append(assertion)
        return root

    def sign(
        self,
        element: etree._Element,
        *,
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None,
        cert_pem: str | None = None,
        signature_algorithm: str = "rsa-sha256",
        digest_algorithm: str = "sha256",
    ) -> etree._Element:
        """Sign ``element`` (enveloped, referenced by its ID), as an IdP does."""
        legacy = "sha1" in signature_algorithm or "sha1" in digest_algorithm
        signer = (_Sha1Signer if legacy else XMLSigner)(
            signature_algorithm=signature_algorithm,
            digest_algorithm=digest_algorithm,
            c14n_algorithm=EXC_C14N,
        )
        signed: etree._Element = signer.sign(
            element,
            key=key or self.key,
            cert=cert_pem or self.cert_pem,
            reference_uri=f"#{element.get('ID')}",
        )
        return signed

    def signed_assertion(self, subject: str = "alice", **kwargs: Any) -> bytes:
        """The XML of a signed assertion."""
        return to_xml(self.sign(self.assertion(subject, **kwargs)))


def to_xml(element: etree._Element) -> bytes:
    return bytes(etree.tostring(element))


def parse_xml(xml: bytes) -> etree._Element:
    return etree.fromstring(xml)


def saml_password(xml: bytes | etree._Element) -> bytes:
    """What the client sends in the password field: the base64 of the XML."""
    if not isinstance(xml, bytes):
        xml = to_xml(xml)
    return base64.b64encode(xml)


def find(element: etree._Element, path: str) -> etree._Element:
    found = element.find(path, {"saml": SAML_NS, "samlp": SAMLP_NS, "ds": DS_NS})
    assert found is not None, path
    return found


class RecordPrincipals:
    """A test-only gate: allows everything and records the Principal of each statement."""

    def __init__(self) -> None:
        self.principals: list[Principal] = []

    def decide(self, session: SessionInfo, request: StatementRequest) -> Decision:
        """Allow, and remember who asked."""
        self.principals.append(session.principal)
        return ALLOW

    def last(self) -> Principal:
        """The Principal of the latest statement."""
        assert self.principals, "no statement reached the gate"
        return self.principals[-1]
