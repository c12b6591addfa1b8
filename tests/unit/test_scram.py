"""SCRAM-SHA-256 and md5 answers, checked against published vectors."""

from __future__ import annotations

import pytest

from querywarden.errors import UpstreamError
from querywarden.scram import ScramClient, md5_password

# RFC 7677, section 3.
NONCE = "rOprNGfwEbeRWgbNEkqO"
SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_rfc7677_vector() -> None:
    client = ScramClient("pencil", nonce=NONCE, username="user")
    assert client.client_first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    assert client.client_final(SERVER_FIRST) == CLIENT_FINAL
    client.verify_server_final(SERVER_FINAL)


def test_wrong_server_signature_is_refused() -> None:
    client = ScramClient("pencil", nonce=NONCE, username="user")
    client.client_final(SERVER_FIRST)
    with pytest.raises(UpstreamError, match="signature"):
        client.verify_server_final(b"v=" + b"A" * 44)


def test_server_nonce_must_extend_ours() -> None:
    client = ScramClient("pencil", nonce=NONCE)
    with pytest.raises(UpstreamError, match="nonce"):
        client.client_final(b"r=somebodyelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")


def test_malformed_server_first() -> None:
    with pytest.raises(UpstreamError, match="malformed"):
        ScramClient("x").client_final(b"garbage")


def test_md5_password() -> None:
    # md5(md5("secret" + "alice") + salt), as libpq computes it.
    import hashlib

    inner = hashlib.md5(b"secretalice").hexdigest().encode()
    expected = b"md5" + hashlib.md5(inner + b"\x01\x02\x03\x04").hexdigest().encode()
    assert md5_password("alice", "secret", b"\x01\x02\x03\x04") == expected
    assert len(expected) == 35
