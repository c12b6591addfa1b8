r"""Masking strategies: replace one DataRow value with a masked value the client can decode.

Sans-I/O and pure: a value goes in exactly as it appears in a PostgreSQL DataRow (text
format or binary format, ``None`` for SQL NULL), a replacement value comes out. The hot path
is :func:`make_masker`, which does every lookup once per result column and returns a small
closure to call once per row; :func:`mask_value` is the same thing behind a cache.

Strategies (:class:`MaskSpec`):

- ``redact``: the constant ``replacement`` (default ``****``).
- ``null``: SQL NULL, for every type.
- ``partial``: the first ``keep_first`` and last ``keep_last`` characters, with the middle
  replaced by ``replacement``. The length is *not* preserved: the filler is always the
  same, because the length of a secret can itself be telling. Characters are kept only if
  at least as many characters are hidden as are shown (``len >= 2 * (keep_first +
  keep_last)``); a shorter value becomes the filler alone.
- ``email``: ``replacement`` + ``@`` + the domain (the text after the last ``@``). A value
  without ``@``, or whose "domain" is not a plain host name (so free text after an ``@``
  cannot ride along), becomes ``replacement``.
- ``hash``: keyed HMAC-SHA256 of the value. Stable across calls, sessions, result formats
  and client encodings, so joins and GROUP BY on masked values still match (per type:
  an int4 and an int8 column holding the same number hash to different values). Not
  reversible without the key.
- ``digits``: format preserving. Every digit is replaced by a digit drawn from an HMAC of
  the whole value (with a key derived for this purpose only), so the result is
  deterministic, has the same length, and keeps every non-digit character as it was.

What each type family receives (text = text result format, binary = binary format):

==========================  ==========================  ================================
type family (OIDs)           strategy                    replacement
==========================  ==========================  ================================
any                          null                        NULL
any                          NULL value                  NULL
text-like: text 25,          redact / partial / email /  the masked string in the client
varchar 1043, bpchar 1042,   hash / digits               encoding, same bytes for text
name 19, unknown 705,                                    and binary. hash: 16 hex chars.
"char" 18                                                bpchar: trailing blanks are
                                                         dropped first. "char": the first
                                                         character only (ASCII).
                                                         Undecodable value: replacement
                                                         (hash: HMAC of the raw bytes).
json 114, jsonb 3802         as text-like                the masked string as a JSON
                                                         string literal; jsonb binary
                                                         keeps its version byte 0x01.
xml 142                      as text-like                masked string, XML-escaped.
int2 21, int4 23, int8 20,   hash                        a keyed number in the type's
oid 26                                                   range (text: decimal; binary:
                                                         big-endian, fixed width)
                             digits                      same digits count and sign; if
                                                         that falls outside the type's
                                                         range: the hash value instead
                             redact / partial / email    0
numeric 1700                 hash                        a keyed integer < 2**48
                             digits                      digits replaced, sign and '.'
                                                         kept (binary: re-encoded)
                             redact / partial / email    0
float4 700, float8 701       hash                        a keyed integer, exactly
                                                         representable in the type
                             digits                      digits replaced (text as sent;
                                                         binary: of repr()); not finite
                                                         or out of range: the hash value
                             redact / partial / email    0
uuid 2950                    hash                        16 bytes of the HMAC (text: the
                                                         canonical 36-character form)
                             others                      the nil UUID
bytea 17                     hash                        the 32-byte HMAC (text: ``\x``
                                                         + hex)
                             others                      empty (text: ``\x``)
everything else: bool,       any                         NULL
dates and times, inet,
arrays, records, range,
extension and unknown OIDs
==========================  ==========================  ================================

Arrays, records and unknown types get NULL whatever the strategy: they can carry sensitive
values in a structure this module does not parse, and NULL is the one replacement every
client decodes for every type. Malformed input never passes through: it gets the
family's constant (or a hash of its raw bytes), never the raw bytes.
"""

