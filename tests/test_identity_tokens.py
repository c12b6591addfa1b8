"""Identity through the gateway: real clients (psycopg, psql) presenting real tokens.

Tokens come from a real OpenID Connect provider (panva's oidc-provider, over HTTPS on
loopback), from the development issuer, from keys made here (hand-made JWTs) and from a
SAML IdP made here (signxml). A test-only gate records the Principal the gateway derived,
from the SessionInfo of each statement. Every refusal is checked for its SQLSTATE, for a
message that says what was wrong, and for not echoing the token or any key material.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest
from lxml import etree
from psycopg.conninfo import make_conninfo

from gateway_harness import DEV_KEY, RunningGateway
from identity_helpers import (
    AUDIENCE,
    DS_NS,
    ClientCertificate,
    Pki,
    RecordPrincipals,
    SamlIdp,
    assert_no_leak,
    claims_for,
    corrupt_signature,
    find,
    hmac_jwt,
    key_material,
    public_pem,
    raw_jwt,
    rsa_key,
    saml_password,
    sign_jwt,
    tamper_payload,
)
from oidc_provider import OidcProvider
from querywarden import codec
from querywarden.devcluster import DATABASE
from querywarden.identity import Principal
from querywarden.identity import jwt_tokens as jwt_tokens_module
from querywarden.identity.dev import ensure_key, load_public_jwk, mint_token
from querywarden.identity.jwt_tokens import thumbprint_sha256
from querywarden.policy import PolicyDocument
from querywarden.tlsutil import write_self_signed
from raw_client import READ_TIMEOUT, Message, RawClient, gateway_errors

DEV_ISSUER = {"name": "dev", "kind": "dev", "keyFile": str(DEV_KEY)}
CONNECT_TIMEOUT = 10


StartGateway = Callable[..., RunningGateway]


@pytest.fixture(autouse=True)
def no_gateway_crash(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A refused token is handled, never an unexpected error in the gateway's log."""
    caplog.set_level(logging.INFO, logger="querywarden")
    yield
    assert not gateway_errors(caplog.get_records("call"))


@pytest.fixture
def start(make_gateway: Callable[..., RunningGateway]) -> StartGateway:
    """Start gateways trusting the given issuers; each records Principals; all are stopped."""

    def make(issuers: list[dict[str, Any]], **settings: Any) -> RunningGateway:
        policy = PolicyDocument.model_validate({"identity": {"issuers": issuers}})
        gate = RecordPrincipals()
        running = make_gateway(gate=gate, policy=policy, **settings)
        running.extra["gate"] = gate
        return running

    return make


def gate_of(gw: RunningGateway) -> RecordPrincipals:
    gate = gw.extra["gate"]
    assert isinstance(gate, RecordPrincipals)
    return gate


def oidc_issuer(
    provider: OidcProvider, name: str = "corp-oidc", **overrides: Any
) -> dict[str, Any]:
    """The policy entry that trusts this provider, as an operator would write it."""
    return {
        "name": name,
        "kind": "oidc",
        "issuer": provider.issuer,
        "audiences": [AUDIENCE],
        "caFile": str(provider.ca_file),
        "groupsClaim": "groups",
        **overrides,
    }


@pytest.fixture
def own_oidc(tmp_path: Path) -> Iterator[OidcProvider]:
    """A provider of this test's own (for rotating its keys or stopping it)."""
    provider = OidcProvider(ttl=300).start(tmp_path / "oidc", {"agent-1": ["ai-agents"]})
    try:
        yield provider
    finally:
        provider.stop()


# --- clients ---------------------------------------------------------------------------


def conninfo(gw: RunningGateway, password: str, user: str = "agent-1", **params: Any) -> str:
    return make_conninfo(
        host=gw.host,
        port=gw.port,
        dbname=DATABASE,
        user=user,
        password=password,
        connect_timeout=CONNECT_TIMEOUT,
        **params,
    )


