"""Sans-I/O PostgreSQL wire codec: framing, the few decoders the gateway needs, encoders.

Nothing here touches a socket. Frames are located by their 5-byte header (type byte and
big-endian length) and handed on as slices of the bytes received; only messages the
gateway must read are decoded. Message names follow the PostgreSQL documentation,
chapter "Frontend/Backend Protocol".
"""

from __future__ import annotations

import codecs
import struct
from dataclasses import dataclass

from querywarden.errors import ProtocolViolation, TerminatedBeforeStartup

# --- constants ------------------------------------------------------------------------

PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

#: The largest untyped startup packet we accept (PostgreSQL itself allows 10000 bytes).
MAX_STARTUP_PACKET = 10000

INT32 = struct.Struct("!i")
UINT32 = struct.Struct("!I")
INT16 = struct.Struct("!h")
UINT16 = struct.Struct("!H")
HEADER = struct.Struct("!cI")
TYPE_AND_LENGTH = struct.Struct("!BI")

# Authentication request codes (backend 'R').
AUTH_OK = 0
AUTH_CLEARTEXT_PASSWORD = 3
AUTH_MD5_PASSWORD = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# --- framing ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartupPacket:
    """An untyped frame from the start of a connection, identified by its code."""

    code: int
    body: bytes  # everything after the 4-byte code

    @property
    def is_startup_message(self) -> bool:
        """True for a StartupMessage (protocol version 3.x), false for the request codes."""
        return self.code >> 16 == 3


def read_startup_packet(buf: bytearray) -> StartupPacket | None:
    """Remove and return one untyped startup packet from ``buf``; ``None`` if incomplete.

    Raises ProtocolViolation for a length PostgreSQL itself would refuse, and
    TerminatedBeforeStartup for a Terminate message where the packet should be.
    """
    if buf[:5] == TERMINATE:
        raise TerminatedBeforeStartup("the client sent Terminate before its startup packet")
    if len(buf) < 8:
        if len(buf) >= 4:
            _check_startup_length(UINT32.unpack_from(buf, 0)[0])
        return None
    length = UINT32.unpack_from(buf, 0)[0]
    _check_startup_length(length)
    if len(buf) < length:
        return None
    code = UINT32.unpack_from(buf, 4)[0]
    body = bytes(buf[8:length])
    del buf[:length]
    return StartupPacket(code, body)


def _check_startup_length(length: int) -> None:
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise ProtocolViolation(f"invalid length of startup packet: {length}")


def parse_startup_parameters(body: bytes) -> dict[str, str]:
    """Decode the NUL-separated name/value pairs of a StartupMessage."""
    if not body.endswith(b"\0"):
        raise ProtocolViolation("startup packet is not NUL-terminated")
    parts = body[:-1].split(b"\0")
    if parts == [b""]:
        return {}
    if len(parts) % 2:
        # A trailing empty name ends the list; anything else is malformed.
        if parts[-1] != b"":
            raise ProtocolViolation("startup packet has a parameter without a value")
        parts = parts[:-1]
    try:
        names = [p.decode() for p in parts[0::2]]
        values = [p.decode() for p in parts[1::2]]
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("startup parameter is not valid UTF-8") from exc
    if any(not n for n in names):
        raise ProtocolViolation("startup packet has an empty parameter name")
    return dict(zip(names, values, strict=True))


