"""Sans-I/O client startup: the untyped frames before the StartupMessage, then the password.

The shell feeds bytes to :class:`ClientStartup` and reacts to the events it returns:
answer an SSLRequest, refuse GSS encryption, route a CancelRequest, verify a password.
"""

from __future__ import annotations

from dataclasses import dataclass

from querywarden import codec
from querywarden.errors import AuthenticationFailed, ProtocolViolation
from querywarden.identity import MAX_SECRET_BYTES

#: The newest protocol minor version the gateway speaks (3.0).
SUPPORTED_MINOR = 0


@dataclass(frozen=True, slots=True)
class SSLRequested:
    """The client asks for TLS: answer b'S' and upgrade, or b'N'."""


@dataclass(frozen=True, slots=True)
class GSSENCRequested:
    """The client asks for GSSAPI encryption, which the gateway does not offer."""


@dataclass(frozen=True, slots=True)
class CancelRequested:
    """A CancelRequest with the key the gateway handed out in BackendKeyData."""

    pid: int
    secret: bytes


@dataclass(frozen=True, slots=True)
class StartupReceived:
    """The StartupMessage: connection parameters and what must be negotiated down."""

    params: dict[str, str]
    minor_version: int
    unsupported_options: tuple[str, ...]

    @property
    def needs_negotiation(self) -> bool:
        """True when the client asked for a newer minor version or `_pq_.` options."""
        return self.minor_version > SUPPORTED_MINOR or bool(self.unsupported_options)


@dataclass(frozen=True, slots=True)
class PasswordReceived:
    """The PasswordMessage: the secret in the password slot."""

    secret: bytes


StartupEvent = SSLRequested | GSSENCRequested | CancelRequested | StartupReceived | PasswordReceived


