"""The upstream connector: every connection the gateway opens to PostgreSQL.

The gateway authenticates upstream with its own credentials (trust, cleartext, md5 or
SCRAM-SHA-256), with TLS according to ``sslmode``. The client's secret never travels here,
and nothing of the upstream credentials travels back: upstream authentication errors are
reported to the client without the server's text.

One :class:`UpstreamTarget`, built from the settings (per role, its credentials), serves
every connection: the relay's (:func:`connect`), the side connections for the masking
catalog and EXPLAIN (:func:`side_connection`, asyncpg) and cancel requests
(:func:`deliver_cancel`, blocking, for a thread of its own). All TLS comes from
:func:`_tls_context_for`, so ``verify-full`` checks the certificate and its name on each
of them, before any password or cancel key is sent.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from querywarden import codec
from querywarden.endpoint import ConnectionClosed, Endpoint
from querywarden.errors import ProtocolViolation, UpstreamError
from querywarden.scram import MECHANISM, ScramClient, md5_password

#: The largest message accepted during the upstream handshake.
_HANDSHAKE_MESSAGE_LIMIT = 1024 * 1024


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where and as whom the gateway connects."""

    host: str
    port: int
    user: str
    password: str | None = None
    sslmode: str = "prefer"
    sslrootcert: Path | None = None
    connect_timeout: float = 5.0


@dataclass(slots=True)
class UpstreamConnection:
    """An authenticated upstream connection, ready for queries."""

    endpoint: Endpoint
    #: ParameterStatus (and NoticeResponse) frames received during start-up, in order.
    startup_frames: list[bytes] = field(default_factory=list)
    parameters: dict[str, str] = field(default_factory=dict)
    backend_pid: int = 0
    backend_secret: bytes = b""
    transaction_status: bytes = b"I"
    tls: bool = False


def _client_tls_context(target: UpstreamTarget) -> ssl.SSLContext:
    return _tls_context_for(target.sslmode, target.sslrootcert)


def client_tls_context(sslmode: str, sslrootcert: Path | None) -> ssl.SSLContext:
    """A client TLS context with libpq's meaning of ``sslmode`` (cached per argument)."""
    return _tls_context_for(sslmode, sslrootcert)


@functools.lru_cache(maxsize=16)
def _tls_context_for(sslmode: str, sslrootcert: Path | None) -> ssl.SSLContext:
    # Built once per (sslmode, sslrootcert): loading a CA store takes tens of milliseconds
    # and would block the event loop on every connection.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if sslmode in ("verify-ca", "verify-full"):
        # As in libpq: sslrootcert, when given, is the only trust anchor.
        if sslrootcert is not None:
            context.load_verify_locations(cafile=str(sslrootcert))
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        context.check_hostname = sslmode == "verify-full"
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        # prefer/require encrypt without verifying, exactly as libpq defines those modes.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def asyncpg_ssl(target: UpstreamTarget) -> ssl.SSLContext | bool:
    """The ``ssl=`` argument of asyncpg for ``target``: the relay's TLS context, or False."""
    if target.sslmode == "disable":
        return False
    return _client_tls_context(target)


async def side_connection(
    target: UpstreamTarget, database: str, application_name: str
) -> asyncpg.Connection:
    """An asyncpg connection of the gateway's own to the upstream (catalog, EXPLAIN).

    asyncpg treats an SSLContext as ``require``: a server that answers the SSLRequest
    with N is refused. Under ``prefer`` that answer is libpq's cue to go on without TLS,
    so the connection is made again in plaintext then; no other failure is retried
    (a certificate that does not verify is never retried without TLS).
    """
    tls = asyncpg_ssl(target)

    async def attempt(tls: ssl.SSLContext | bool) -> asyncpg.Connection:
        return await asyncpg.connect(
            host=target.host,
            port=target.port,
            user=target.user,
            password=target.password,
            database=database,
            ssl=tls,
            timeout=target.connect_timeout,
            server_settings={"application_name": application_name, "search_path": "public"},
        )

    try:
        return await attempt(tls)
    except ConnectionError as exc:
        # asyncpg's words for an N answer (its TLSUpgradeProto); the handshake has not
        # started, so nothing was sent in the clear.
        if target.sslmode != "prefer" or "rejected SSL upgrade" not in str(exc):
            raise
    return await attempt(False)