class FrameReader:
    """Splits a byte stream of typed messages into frames, bounded by a size limit.

    ``max_size`` bounds the length of one message that the caller asks to be buffered
    whole. Messages the caller streams (see :meth:`next_header`) are not bounded here.
    """

    __slots__ = ("_buf", "max_size")

    def __init__(self, max_size: int) -> None:
        self._buf = bytearray()
        self.max_size = max_size

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buf += data

    def __len__(self) -> int:
        return len(self._buf)

    def next_frame(self) -> tuple[int, bytes] | None:
        """Remove and return ``(type, whole message bytes)``, or ``None`` if incomplete."""
        buf = self._buf
        if len(buf) < 5:
            return None
        mtype, length = TYPE_AND_LENGTH.unpack_from(buf, 0)
        if length < 4:
            raise ProtocolViolation(f"invalid message length {length} for message type {mtype!r}")
        if length + 1 > self.max_size:
            raise MessageTooLarge(mtype, length + 1, self.max_size)
        end = length + 1
        if len(buf) < end:
            return None
        frame = bytes(buf[:end])
        del buf[:end]
        return mtype, frame

    def take_all(self) -> bytes:
        """Remove and return every buffered byte (for streaming pass-through)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data


class ChunkBuffer:
    """The bytes of an incomplete message, kept as the chunks received and joined once.

    Appending a chunk copies nothing; :meth:`take` joins the chunks once the caller has
    the ``wanted`` bytes it waits for (a whole message, or a header). Joining on every
    read instead would copy a large message once per read: quadratic in its size.
    """

    __slots__ = ("_chunks", "_size", "copied", "wanted")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        #: How many bytes must be buffered before :meth:`take` is worth calling.
        self.wanted = 0
        #: Bytes copied by joins so far (what the O(n) guarantee is measured by).
        self.copied = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data: bytes) -> None:
        """Keep a chunk, uncopied."""
        if data:
            self._chunks.append(data)
            self._size += len(data)

    @property
    def ready(self) -> bool:
        """Whether the wanted bytes have arrived."""
        return self._size >= self.wanted

    def take(self) -> bytes:
        """Remove and return everything buffered, joined (a single chunk is not copied)."""
        chunks = self._chunks
        if len(chunks) == 1:
            data = chunks[0]
        else:
            data = b"".join(chunks)
            self.copied += len(data)
        chunks.clear()
        self._size = self.wanted = 0
        return data

    def hold(self, data: bytes) -> None:
        """Keep the incomplete tail of a stream: wait for its whole message, or its header."""
        self.append(data)
        if len(data) >= 5:
            self.wanted = TYPE_AND_LENGTH.unpack_from(data, 0)[1] + 1
        else:
            self.wanted = 5


class LargeText:
    """A Query or Parse too large to join: kept as received, its text decoded as it comes.

    Joining a message of tens of megabytes and decoding its SQL text when its last byte
    arrives is linear work, but done in one step it stalls everything else for as long
    (about 40 ms per copy of 60 MB, mostly page faults). Here each chunk costs its own
    share as it arrives; what is left at the end is one join of the decoded text. The
    message goes on as its chunks (``writelines``), never joined.

    Feed it from the message's first byte (the 5-byte header must be there); :meth:`feed`
    returns the bytes after the message once it is whole.
    """

    __slots__ = (
        "_decoder",
        "_encoding",
        "_field",
        "_name",
        "_tail",
        "_text",
        "chunks",
        "invalid",
        "left",
        "mtype",
        "unusual",
    )

    def __init__(self, data: bytes, encoding: str) -> None:
        mtype, length = TYPE_AND_LENGTH.unpack_from(data, 0)
        if mtype not in (_QUERY, _PARSE):
            raise ValueError("only a Query or a Parse is collected")
        self.mtype: int = mtype
        #: The message as received, in order: what is forwarded.
        self.chunks: list[bytes] = []
        #: Bytes of the message still to come.
        self.left: int = length + 1
        #: Whether the text has a byte above 0x7F or a backslash (it could read otherwise
        #: in another client_encoding or without standard_conforming_strings).
        self.unusual = False
        #: Whether the text is not valid in the encoding (then decoded with replacements).
        self.invalid = False
        self._encoding = encoding
        self._decoder = codecs.getincrementaldecoder(encoding)()
        self._field = _SQL if mtype == _QUERY else _NAME
        self._name = bytearray()
        self._text: list[str] = []
        self._tail = bytearray()
        self._take(data, 5)

    @property
    def complete(self) -> bool:
        """Whether the whole message is here."""
        return not self.left

    def feed(self, data: bytes) -> bytes:
        """Take received bytes; return those after the message (b"" until it is whole)."""
        if not self.left or not data:
            return data
        if len(data) <= self.left:
            self._take(data, 0)
            return b""
        left = self.left
        self._take(data[:left], 0)
        return data[left:]

    def _take(self, data: bytes, start: int) -> None:
        self.chunks.append(data)
        self.left -= len(data)
        pos, size = start, len(data)
        while pos < size:
            field = self._field
            if field == _TAIL:
                if self.mtype == _PARSE:
                    self._tail += data[pos:]  # the parameter types
                return
            nul = data.find(b"\0", pos)
            stop = size if nul < 0 else nul
            part = data if pos == 0 and stop == size else data[pos:stop]
            if field == _NAME:
                self._name += part
            else:
                if not self.unusual:
                    self.unusual = b"\\" in part or not part.isascii()
                self._decode(part, final=nul >= 0)
            if nul < 0:
                return
            pos = nul + 1
            self._field = field + 1

    def _decode(self, part: bytes, *, final: bool) -> None:
        decoder = self._decoder
        try:
            text = decoder.decode(part, final)
        except UnicodeDecodeError:
            # The request is refused (22021); its text is kept, with replacements, for
            # the refusal and the audit record. The decoder kept its state: decode again.
            self.invalid = True
            decoder.errors = "replace"
            text = decoder.decode(part, final)
        self._text.append(text)

    def request(self) -> tuple[str, str, tuple[int, ...]]:
        """``(statement name, SQL text, parameter types)`` of the whole message.

        Raises ProtocolViolation where :func:`decode_query` and :func:`decode_parse`
        would, InvalidText when the name or the text is not valid in the encoding.
        """
        name, sql = self._strings()
        if self.invalid:
            raise InvalidText(
                f"string in message is not valid in the client encoding ({self._encoding})"
            )
        if self.mtype == _QUERY:
            return "", sql, ()
        tail = bytes(self._tail)
        count, pos = _count(tail, 0, "Parse", "parameter type count")
        if pos + 4 * count != len(tail):
            raise ProtocolViolation(
                f"invalid message format: Parse declares {count} parameter types but "
                f"carries {len(tail) - pos} bytes for them (4 each)"
            )
        return name, sql, struct.unpack_from(f"!{count}I", tail, pos)

    def refused_request(self) -> tuple[str, str]:
        """``(statement name, SQL text with replacements)``: what a refusal names.

        The name must still be valid (as :meth:`Session._undecodable` requires).
        """
        return self._strings()

    def _strings(self) -> tuple[str, str]:
        if self.left:
            raise RuntimeError("the message is not whole yet")
        if self._field != _TAIL:
            raise ProtocolViolation("string in message is not NUL-terminated")
        try:
            name = self._name.decode(self._encoding)
        except UnicodeDecodeError as exc:
            raise InvalidText(
                f"string in message is not valid in the client encoding ({self._encoding})"
            ) from exc
        if len(self._text) != 1:
            self._text[:] = ["".join(self._text)]  # joined once, however often asked
        return name, self._text[0] if self._text else ""


_QUERY = ord("Q")
_PARSE = ord("P")
_NAME, _SQL, _TAIL = 0, 1, 2


class MessageTooLarge(ProtocolViolation):
    """A message longer than the configured limit."""

    def __init__(self, mtype: int, size: int, limit: int) -> None:
        super().__init__(
            f"message of type {chr(mtype)!r} is {size} bytes, over the gateway's limit of {limit}",
            sqlstate="54000",
        )


# --- decoders -------------------------------------------------------------------------


def _cstring(data: bytes, pos: int, encoding: str = "utf-8") -> tuple[str, int]:
    end = data.find(b"\0", pos)
    if end < 0:
        raise ProtocolViolation("string in message is not NUL-terminated")
    try:
        if end - pos > _COPY_FREE_DECODE:
            # A huge SQL text is decoded in place: slicing it first would copy it once more.
            return str(memoryview(data)[pos:end], encoding), end + 1
        return data[pos:end].decode(encoding), end + 1
    except UnicodeDecodeError as exc:
        raise InvalidText(
            f"string in message is not valid in the client encoding ({encoding})"
        ) from exc


class InvalidText(ProtocolViolation):
    """A string in a message is not valid in the client encoding (as PostgreSQL: 22021)."""

    default_sqlstate = "22021"


def decode_cstring(data: bytes, pos: int, encoding: str = "utf-8") -> tuple[str, int]:
    """A NUL-terminated string at ``pos`` and the position after it."""
    return _cstring(data, pos, encoding)


#: Strings longer than this are decoded without being sliced out first.
_COPY_FREE_DECODE = 64 * 1024


def decode_query(frame: bytes, encoding: str = "utf-8") -> str:
    """Query ('Q'): the SQL text."""
    sql, _ = _cstring(frame, 5, encoding)
    return sql


@dataclass(frozen=True, slots=True)
class Parse:
    """Parse ('P'): statement name, SQL text and parameter type OIDs."""

    statement: str
    sql: str
    param_types: tuple[int, ...]


def decode_parse(frame: bytes, encoding: str = "utf-8") -> Parse:
    """Decode a Parse message (up to 65535 parameter types, as PostgreSQL allows)."""
    name, pos = _cstring(frame, 5, encoding)
    sql, pos = _cstring(frame, pos, encoding)
    count, pos = _count(frame, pos, "Parse", "parameter type count")
    if pos + 4 * count != len(frame):
        raise ProtocolViolation(
            f"invalid message format: Parse declares {count} parameter types but carries "
            f"{len(frame) - pos} bytes for them (4 each)"
        )
    types = struct.unpack_from(f"!{count}I", frame, pos)
    return Parse(name, sql, types)


@dataclass(frozen=True, slots=True)
class Bind:
    """Bind ('B'): portal and statement names; parameters stay in the raw frame."""

    portal: str
    statement: str


@dataclass(frozen=True, slots=True)
class BindParameters:
    """What a Bind carries after its names: the parameters and the result formats."""

    formats: tuple[int, ...]  # parameter format codes (empty: all text; one: for all)
    values: tuple[bytes | None, ...]  # None for NULL
    result_formats: tuple[int, ...]  # result-column format codes (likewise)


def decode_bind_names(frame: bytes, encoding: str = "utf-8") -> Bind:
    """Decode just the portal and statement names of a Bind message."""
    portal, pos = _cstring(frame, 5, encoding)
    statement, _ = _cstring(frame, pos, encoding)
    return Bind(portal, statement)


def decode_bind_parameters(frame: bytes) -> BindParameters:
    """Bind ('B'): every count and length checked against the frame.

    Faults are named as PostgreSQL names them, so a client reads the same reason
    whether the gateway or the server finds the fault.
    """
    pos = _skip_cstring(frame, 5)  # portal
    pos = _skip_cstring(frame, pos)  # statement
    formats, values, pos = _formatted_values(frame, pos, "Bind", "parameter")
    nresults, pos = _count(frame, pos, "Bind", "result format count")
    results, pos = _int16s(frame, pos, nresults, "Bind", "result format codes")
    _expect_end(frame, pos, "Bind")
    return BindParameters(formats, values, results)


def decode_data_row(frame: bytes) -> tuple[bytes | None, ...]:
    """DataRow ('D'): the column values (None for NULL), checked against the frame."""
    count, pos = _count(frame, 5, "DataRow", "column count")
    values, pos = _values(frame, pos, count, "DataRow", "column")
    _expect_end(frame, pos, "DataRow")
    return values


def _count(frame: bytes, pos: int, message: str, what: str) -> tuple[int, int]:
    """An unsigned 16-bit count at ``pos`` (PostgreSQL reads these counts unsigned)."""
    if pos + 2 > len(frame):
        raise ProtocolViolation(
            f"insufficient data left in message: {message} is truncated before its {what}"
        )
    return UINT16.unpack_from(frame, pos)[0], pos + 2


def _int16s(
    frame: bytes, pos: int, count: int, message: str, what: str
) -> tuple[tuple[int, ...], int]:
    end = pos + 2 * count
    if end > len(frame):
        raise ProtocolViolation(
            f"insufficient data left in message: {message} declares {count} {what} "
            f"but has room for {(len(frame) - pos) // 2}"
        )
    return struct.unpack_from(f"!{count}h", frame, pos), end


def _values(
    frame: bytes, pos: int, count: int, message: str, what: str
) -> tuple[tuple[bytes | None, ...], int]:
    """``count`` length-prefixed values at ``pos`` (-1 is NULL), as in Bind and DataRow."""
    size = len(frame)
    unpack = INT32.unpack_from
    values: list[bytes | None] = []
    for index in range(1, count + 1):
        if pos + 4 > size:
            raise ProtocolViolation(
                f"insufficient data left in message: {message} declares {count} {what}s "
                f"but ends before the length of {what} {index}"
            )
        (length,) = unpack(frame, pos)
        pos += 4
        if length == -1:
            values.append(None)
            continue
        if length < 0:
            raise ProtocolViolation(f"invalid length {length} of {what} {index} in {message}")
        if pos + length > size:
            raise ProtocolViolation(
                f"insufficient data left in message: {what} {index} of {message} is "
                f"{length} bytes long, but {size - pos} bytes are left"
            )
        values.append(frame[pos : pos + length])
        pos += length
    return tuple(values), pos


def _skip_cstring(frame: bytes, pos: int) -> int:
    end = frame.find(b"\0", pos)
    if end < 0:
        raise ProtocolViolation("string in message is not NUL-terminated")
    return end + 1


def _formatted_values(
    frame: bytes, pos: int, message: str, item: str
) -> tuple[tuple[int, ...], tuple[bytes | None, ...], int]:
    """Format codes, then the values they describe, as Bind and FunctionCall carry them.

    Zero codes mean all text, one code applies to every value, otherwise one per value.
    """
    nformats, pos = _count(frame, pos, message, f"{item} format count")
    formats, pos = _int16s(frame, pos, nformats, message, f"{item} format codes")
    nvalues, pos = _count(frame, pos, message, f"{item} count")
    if nformats > 1 and nformats != nvalues:
        # PostgreSQL's words: "bind message has 2 parameter formats but 1 parameters".
        kind = "bind" if message == "Bind" else "function call"
        raise ProtocolViolation(
            f"{kind} message has {nformats} {item} formats but {nvalues} {item}s"
        )
    values, pos = _values(frame, pos, nvalues, message, item)
    return formats, values, pos


def _expect_end(frame: bytes, pos: int, message: str) -> None:
    if pos != len(frame):
        raise ProtocolViolation(
            f"invalid message format: {message} has {len(frame) - pos} bytes after its last field"
        )


@dataclass(frozen=True, slots=True)
class FieldDescription:
    """One column of a RowDescription."""

    name: bytes
    table_oid: int
    attnum: int
    type_oid: int
    format: int


def decode_row_description(frame: bytes) -> list[FieldDescription]:
    """RowDescription ('T'): every column's origin, type and format."""
    count, pos = _count(frame, 5, "RowDescription", "column count")
    size = len(frame)
    fields: list[FieldDescription] = []
    for _ in range(count):
        end = frame.find(b"\0", pos)
        if end < 0 or end + 1 + _FIELD.size > size:
            raise ProtocolViolation(
                f"insufficient data left in message: RowDescription declares {count} "
                f"columns but ends after {len(fields)}"
            )
        table_oid, attnum, type_oid, _, _, fmt = _FIELD.unpack_from(frame, end + 1)
        fields.append(FieldDescription(frame[pos:end], table_oid, attnum, type_oid, fmt))
        pos = end + 1 + _FIELD.size
    return fields