from __future__ import annotations

import codecs
import hashlib
import hmac
import json
import math
import re
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, Literal

# --- type OIDs (names as in PostgreSQL's pg_type.dat) ----------------------------------

BOOLOID: Final = 16
BYTEAOID: Final = 17
CHAROID: Final = 18
NAMEOID: Final = 19
INT8OID: Final = 20
INT2OID: Final = 21
INT4OID: Final = 23
TEXTOID: Final = 25
OIDOID: Final = 26
JSONOID: Final = 114
XMLOID: Final = 142
FLOAT4OID: Final = 700
FLOAT8OID: Final = 701
UNKNOWNOID: Final = 705
BPCHAROID: Final = 1042
VARCHAROID: Final = 1043
NUMERICOID: Final = 1700
UUIDOID: Final = 2950
JSONBOID: Final = 3802

_PLAIN_TEXT_TYPES: Final = frozenset({TEXTOID, VARCHAROID, BPCHAROID, NAMEOID, UNKNOWNOID, CHAROID})

#: Types whose values are strings in the client encoding (jsonb binary: after its version
#: byte). These are the values content detectors scan.
TEXT_LIKE_TYPES: Final[frozenset[int]] = _PLAIN_TEXT_TYPES | {JSONOID, JSONBOID, XMLOID}


def is_text_like(type_oid: int) -> bool:
    """True for types whose values are strings in the client encoding (incl. json, xml)."""
    return type_oid in TEXT_LIKE_TYPES


# --- the specification -------------------------------------------------------------------

Strategy = Literal["redact", "null", "partial", "email", "hash", "digits"]
_STRATEGIES: Final = frozenset({"redact", "null", "partial", "email", "hash", "digits"})
_KEYED: Final = frozenset({"hash", "digits"})

#: Length of the hex string the ``hash`` strategy gives text-like values (64 bits: a
#: million distinct values collide with probability ~3e-8, so joins stay exact).
HASH_TEXT_CHARS: Final = 16

#: Keyed strategies refuse shorter keys: with a short key the hash of a low-entropy value
#: (an SSN has 10**9 possibilities) could be brute-forced.
MIN_KEY_BYTES: Final = 16

Masker = Callable[[bytes | None], bytes | None]
"""One column's masking function: DataRow value in, replacement value out."""


@dataclass(frozen=True, slots=True)
class MaskSpec:
    """How to mask one column (see the module docstring for each strategy)."""

    strategy: Strategy
    keep_first: int = 0  # partial
    keep_last: int = 0  # partial
    replacement: str = "****"  # redact, and the filler for partial and email

    def __post_init__(self) -> None:
        # Literal is only checked statically; policy files reach here at run time.
        if self.strategy not in _STRATEGIES:
            raise ValueError(f"unknown masking strategy {self.strategy!r}")
        if self.keep_first < 0 or self.keep_last < 0:
            raise ValueError("keep_first and keep_last must not be negative")


def mask_value(
    value: bytes | None,
    *,
    type_oid: int,
    binary: bool,
    spec: MaskSpec,
    key: bytes,
    encoding: str = "utf-8",
) -> bytes | None:
    """Mask one DataRow value of type ``type_oid``; ``None`` (SQL NULL) stays ``None``.

    ``encoding`` is the Python codec name of the session's client encoding. Convenience
    wrapper around :func:`make_masker` (cached): per-row code should hold the masker.
    """
    return _cached_masker(spec, type_oid, binary, key, encoding)(value)