async def open_endpoint(target: UpstreamTarget) -> Endpoint:
    """Open a TCP connection to the upstream, bounded by the connect timeout."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(target.connect_timeout):
            _, endpoint = await loop.create_connection(Endpoint, target.host, target.port)
    except (OSError, TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise UpstreamError(
            f"could not connect to the upstream database at {target.host}:{target.port}: {reason}",
            sqlstate="08001",
        ) from exc
    return endpoint


async def connect(
    target: UpstreamTarget, database: str, params: dict[str, str]
) -> UpstreamConnection:
    """Connect, negotiate TLS, authenticate and wait for the first ReadyForQuery."""
    endpoint = await open_endpoint(target)
    try:
        async with asyncio.timeout(target.connect_timeout):
            return await _handshake(endpoint, target, database, params)
    except TimeoutError as exc:
        endpoint.abort()
        raise UpstreamError(
            "the upstream database did not complete start-up in time", sqlstate="08001"
        ) from exc
    except ConnectionClosed as exc:
        endpoint.abort()
        raise UpstreamError(
            "the upstream database closed the connection during start-up", sqlstate="08006"
        ) from exc
    except BaseException:
        endpoint.abort()
        raise


async def _handshake(
    endpoint: Endpoint, target: UpstreamTarget, database: str, params: dict[str, str]
) -> UpstreamConnection:
    conn = UpstreamConnection(endpoint)
    conn.tls = await _negotiate_tls(endpoint, target)
    startup = {"user": target.user, "database": database, **params}
    endpoint.write(codec.startup_message(startup))
    reader = codec.FrameReader(_HANDSHAKE_MESSAGE_LIMIT)
    scram: ScramClient | None = None
    while True:
        frame_info = reader.next_frame()
        if frame_info is None:
            reader.feed(await endpoint.read())
            continue
        mtype, frame = frame_info
        if mtype == ord("R"):
            scram = _answer_authentication(endpoint, target, frame, scram)
        elif mtype == ord("S"):
            name, value = codec.decode_parameter_status(frame)
            conn.parameters[name] = value
            conn.startup_frames.append(frame)
        elif mtype == ord("N"):
            conn.startup_frames.append(frame)
        elif mtype == ord("K"):
            conn.backend_pid, conn.backend_secret = codec.decode_backend_key_data(frame)
        elif mtype == ord("Z"):
            conn.transaction_status = frame[5:6]
            leftover = reader.take_all()
            if leftover:
                raise UpstreamError("upstream sent data after ReadyForQuery during start-up")
            return conn
        elif mtype == ord("E"):
            raise _startup_error(codec.decode_fields(frame))
        elif mtype == ord("v"):
            continue  # we ask for 3.0 without options; nothing to adapt to
        else:
            raise UpstreamError(f"unexpected message {chr(mtype)!r} from upstream during start-up")


async def _negotiate_tls(endpoint: Endpoint, target: UpstreamTarget) -> bool:
    """SSLRequest, then TLS as ``sslmode`` says; True when the connection is now TLS."""
    if target.sslmode == "disable":
        return False
    endpoint.write(codec.ssl_request())
    answer = await endpoint.read()
    if answer[:1] == b"S" and len(answer) == 1:
        await endpoint.start_tls(
            _client_tls_context(target), server_side=False, server_hostname=target.host
        )
        return True
    if answer[:1] == b"N" and len(answer) == 1:
        if target.sslmode != "prefer":
            raise UpstreamError(
                f"the upstream database does not offer TLS, which sslmode={target.sslmode} "
                "requires",
                sqlstate="08001",
            )
        return False
    raise UpstreamError("unexpected answer to SSLRequest from upstream", sqlstate="08P01")


def _answer_authentication(
    endpoint: Endpoint, target: UpstreamTarget, frame: bytes, scram: ScramClient | None
) -> ScramClient | None:
    code, payload = codec.decode_authentication(frame)
    if code == codec.AUTH_OK:
        return scram
    password = target.password
    needs_password = (codec.AUTH_CLEARTEXT_PASSWORD, codec.AUTH_MD5_PASSWORD, codec.AUTH_SASL)
    if code in needs_password and password is None:
        raise UpstreamError(
            "the upstream database asks for a password and none is configured "
            "(upstream.password or upstream.passwordFile)",
            sqlstate="08004",
        )
    if code == codec.AUTH_CLEARTEXT_PASSWORD:
        assert password is not None
        endpoint.write(codec.password_message(codec.cstr(password)))
    elif code == codec.AUTH_MD5_PASSWORD:
        assert password is not None
        answer = md5_password(target.user, password, payload[:4])
        endpoint.write(codec.password_message(answer + b"\0"))
    elif code == codec.AUTH_SASL:
        assert password is not None
        mechanisms = payload.rstrip(b"\0").split(b"\0")
        if MECHANISM.encode() not in mechanisms:
            raise UpstreamError(
                "the upstream database offers no SASL mechanism the gateway supports"
            )
        scram = ScramClient(password)
        first = scram.client_first()
        body = codec.cstr(MECHANISM) + codec.INT32.pack(len(first)) + first
        endpoint.write(codec.password_message(body))
    elif code == codec.AUTH_SASL_CONTINUE:
        if scram is None:
            raise ProtocolViolation("SASL continue without a SASL exchange")
        endpoint.write(codec.password_message(scram.client_final(payload)))
    elif code == codec.AUTH_SASL_FINAL:
        if scram is None:
            raise ProtocolViolation("SASL final without a SASL exchange")
        scram.verify_server_final(payload)
    else:
        raise UpstreamError(
            f"the upstream database asks for an unsupported authentication ({code})"
        )
    return scram


def _startup_error(fields: dict[str, str]) -> UpstreamError:
    sqlstate = fields.get("C", "08006")
    if sqlstate.startswith("28"):
        # Never relay the server's text: it names the gateway's upstream role.
        return UpstreamError(
            "the gateway could not authenticate to the upstream database; "
            "this is a gateway configuration problem, not your credentials",
            sqlstate="08004",
        )
    return UpstreamError(fields.get("M", "upstream start-up failed"), sqlstate=sqlstate)


def deliver_cancel(target: UpstreamTarget, pid: int, secret: bytes) -> None:
    """Deliver a CancelRequest for an upstream backend (best effort, like libpq).

    Blocking, for a thread of its own (:class:`querywarden.cancel.CancelCourier`): the
    event loop may be busy relaying the very result the client wants to stop. The request
    travels with the TLS of every other upstream connection (PostgreSQL reads a
    CancelRequest after an SSLRequest as it reads a StartupMessage, as libpq 17 sends it):
    under ``verify-full`` the backend's cancel key goes to the verified server only.
    """
    timeout = target.connect_timeout
    try:
        raw = socket.create_connection((target.host, target.port), timeout=timeout)
    except OSError as exc:
        raise UpstreamError(
            f"could not connect to the upstream database at {target.host}:{target.port} "
            f"to deliver a cancel: {exc}",
            sqlstate="08001",
        ) from exc
    sock: socket.socket = raw
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = _negotiate_tls_blocking(raw, target)
        sock.sendall(codec.cancel_request(pid, secret))
        # The server closes the connection without answering once it has signalled the
        # backend; waiting for that keeps "delivered" meaning delivered.
        while sock.recv(64):
            pass
    except TimeoutError:
        pass  # sent; the server just did not close in time
    finally:
        sock.close()


def _negotiate_tls_blocking(raw: socket.socket, target: UpstreamTarget) -> socket.socket:
    """:func:`_negotiate_tls` over a blocking socket: the socket to send on."""
    if target.sslmode == "disable":
        return raw
    raw.sendall(codec.ssl_request())
    answer = raw.recv(1)
    if answer == b"S":
        try:
            return _client_tls_context(target).wrap_socket(raw, server_hostname=target.host)
        except ssl.SSLError as exc:
            raise UpstreamError(f"TLS handshake failed: {exc}", sqlstate="08006") from exc
    if answer == b"N":
        if target.sslmode != "prefer":
            raise UpstreamError(
                f"the upstream database does not offer TLS, which sslmode={target.sslmode} "
                "requires",
                sqlstate="08001",
            )
        return raw
    raise UpstreamError("unexpected answer to SSLRequest from upstream", sqlstate="08P01")