_FIELD = struct.Struct("!IhIhih")


def decode_target(frame: bytes, encoding: str = "utf-8") -> tuple[str, str]:
    """Describe ('D') or Close ('C'): ``(kind, name)`` where kind is 'S' or 'P'."""
    if len(frame) < 7:
        raise ProtocolViolation("Describe/Close message is truncated")
    kind = chr(frame[5])
    if kind not in ("S", "P"):
        raise ProtocolViolation(f"Describe/Close target must be 'S' or 'P', not {kind!r}")
    name, _ = _cstring(frame, 6, encoding)
    return kind, name


def decode_execute_portal(frame: bytes, encoding: str = "utf-8") -> str:
    """Execute ('E'): the portal name (followed by the row count, which must be there)."""
    name, pos = _cstring(frame, 5, encoding)
    if pos + 4 != len(frame):
        raise ProtocolViolation(
            "invalid message format: Execute must end with its 4-byte row count"
        )
    return name


def decode_function_call_oid(frame: bytes) -> int:
    """FunctionCall ('F'): the OID of the function called; the whole frame is checked."""
    if len(frame) < 9:
        raise ProtocolViolation("insufficient data left in message: FunctionCall is truncated")
    _, _, pos = _formatted_values(frame, 9, "FunctionCall", "argument")
    _, pos = _count(frame, pos, "FunctionCall", "result format")
    _expect_end(frame, pos, "FunctionCall")
    return int(UINT32.unpack_from(frame, 5)[0])