def make_masker(
    spec: MaskSpec, *, type_oid: int, binary: bool, key: bytes, encoding: str = "utf-8"
) -> Masker:
    """Build the masking function for one result column.

    Raises ValueError for a keyed strategy with a key shorter than MIN_KEY_BYTES, and
    LookupError for an encoding Python does not know.
    """
    codec = codecs.lookup(encoding).name
    if spec.strategy in _KEYED and len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the masking key must be at least {MIN_KEY_BYTES} bytes")
    if spec.strategy == "null":
        return _null
    if type_oid in TEXT_LIKE_TYPES:
        return _text_masker(spec, type_oid, binary, key, codec)
    family = _NUMBER_FAMILIES.get(type_oid)
    if family is not None:
        return family(spec, type_oid, binary, key)
    if type_oid == UUIDOID:
        return _uuid_masker(spec, binary, key)
    if type_oid == BYTEAOID:
        return _bytea_masker(spec, binary, key)
    return _null


#: Plain text types whose wire value is the text itself, in text and in binary format
#: (bpchar: with its padding blanks, stripped before masking).
_PLAIN_WIRE_TEXT: Final = frozenset({TEXTOID, VARCHAROID, BPCHAROID, NAMEOID, UNKNOWNOID})

#: keep_first/keep_last beyond this go to the Python masker (the compiled one takes machine
#: integers; no text has a billion characters to keep anyway).
_COMPILED_MAX_KEEP: Final = 1 << 30

#: What the compiled row masker does for one column (see :func:`compiled_op`).
CompiledOp = tuple[object, ...]


def compiled_op(masker: Masker, spec: MaskSpec, *, type_oid: int, encoding: str) -> CompiledOp:
    """How the compiled row masker (``querywarden_native``) applies ``masker``.

    ``masker`` is what :func:`make_masker` returned for these arguments. The forms the
    compiled loop reproduces byte for byte: ``("null",)`` (every value NULL),
    ``("constant", bytes)`` (every non-NULL value the same), ``("partial", keep_first,
    keep_last, filler, strip_blanks)`` and ``("email", filler, strip_blanks, masker)`` for
    plain text types in UTF-8 (email calls ``masker`` for a non-ASCII domain, whose letters
    only Python's Unicode tables decide). Everything else is ``("call", masker)``: the
    compiled loop calls back. ``tests/unit/test_native_masking.py`` holds the two to the same
    bytes.
    """
    if masker is _null:
        return ("null",)
    if getattr(masker, "__code__", None) is _CONSTANT_CODE:
        # A closure of _constant: its answer does not depend on the value.
        return ("constant", masker(b""))
    keep = max(spec.keep_first, spec.keep_last)
    if (
        type_oid in _PLAIN_WIRE_TEXT
        and codecs.lookup(encoding).name == "utf-8"
        and keep < _COMPILED_MAX_KEEP
    ):
        # _text_finisher of a plain type: encode(codec, "replace"), piece by piece the same.
        filler = spec.replacement.encode("utf-8", "replace")
        strip = type_oid == BPCHAROID
        if spec.strategy == "partial":
            return ("partial", spec.keep_first, spec.keep_last, filler, strip)
        if spec.strategy == "email":
            return ("email", filler, strip, masker)
    return ("call", masker)


@lru_cache(maxsize=1024)
def _cached_masker(
    spec: MaskSpec, type_oid: int, binary: bool, key: bytes, encoding: str
) -> Masker:
    return make_masker(spec, type_oid=type_oid, binary=binary, key=key, encoding=encoding)


def _null(value: bytes | None) -> None:
    return None


def _constant(result: bytes) -> Masker:
    def mask(value: bytes | None) -> bytes | None:
        return None if value is None else result

    return mask


_CONSTANT_CODE: Final = _constant(b"").__code__


# --- keyed primitives --------------------------------------------------------------------


@lru_cache(maxsize=64)
def _hmac(key: bytes) -> Callable[[bytes], bytes]:
    """HMAC-SHA256 under ``key``; the key schedule is done once and copied per call."""
    base = hmac.new(key, digestmod=hashlib.sha256)

    def digest(message: bytes) -> bytes:
        mac = base.copy()
        mac.update(message)
        return mac.digest()

    return digest


