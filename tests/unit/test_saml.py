"""SAML 2.0 assertions in the password slot, no sockets.

Assertions are built with lxml and signed with signxml's XMLSigner by an IdP key and
self-signed certificate made here with cryptography. Besides the plain checks (signature,
issuer, validity window, audience, lifetime), the signature-wrapping attacks: a validly
signed assertion for ``alice`` next to, or moved under, an unsigned one for ``admin``.
Whatever the shape, the outcome is a refusal or the *signed* subject, never ``admin``.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import time
from typing import Any

import pytest
from lxml import etree

from identity_helpers import (
    DS_NS,
    SAML_NS,
    SAMLP_NS,
    SamlIdp,
    assert_no_leak,
    find,
    key_material,
    parse_xml,
    rsa_key,
    saml_password,
    self_signed_certificate,
    to_xml,
)
from querywarden.errors import AuthenticationFailed
from querywarden.identity import Credentials, Principal
from querywarden.identity.authenticator import TokenAuthenticator
from querywarden.identity.saml import decode_assertion, unverified_issuer, verify_assertion
from querywarden.policy.model import IdentitySection, SamlIssuer


@pytest.fixture(scope="module")
def idp() -> SamlIdp:
    return SamlIdp()


@pytest.fixture(scope="module")
def other_idp() -> SamlIdp:
    return SamlIdp("https://other-idp.example.test/saml")


def authenticator(*idps: SamlIdp, **overrides: Any) -> TokenAuthenticator:
    issuers = [idp.issuer_config(f"saml-{i}", **overrides) for i, idp in enumerate(idps)]
    return TokenAuthenticator(IdentitySection.model_validate({"issuers": issuers}))


def accept(auth: TokenAuthenticator, xml: bytes | etree._Element) -> Principal:
    secret = saml_password(xml)
    return asyncio.run(auth.authenticate(Credentials("someone", secret, "127.0.0.1:40000")))


def refuse(
    auth: TokenAuthenticator,
    xml: bytes | etree._Element,
    idp: SamlIdp,
    *,
    sqlstates: tuple[str, ...] = ("28P01",),
) -> AuthenticationFailed:
    secret = saml_password(xml)
    with pytest.raises(AuthenticationFailed) as caught:
        asyncio.run(auth.authenticate(Credentials("someone", secret, "127.0.0.1:40000")))
    error = caught.value
    assert error.sqlstate in sqlstates, (error.sqlstate, error.message)
    parser = etree.XMLParser(resolve_entities=False, load_dtd=False, no_network=True, recover=True)
    document = etree.fromstring(base64.b64decode(secret), parser=parser)
    signature_values = [el.text or "" for el in document.iter(f"{{{DS_NS}}}*")]
    assert_no_leak(error.message, secret, *key_material(idp.key), *signature_values, idp.cert_pem)
    return error


@pytest.fixture(scope="module")
def auth(idp: SamlIdp) -> TokenAuthenticator:
    return authenticator(idp)


# --- accepted --------------------------------------------------------------------------


def test_signed_assertion_gives_nameid_and_groups(idp: SamlIdp, auth: TokenAuthenticator) -> None:
    now = time.time()
    xml = idp.signed_assertion("alice", groups=["ai-agents", "readers"], now=now, ttl=300)
    principal = accept(auth, xml)
    assert principal.subject == "alice"
    assert principal.groups == {"ai-agents", "readers"}
    assert principal.issuer == "saml-0"
    assert principal.display_name == "alice"
    assert principal.expires_at == float(int(now) + 300)


def test_groups_come_from_the_configured_attribute(idp: SamlIdp) -> None:
    auth = authenticator(idp, groupsAttribute="memberOf")
    xml = idp.signed_assertion("alice", groups=["cn=dba"], groups_attribute="memberOf")
    assert accept(auth, xml).groups == {"cn=dba"}
    # The default attribute name is not read when another one is configured.
    assert accept(auth, idp.signed_assertion("alice", groups=["dba"])).groups == frozenset()


def test_signed_response_containing_one_assertion(idp: SamlIdp, auth: TokenAuthenticator) -> None:
    response = idp.sign(idp.response(idp.assertion("alice")))
    assert accept(auth, response).subject == "alice"


def test_signed_response_with_two_assertions_is_refused(
    idp: SamlIdp, auth: TokenAuthenticator
) -> None:
    response = idp.sign(idp.response(idp.assertion("alice"), idp.assertion("bob")))
    error = refuse(auth, response, idp)
    assert "exactly one assertion" in error.message


def test_whitespace_around_the_base64_is_ignored(idp: SamlIdp, auth: TokenAuthenticator) -> None:
    secret = b"  " + saml_password(idp.signed_assertion("alice")) + b"\n"
    principal = asyncio.run(auth.authenticate(Credentials("someone", secret, "127.0.0.1:1")))
    assert principal.subject == "alice"


def test_line_wrapped_base64_is_accepted(idp: SamlIdp, auth: TokenAuthenticator) -> None:
    # GNU base64 wraps at 76 columns by default; the wrapped form is still the assertion.
    flat = saml_password(idp.signed_assertion("alice"))
    wrapped = b"\n".join(flat[i : i + 76] for i in range(0, len(flat), 76))
    assert b"\n" in wrapped
    principal = asyncio.run(auth.authenticate(Credentials("someone", wrapped, "127.0.0.1:1")))
    assert principal.subject == "alice"


# --- refused: signature ----------------------------------------------------------------


def test_unsigned_assertion_is_refused(idp: SamlIdp, auth: TokenAuthenticator) -> None:
    error = refuse(auth, idp.assertion("admin"), idp)
    assert "signature is invalid or missing" in error.message


def test_assertion_signed_by_another_key_is_refused(idp: SamlIdp, auth: TokenAuthenticator) -> None:
    """An attacker's own key and certificate (embedded in KeyInfo) are not trusted."""
    key = rsa_key()
    _, pem = self_signed_certificate(key, "saml-idp")
    forged = idp.sign(idp.assertion("admin"), key=key, cert_pem=pem)
    error = refuse(auth, forged, idp)
    assert "signature is invalid" in error.message