def decode_password(frame: bytes) -> bytes:
    """PasswordMessage ('p'): the raw password bytes (without the terminator)."""
    body = frame[5:]
    if not body.endswith(b"\0"):
        raise ProtocolViolation("password message is not NUL-terminated")
    return body[:-1]


def decode_fields(frame: bytes) -> dict[str, str]:
    """ErrorResponse/NoticeResponse ('E'/'N'): the fields keyed by their one-letter code."""
    fields: dict[str, str] = {}
    pos = 5
    end = len(frame)
    while pos < end and frame[pos] != 0:
        code = chr(frame[pos])
        stop = frame.find(b"\0", pos + 1)
        if stop < 0:
            raise ProtocolViolation("error field is not NUL-terminated")
        fields[code] = frame[pos + 1 : stop].decode("utf-8", "replace")
        pos = stop + 1
    return fields


def encode_fields(mtype: bytes, fields: dict[str, str]) -> bytes:
    """ErrorResponse/NoticeResponse from fields keyed by their one-letter code."""
    parts = [code.encode() + cstr(value) for code, value in fields.items()]
    return message(mtype, b"".join(parts) + b"\0")


def decode_parameter_status(frame: bytes) -> tuple[str, str]:
    """ParameterStatus ('S'): ``(name, value)``."""
    name, pos = _cstring(frame, 5)
    value, _ = _cstring(frame, pos)
    return name, value