def connect(
    gw: RunningGateway, password: str, user: str = "agent-1", **params: Any
) -> psycopg.Connection[Any]:
    return psycopg.connect(conninfo(gw, password, user, **params), autocommit=True)


def query_as(gw: RunningGateway, password: str, sql: str = "SELECT 1", **params: Any) -> Any:
    with connect(gw, password, **params) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return row[0]


def psql(
    gw: RunningGateway, password: str, sql: str, user: str = "agent-1"
) -> subprocess.CompletedProcess[str]:
    """psql with the token in PGPASSWORD, as docs/identity.md tells an agent to run it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({"PGPASSWORD": password, "PGCONNECT_TIMEOUT": str(CONNECT_TIMEOUT), "LC_ALL": "C"})
    return subprocess.run(
        [
            "psql",
            f"host={gw.host} port={gw.port} dbname={DATABASE} user={user}",
            "-X",
            "-w",  # never prompt: the password is PGPASSWORD or nothing
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def raw_refusal(gw: RunningGateway, password: bytes, *, timeout: float = READ_TIMEOUT) -> Message:
    """Present ``password`` with the raw client; return the FATAL error the gateway sent."""
    with RawClient.to(gw, timeout=timeout) as client:
        client.startup("agent-1")
        auth = client.read_message()
        assert auth is not None and auth.mtype == b"R", auth
        client.send(codec.password_message(password + b"\0"))
        return client.expect_fatal()


def assert_refused(
    gw: RunningGateway,
    password: str | bytes,
    sqlstate: str,
    fragment: str,
    *material: str | bytes,
) -> Message:
    """Refused with this SQLSTATE and a message containing ``fragment``; nothing leaked."""
    secret = password.encode() if isinstance(password, str) else password
    error = raw_refusal(gw, secret)
    assert error.sqlstate == sqlstate, error.fields
    assert error.fields.get("S") == "FATAL", error.fields
    assert fragment in error.text, error.fields
    everything = " ".join(error.fields.values())
    assert_no_leak(everything, secret, *material)
    return error


def dev_key_material() -> list[str]:
    return key_material(ensure_key(DEV_KEY))


def dev_kid() -> str:
    return str(load_public_jwk(DEV_KEY)["kid"])


def unverified_claims(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


# --- a real OIDC provider ----------------------------------------------------------------


def test_oidc_token_through_psycopg_and_psql(oidc: OidcProvider, start: StartGateway) -> None:
    gw = start([oidc_issuer(oidc)])
    gate = gate_of(gw)
    token = oidc.token("agent-1")
    exp = float(unverified_claims(token)["exp"])
    expected = Principal(
        subject="agent-1",
        groups=frozenset({"ai-agents"}),
        issuer="corp-oidc",
        display_name="agent-1",
        expires_at=exp,
    )

    assert query_as(gw, token, "SELECT current_user") == "qw_scram"
    assert gate.last() == expected

    result = psql(gw, token, "SELECT 'via psql'")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "via psql"
    assert gate.last() == expected

    dba_token = oidc.token("dba-1")
    assert query_as(gw, dba_token, user="dba-1") == 1
    principal = gate.last()
    assert (principal.subject, principal.groups) == ("dba-1", frozenset({"dba", "dba-oncall"}))
    assert principal.expires_at == float(unverified_claims(dba_token)["exp"])


def test_oidc_token_is_refused_by_a_gateway_that_does_not_trust_the_provider(
    oidc: OidcProvider, start: StartGateway
) -> None:
    gw = start([DEV_ISSUER])
    token = oidc.token("agent-1")
    assert_refused(gw, token, "28P01", "not trusted")
    with pytest.raises(psycopg.OperationalError, match="not trusted"):
        connect(gw, token)


class JwksFetches:
    """Counts the gateway's HTTPS fetches of the JWKS (wrapping the module's fetcher)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, jwks_uri: str) -> None:
        self.jwks_uri = jwks_uri
        self.urls: list[str] = []
        original = jwt_tokens_module._get_json

        def counting(url: str, **kwargs: Any) -> Any:
            self.urls.append(url)
            return original(url, **kwargs)

        monkeypatch.setattr(jwt_tokens_module, "_get_json", counting)

    @property
    def count(self) -> int:
        return sum(1 for url in self.urls if url == self.jwks_uri)