@pytest.mark.parametrize(
    "change",
    ["nameid", "group", "not-on-or-after", "audience"],
)
def test_assertion_changed_after_signing_is_refused(
    idp: SamlIdp, auth: TokenAuthenticator, change: str
) -> None:
    signed = idp.sign(idp.assertion("alice", groups=["readers"]))
    if change == "nameid":
        find(signed, "saml:Subject/saml:NameID").text = "admin"
    elif change == "group":
        find(signed, "saml:AttributeStatement/saml:Attribute/saml:AttributeValue").text = "dba"
    elif change == "not-on-or-after":
        find(signed, "saml:Conditions").set("NotOnOrAfter", "2099-01-01T00:00:00Z")
    else:
        find(signed, "saml:Conditions/saml:AudienceRestriction/saml:Audience").text = "x"
    error = refuse(auth, signed, idp)
    assert "signature is invalid" in error.message


def test_sha1_signature_is_refused(idp: SamlIdp, auth: TokenAuthenticator) -> None:
    signed = idp.sign(
        idp.assertion("alice"), signature_algorithm="rsa-sha1", digest_algorithm="sha1"
    )
    error = refuse(auth, signed, idp)
    assert "signature is invalid" in error.message


@pytest.mark.parametrize(
    "signature",
    [
        "<ds:Signature>garbage</ds:Signature>",
        "<ds:Signature><ds:SignedInfo/><ds:SignatureValue>!!not base64!!</ds:SignatureValue>"
        "</ds:Signature>",
        "<ds:Signature><ds:SignedInfo><ds:CanonicalizationMethod Algorithm="
        '"http://www.w3.org/2001/10/xml-exc-c14n#"/><ds:SignatureMethod Algorithm='
        '"http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"/><ds:Reference URI="#a1">'
        '<ds:DigestMethod Algorithm="http://www.w3.org/2001/04/xmlenc#sha256"/>'
        "<ds:DigestValue>AAAA</ds:DigestValue></ds:Reference></ds:SignedInfo>"
        "<ds:SignatureValue>%%%</ds:SignatureValue></ds:Signature>",
    ],
    ids=["text-content", "empty-signed-info", "signature-value-not-base64"],
)
def test_malformed_signature_element_is_refused(
    idp: SamlIdp, auth: TokenAuthenticator, signature: str
) -> None:
    """Anyone can send this: only the IdP's (public) entity ID is needed. It must be a
    plain refusal (28P01), not an unexpected exception (the gateway's 'internal error')."""
    xml = (
        f'<saml:Assertion xmlns:saml="{SAML_NS}" xmlns:ds="{DS_NS}" ID="a1" Version="2.0" '
        f'IssueInstant="2030-01-01T00:00:00Z"><saml:Issuer>{idp.entity_id}</saml:Issuer>'
        f"{signature}<saml:Subject><saml:NameID>admin</saml:NameID></saml:Subject>"
        "</saml:Assertion>"
    ).encode()
    error = refuse(auth, xml, idp)
    assert "signature" in error.message


