"""SAML 2.0 assertions presented base64-encoded in the password slot.

Verified with signxml (a maintained, pure-Python XML-DSig implementation on lxml that
needs no native xmlsec library and refuses SHA-1 by default). Against signature wrapping,
every claim is read from the element the signature actually covers (signxml's
``signed_xml``), never from the document as received.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import time
from typing import Any

from lxml import etree
from signxml.exceptions import SignXMLException
from signxml.verifier import XMLVerifier

from querywarden.errors import AuthenticationFailed
from querywarden.identity.principal import Principal
from querywarden.policy.model import SamlIssuer

NS = {"saml": "urn:oasis:names:tc:SAML:2.0:assertion"}
_ASSERTION = "{urn:oasis:names:tc:SAML:2.0:assertion}Assertion"


def _parser() -> etree.XMLParser:
    # No DTDs, no entities, no network: the assertion is attacker-supplied input.
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


def decode_assertion(secret: bytes) -> bytes | None:
    """The XML of a base64-encoded assertion, or None when the secret is not one."""
    # Tools such as GNU base64 wrap lines: white space is not part of the encoding.
    compact = b"".join(secret.split())
    try:
        xml = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None
    return xml if xml.lstrip().startswith(b"<") else None


def unverified_issuer(xml: bytes) -> str | None:
    """The ``<Issuer>`` the document claims (unverified: only to pick the verifier)."""
    try:
        root = etree.fromstring(xml, parser=_parser())
    except etree.XMLSyntaxError:
        return None
    found = root.find(".//saml:Issuer", NS)
    return found.text.strip() if found is not None and found.text else None


def _instant(value: str | None, what: str) -> float:
    if not value:
        raise AuthenticationFailed(f"SAML assertion lacks {what}")
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise AuthenticationFailed(f"SAML assertion has an invalid {what}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


def verify_assertion(xml: bytes, config: SamlIssuer, *, now: float | None = None) -> Principal:
    """Verify signature, issuer, validity window and audience; return the Principal."""
    now = time.time() if now is None else now
    try:
        result: Any = XMLVerifier().verify(
            xml, x509_cert=config.certificate_pem(), parser=_parser()
        )
    except etree.XMLSyntaxError as exc:
        raise AuthenticationFailed("SAML assertion is not well-formed XML") from exc
    except (SignXMLException, etree.DocumentInvalid, TypeError, ValueError) as exc:
        # The XML is the client's: a Signature that is missing, schema-invalid (DocumentInvalid)
        # or has empty values (TypeError in b64decode) is a refused credential, not a crash.
        raise AuthenticationFailed("SAML assertion signature is invalid or missing") from exc
    signed = result.signed_xml
    # The signed element is the Assertion itself, or a Response that contains exactly one.
    if signed.tag == _ASSERTION:
        assertion = signed
    else:
        inner = signed.findall("saml:Assertion", NS)
        if len(inner) != 1:
            raise AuthenticationFailed("SAML signature does not cover exactly one assertion")
        assertion = inner[0]
    issuer = assertion.findtext("saml:Issuer", namespaces=NS)
    if issuer is None or issuer.strip() != config.entity_id:
        raise AuthenticationFailed("SAML assertion issuer does not match")
    leeway = config.leeway.total_seconds()
    conditions = assertion.find("saml:Conditions", NS)
    if conditions is None:
        raise AuthenticationFailed("SAML assertion lacks Conditions")
    not_before = _instant(conditions.get("NotBefore"), "NotBefore")
    not_on_or_after = _instant(conditions.get("NotOnOrAfter"), "NotOnOrAfter")
    if now + leeway < not_before:
        raise AuthenticationFailed("SAML assertion is not valid yet (NotBefore)")
    # No leeway here: the session ends at NotOnOrAfter (Principal.expires_at).
    if now >= not_on_or_after:
        raise AuthenticationFailed(
            "SAML assertion has expired: get a fresh one and reconnect", sqlstate="28000"
        )
    issued = _instant(assertion.get("IssueInstant"), "IssueInstant")
    lifetime = not_on_or_after - min(issued, not_before)
    limit = config.max_token_lifetime.total_seconds()
    if lifetime > limit:
        raise AuthenticationFailed(
            f"SAML assertion lifetime of {lifetime:.0f}s exceeds issuer {config.name!r}'s "
            f"maxTokenLifetime of {limit:.0f}s"
        )
    audiences = [
        (a.text or "").strip()
        for a in conditions.findall("saml:AudienceRestriction/saml:Audience", NS)
    ]
    if config.audience not in audiences:
        raise AuthenticationFailed(
            f"SAML assertion audience is not accepted: issuer {config.name!r} requires "
            f"{config.audience}"
        )
    subject = assertion.findtext("saml:Subject/saml:NameID", namespaces=NS)
    if not subject or not subject.strip():
        raise AuthenticationFailed("SAML assertion lacks a NameID")
    groups = frozenset(
        (value.text or "").strip()
        for attribute in assertion.findall("saml:AttributeStatement/saml:Attribute", NS)
        if attribute.get("Name") == config.groups_attribute
        for value in attribute.findall("saml:AttributeValue", NS)
        if (value.text or "").strip()
    )
    return Principal(
        subject=subject.strip(),
        groups=groups,
        issuer=config.name,
        display_name=subject.strip(),
        expires_at=not_on_or_after,
    )