def test_key_rotation_needs_one_refresh_and_unknown_kids_are_refused(
    own_oidc: OidcProvider, start: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetches = JwksFetches(monkeypatch, own_oidc.jwks_uri)
    gw = start([oidc_issuer(own_oidc, jwksRefreshInterval="0s")])
    old_token = own_oidc.token("agent-1")
    assert query_as(gw, old_token) == 1
    assert fetches.count == 1

    old_kid = jwt.get_unverified_header(old_token)["kid"]
    new_kid = own_oidc.rotate_keys()
    assert new_kid != old_kid
    new_token = own_oidc.token("agent-1")
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    assert query_as(gw, new_token) == 1
    assert fetches.count == 2  # one refresh found the new key
    assert gate_of(gw).last().expires_at == float(unverified_claims(new_token)["exp"])
    assert query_as(gw, own_oidc.token("agent-1")) == 1
    assert fetches.count == 2  # and it is cached from now on

    # A key the provider never published: refused after exactly one refresh.
    stranger = rsa_key()
    forged = sign_jwt(
        claims_for(own_oidc.issuer, "agent-1", groups=["dba"]),
        stranger,
        alg="RS256",
        kid="never-published",
        headers={"typ": "at+jwt"},
    )
    error = assert_refused(gw, forged, "28P01", "does not publish", *key_material(stranger))
    assert "never-published" in error.text
    assert fetches.count == 3

    # The retired key (rotation without keep_old) is gone after the refresh.
    assert_refused(gw, old_token, "28P01", "does not publish")
    assert fetches.count == 4


class BlackHole:
    """A TCP listener that accepts connections and never answers: a hung JWKS endpoint."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.accepted: list[socket.socket] = []
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="black-hole", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)
            self.connected.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self.accepted:
            conn.close()
        self.sock.close()


def test_jwks_endpoint_down_cached_keys_keep_working_unknown_kids_fail_closed(
    own_oidc: OidcProvider, start: StartGateway
) -> None:
    fetch_timeout = 2.0
    gw = start(
        [oidc_issuer(own_oidc, fetchTimeout=f"{fetch_timeout:g}s", jwksRefreshInterval="0s")]
    )
    assert query_as(gw, own_oidc.token("agent-1")) == 1  # the key is now cached
    cached = [own_oidc.token("agent-1") for _ in range(6)]
    own_oidc.rotate_keys()
    unknown = own_oidc.token("agent-1")  # signed by a key the gateway has not seen
    port = urllib.parse.urlsplit(own_oidc.issuer).port
    assert port is not None

    own_oidc.stop()
    assert not own_oidc.is_running()

    # The provider is gone (connections refused): cached keys still verify...
    assert query_as(gw, cached[0]) == 1
    assert gate_of(gw).last().subject == "agent-1"
    # ...and an unknown kid fails closed, at once (nothing to wait for).
    started = time.monotonic()
    error = assert_refused(gw, unknown, "08004", "could not fetch the issuer's signing keys")
    assert time.monotonic() - started < fetch_timeout + 3
    assert "try again" in error.text

    # Now the endpoint hangs: it accepts connections and never answers.
    hole = BlackHole(port)
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:

            def slow_attempt() -> tuple[Message, float]:
                begun = time.monotonic()
                refusal = raw_refusal(gw, unknown.encode(), timeout=4 * fetch_timeout + 5)
                return refusal, time.monotonic() - begun

            slow = pool.submit(slow_attempt)
            assert hole.connected.wait(fetch_timeout + 5), "the gateway did not try to fetch"
            # While that fetch hangs, clients whose key is cached get in, concurrently.
            quick = [pool.submit(query_as, gw, token) for token in cached[1:]]
            assert [f.result(timeout=30) for f in quick] == [1] * len(quick)
            assert not slow.done(), "the cached-key connections waited for the hung fetch"
            refusal, elapsed = slow.result(timeout=4 * fetch_timeout + 10)
    finally:
        hole.close()
    assert refusal.sqlstate == "08004", refusal.fields
    assert "could not fetch" in refusal.text
    # Bounded by fetchTimeout (discovery and JWKS are each bounded by it).
    assert elapsed < 2 * fetch_timeout + 3
    assert_no_leak(" ".join(refusal.fields.values()), unknown)
    # And the gateway keeps serving cached keys after the outage.
    assert query_as(gw, cached[0]) == 1


# --- bad tokens (development issuers and hand-made tokens) -----------------------------


@pytest.fixture
def dev_b_key(tmp_path: Path) -> Path:
    path = tmp_path / "dev-b.pem"
    ensure_key(path)
    return path


@pytest.fixture
def dev_gateway(start: StartGateway, dev_b_key: Path) -> RunningGateway:
    """Two development issuers with their own keys, as two trusted issuers."""
    return start(
        [
            DEV_ISSUER,
            {"name": "dev-b", "kind": "dev", "keyFile": str(dev_b_key), "issuer": "qw-dev-b"},
        ]
    )


def _dev_claims(**overrides: Any) -> dict[str, Any]:
    claims = claims_for("querywarden-dev", "alice", groups=["ai-agents"])
    claims.update(overrides)
    return claims


def _dev_signed(claims: dict[str, Any]) -> str:
    return sign_jwt(claims, ensure_key(DEV_KEY), alg="ES256", kid=dev_kid())


BAD_TOKENS: dict[str, tuple[Callable[[], str], str, str]] = {
    "expired": (
        lambda: mint_token("alice", key_file=DEV_KEY, now=time.time() - 600, ttl=300),
        "28000",
        "token has expired",
    ),
    "not-yet-valid": (
        lambda: _dev_signed(_dev_claims(nbf=int(time.time()) + 600)),
        "28P01",
        "not valid yet",
    ),
    "wrong-issuer": (
        # Signed by the first dev issuer's key, but iss names the second one.
        lambda: _dev_signed(_dev_claims(iss="qw-dev-b")),
        "28P01",
        "signature is invalid",
    ),
    "unknown-issuer": (
        lambda: mint_token("alice", key_file=DEV_KEY, issuer="https://idp.unknown.example"),
        "28P01",
        "not trusted",
    ),
    "wrong-audience": (
        lambda: mint_token("alice", key_file=DEV_KEY, audience="https://api.example"),
        "28P01",
        "audience",
    ),
    "alg-none": (
        lambda: raw_jwt({"alg": "none", "typ": "JWT"}, _dev_claims(sub="admin")),
        "28P01",
        "'none' is not accepted",
    ),
    "hs256-with-public-key": (
        lambda: hmac_jwt(_dev_claims(sub="admin"), public_pem(ensure_key(DEV_KEY)), kid=dev_kid()),
        "28P01",
        "'HS256' is not accepted",
    ),
    "tampered-payload": (
        lambda: tamper_payload(mint_token("alice", key_file=DEV_KEY), sub="admin"),
        "28P01",
        "signature is invalid",
    ),
    "bad-signature": (
        lambda: corrupt_signature(mint_token("alice", key_file=DEV_KEY)),
        "28P01",
        "signature is invalid",
    ),
    "lifetime-too-long": (
        lambda: mint_token("alice", key_file=DEV_KEY, ttl=7200),
        "28P01",
        "maxTokenLifetime",
    ),
    "malformed": (lambda: "eyJub3QiOiJhIHRva2VuIn0.bm9wZQ.AAAA", "28P01", "malformed token"),
    "static-password": (lambda: "correct horse battery staple", "28P01", "malformed token"),
    "one-megabyte": (lambda: "A" * (1024 * 1024), "28000", "over the limit"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS), ids=list(BAD_TOKENS))
def test_bad_token_is_refused(dev_gateway: RunningGateway, case: str) -> None:
    make, sqlstate, fragment = BAD_TOKENS[case]
    token = make()
    assert_refused(dev_gateway, token, sqlstate, fragment, *dev_key_material())
    # What libpq (psycopg) shows its user says the same.
    with pytest.raises(psycopg.OperationalError) as caught:
        connect(dev_gateway, token)
    message = str(caught.value)
    assert fragment in message
    assert_no_leak(message, token, *dev_key_material())
    assert gate_of(dev_gateway).principals == []


def test_empty_password_is_refused(dev_gateway: RunningGateway) -> None:
    assert_refused(dev_gateway, b"", "28P01", "empty password")
    # psql with an empty PGPASSWORD: libpq itself refuses to send it, nothing gets in.
    result = psql(dev_gateway, "", "SELECT 1")
    assert result.returncode == 2
    assert "no password supplied" in result.stderr, result.stderr
    assert gate_of(dev_gateway).principals == []


def test_bad_token_through_psql(dev_gateway: RunningGateway) -> None:
    token = mint_token("alice", key_file=DEV_KEY, audience="https://api.example")
    result = psql(dev_gateway, token, "SELECT 1")
    assert result.returncode == 2, result.stderr
    assert "token audience is not accepted" in result.stderr
    assert_no_leak(result.stderr, token, *dev_key_material())
    # The good token of the same issuer gets in.
    good = psql(dev_gateway, mint_token("alice", key_file=DEV_KEY), "SELECT 'in'")
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip() == "in"


def test_expired_token_within_leeway_is_not_accepted_only_to_be_cut_off(
    dev_gateway: RunningGateway,
) -> None:
    """A token that expired 5 s ago (inside the 30 s leeway) must be consistent: either
    refused at start-up (28000, expired) or good for at least one statement. Accepting it
    and then refusing every statement as expired is neither."""
    token = mint_token("alice", key_file=DEV_KEY, now=time.time() - 65, ttl=60)
    try:
        conn = connect(dev_gateway, token)
    except psycopg.OperationalError as exc:
        assert "expired" in str(exc)
        assert_refused(dev_gateway, token, "28000", "expired")
        return
    with conn:
        try:
            conn.execute("SELECT 1")
        except psycopg.Error as exc:
            pytest.fail(
                "the gateway authenticated a token it already considers expired: start-up "
                f"succeeded, then the first statement got {exc.sqlstate}: {exc}"
            )


def test_groups_claim_as_dotted_path_and_as_space_separated_string(start: StartGateway) -> None:
    gw = start(
        [
            {
                **DEV_ISSUER,
                "name": "realm",
                "issuer": "qw-realm",
                "groupsClaim": "realm_access.roles",
            },
            {**DEV_ISSUER, "name": "scoped", "issuer": "qw-scoped", "groupsClaim": "scp"},
        ]
    )
    gate = gate_of(gw)
    realm = mint_token(
        "kc-user",
        key_file=DEV_KEY,
        issuer="qw-realm",
        extra={"realm_access": {"roles": ["dba", "offline_access"]}, "groups": ["ignored"]},
    )
    assert query_as(gw, realm) == 1
    assert (gate.last().issuer, gate.last().groups) == (
        "realm",
        frozenset({"dba", "offline_access"}),
    )
    scoped = mint_token(
        "svc", key_file=DEV_KEY, issuer="qw-scoped", extra={"scp": "db:read  db:write"}
    )
    assert query_as(gw, scoped) == 1
    assert (gate.last().issuer, gate.last().groups) == (
        "scoped",
        frozenset({"db:read", "db:write"}),
    )


def test_several_issuers_at_once_the_tokens_issuer_picks_the_verifier(
    oidc: OidcProvider, start: StartGateway
) -> None:
    idp = SamlIdp()
    gw = start([oidc_issuer(oidc), DEV_ISSUER, idp.issuer_config()])
    gate = gate_of(gw)
    assert query_as(gw, oidc.token("dba-1")) == 1
    from_oidc = gate.last()
    result = psql(gw, mint_token("bob", groups=["dba"], key_file=DEV_KEY), "SELECT 1")
    assert result.returncode == 0, result.stderr
    from_dev = gate.last()
    assert query_as(gw, saml_password(idp.signed_assertion("carol")).decode()) == 1
    from_saml = gate.last()
    assert [(p.issuer, p.subject) for p in (from_oidc, from_dev, from_saml)] == [
        ("corp-oidc", "dba-1"),
        ("dev", "bob"),
        ("corp-saml", "carol"),
    ]
    # A dev token claiming to come from the OIDC provider is verified by the provider's keys.
    forged = _dev_signed(_dev_claims(iss=oidc.issuer, aud=AUDIENCE))
    assert_refused(gw, forged, "28P01", "does not publish", *dev_key_material())


# --- SAML through the gateway -----------------------------------------------------------


@pytest.fixture(scope="module")
def saml_idp() -> SamlIdp:
    return SamlIdp()


def test_saml_assertion_through_psql_and_psycopg(saml_idp: SamlIdp, start: StartGateway) -> None:
    gw = start([saml_idp.issuer_config()])
    gate = gate_of(gw)
    now = time.time()
    xml = saml_idp.signed_assertion("alice", groups=["ai-agents", "readers"], now=now, ttl=600)
    password = saml_password(xml).decode()
    result = psql(gw, password, "SELECT current_user", user="alice")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "qw_scram"
    expected = Principal(
        subject="alice",
        groups=frozenset({"ai-agents", "readers"}),
        issuer="corp-saml",
        display_name="alice",
        expires_at=float(int(now) + 600),
    )
    assert gate.last() == expected
    assert query_as(gw, password, user="alice") == 1
    assert gate.last() == expected


def test_saml_refusals_through_the_gateway(saml_idp: SamlIdp, start: StartGateway) -> None:
    gw = start([saml_idp.issuer_config()])
    material = [*key_material(saml_idp.key), saml_idp.cert_pem]
    unsigned = saml_password(saml_idp.assertion("admin"))
    assert_refused(gw, unsigned, "28P01", "signature is invalid or missing", *material)
    expired = saml_password(saml_idp.signed_assertion("alice", now=time.time() - 900, ttl=300))
    assert_refused(gw, expired, "28000", "expired", *material)
    audience = saml_password(saml_idp.signed_assertion("alice", audience="https://other.sp"))
    assert_refused(gw, audience, "28P01", "audience", *material)
    with pytest.raises(psycopg.OperationalError, match="signature is invalid or missing"):
        connect(gw, unsigned.decode(), user="admin")
    assert gate_of(gw).principals == []


def test_saml_signature_wrapping_through_the_gateway(
    saml_idp: SamlIdp, start: StartGateway
) -> None:
    """The signed 'alice' assertion moved under the signature's Object element, an unsigned
    'admin' assertion as the document: the gateway must see alice (or refuse), never admin."""
    gw = start([saml_idp.issuer_config()])
    signed = saml_idp.sign(saml_idp.assertion("alice"))
    signature = find(signed, "ds:Signature")
    signed.remove(signature)
    evil = saml_idp.assertion("admin", groups=["dba"])
    etree.SubElement(signature, f"{{{DS_NS}}}Object").append(signed)
    evil.insert(1, signature)
    password = saml_password(evil).decode()
    try:
        value = query_as(gw, password, "SELECT 1", user="admin")
    except psycopg.OperationalError as exc:
        assert "SAML" in str(exc)
        return
    assert value == 1
    principal = gate_of(gw).last()
    assert (principal.subject, principal.groups) == ("alice", frozenset({"ai-agents"}))


def test_saml_malformed_signature_is_a_refusal_not_an_internal_error(
    saml_idp: SamlIdp, start: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the IdP's (public) entity ID is needed to send this. Expected: 28P01 and a
    message about the signature; not XX000 'internal error' and a traceback in the log."""
    gw = start([saml_idp.issuer_config()])
    xml = (
        '<saml:Assertion xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" '
        'xmlns:ds="http://www.w3.org/2000/09/xmldsig#" ID="a1" Version="2.0" '
        f'IssueInstant="2030-01-01T00:00:00Z"><saml:Issuer>{saml_idp.entity_id}</saml:Issuer>'
        "<ds:Signature>garbage</ds:Signature>"
        "<saml:Subject><saml:NameID>admin</saml:NameID></saml:Subject></saml:Assertion>"
    ).encode()
    error = raw_refusal(gw, saml_password(xml))
    crashes = gateway_errors(caplog.get_records("call"))
    caplog.clear()  # reported here; no need for no_gateway_crash to say it again
    assert (error.sqlstate, crashes) == ("28P01", []), (error.fields, crashes)
    assert "signature" in error.text
    assert gate_of(gw).principals == []


# --- certificate-bound tokens (RFC 8705) -------------------------------------------------


@pytest.fixture
def mtls(tmp_path: Path, start: StartGateway) -> tuple[RunningGateway, Pki]:
    cert_file, key_file = write_self_signed(tmp_path / "server", "gateway")
    pki = Pki(tmp_path / "pki")
    gw = start(
        [DEV_ISSUER],
        tls={
            "certFile": str(cert_file),
            "keyFile": str(key_file),
            "clientCaFile": str(pki.ca_file),
        },
    )
    return gw, pki


def tls_raw_refusal(
    gw: RunningGateway, password: str, client_cert: ClientCertificate | None
) -> Message:
    """Start-up over TLS (with or without a client certificate) with the raw client."""
    with RawClient.to(gw) as client:
        client.send(codec.ssl_request())
        assert client.read_byte() == b"S"
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if client_cert is not None:
            context.load_cert_chain(str(client_cert.cert_file), str(client_cert.key_file))
        client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
        client.startup("agent-1")
        auth = client.read_message()
        assert auth is not None and auth.mtype == b"R", auth
        client.send(codec.password_message(password.encode() + b"\0"))
        return client.expect_fatal()


def test_certificate_bound_token(mtls: tuple[RunningGateway, Pki]) -> None:
    gw, pki = mtls
    mine, other = pki.issue("agent-7-cert"), pki.issue("agent-8-cert")
    token = mint_token(
        "agent-7",
        groups=["ai-agents"],
        key_file=DEV_KEY,
        extra={"cnf": {"x5t#S256": thumbprint_sha256(mine.der)}},
    )

    def tls(cert: ClientCertificate | None) -> dict[str, str]:
        params = {"sslmode": "require"}
        if cert is not None:
            params.update(sslcert=str(cert.cert_file), sslkey=str(cert.key_file))
        else:
            params.update(sslcert=str(pki.directory / "none.crt"))  # no default cert either
        return params

    # The certificate the token is bound to: accepted.
    with connect(gw, token, **tls(mine)) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert gate_of(gw).last().subject == "agent-7"

    # Another certificate from the same CA: refused.
    with pytest.raises(psycopg.OperationalError, match="different client certificate"):
        connect(gw, token, **tls(other))
    error = tls_raw_refusal(gw, token, other)
    assert error.sqlstate == "28000", error.fields
    assert "different client certificate" in error.text
    assert_no_leak(" ".join(error.fields.values()), token, *dev_key_material())

    # No certificate at all: refused.
    with pytest.raises(psycopg.OperationalError, match="bound to a client certificate"):
        connect(gw, token, **tls(None))
    error = tls_raw_refusal(gw, token, None)
    assert error.sqlstate == "28000", error.fields
    assert "bound to a client certificate" in error.text

    # Plaintext on loopback cannot present a certificate: refused too.
    error = raw_refusal(gw, token.encode())
    assert error.sqlstate == "28000", error.fields

    # An unbound token is fine with or without a certificate.
    unbound = mint_token("agent-9", key_file=DEV_KEY)
    assert query_as(gw, unbound, **tls(other)) == 1
    assert query_as(gw, unbound, **tls(None)) == 1


# --- the token's expiry ends the session -------------------------------------------------


def test_token_expiry_ends_the_session(dev_gateway: RunningGateway) -> None:
    token = mint_token("alice", groups=["ai-agents"], key_file=DEV_KEY, ttl=3)
    exp = float(unverified_claims(token)["exp"])
    conn = connect(dev_gateway, token)
    raw = RawClient.to(dev_gateway)
    try:
        raw.login("alice", token)
        assert conn.execute("SELECT 'before'").fetchone() == ("before",)
        assert gate_of(dev_gateway).last().expires_at == exp
        while time.time() < exp + 0.2:
            time.sleep(0.1)
        with pytest.raises(psycopg.OperationalError) as caught:
            conn.execute("SELECT 'after'")
        assert caught.value.sqlstate == "28000"
        assert "token has expired" in str(caught.value)
        assert "reconnect" in str(caught.value)
        assert conn.closed or conn.broken
        # The same for a raw client: one FATAL 28000, then the gateway closes.
        raw.send(codec.query("SELECT 'after'"))
        messages = raw.read_to_close()
        assert [m.mtype for m in messages] == [b"E"]
        assert messages[0].sqlstate == "28000"
        assert messages[0].fields["S"] == "FATAL"
        assert "reconnect with a fresh token" in messages[0].text
    finally:
        raw.close()
        conn.close()
    # Nothing of 'after' reached the gate (so nothing reached the database).
    assert all(p.subject == "alice" for p in gate_of(dev_gateway).principals)
    assert len(gate_of(dev_gateway).principals) == 1


# --- `querywarden token` -----------------------------------------------------------------


def test_querywarden_token_cli(tmp_path: Path, start: StartGateway) -> None:
    key_file = tmp_path / "state" / "dev-issuer.pem"  # neither the file nor its directory exist

    def mint(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "querywarden", "token", "--key-file", str(key_file), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    token = mint("--sub", "agent-9", "--groups", "a,b", "--ttl", "5m")
    assert key_file.stat().st_mode & 0o777 == 0o600
    jwk = load_public_jwk(key_file)
    claims = jwt.decode(
        token,
        key=jwt.PyJWK(jwk).key,
        algorithms=["ES256"],
        audience="querywarden",
        issuer="querywarden-dev",
        options={"require": ["exp", "iat", "sub"]},
    )
    assert claims["sub"] == "agent-9"
    assert claims["groups"] == ["a", "b"]
    assert claims["exp"] - claims["iat"] == 300
    assert jwt.get_unverified_header(token)["kid"] == jwk["kid"]
    key_bytes = key_file.read_bytes()

    # A second run reuses the key; odd spacing and empty items in --groups are dropped.
    second = mint("--sub", "agent-9", "--groups", " a, ,b ,c,")
    assert key_file.read_bytes() == key_bytes
    assert unverified_claims(second)["groups"] == ["a", "b", "c"]

    # A gateway trusting that key file lets the token in, with those groups.
    gw = start([{"name": "cli-dev", "kind": "dev", "keyFile": str(key_file)}])
    result = psql(gw, token, "SELECT 1", user="agent-9")
    assert result.returncode == 0, result.stderr
    principal = gate_of(gw).last()
    assert (principal.subject, principal.groups, principal.issuer) == (
        "agent-9",
        frozenset({"a", "b"}),
        "cli-dev",
    )