def decode_notification(frame: bytes) -> tuple[int, bytes, bytes]:
    """NotificationResponse ('A'): ``(process id, channel, payload)``, as bytes."""
    if len(frame) < 11:
        raise ProtocolViolation("NotificationResponse is truncated")
    pid = UINT32.unpack_from(frame, 5)[0]
    channel_end = frame.find(b"\0", 9)
    payload_end = frame.find(b"\0", channel_end + 1) if channel_end >= 0 else -1
    if payload_end < 0:
        raise ProtocolViolation("string in NotificationResponse is not NUL-terminated")
    return pid, bytes(frame[9:channel_end]), bytes(frame[channel_end + 1 : payload_end])


def notification_response(pid: int, channel: bytes, payload: str) -> bytes:
    """NotificationResponse ('A'); the channel as the server sent it."""
    return message(b"A", UINT32.pack(pid) + channel + b"\0" + cstr(payload))


def decode_backend_key_data(frame: bytes) -> tuple[int, bytes]:
    """BackendKeyData ('K'): ``(process id, secret key bytes)``."""
    if len(frame) < 13:
        raise ProtocolViolation("BackendKeyData is truncated")
    return UINT32.unpack_from(frame, 5)[0], bytes(frame[9:])


def decode_authentication(frame: bytes) -> tuple[int, bytes]:
    """Authentication ('R'): ``(request code, remaining payload)``."""
    if len(frame) < 9:
        raise ProtocolViolation("Authentication message is truncated")
    return UINT32.unpack_from(frame, 5)[0], bytes(frame[9:])


