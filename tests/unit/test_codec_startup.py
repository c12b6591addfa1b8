"""Codec framing and the client start-up machine, bytes in and events out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from querywarden import codec
from querywarden.errors import AuthenticationFailed, ProtocolViolation
from querywarden.startup import (
    CancelRequested,
    ClientStartup,
    GSSENCRequested,
    PasswordReceived,
    SSLRequested,
    StartupReceived,
)


def events(machine: ClientStartup, data: bytes) -> list[object]:
    machine.receive(data)
    out = []
    while (event := machine.next_event()) is not None:
        out.append(event)
        if isinstance(event, StartupReceived):
            machine.expect_password()
    return out


@given(st.lists(st.tuples(st.sampled_from(b"QPBDEdT"), st.binary(max_size=200)), max_size=15))
def test_frame_reader_reassembles_any_split(messages: list[tuple[int, bytes]]) -> None:
    stream = b"".join(codec.message(bytes([t]), p) for t, p in messages)
    for step in (1, 3, 64):
        reader = codec.FrameReader(1 << 20)
        got = []
        for i in range(0, len(stream), step):
            reader.feed(stream[i : i + step])
            while (frame := reader.next_frame()) is not None:
                got.append(frame)
        assert [(t, f[5:]) for t, f in got] == messages
        assert len(reader) == 0


def test_frame_reader_limits() -> None:
    reader = codec.FrameReader(100)
    reader.feed(codec.message(b"Q", b"x" * 200)[:10])
    with pytest.raises(codec.MessageTooLarge):
        reader.next_frame()


def test_startup_sequence_byte_by_byte() -> None:
    stream = (
        codec.ssl_request()
        + codec.startup_message({"user": "alice", "database": "app", "application_name": "t"})
        + codec.password_message(b"token\0")
    )
    machine = ClientStartup()
    got: list[object] = []
    for i in range(len(stream)):
        got += events(machine, stream[i : i + 1])
    assert got[0] == SSLRequested()
    assert isinstance(got[1], StartupReceived)
    assert got[1].params == {"user": "alice", "database": "app", "application_name": "t"}
    assert not got[1].needs_negotiation
    assert got[2] == PasswordReceived(b"token")


def test_newer_minor_version_and_pq_options_are_negotiated() -> None:
    packet = codec.startup_message({"user": "a", "_pq_.compression": "on"}, version=(3 << 16) | 2)
    (event,) = events(ClientStartup(), packet)
    assert isinstance(event, StartupReceived)
    assert event.minor_version == 2
    assert event.unsupported_options == ("_pq_.compression",)
    assert "_pq_.compression" not in event.params
    assert event.needs_negotiation


def test_cancel_and_gssenc() -> None:
    assert events(ClientStartup(), codec.cancel_request(1234, b"\x01\x02\x03\x04")) == [
        CancelRequested(1234, b"\x01\x02\x03\x04")
    ]
    gss = codec.INT32.pack(8) + codec.INT32.pack(codec.GSSENC_REQUEST_CODE)
    assert events(ClientStartup(), gss) == [GSSENCRequested()]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (codec.INT32.pack(4) + b"\0\0\0\0", "invalid length"),
        (codec.INT32.pack(100000) + b"\0\0\0\0", "invalid length"),
        (codec.INT32.pack(8) + codec.INT32.pack(2 << 16), "unsupported frontend protocol 2.0"),
        (b"GET / HTTP/1.1\r\n\r\n", "invalid length"),
        (codec.startup_message({"database": "x"}), "no PostgreSQL user name"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "direct TLS negotiation"),
    ],
)
def test_bad_startup_packets(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolViolation, match=match):
        events(ClientStartup(), data)


def test_bytes_after_ssl_request_are_refused() -> None:
    # Plaintext pipelined behind SSLRequest would bypass TLS (CVE-2021-23214).
    with pytest.raises(ProtocolViolation, match="unencrypted data"):
        events(ClientStartup(), codec.ssl_request() + codec.startup_message({"user": "a"}))


def test_second_ssl_request_after_tls_is_refused() -> None:
    machine = ClientStartup()
    machine.tls = True
    with pytest.raises(ProtocolViolation, match="already uses TLS"):
        events(machine, codec.ssl_request())


def test_huge_password_is_refused_from_its_header() -> None:
    machine = ClientStartup()
    events(machine, codec.startup_message({"user": "a"}))
    header = b"p" + codec.UINT32.pack(1_000_004)
    machine.receive(header)
    with pytest.raises(AuthenticationFailed, match="over the limit"):
        machine.next_event()


def test_wrong_message_instead_of_password() -> None:
    machine = ClientStartup()
    events(machine, codec.startup_message({"user": "a"}))
    with pytest.raises(ProtocolViolation, match="expected a password"):
        events(machine, codec.query("SELECT 1"))


def test_error_response_round_trip() -> None:
    frame = codec.error_response("42501", "no", detail="because", hint="do that")
    assert codec.decode_fields(frame) == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "42501",
        "M": "no",
        "D": "because",
        "H": "do that",
    }


def test_startup_settings_pass_through_and_options_are_parsed() -> None:
    from querywarden.startup import upstream_parameters

    params = {
        "user": "a",
        "database": "app",
        "application_name": "agent",
        "options": r"-c statement_timeout=1234ms --lock-timeout=5s -cTimeZone=UTC",
    }
    assert upstream_parameters(params) == {
        "application_name": "agent",
        "statement_timeout": "1234ms",
        "lock_timeout": "5s",
        "TimeZone": "UTC",
    }


@pytest.mark.parametrize(
    "params",
    [
        {"user": "a", "search_path": "evil,public"},
        {"user": "a", "options": "-c role=postgres"},
        {"user": "a", "options": "-c session_authorization=postgres"},
        {"user": "a", "options": "-D /tmp"},
        {"user": "a", "options": "-c novalue"},
    ],
)
def test_startup_settings_that_change_meaning_or_identity_are_refused(
    params: dict[str, str],
) -> None:
    from querywarden.startup import upstream_parameters

    with pytest.raises(ProtocolViolation) as info:
        upstream_parameters(params)
    assert info.value.sqlstate == "0A000"