def test_signed_assertion_with_an_emptied_signature_value_is_refused(
    idp: SamlIdp, auth: TokenAuthenticator
) -> None:
    """Schema-valid (an empty base64Binary) but nothing to verify: a refusal, not a crash."""
    signed = idp.sign(idp.assertion("admin"))
    find(signed, "ds:Signature/ds:SignatureValue").text = ""
    error = refuse(auth, signed, idp)
    assert "signature" in error.message


# --- refused: claims -------------------------------------------------------------------


def test_expired_assertion_is_refused_with_28000(idp: SamlIdp, auth: TokenAuthenticator) -> None:
    now = time.time()
    xml = idp.signed_assertion("alice", now=now - 900, ttl=300)  # ended 10 minutes ago
    error = refuse(auth, xml, idp, sqlstates=("28000",))
    assert "expired" in error.message


def test_assertion_not_valid_yet_is_refused(idp: SamlIdp, auth: TokenAuthenticator) -> None:
    now = time.time()
    xml = idp.signed_assertion("alice", now=now, not_before=now + 600, not_on_or_after=now + 900)
    error = refuse(auth, xml, idp)
    assert "not valid yet" in error.message


def test_leeway_tolerates_small_clock_skew(idp: SamlIdp, auth: TokenAuthenticator) -> None:
    now = time.time()
    xml = idp.signed_assertion("alice", now=now + 10)  # the IdP's clock is 10 s ahead
    assert accept(auth, xml).subject == "alice"


def test_an_accepted_assertion_is_not_already_expired(
    idp: SamlIdp, auth: TokenAuthenticator
) -> None:
    """As for JWTs: NotOnOrAfter 5 s ago (inside the leeway) must be refused as expired,
    not accepted with a Principal.expires_at in the past (the session would end at once)."""
    now = time.time()
    xml = idp.signed_assertion("alice", now=now - 65, ttl=60)
    try:
        principal = accept(auth, xml)
    except AuthenticationFailed as error:
        assert error.sqlstate == "28000"
        assert "expired" in error.message
        return
    assert principal.expires_at is not None
    assert principal.expires_at > time.time(), "accepted an assertion whose session is over"


def test_wrong_audience_is_refused(idp: SamlIdp, auth: TokenAuthenticator) -> None:
    xml = idp.signed_assertion("alice", audience="https://sp.elsewhere.example.test")
    error = refuse(auth, xml, idp)
    assert "audience" in error.message
    assert "querywarden" in error.message


def test_untrusted_issuer_entity_id_is_refused(
    idp: SamlIdp, other_idp: SamlIdp, auth: TokenAuthenticator
) -> None:
    error = refuse(auth, other_idp.signed_assertion("alice"), other_idp)
    assert "not trusted" in error.message


def test_signed_assertion_naming_another_issuer_is_refused(
    idp: SamlIdp, auth: TokenAuthenticator
) -> None:
    """The trusted IdP's key signed it, but the assertion names another entity ID."""
    signed = idp.sign(idp.assertion("alice", issuer="https://other-idp.example.test/saml"))
    # The unsigned Response around it names the trusted IdP, so its verifier is picked.
    response = idp.response(signed)
    error = refuse(auth, response, idp)
    assert "issuer does not match" in error.message