# --- encoders -------------------------------------------------------------------------


def message(mtype: bytes, payload: bytes = b"") -> bytes:
    """Frame a typed message."""
    return HEADER.pack(mtype, len(payload) + 4) + payload


def cstr(value: str) -> bytes:
    """A NUL-terminated UTF-8 string."""
    return value.encode() + b"\0"


def startup_message(params: dict[str, str], version: int = PROTOCOL_3_0) -> bytes:
    """An untyped StartupMessage."""
    body = INT32.pack(version) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return INT32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    """An untyped SSLRequest."""
    return INT32.pack(8) + INT32.pack(SSL_REQUEST_CODE)


def cancel_request(pid: int, secret: bytes) -> bytes:
    """An untyped CancelRequest."""
    return (
        INT32.pack(12 + len(secret)) + INT32.pack(CANCEL_REQUEST_CODE) + UINT32.pack(pid) + secret
    )


def authentication(code: int, payload: bytes = b"") -> bytes:
    """An Authentication ('R') request."""
    return message(b"R", UINT32.pack(code) + payload)


AUTHENTICATION_OK = authentication(AUTH_OK)
AUTHENTICATION_CLEARTEXT = authentication(AUTH_CLEARTEXT_PASSWORD)


def backend_key_data(pid: int, secret: bytes) -> bytes:
    """BackendKeyData ('K')."""
    return message(b"K", UINT32.pack(pid) + secret)