class ClientStartup:
    """Reads the client's side of connection start-up, one event at a time."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._phase = "startup"  # then "password", then "done"
        self.tls = False

    def receive(self, data: bytes) -> None:
        """Append bytes from the client."""
        self._buf += data

    def next_event(self) -> StartupEvent | None:
        """The next complete event, or ``None`` until more bytes arrive."""
        if self._phase == "startup":
            if self._buf[:1] == b"\x16":
                # A TLS ClientHello without SSLRequest: PostgreSQL 17's sslnegotiation=direct.
                raise ProtocolViolation(
                    "direct TLS negotiation is not supported: connect with "
                    "sslnegotiation=postgres (the default)"
                )
            packet = codec.read_startup_packet(self._buf)
            return None if packet is None else self._on_packet(packet)
        if self._phase == "password":
            return self._read_password()
        raise ProtocolViolation("start-up is already complete")

    def expect_password(self) -> None:
        """The gateway has asked for a password; the next frame must carry it."""
        self._phase = "password"

    def leftover(self) -> bytes:
        """Bytes received past start-up (a client may pipeline its first query)."""
        self._phase = "done"
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def _on_packet(self, packet: codec.StartupPacket) -> StartupEvent:
        if packet.code == codec.SSL_REQUEST_CODE:
            if self.tls:
                raise ProtocolViolation("SSLRequest received on a connection that already uses TLS")
            if self._buf:
                # Bytes after SSLRequest but before our answer would be outside TLS: an
                # injection attempt (CVE-2021-23214 in PostgreSQL's own server).
                raise ProtocolViolation("unencrypted data received after SSLRequest")
            return SSLRequested()
        if packet.code == codec.GSSENC_REQUEST_CODE:
            return GSSENCRequested()
        if packet.code == codec.CANCEL_REQUEST_CODE:
            if len(packet.body) < 8:
                raise ProtocolViolation("CancelRequest is truncated")
            pid = codec.UINT32.unpack_from(packet.body, 0)[0]
            return CancelRequested(pid, packet.body[4:])
        if not packet.is_startup_message:
            raise ProtocolViolation(
                f"unsupported frontend protocol {packet.code >> 16}.{packet.code & 0xFFFF}: "
                "the gateway speaks protocol 3.0"
            )
        params = codec.parse_startup_parameters(packet.body)
        unsupported = tuple(k for k in params if k.startswith("_pq_."))
        for key in unsupported:
            del params[key]
        if "user" not in params:
            raise ProtocolViolation("no PostgreSQL user name specified in startup packet")
        return StartupReceived(params, packet.code & 0xFFFF, unsupported)

    def _read_password(self) -> PasswordReceived | None:
        buf = self._buf
        if len(buf) < 5:
            return None
        mtype, length = codec.TYPE_AND_LENGTH.unpack_from(buf, 0)
        if mtype != ord("p"):
            raise ProtocolViolation(f"expected a password message, got message type {chr(mtype)!r}")
        if length < 5:
            raise ProtocolViolation(f"invalid password message length {length}")
        if length - 5 > MAX_SECRET_BYTES:
            raise AuthenticationFailed(
                f"password field is {length - 5} bytes, over the limit of {MAX_SECRET_BYTES}",
                sqlstate="28000",
            )
        if len(buf) < length + 1:
            return None
        frame = bytes(buf[: length + 1])
        del buf[: length + 1]
        return PasswordReceived(codec.decode_password(frame))


#: Settings a client may give at start-up (as parameters or ``-c`` in ``options``); they
#: are passed on to the upstream. Anything that changes what a statement means or who
#: runs it (role, session_authorization, search_path, standard_conforming_strings, ...)
#: must be set with SET after connecting, where the decision point sees it.
STARTUP_SETTINGS = {
    name.lower(): name
    for name in (
        "application_name",
        "client_encoding",
        "DateStyle",
        "IntervalStyle",
        "TimeZone",
        "extra_float_digits",
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
        "idle_session_timeout",
        "bytea_output",
    )
}

#: Start-up parameters the gateway itself consumes.
_CONNECTION_PARAMETERS = frozenset({"user", "database", "replication", "options"})

#: The gateway's own start-up setting: what a client asks it to say about its results
#: (as a parameter, or ``-c querywarden.annotations=masking`` in ``options``). Never
#: passed upstream.
ANNOTATIONS = "querywarden.annotations"
#: ``masking``: a NoticeResponse before a result's rows naming the columns masked in it;
#: ``decisions``: one before a refusal naming the rule that decided it.
KNOWN_ANNOTATIONS = frozenset({"masking", "decisions"})


def upstream_parameters(params: dict[str, str]) -> dict[str, str]:
    """The settings to pass upstream; refuse (0A000) any the gateway does not accept."""
    settings: dict[str, str] = {}
    for name, value in params.items():
        if name in _CONNECTION_PARAMETERS or name == ANNOTATIONS:
            continue
        settings[_accepted_setting(name)] = value
    for name, value in _parse_options(params.get("options", "")):
        if name != ANNOTATIONS:
            settings[_accepted_setting(name)] = value
    return settings


def requested_annotations(params: dict[str, str]) -> frozenset[str]:
    """The annotations a client asked for at start-up; refuse (22023) unknown ones."""
    values = [params.get(ANNOTATIONS, "")]
    values += [
        value for name, value in _parse_options(params.get("options", "")) if name == ANNOTATIONS
    ]
    asked = frozenset(word.strip() for value in values for word in value.split(",") if word.strip())
    unknown = asked - KNOWN_ANNOTATIONS
    if unknown:
        raise ProtocolViolation(
            f"unknown {ANNOTATIONS} value {', '.join(sorted(unknown))!r} (known: "
            f"{', '.join(sorted(KNOWN_ANNOTATIONS))})",
            sqlstate="22023",
        )
    return asked


def _accepted_setting(name: str) -> str:
    canonical = STARTUP_SETTINGS.get(name.lower())
    if canonical is None:
        raise ProtocolViolation(
            f"start-up setting {name!r} is not accepted through querywarden: run SET after "
            f"connecting, where the policy sees it (accepted at start-up: "
            f"{', '.join(sorted(STARTUP_SETTINGS.values()))})",
            sqlstate="0A000",
        )
    return canonical


def _parse_options(options: str) -> list[tuple[str, str]]:
    """``-c name=value`` / ``--name=value`` pairs from libpq's ``options`` string."""
    words: list[str] = []
    current: list[str] = []
    escaped = False
    for char in options:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char.isspace():
            if current:
                words.append("".join(current))
                current = []
        else:
            current.append(char)
    if current:
        words.append("".join(current))
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            setting, i = words[i + 1], i + 2
        elif word.startswith("-c") or word.startswith("--"):
            setting, i = word[2:], i + 1
        else:
            raise ProtocolViolation(
                f"start-up option {word!r} is not accepted through querywarden: only "
                "-c name=value settings are",
                sqlstate="0A000",
            )
        name, sep, value = setting.partition("=")
        if not sep or not name:
            raise ProtocolViolation(f"malformed start-up option {setting!r}", sqlstate="0A000")
        pairs.append((name.replace("-", "_"), value))
    return pairs