def _digits_hmac(key: bytes) -> Callable[[bytes], bytes]:
    # A key of its own, so a digits replacement says nothing about the hash of the same
    # value under the same policy key.
    return _hmac(hmac.digest(key, b"querywarden masking: digits", "sha256"))


def _keystream(seed: bytes, length: int) -> bytes:
    """At least ``length`` pseudorandom bytes determined by ``seed`` (an HMAC output)."""
    return seed if length <= len(seed) else hashlib.shake_256(seed).digest(length)


def _replace_digits(text: str, seed: bytes) -> str:
    """Replace every digit of ``text`` by one drawn from ``seed``; keep everything else."""
    stream = iter(_keystream(seed, len(text)))
    # byte % 10 is very slightly biased towards 0-5; that is harmless here: without the
    # key, the output digits carry no information about the input digits either way.
    return "".join([_DIGIT_CHARS[next(stream) % 10] if c.isdigit() else c for c in text])


_DIGIT_CHARS: Final = "0123456789"


def _avoid_leading_zero(text: str, seed: bytes) -> str:
    """Make the first digit run of a number non-zero if it has more than one digit."""
    start = 1 if text.startswith("-") else 0
    if len(text) > start + 1 and text[start] == "0" and text[start + 1].isdigit():
        return f"{text[:start]}{'123456789'[seed[-1] % 9]}{text[start + 1 :]}"
    return text


# --- string transforms shared by the text-like family -----------------------------------


def _partial(text: str, keep_first: int, keep_last: int, filler: str) -> str:
    kept = keep_first + keep_last
    if kept == 0 or len(text) < 2 * kept:
        return filler
    return f"{text[:keep_first]}{filler}{text[len(text) - keep_last :]}"


# Letters and digits in any script (str.isalnum's notion), with '.' and '-' inside.
_HOST = re.compile(r"[^\W_](?:[^\W_]|[.-])*(?<=[^\W_])|[^\W_]")


def _plain_host(domain: str) -> bool:
    """True if ``domain`` looks like a host name: letters, digits, '.' and '-' only."""
    return len(domain) <= 253 and _HOST.fullmatch(domain) is not None


def _email(text: str, filler: str) -> str:
    _, at, domain = text.rpartition("@")
    if at and _plain_host(domain):
        return f"{filler}@{domain}"
    return filler


# --- text-like types ---------------------------------------------------------------------