def parameter_status(name: str, value: str) -> bytes:
    """ParameterStatus ('S')."""
    return message(b"S", cstr(name) + cstr(value))


READY_FOR_QUERY = {status: message(b"Z", status) for status in (b"I", b"T", b"E")}


def ready_for_query(status: bytes) -> bytes:
    """ReadyForQuery ('Z') with transaction status I, T or E."""
    return READY_FOR_QUERY[status]


def _fields(severity: str, sqlstate: str, text: str, detail: str | None, hint: str | None) -> bytes:
    parts = [b"S", cstr(severity), b"V", cstr(severity), b"C", cstr(sqlstate), b"M", cstr(text)]
    if detail:
        parts += [b"D", cstr(detail)]
    if hint:
        parts += [b"H", cstr(hint)]
    parts.append(b"\0")
    return b"".join(parts)


def error_response(
    sqlstate: str,
    text: str,
    *,
    detail: str | None = None,
    hint: str | None = None,
    severity: str = "ERROR",
) -> bytes:
    """ErrorResponse ('E')."""
    return message(b"E", _fields(severity, sqlstate, text, detail, hint))


def notice_response(
    text: str, *, sqlstate: str = "00000", detail: str | None = None, hint: str | None = None
) -> bytes:
    """NoticeResponse ('N')."""
    return message(b"N", _fields("NOTICE", sqlstate, text, detail, hint))


def negotiate_protocol_version(newest_minor: int, unsupported: list[str]) -> bytes:
    """NegotiateProtocolVersion ('v') for protocol 3.``newest_minor``.

    The first field is the whole version code (3.0 is 196608), as PostgreSQL sends it and
    libpq 18 checks it, although the protocol documentation calls it the minor version.
    """
    payload = INT32.pack((3 << 16) | newest_minor) + INT32.pack(len(unsupported))
    payload += b"".join(cstr(o) for o in unsupported)
    return message(b"v", payload)


def query(sql: str) -> bytes:
    """Query ('Q')."""
    return message(b"Q", cstr(sql))


def parse(statement: str, sql: str, param_types: tuple[int, ...] = ()) -> bytes:
    """Parse ('P')."""
    payload = cstr(statement) + cstr(sql) + UINT16.pack(len(param_types))
    payload += struct.pack(f"!{len(param_types)}I", *param_types)
    return message(b"P", payload)


def describe(kind: str, name: str) -> bytes:
    """Describe ('D') of a statement ('S') or portal ('P')."""
    return message(b"D", kind.encode() + cstr(name))


def password_message(payload: bytes) -> bytes:
    """PasswordMessage / SASLInitialResponse / SASLResponse ('p')."""
    return message(b"p", payload)


TERMINATE = message(b"X")