def test_assertion_signed_by_another_trusted_idp_is_refused(
    idp: SamlIdp, other_idp: SamlIdp
) -> None:
    """Two trusted IdPs: one cannot vouch for the other's entity ID."""
    auth = authenticator(idp, other_idp)
    forged = other_idp.sign(idp.assertion("admin"))  # names idp, signed by other_idp
    error = refuse(auth, forged, other_idp)
    assert "signature is invalid" in error.message
    assert accept(auth, other_idp.signed_assertion("carol")).issuer == "saml-1"


def test_lifetime_longer_than_max_token_lifetime_is_refused(
    idp: SamlIdp, auth: TokenAuthenticator
) -> None:
    now = time.time()
    assert accept(auth, idp.signed_assertion("alice", now=now, ttl=3600)).subject == "alice"
    error = refuse(auth, idp.signed_assertion("alice", now=now, ttl=7200), idp)
    assert "maxTokenLifetime" in error.message
    # An IssueInstant long before NotBefore counts too.
    xml = idp.signed_assertion("alice", now=now, issue_instant=now - 86400, ttl=300)
    error = refuse(auth, xml, idp)
    assert "maxTokenLifetime" in error.message


@pytest.mark.parametrize("missing", ["Conditions", "NameID", "NotOnOrAfter", "IssueInstant"])
def test_assertion_lacking_a_required_part_is_refused(
    idp: SamlIdp, auth: TokenAuthenticator, missing: str
) -> None:
    assertion = idp.assertion("alice")
    if missing == "Conditions":
        assertion.remove(find(assertion, "saml:Conditions"))
    elif missing == "NameID":
        subject = find(assertion, "saml:Subject")
        subject.remove(find(subject, "saml:NameID"))
    elif missing == "NotOnOrAfter":
        del find(assertion, "saml:Conditions").attrib["NotOnOrAfter"]
    else:
        del assertion.attrib["IssueInstant"]
    error = refuse(auth, idp.sign(assertion), idp)
    assert "lacks" in error.message


def test_verify_assertion_uses_the_clock_it_is_given(idp: SamlIdp) -> None:
    config = SamlIssuer.model_validate(idp.issuer_config())
    now = time.time()
    xml = idp.signed_assertion("alice", now=now, ttl=300)
    assert verify_assertion(xml, config, now=now).subject == "alice"
    with pytest.raises(AuthenticationFailed, match="expired"):
        verify_assertion(xml, config, now=now + 3600)
    with pytest.raises(AuthenticationFailed, match="not valid yet"):
        verify_assertion(xml, config, now=now - 3600)


# --- signature wrapping ----------------------------------------------------------------


def _evil(idp: SamlIdp, assertion_id: str | None = None) -> etree._Element:
    return idp.assertion("admin", groups=["dba", "superusers"], assertion_id=assertion_id)


def wrapped_sibling_first(idp: SamlIdp) -> etree._Element:
    """Response: an unsigned 'admin' assertion first, the signed 'alice' one after it."""
    return idp.response(_evil(idp), idp.sign(idp.assertion("alice")))


def wrapped_in_extensions(idp: SamlIdp) -> etree._Element:
    """Response: the signed 'alice' assertion hidden in Extensions, 'admin' where it was."""
    response = idp.response(_evil(idp))
    extensions = etree.Element(f"{{{SAMLP_NS}}}Extensions")
    extensions.append(idp.sign(idp.assertion("alice")))
    response.insert(1, extensions)  # after the Response's Issuer, as the schema has it
    return response


def wrapped_in_signature_object(idp: SamlIdp) -> etree._Element:
    """XSW: the 'admin' assertion is the root; the signature is moved into it and the
    signed 'alice' assertion into the signature's <ds:Object>. The reference still
    resolves to 'alice' and the digest still matches, so the signature is valid."""
    signed = idp.sign(idp.assertion("alice"))
    signature = find(signed, "ds:Signature")
    signed.remove(signature)
    evil = _evil(idp)
    obj = etree.SubElement(signature, f"{{{DS_NS}}}Object")
    obj.append(signed)
    evil.insert(1, signature)
    return evil