def _text_masker(spec: MaskSpec, type_oid: int, binary: bool, key: bytes, codec: str) -> Masker:
    finish = _text_finisher(type_oid, binary, codec)
    fallback = finish(spec.replacement)
    strategy = spec.strategy
    if strategy == "redact":
        return _constant(fallback)
    decode = _text_decoder(type_oid, binary, codec)

    if strategy == "hash":
        mac = _hmac(key)
        if type_oid in (JSONOID, JSONBOID):
            # Hash what the JSON says, so '"a"'::jsonb and 'a'::text mask alike.
            def canonical(value: bytes) -> bytes:
                try:
                    return decode(value).encode("utf-8", "surrogatepass")
                except (UnicodeDecodeError, ValueError):
                    return value  # still keyed and stable; never sent back as is

        else:
            payload, to_utf8 = _text_payload(type_oid, binary), _to_utf8(codec)

            def canonical(value: bytes) -> bytes:
                return to_utf8(payload(value))

        def mask_hash(value: bytes | None) -> bytes | None:
            if value is None:
                return None
            return finish(mac(canonical(value))[: HASH_TEXT_CHARS // 2].hex())

        return mask_hash

    transform: Callable[[str], str]
    if strategy == "partial":
        first, last, filler = spec.keep_first, spec.keep_last, spec.replacement

        def transform(text: str) -> str:
            return _partial(text, first, last, filler)

    elif strategy == "email":
        filler = spec.replacement

        def transform(text: str) -> str:
            return _email(text, filler)

    else:  # digits
        mac = _digits_hmac(key)

        def transform(text: str) -> str:
            return _replace_digits(text, mac(text.encode("utf-8", "surrogatepass")))

    def mask(value: bytes | None) -> bytes | None:
        if value is None:
            return None
        try:
            text = decode(value)
        except (UnicodeDecodeError, ValueError):
            return fallback  # fail closed: never hand back bytes we could not read
        return finish(transform(text))

    return mask


def _text_decoder(type_oid: int, binary: bool, codec: str) -> Callable[[bytes], str]:
    """The string a wire value holds (raises UnicodeDecodeError or ValueError)."""
    payload = _text_payload(type_oid, binary)
    if type_oid in (JSONOID, JSONBOID):

        def json_text(value: bytes) -> str:
            text = payload(value).decode(codec)
            # A JSON string scalar is masked by its content, not its quotes: partial
            # keeps characters of the string, email finds its domain.
            if text[:1] == '"':
                content = json.loads(text)
                if isinstance(content, str):
                    return content
            return text

        return json_text
    if payload is _identity:
        return lambda value: value.decode(codec)

    def text(value: bytes) -> str:
        return payload(value).decode(codec)

    return text


def _text_payload(type_oid: int, binary: bool) -> Callable[[bytes], bytes]:
    """The string bytes inside a wire value (raises ValueError if there are none)."""
    if type_oid == JSONBOID and binary:
        return _jsonb_binary_payload
    if type_oid == BPCHAROID:
        # Trailing blanks are padding, not data (PostgreSQL ignores them in comparisons),
        # so they must not change a hash; 0x20 is never part of a multibyte character in
        # any client encoding PostgreSQL supports.
        return _strip_blanks
    return _identity


def _jsonb_binary_payload(value: bytes) -> bytes:
    if value[:1] != b"\x01":
        raise ValueError("unknown jsonb binary version")
    return value[1:]


def _strip_blanks(value: bytes) -> bytes:
    return value.rstrip(b" ")


def _identity(value: bytes) -> bytes:
    return value


def _to_utf8(codec: str) -> Callable[[bytes], bytes]:
    """Re-encode to UTF-8 so a hash does not depend on the client encoding."""
    if codec == "utf-8":
        return _identity

    def convert(value: bytes) -> bytes:
        try:
            return value.decode(codec).encode("utf-8")
        except UnicodeError:
            return value  # still keyed and stable; just not comparable across encodings

    return convert


def _text_finisher(type_oid: int, binary: bool, codec: str) -> Callable[[str], bytes]:
    """Turn a masked string into a valid wire value of the column's type."""
    if type_oid in (JSONOID, JSONBOID):
        prefix = b"\x01" if type_oid == JSONBOID and binary else b""

        def json_string(text: str) -> bytes:
            # ensure_ascii: the literal is then valid in every client encoding.
            return prefix + json.dumps(text).encode("ascii")

        return json_string
    if type_oid == XMLOID:

        def xml_content(text: str) -> bytes:
            escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            return escaped.encode(codec, "xmlcharrefreplace")

        return xml_content
    if type_oid == CHAROID:

        def single_char(text: str) -> bytes:
            # "char" is one byte on the server; keep it one ASCII byte for the client.
            return text[:1].encode("ascii", "replace")

        return single_char

    def encoded(text: str) -> bytes:
        # "replace": a replacement string the client encoding cannot express becomes '?'
        # rather than an error or bytes the client cannot decode.
        return text.encode(codec, "replace")

    return encoded


# --- numbers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _IntType:
    wire: struct.Struct
    low: int
    high: int


_INT_TYPES: Final = {
    INT2OID: _IntType(struct.Struct("!h"), -(2**15), 2**15 - 1),
    INT4OID: _IntType(struct.Struct("!i"), -(2**31), 2**31 - 1),
    INT8OID: _IntType(struct.Struct("!q"), -(2**63), 2**63 - 1),
    OIDOID: _IntType(struct.Struct("!I"), 0, 2**32 - 1),
}


def _int_masker(spec: MaskSpec, type_oid: int, binary: bool, key: bytes) -> Masker:
    kind = _INT_TYPES[type_oid]
    low, span = kind.low, kind.high - kind.low + 1
    emit: Callable[[int], bytes] = kind.wire.pack if binary else _ascii_int
    if spec.strategy not in _KEYED:
        return _constant(emit(0))
    mac = _hmac(key)

    def parse(value: bytes) -> int | None:
        try:
            return kind.wire.unpack(value)[0] if binary else int(value)
        except (struct.error, ValueError):
            return None

    def keyed(canonical: bytes) -> int:
        return low + int.from_bytes(mac(canonical)[:8], "big") % span

    if spec.strategy == "hash":

        def mask_hash(value: bytes | None) -> bytes | None:
            if value is None:
                return None
            number = parse(value)
            return emit(keyed(value if number is None else b"%d" % number))

        return mask_hash

    digits_mac = _digits_hmac(key)

    def mask_digits(value: bytes | None) -> bytes | None:
        if value is None:
            return None
        number = parse(value)
        if number is None:
            return emit(keyed(value))
        text = str(number)
        seed = digits_mac(text.encode("ascii"))
        masked = int(_avoid_leading_zero(_replace_digits(text, seed), seed))
        if not kind.low <= masked <= kind.high:
            masked = keyed(text.encode("ascii"))
        return emit(masked)

    return mask_digits


def _ascii_int(number: int) -> bytes:
    return b"%d" % number


_FLOAT4_MAX: Final = 3.4028234663852886e38
_FLOAT4: Final = struct.Struct("!f")
_FLOAT8: Final = struct.Struct("!d")


def _float_masker(spec: MaskSpec, type_oid: int, binary: bool, key: bytes) -> Masker:
    single = type_oid == FLOAT4OID
    wire = _FLOAT4 if single else _FLOAT8
    # Keyed integers below 2**24 (float4) or 2**48 (float8) are exact in the type.
    keyed_bytes = 3 if single else 6

    def emit(number: float) -> bytes:
        if binary:
            return wire.pack(number)
        return b"%d" % number if number.is_integer() else repr(number).encode("ascii")

    if spec.strategy not in _KEYED:
        return _constant(emit(0.0))
    mac = _hmac(key)

    def parse(value: bytes) -> float | None:
        try:
            number: float = wire.unpack(value)[0] if binary else float(value)
            # A float4 is canonical once rounded to single precision, whichever format
            # it arrived in, so text and binary clients get the same hash.
            return _FLOAT4.unpack(_FLOAT4.pack(number))[0] if single else number
        except (struct.error, ValueError, OverflowError):  # malformed, or too big a float4
            return None

    def keyed(value: bytes, number: float | None) -> float:
        canonical = value if number is None else repr(number).encode("ascii")
        return float(int.from_bytes(mac(canonical)[:keyed_bytes], "big"))

    def valid(number: float) -> bool:
        return math.isfinite(number) and (not single or abs(number) <= _FLOAT4_MAX)

    if spec.strategy == "hash":

        def mask_hash(value: bytes | None) -> bytes | None:
            if value is None:
                return None
            return emit(keyed(value, parse(value)))

        return mask_hash

    digits_mac = _digits_hmac(key)

    def mask_digits(value: bytes | None) -> bytes | None:
        if value is None:
            return None
        number = parse(value)
        if number is None:
            return emit(keyed(value, None))
        # Text values keep the server's spelling; binary ones are spelled by repr().
        text = repr(number) if binary else value.decode("ascii", "replace")
        masked_text = _replace_digits(text, digits_mac(text.encode("utf-8", "replace")))
        try:
            masked = float(masked_text)
        except ValueError:
            return emit(keyed(value, number))
        if not valid(masked) and (math.isfinite(number) or math.isfinite(masked)):
            # Out of the type's range: a finite value overflowed, or a spelling that read
            # as infinity (1e+400 for a float4) gained finite but unrepresentable digits.
            return emit(keyed(value, number))
        if binary:
            return wire.pack(masked)
        return masked_text.encode("ascii", "replace")

    return mask_digits


_NUMERIC_TEXT: Final = re.compile(r"-?[0-9]+(?:\.[0-9]+)?|NaN|-?Infinity")
_NUMERIC_HEAD: Final = struct.Struct("!hhHH")
_NUMERIC_POS: Final = 0x0000
_NUMERIC_NEG: Final = 0x4000
_NUMERIC_SPECIAL: Final = {"NaN": 0xC000, "Infinity": 0xD000, "-Infinity": 0xF000}
_NUMERIC_SPECIAL_TEXT: Final = {code: text for text, code in _NUMERIC_SPECIAL.items()}
_NUMERIC_MAX_SCALE: Final = 0x3FFF
_NUMERIC_ZERO_BINARY: Final = _NUMERIC_HEAD.pack(0, 0, _NUMERIC_POS, 0)


def numeric_to_binary(text: str) -> bytes:
    """Encode a numeric in PostgreSQL's binary format from its text form (``-12.50``).

    Raises ValueError for text that is not a plain decimal, ``NaN`` or ``±Infinity``.
    """
    if not _NUMERIC_TEXT.fullmatch(text):
        raise ValueError(f"not a numeric: {text[:40]!r}")
    special = _NUMERIC_SPECIAL.get(text)
    if special is not None:
        return _NUMERIC_HEAD.pack(0, 0, special, 0)
    negative = text.startswith("-")
    whole, _, fraction = text.lstrip("-").partition(".")
    whole = whole.lstrip("0")
    if len(fraction) > _NUMERIC_MAX_SCALE:
        raise ValueError("numeric scale out of range")
    # Base-10000 digits are aligned on the decimal point: pad both sides to 4 digits.
    lead = -len(whole) % 4
    padded = "0" * lead + whole + fraction + "0" * (-len(fraction) % 4)
    groups = [int(padded[i : i + 4]) for i in range(0, len(padded), 4)]
    weight = (lead + len(whole)) // 4 - 1
    start = 0
    while start < len(groups) and groups[start] == 0:
        start += 1
        weight -= 1
    end = len(groups)
    while end > start and groups[end - 1] == 0:
        end -= 1
    groups = groups[start:end]
    if not groups:
        return _NUMERIC_HEAD.pack(0, 0, _NUMERIC_POS, len(fraction))
    if not -(2**15) <= weight < 2**15:
        raise ValueError("numeric weight out of range")
    sign = _NUMERIC_NEG if negative else _NUMERIC_POS
    head = _NUMERIC_HEAD.pack(len(groups), weight, sign, len(fraction))
    return head + struct.pack(f"!{len(groups)}H", *groups)


def numeric_from_binary(value: bytes) -> str | None:
    """The text form of a binary-format numeric, or ``None`` if it is malformed."""
    if len(value) < _NUMERIC_HEAD.size:
        return None
    count, weight, sign, scale = _NUMERIC_HEAD.unpack_from(value)
    if count < 0 or len(value) != _NUMERIC_HEAD.size + 2 * count:
        return None
    special = _NUMERIC_SPECIAL_TEXT.get(sign)
    if special is not None:
        return special if count == 0 else None
    if sign not in (_NUMERIC_POS, _NUMERIC_NEG) or scale > _NUMERIC_MAX_SCALE:
        return None
    groups = struct.unpack_from(f"!{count}H", value, _NUMERIC_HEAD.size)
    if any(group > 9999 for group in groups):
        return None
    digits = "".join([f"{group:04d}" for group in groups])
    point = (weight + 1) * 4  # index of the decimal point within ``digits``
    if point < 0:
        digits, point = "0" * -point + digits, 0
    elif point > len(digits):
        digits += "0" * (point - len(digits))
    whole = digits[:point].lstrip("0") or "0"
    text = whole + ("." + digits[point : point + scale].ljust(scale, "0") if scale else "")
    if sign == _NUMERIC_NEG and text.strip("0.") != "":
        text = "-" + text
    return text


def _numeric_masker(spec: MaskSpec, type_oid: int, binary: bool, key: bytes) -> Masker:
    def emit(text: str) -> bytes:
        return numeric_to_binary(text) if binary else text.encode("ascii")

    if spec.strategy not in _KEYED:
        return _constant(_NUMERIC_ZERO_BINARY if binary else b"0")
    mac = _hmac(key)

    def parse(value: bytes) -> str | None:
        if binary:
            return numeric_from_binary(value)
        text = value.decode("ascii", "replace")
        return text if _NUMERIC_TEXT.fullmatch(text) else None

    def keyed(canonical: bytes) -> str:
        return str(int.from_bytes(mac(canonical)[:6], "big"))

    if spec.strategy == "hash":

        def mask_hash(value: bytes | None) -> bytes | None:
            if value is None:
                return None
            text = parse(value)
            return emit(keyed(value if text is None else text.encode("ascii")))

        return mask_hash

    digits_mac = _digits_hmac(key)

    def mask_digits(value: bytes | None) -> bytes | None:
        if value is None:
            return None
        text = parse(value)
        if text is None:
            return emit(keyed(value))
        seed = digits_mac(text.encode("ascii"))
        try:
            return emit(_avoid_leading_zero(_replace_digits(text, seed), seed))
        except ValueError:  # not expected (the shape is kept), but never send a bad value
            return emit(keyed(text.encode("ascii")))

    return mask_digits


_NUMBER_FAMILIES: Final[dict[int, Callable[[MaskSpec, int, bool, bytes], Masker]]] = {
    INT2OID: _int_masker,
    INT4OID: _int_masker,
    INT8OID: _int_masker,
    OIDOID: _int_masker,
    FLOAT4OID: _float_masker,
    FLOAT8OID: _float_masker,
    NUMERICOID: _numeric_masker,
}


# --- uuid and bytea ----------------------------------------------------------------------

_NIL_UUID: Final = uuid.UUID(int=0)


def _uuid_masker(spec: MaskSpec, binary: bool, key: bytes) -> Masker:
    def emit(raw: bytes) -> bytes:
        return raw if binary else str(uuid.UUID(bytes=raw)).encode("ascii")

    if spec.strategy != "hash":
        return _constant(emit(_NIL_UUID.bytes))
    mac = _hmac(key)

    def canonical(value: bytes) -> bytes:
        if binary:
            return value
        try:
            return uuid.UUID(value.decode("ascii")).bytes
        except (UnicodeDecodeError, ValueError):
            return value

    def mask_hash(value: bytes | None) -> bytes | None:
        if value is None:
            return None
        return emit(mac(canonical(value))[:16])

    return mask_hash


_BYTEA_ESCAPE: Final = re.compile(rb"\\(\\|[0-3][0-7]{2})")


def _bytea_from_text(value: bytes) -> bytes:
    """The bytes of a text-format bytea (hex or escape output); raw input if malformed."""
    try:
        if value.startswith(b"\\x"):
            return bytes.fromhex(value[2:].decode("ascii"))
        return _BYTEA_ESCAPE.sub(lambda m: b"\\" if m[1] == b"\\" else bytes([int(m[1], 8)]), value)
    except (UnicodeDecodeError, ValueError):
        return value


def _bytea_masker(spec: MaskSpec, binary: bool, key: bytes) -> Masker:
    if spec.strategy != "hash":
        return _constant(b"" if binary else b"\\x")
    mac = _hmac(key)

    def mask_hash(value: bytes | None) -> bytes | None:
        if value is None:
            return None
        if binary:
            return mac(value)
        return b"\\x" + mac(_bytea_from_text(value)).hex().encode("ascii")

    return mask_hash