def wrapped_in_advice(idp: SamlIdp) -> etree._Element:
    """The 'admin' assertion as the root with the signed 'alice' one in its Advice."""
    evil = _evil(idp)
    advice = etree.Element(f"{{{SAML_NS}}}Advice")
    advice.append(idp.sign(idp.assertion("alice")))
    evil.append(advice)
    return evil


def wrapped_with_the_same_id(idp: SamlIdp) -> etree._Element:
    """The 'admin' assertion copies the signed one's ID, so a naive lookup finds it first."""
    signed = idp.sign(idp.assertion("alice"))
    evil = _evil(idp, assertion_id=signed.get("ID"))
    response = idp.response(evil)
    extensions = etree.Element(f"{{{SAMLP_NS}}}Extensions")
    extensions.append(signed)
    response.insert(1, extensions)
    return response


def signed_response_with_injected_assertion(idp: SamlIdp) -> etree._Element:
    """A signed Response for 'alice' with an 'admin' assertion injected into it."""
    response = idp.sign(idp.response(idp.assertion("alice")))
    response.insert(1, _evil(idp))
    return response


def naive_subject(xml: bytes) -> str | None:
    root = parse_xml(xml)
    assertion = root if root.tag == f"{{{SAML_NS}}}Assertion" else find(root, "saml:Assertion")
    text = find(assertion, "saml:Subject/saml:NameID").text
    return None if text is None else str(text)


WRAPPINGS = {
    "sibling-first": wrapped_sibling_first,
    "in-extensions": wrapped_in_extensions,
    "in-signature-object": wrapped_in_signature_object,
    "in-advice": wrapped_in_advice,
    "same-id": wrapped_with_the_same_id,
    "injected-into-signed-response": signed_response_with_injected_assertion,
}


@pytest.mark.parametrize("wrap", list(WRAPPINGS.values()), ids=list(WRAPPINGS))
def test_signature_wrapping_never_yields_the_unsigned_subject(
    idp: SamlIdp, auth: TokenAuthenticator, wrap: Any
) -> None:
    document = wrap(idp)
    xml = to_xml(document)
    # The attack is real: a naive parser (the root Assertion, or the Response's first
    # Assertion child) would read 'admin'.
    assert naive_subject(xml) == "admin"
    secret = saml_password(xml)
    try:
        principal = asyncio.run(auth.authenticate(Credentials("x", secret, "127.0.0.1:1")))
    except AuthenticationFailed as error:
        assert error.sqlstate == "28P01", error.message
        return
    assert principal.subject == "alice"
    assert principal.groups == {"ai-agents"}


def test_wrapped_signed_element_is_what_the_claims_come_from(
    idp: SamlIdp, auth: TokenAuthenticator
) -> None:
    """The Extensions and Object variants do verify; the Principal is the signed one's."""
    for wrap in (wrapped_in_extensions, wrapped_in_signature_object, wrapped_sibling_first):
        assert accept(auth, wrap(idp)).subject == "alice"


# --- decoding helpers ------------------------------------------------------------------


def test_decode_assertion_and_unverified_issuer(idp: SamlIdp) -> None:
    xml = idp.signed_assertion("alice")
    assert decode_assertion(base64.b64encode(xml)) == xml
    assert decode_assertion(b"eyJhbGciOiJFUzI1NiJ9") is None  # base64 JSON, not XML
    assert decode_assertion(b"not base64!") is None
    assert unverified_issuer(xml) == idp.entity_id
    assert unverified_issuer(b"<unclosed") is None


def test_entities_and_dtds_are_not_expanded(idp: SamlIdp, auth: TokenAuthenticator) -> None:
    assertion = copy.deepcopy(idp.assertion("alice"))
    body = to_xml(assertion).decode()
    xml = (
        '<!DOCTYPE a [<!ENTITY who SYSTEM "file:///etc/hostname">]>'
        + body.replace(">alice<", ">&who;<")
    ).encode()
    error = refuse(auth, xml, idp)
    assert "signature" in error.message
