"""Export the durable audit log to an OpenTelemetry Collector as OTLP/HTTP spans.

The log is the queue. The exporter reads records after a persisted offset, turns them into
spans and POSTs them to ``<endpoint>/v1/traces`` (protobuf); only after the Collector
answers 2xx does it move the offset forward. When the Collector is down nothing is lost
and nothing piles up in memory: the exporter keeps the one batch that failed and stops
reading, the records wait on disk, and it goes on from there when the Collector is back;
after a restart it starts again from the persisted offset (at-least-once; the SDK's
in-memory queue would drop when full). Only records up to the log's ``HEAD`` (on disk)
are read.

Spans are built directly from ``opentelemetry.proto`` messages rather than through the SDK
because their ids and times must come from the records: a span re-sent after a restart
carries the same trace and span id as the first time, so a receiver can deduplicate.

* ``session.connect`` … ``session.end`` → a ``querywarden.session`` span (kind SERVER).
* ``statement.request`` … ``statement.result`` → a child span (kind CLIENT) named by its
  ``db.query.summary`` (``SELECT public.orders``), exported as soon as the result is
  read, while its session may still be open.

Attributes follow the OpenTelemetry semantic conventions 1.44.0 (:data:`SCHEMA_URL`;
docs/audit.md lists each): the identity as ``user.*``, the upstream as ``server.*``,
relations schema-qualified.
* ``session.auth_failed`` → a standalone ``querywarden.auth_failed`` span.

What leaves for the Collector is sanitized by default (``query_text="normalized"``, the
OpenTelemetry database conventions' default): ``db.query.text`` is the statement with
every constant a ``$n`` and no comments (:func:`querywarden.analysis.sanitized_text`),
and absent for text that does not parse; the quoted parts of a refusal's reason (the
parser quotes the input it stopped at) are replaced; the server's error message is left
out (it may quote a value, or be a function's RAISE of one). ``"raw"`` exports the exact
text and messages; ``"none"`` no text at all. The exact text stays in the local log,
which is the record of truth. Bind parameter values and sampled rows are never exported.

Ids: trace id = sha256(session_id)[:16]; session span id = sha256("session:" +
session_id)[:8]; statement span id = sha256(statement_id)[:8].

:class:`SpanAssembler` is the sans-I/O part (records in, spans out, what is still open);
:class:`LogExporter` is the thin I/O shell (the log, HTTP, the offset file).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import http.client
import json
import logging
import os
import re
import struct
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from querywarden import __version__
from querywarden.analysis import sanitized_text
from querywarden.audit.log import HEAD_FILE, AuditFormatError
from querywarden.masking.rows import scrub_quoted

log = logging.getLogger(__name__)

__all__ = [
    "QUERY_TEXT_MODES",
    "DirectorySource",
    "ExportError",
    "LogExporter",
    "NameScope",
    "OffsetState",
    "RecordSource",
    "SpanAssembler",
    "collection_name",
    "collection_names",
    "operation_name",
    "query_summary",
    "read_offset",
    "session_span_id",
    "statement_span_id",
    "tls_protocol",
    "trace_id_of",
    "write_offset",
]

SCOPE_NAME = "querywarden.audit"
#: The semantic conventions the spans follow (docs/audit.md lists every attribute).
SCHEMA_URL = "https://opentelemetry.io/schemas/1.44.0"
SESSION_SPAN_NAME = "querywarden.session"
STATEMENT_SPAN_NAME = "querywarden.statement"
AUTH_FAILED_SPAN_NAME = "querywarden.auth_failed"

#: db.query.text is cut here: the exact text stays in the log, and a Collector refuses
#: requests over its body limit (a few MiB by default) however they are batched.
QUERY_TEXT_LIMIT = 32 * 1024
#: What ``db.query.text`` carries: the sanitized text (default), the exact text, or none.
QUERY_TEXT_MODES = ("normalized", "raw", "none")
#: ``db.query.summary`` is at most this long, as the conventions recommend.
QUERY_SUMMARY_LIMIT = 255
#: The search path the gateway pins for every session (see ``server.py``).
DEFAULT_SEARCH_PATH = ("public",)
#: A request body is closed before it grows past this (below the Collector's defaults).
MAX_REQUEST_BYTES = 4 * 1024 * 1024
#: The longest wait between two attempts while the Collector is unreachable.
MAX_BACKOFF = 30.0

_KIND_SERVER = int(Span.SpanKind.SPAN_KIND_SERVER)
_KIND_CLIENT = int(Span.SpanKind.SPAN_KIND_CLIENT)
_STATUS_ERROR = int(Status.StatusCode.STATUS_CODE_ERROR)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A leading keyword, after whitespace and comments (which clients put before statements).
# One whitespace character per repetition, not \s+: nested quantifiers backtrack
# exponentially on a long run of spaces that ends in no keyword.
_KEYWORD = re.compile(r"(?:\s|--[^\n]*(?:\n|$)|/\*.*?\*/)*([A-Za-z]+)", re.DOTALL)
#: How much of a statement's start is searched for its keyword.
_KEYWORD_WINDOW = 4096
# OpenSSL's protocol names: TLSv1.3, TLSv1.2, TLSv1, SSLv3.
_TLS_VERSION = re.compile(r"^(TLS|SSL)v(\d+(?:\.\d+)?)$")
# Operations that name a statement better than the WITH that introduces them.
_DML = ("insert", "update", "delete", "merge")


class ExportError(Exception):
    """The Collector could not be reached or did not accept a batch (retry later)."""


# --- ids and values -----------------------------------------------------------------------


def trace_id_of(session_id: str) -> bytes:
    """The trace id of a session: the first 16 bytes of sha256(session_id)."""
    return hashlib.sha256(session_id.encode()).digest()[:16]


def session_span_id(session_id: str) -> bytes:
    """The span id of a session's span: the first 8 bytes of sha256("session:" + id)."""
    return hashlib.sha256(f"session:{session_id}".encode()).digest()[:8]


def statement_span_id(statement_id: str) -> bytes:
    """The span id of a statement's span: the first 8 bytes of sha256(statement_id)."""
    return hashlib.sha256(statement_id.encode()).digest()[:8]


def _auth_failed_ids(record: Mapping[str, Any]) -> tuple[bytes, bytes]:
    # Seq alone repeats across gateways sharing a Collector; with the chain hash of the
    # record before it, the id is unique and still the same on every re-export.
    digest = hashlib.sha256(f"auth_failed:{record.get('seq')}:{record.get('prev')}".encode())
    raw = digest.digest()
    return raw[:16], raw[16:24]


def _time_ns(ts: object) -> int:
    """Nanoseconds since the epoch of an RFC 3339 record time (0 when unreadable)."""
    if not isinstance(ts, str):
        return 0
    try:
        moment = datetime.fromisoformat(ts)
    except ValueError:
        return 0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    # Integer arithmetic: a float timestamp would lose the microseconds.
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


# --- the protobuf wire format, by hand ----------------------------------------------------
#
# Spans are encoded directly to OTLP protobuf bytes. Building message objects costs about
# 60 µs per statement (some thirty KeyValue/AnyValue objects, then copies), more than the
# gateway spends relaying the statement; bytes cost a fraction of that, and a session's
# shared attributes are encoded once and reused for each of its statements. Protobuf
# allows it: a repeated field's entries may be concatenated in any order. Tag bytes are
# (field number << 3) | wire type; the tests decode every shape with opentelemetry-proto.

_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
_INT64_MASK = (1 << 64) - 1
# Lengths below 16 KiB (almost all) are looked up, not computed.
_SMALL_VARINTS = [
    bytes((n,)) if n < 0x80 else bytes((n & 0x7F | 0x80, n >> 7)) for n in range(1 << 14)
]


def _varint(value: int) -> bytes:
    if value < 16384:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _utf8(value: str) -> bytes:
    try:
        return value.encode()
    except UnicodeEncodeError:
        # JSON can carry lone surrogates ("\ud800"), which UTF-8 cannot: through UTF-16,
        # where a lone surrogate decodes to U+FFFD and valid pairs stay whole.
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode()


def _string_value(value: str) -> bytes:
    raw = _utf8(value)
    return b"\x0a" + _varint(len(raw)) + raw  # AnyValue.string_value (1)


def _any_value(value: object) -> bytes | None:
    """An ``AnyValue`` message; None for None (the attribute is left out)."""
    if value is None:
        return None
    if isinstance(value, str):
        return _string_value(value)
    if isinstance(value, bool):  # before int: bool is an int
        return b"\x10\x01" if value else b"\x10\x00"  # bool_value (2)
    if isinstance(value, int):
        return b"\x18" + _varint(value & _INT64_MASK)  # int_value (3), two's complement
    if isinstance(value, float):
        return b"\x21" + _F64.pack(value)  # double_value (4)
    if isinstance(value, list | tuple) and all(
        isinstance(v, str | bool | int | float) for v in value
    ):
        items = [item for item in map(_any_value, value) if item is not None]
        array = b"".join(b"\x0a" + _varint(len(item)) + item for item in items)
        return b"\x2a" + _varint(len(array)) + array  # array_value (5) of values (1)
    # Nested structures: one JSON string, which every backend can store and search.
    return _string_value(json.dumps(value, sort_keys=True, default=str))


@functools.lru_cache(maxsize=1024)
def _key_field(key: str) -> bytes:
    raw = key.encode()
    return b"\x0a" + _varint(len(raw)) + raw  # KeyValue.key (1)


def _attribute(key: str, value: object) -> bytes:
    """One ``Span.attributes`` entry (field 9) holding ``KeyValue(key, value)``."""
    any_value = _any_value(value)
    if any_value is None:
        return b""
    pair = _key_field(key) + b"\x12" + _varint(len(any_value)) + any_value  # value (2)
    return b"\x4a" + _varint(len(pair)) + pair


@functools.lru_cache(maxsize=4096)
def _repeated_attribute(key: str, value: str | tuple[str, ...]) -> bytes:
    # Most values repeat from statement to statement (operation, relation, rule, outcome,
    # command tag, the statement text itself under a steady workload): a cache lookup
    # costs a fifth of encoding them again.
    return _attribute(key, list(value) if isinstance(value, tuple) else value)


@functools.lru_cache(maxsize=1024)
def _int_prefix(key: str) -> bytes:
    return _key_field(key) + b"\x12"  # KeyValue.key, then the value's tag


def _int_attribute(key: str, value: int) -> bytes:
    any_value = b"\x18" + _varint(value & _INT64_MASK)
    pair = _int_prefix(key) + _varint(len(any_value)) + any_value
    return b"\x4a" + _varint(len(pair)) + pair


#: Strings up to this length go through the cache (longer ones are rarely repeated).
_CACHED_LENGTH = 512


class _Attributes:
    """Encoded span attributes, appended in order; absent values are left out."""

    __slots__ = ("data",)

    def __init__(self, data: bytes = b"") -> None:
        self.data = bytearray(data)

    def add(self, key: str, value: object) -> None:
        # Fast paths by exact type for what records mostly hold; _attribute does the rest.
        if value is None:
            return
        if type(value) is str:
            if len(value) <= _CACHED_LENGTH:
                self.data += _repeated_attribute(key, value)
                return
        elif type(value) is int:
            self.data += _int_attribute(key, value)
            return
        elif type(value) is list and len(value) <= 16 and all(type(v) is str for v in value):
            self.data += _repeated_attribute(key, tuple(value))
            return
        self.data += _attribute(key, value)

    def masking(self, masking: object) -> None:
        """``querywarden.masked_values`` (total) and one count per masking name."""
        if not isinstance(masking, Mapping):
            return
        counts = {str(k): v for k, v in masking.items() if isinstance(v, int)}
        self.add("querywarden.masked_values", sum(counts.values()))
        for name in sorted(counts):
            self.add(f"querywarden.masking.{name}", counts[name])


_INTERRUPTED = _attribute("querywarden.interrupted", True)


@dataclass(slots=True)
class _SpanParts:
    """A span being built: encoded by :meth:`encode` once it has ended."""

    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: bytearray
    status_code: int = 0
    status_message: str = ""

    def error(self, message: str) -> None:
        self.status_code = _STATUS_ERROR
        self.status_message = message

    def encode(self) -> bytes:
        """The ``Span`` message."""
        name = _utf8(self.name)
        parts: list[bytes | bytearray] = [
            b"\x0a\x10",  # trace_id (1), 16 bytes
            self.trace_id,
            b"\x12\x08",  # span_id (2), 8 bytes
            self.span_id,
        ]
        if self.parent_span_id:
            parts += (b"\x22\x08", self.parent_span_id)  # parent_span_id (4)
        parts += (
            b"\x2a",  # name (5)
            _varint(len(name)),
            name,
            b"\x30",  # kind (6)
            _varint(self.kind),
            b"\x39",  # start_time_unix_nano (7), fixed64
            _U64.pack(self.start_ns),
            b"\x41",  # end_time_unix_nano (8), fixed64
            _U64.pack(max(self.end_ns, self.start_ns)),
            self.attributes,  # attributes (9), already framed
        )
        if self.status_code:
            message = _utf8(self.status_message)
            status = b"\x12" + _varint(len(message)) + message if message else b""
            status += b"\x18" + _varint(self.status_code)  # message (2), code (3)
            parts += (b"\x7a", _varint(len(status)), status)  # status (15)
        return b"".join(parts)


def _export_request(resource: bytes, scope: bytes, spans: list[bytes]) -> bytes:
    """An ``ExportTraceServiceRequest`` with one resource and one scope around ``spans``."""
    schema = SCHEMA_URL.encode()
    scope_spans = b"".join(
        [b"\x0a", _varint(len(scope)), scope]  # ScopeSpans.scope (1)
        + [b"\x12" + _varint(len(span)) + span for span in spans]  # spans (2)
        + [b"\x1a", _varint(len(schema)), schema]  # schema_url (3)
    )
    resource_spans = (
        b"\x0a" + _varint(len(resource)) + resource  # ResourceSpans.resource (1)
        + b"\x12" + _varint(len(scope_spans)) + scope_spans  # scope_spans (2)
    )  # fmt: skip
    return b"\x0a" + _varint(len(resource_spans)) + resource_spans  # resource_spans (1)


def _split_address(address: object) -> tuple[str | None, int | None]:
    """``host:port`` (as the gateway writes peers, IPv6 unbracketed) or a socket path."""
    if not isinstance(address, str) or not address:
        return None, None
    host, sep, port = address.rpartition(":")
    if sep and host and port.isdigit():
        return host.strip("[]"), int(port)
    return address, None


def _keyword(text: str) -> str | None:
    match = _KEYWORD.match(text, 0, _KEYWORD_WINDOW)
    return match.group(1).upper() if match else None


def _label(operation: str) -> str:
    # "ddl:drop_table" -> "DROP TABLE": the analyzer's names, spelled as SQL.
    return operation.rpartition(":")[2].replace("_", " ").upper()


def operation_name(text: str, summary: Mapping[str, Any] | None) -> str | None:
    """``db.operation.name``: the first operation in the statement, as its text spells it.

    The text's leading keyword, as the semantic conventions ask. The analyzer's summary
    only fills in where the keyword says little: after ``WITH`` the data-modifying
    operation (else ``SELECT``), and when the text starts with no keyword at all.
    """
    keyword = _keyword(text) if text else None
    if keyword is not None and keyword != "WITH":
        return keyword
    operations = summary.get("operations") if summary else None
    ops = {str(o) for o in operations} if isinstance(operations, list) else set()
    modifying = [o for o in _DML if o in ops]
    if len(modifying) == 1:
        return modifying[0].upper()
    if not modifying and "select" in ops:
        return "SELECT"
    if keyword is None and len(ops) == 1:
        return _label(next(iter(ops)))
    return keyword


@dataclass(frozen=True, slots=True)
class NameScope:
    """What an unqualified relation name of one session resolves to, as far as the log says.

    PostgreSQL looks a relation up in the session's temporary schema first, then in
    ``pg_catalog``, then along the search path, which the gateway pins to ``public``.
    ``search_path``: every schema the session's path may hold (the request record's
    ``search_path``). ``temporary``: names the session created temporary relations under.
    """

    search_path: tuple[str, ...] = DEFAULT_SEARCH_PATH
    temporary: frozenset[str] = frozenset()

    def qualified(self, name: str) -> str:
        """``name`` with the schema it resolves in when that is certain, else as written.

        Every relation PostgreSQL keeps in ``pg_catalog`` is named ``pg_*``, and no other
        name resolves there. A name the session also created a temporary relation under,
        or a search path that may hold several schemas, leaves the name as written: which
        schema holds it would be a guess.
        """
        if "." in name:
            return name
        if name in self.temporary:
            return name
        if name.startswith("pg_"):
            return f"pg_catalog.{name}"
        if len(self.search_path) == 1:
            return f"{self.search_path[0]}.{name}"
        return name


#: A session as the gateway starts it: ``public`` only, no temporary relations.
PINNED = NameScope()


def collection_name(summary: Mapping[str, Any] | None, scope: NameScope = PINNED) -> str | None:
    """``db.collection.name``: the first relation written, else the first read, qualified."""
    collections = collection_names(summary, scope)
    return collections[0] if collections else None


def collection_names(summary: Mapping[str, Any] | None, scope: NameScope = PINNED) -> list[str]:
    """Every relation the summary names, written ones first, qualified by ``scope``.

    The log keeps names as the statement spelled them (see :class:`NameScope`).
    """
    if not summary:
        return []
    names: list[str] = []
    for key in ("writes", "reads"):
        relations = summary.get(key)
        if not isinstance(relations, list):
            continue
        for relation in relations:
            name = _relation(relation)
            # "*" stands for relations the analyzer could not name: not a collection.
            if name and "*" not in name:
                name = scope.qualified(name)
                if name not in names:
                    names.append(name)
    return names


def query_summary(
    operation: str | None, summary: Mapping[str, Any] | None, scope: NameScope = PINNED
) -> str | None:
    """``db.query.summary``: the operation and its targets (``INSERT public.a SELECT public.b``).

    The conventions' shape, built from the analyzer's summary rather than by re-reading
    the text: written relations after the statement's own operation, and the relations
    it reads after a ``SELECT`` (directly after the operation when it is a SELECT).
    """
    if not operation:
        return None
    writes = collection_names({"writes": summary.get("writes")} if summary else None, scope)
    reads = [
        name
        for name in collection_names({"reads": summary.get("reads")} if summary else None, scope)
        if name not in writes
    ]
    parts = [operation, *writes]
    if reads:
        if operation != "SELECT":
            parts.append("SELECT")
        parts.extend(reads)
    text = " ".join(parts)
    if len(text) > QUERY_SUMMARY_LIMIT:
        # The conventions cap it: cut at a whole name.
        text = text[: QUERY_SUMMARY_LIMIT + 1].rsplit(" ", 1)[0]
    return text


def _relation(relation: object) -> str | None:
    if isinstance(relation, str):
        return relation
    if isinstance(relation, Mapping) and relation.get("name"):
        schema = relation.get("schema")
        return f"{schema}.{relation['name']}" if schema else str(relation["name"])
    return None


def tls_protocol(version: object) -> tuple[str | None, str | None]:
    """``tls.protocol.name`` and ``.version`` from OpenSSL's ``TLSv1.3`` (``tls``, ``1.3``)."""
    if not isinstance(version, str) or not version:
        return None, None
    match = _TLS_VERSION.match(version)
    if match is None:
        return None, None
    return match.group(1).lower(), match.group(2)


# --- records -> spans ---------------------------------------------------------------------


@dataclass(slots=True)
class _OpenSession:
    """A session whose end has not been read: what its spans need, nothing more."""

    seq: int
    start_ns: int
    #: Identity and connection attributes (encoded), repeated on each statement span: a
    #: statement span is exported long before its session's span and must stand alone.
    shared: bytes
    #: Attributes of the session span only (encoded).
    own: bytes
    statements: set[str] = field(default_factory=set)
    #: Names the session created temporary relations under (see :class:`NameScope`).
    temporary: set[str] = field(default_factory=set)

    def note_temporary(self, summary: Mapping[str, Any]) -> None:
        """Remember the temporary relations a request writes (creates, mostly).

        Noted whether the statement succeeds or not: the name is ambiguous either way
        from here on, so it stays unqualified.
        """
        writes = summary.get("writes")
        if isinstance(writes, list):
            self.temporary.update(
                w[len("pg_temp.") :]
                for w in writes
                if isinstance(w, str) and w.startswith("pg_temp.")
            )


@dataclass(slots=True)
class _OpenStatement:
    """A request whose result has not been read: its span, waiting for an end."""

    seq: int
    session_id: str
    refused: bool
    span: _SpanParts


class SpanAssembler:
    """Records in, finished spans out, as encoded OTLP ``Span`` messages (sans-I/O).

    Holds only what is still open: one small entry per session without an end and per
    request without a result, so memory follows the gateway's concurrency, not the
    length of the log. ``max_open`` bounds even that: past it, the oldest entry is closed
    as interrupted (a session whose end record could never be written must not hold
    memory and the restart offset forever).
    """

    def __init__(self, *, max_open: int = 100_000, query_text: str = "normalized") -> None:
        if query_text not in QUERY_TEXT_MODES:
            raise ValueError(f"query_text must be one of {', '.join(QUERY_TEXT_MODES)}")
        self.max_open = max_open
        self.query_text = query_text
        # Both dicts are in insertion order, which is seq order: the first entry is the
        # oldest, so the restart offset costs O(1).
        self._sessions: dict[str, _OpenSession] = {}
        self._statements: dict[str, _OpenStatement] = {}
        self.last_seq = 0
        self._last_ns = 0

    @property
    def open_sessions(self) -> int:
        """How many sessions have a connect record but no end yet."""
        return len(self._sessions)

    @property
    def open_statements(self) -> int:
        """How many requests have no result yet."""
        return len(self._statements)

    def safe_offset(self) -> int:
        """The seq a restart must read after: the oldest record still needed, minus one."""
        oldest = [self.last_seq + 1]
        if self._sessions:
            oldest.append(next(iter(self._sessions.values())).seq)
        if self._statements:
            oldest.append(next(iter(self._statements.values())).seq)
        return min(oldest) - 1

    def feed(self, record: Mapping[str, Any]) -> list[bytes]:
        """Take the next record (in seq order); return the spans it completes."""
        seq = record.get("seq")
        if isinstance(seq, int):
            self.last_seq = max(self.last_seq, seq)
        else:
            seq = self.last_seq
        now = _time_ns(record.get("ts"))
        self._last_ns = max(self._last_ns, now)
        kind = record.get("type")
        done: list[bytes] = []
        if kind == "statement.request":
            self._request(record, seq, now)
        elif kind == "statement.result":
            span = self._result(record, seq, now)
            if span is not None:
                done.append(span)
        elif kind == "session.connect":
            self._connect(record, seq, now)
        elif kind == "session.end":
            done.extend(self._end(record, now))
        elif kind == "session.auth_failed":
            done.append(self._auth_failed(record, seq, now))
        # Other types (reviews, and whatever comes later) add nothing to these spans.
        if len(self._statements) > self.max_open or len(self._sessions) > self.max_open:
            done.extend(self._evict())
        return done

    def close_all(self, reason: str) -> list[bytes]:
        """Close everything still open as interrupted (the gateway that wrote it is gone).

        End times are the last record time seen: the real end was never recorded.
        """
        done = [self._interrupt_statement(sid, reason) for sid in list(self._statements)]
        done.extend(self._interrupt_session(sid, reason) for sid in list(self._sessions))
        return done

    # -- per record type --

    def _connect(self, record: Mapping[str, Any], seq: int, now: int) -> None:
        session_id = str(record.get("session_id", ""))
        if not session_id or session_id in self._sessions:
            return
        shared = _Attributes(_POSTGRESQL)
        shared.add("db.namespace", record.get("database"))
        host, port = _split_address(record.get("client_address"))
        shared.add("client.address", host)
        shared.add("client.port", port)
        host, port = _split_address(record.get("server_address"))
        shared.add("server.address", host)
        shared.add("server.port", port)
        shared.add("querywarden.session.id", session_id)
        principal = record.get("principal")
        if isinstance(principal, Mapping):
            # The verified identity, as the general conventions name a user; the issuer
            # that vouched for it has no standard name.
            shared.add("user.id", principal.get("subject"))
            shared.add("user.name", principal.get("name") or None)
            groups = principal.get("groups")
            shared.add("user.roles", list(groups) if groups else [])
            shared.add("querywarden.principal.issuer", principal.get("issuer"))
        own = _Attributes()
        own.add("querywarden.session.upstream_user", record.get("upstream_user"))
        own.add("querywarden.session.application_name", record.get("application_name") or None)
        tls = record.get("tls")
        if isinstance(tls, Mapping):
            name, version = tls_protocol(tls.get("version"))
            own.add("tls.protocol.name", name)
            own.add("tls.protocol.version", version)
            own.add("tls.cipher", tls.get("cipher"))
        own.add("querywarden.audit.seq", seq)
        self._sessions[session_id] = _OpenSession(seq, now, bytes(shared.data), bytes(own.data))

    def _request(self, record: Mapping[str, Any], seq: int, now: int) -> None:
        statement_id = str(record.get("statement_id", ""))
        session_id = str(record.get("session_id", ""))
        if not statement_id or statement_id in self._statements:
            return
        text = self._exported_text(record.get("text"))
        summary = record.get("summary")
        summary = summary if isinstance(summary, Mapping) else None
        session = self._sessions.get(session_id)
        if session is not None and summary is not None:
            session.note_temporary(summary)
        scope = self._scope(record, session)
        operation = operation_name(text, summary)
        collection = collection_name(summary, scope)
        # The conventions name a database span by its query summary.
        query = query_summary(operation, summary, scope)
        name = query or STATEMENT_SPAN_NAME

        if session is not None:
            attrs = _Attributes(session.shared)
            session.statements.add(statement_id)
        else:
            # The connect record is out of reach (pruned by retention): keep what we know.
            attrs = _Attributes(_POSTGRESQL)
            attrs.add("querywarden.session.id", session_id)
        if len(text) > QUERY_TEXT_LIMIT:
            attrs.add("db.query.text", text[:QUERY_TEXT_LIMIT])
            attrs.add("querywarden.query.truncated", True)
        elif text:
            attrs.add("db.query.text", text)
        attrs.add("db.query.summary", query)
        attrs.add("db.operation.name", operation)
        attrs.add("db.collection.name", collection)
        attrs.add("querywarden.statement.id", statement_id)
        attrs.add("querywarden.statement.kind", record.get("kind"))
        attrs.add("querywarden.statement.name", record.get("statement_name") or None)
        if summary is not None:
            for key in ("operations", "reads", "writes", "functions"):
                if summary.get(key):
                    attrs.add(f"querywarden.summary.{key}", summary[key])
        decision = record.get("decision")
        decision = decision if isinstance(decision, Mapping) else {}
        outcome = decision.get("outcome")
        reason = decision.get("reason")
        if isinstance(reason, str) and self.query_text != "raw":
            # A syntax error's reason quotes the input: 'at or near "'123-45-6789'"'.
            reason = scrub_quoted(reason)
        attrs.add("querywarden.decision", outcome)
        attrs.add("querywarden.rule", decision.get("rule"))
        attrs.add("querywarden.reason", reason)
        refused = outcome == "refuse"
        if refused:
            # What the client saw in place of a result: the refusal's SQLSTATE.
            attrs.add("db.response.status_code", decision.get("sqlstate"))
            attrs.add("error.type", decision.get("sqlstate") or "querywarden.refused")
        approval = record.get("approval")
        if isinstance(approval, Mapping):
            for key in sorted(approval):
                attrs.add(f"querywarden.approval.{key}", approval[key])
        attrs.add("querywarden.audit.seq", seq)

        span = _SpanParts(
            trace_id_of(session_id),
            statement_span_id(statement_id),
            session_span_id(session_id),
            name,
            _KIND_CLIENT,
            now,
            now,
            attrs.data,
        )
        if refused:
            span.error(str(reason or "refused by policy"))
        self._statements[statement_id] = _OpenStatement(seq, session_id, refused, span)

    @staticmethod
    def _scope(record: Mapping[str, Any], session: _OpenSession | None) -> NameScope:
        """How a request's unqualified relation names resolve."""
        path = record.get("search_path")
        search_path = (
            tuple(str(s) for s in path) if isinstance(path, list) and path else DEFAULT_SEARCH_PATH
        )
        temporary = frozenset(session.temporary) if session is not None else frozenset()
        if search_path == DEFAULT_SEARCH_PATH and not temporary:
            return PINNED
        return NameScope(search_path, temporary)

    def _exported_text(self, text: object) -> str:
        """What of a request's text may leave: by ``query_text``; "" for nothing.

        The span's name comes from this too: from the raw text, a statement that does not
        parse would be named by whatever word it starts with.
        """
        if not isinstance(text, str) or self.query_text == "none":
            return ""
        if self.query_text == "raw":
            return text
        return _sanitized(text) or ""

    def _result(self, record: Mapping[str, Any], seq: int, now: int) -> bytes | None:
        statement_id = str(record.get("statement_id", ""))
        pending = self._statements.pop(statement_id, None)
        if pending is None:
            # Its request is out of reach (pruned) or was already closed: a result alone
            # has no text, decision or start, so it makes no useful span.
            return None
        session = self._sessions.get(pending.session_id)
        if session is not None:
            session.statements.discard(statement_id)
        span = pending.span
        span.end_ns = now
        attrs = _Attributes()
        sqlstate = record.get("sqlstate")
        if not pending.refused:
            attrs.add("db.response.status_code", sqlstate)
        attrs.add("db.response.returned_rows", record.get("rows"))
        attrs.add("querywarden.command", record.get("command"))
        attrs.add("querywarden.duration_ms", record.get("duration_ms"))
        attrs.masking(record.get("masking"))
        response = record.get("response")
        if isinstance(response, Mapping):
            # The contract's names, and the recorder's first spelling of them.
            attrs.add(
                "querywarden.response.bytes", response.get("bytes", response.get("stream_bytes"))
            )
            attrs.add(
                "querywarden.response.digest",
                response.get("digest", response.get("stream_digest")),
            )
        attrs.add("querywarden.audit.result_seq", seq)
        if sqlstate and not pending.refused:
            attrs.add("error.type", sqlstate)
            if self.query_text == "raw":
                # The server's message can quote a value ('invalid input syntax for type
                # integer: "123-45-6789"') or be a function's RAISE of one, unquoted: it
                # leaves only with the raw text. The SQLSTATE says what kind of error.
                attrs.add("querywarden.error.message", record.get("error"))
            span.error(f"SQLSTATE {sqlstate}")
        span.attributes += attrs.data
        return span.encode()

    def _end(self, record: Mapping[str, Any], now: int) -> list[bytes]:
        session_id = str(record.get("session_id", ""))
        session = self._sessions.pop(session_id, None)
        done = [
            self._unanswered(sid, now, "no result was recorded before the session ended")
            for sid in sorted(session.statements if session else ())
        ]
        if session is None:
            # Its connect is out of reach: the span still closes the tree, with less.
            attrs = _Attributes(_POSTGRESQL)
            attrs.add("querywarden.session.id", session_id)
            start = now
        else:
            attrs = _Attributes(session.shared + session.own)
            start = session.start_ns
        attrs.add("querywarden.session.statements", record.get("statements"))
        attrs.add("querywarden.session.refused", record.get("refused"))
        attrs.masking(record.get("masking"))
        span = _SpanParts(
            trace_id_of(session_id),
            session_span_id(session_id),
            b"",
            SESSION_SPAN_NAME,
            _KIND_SERVER,
            start,
            now,
            attrs.data,
        )
        done.append(span.encode())
        return done

    def _auth_failed(self, record: Mapping[str, Any], seq: int, now: int) -> bytes:
        trace_id, span_id = _auth_failed_ids(record)
        attrs = _Attributes(_POSTGRESQL)
        attrs.add("db.namespace", record.get("database"))
        host, port = _split_address(record.get("client_address"))
        attrs.add("client.address", host)
        attrs.add("client.port", port)
        attrs.add("querywarden.auth.user", record.get("user"))
        attrs.add("querywarden.reason", record.get("reason"))
        attrs.add("db.response.status_code", record.get("sqlstate"))
        attrs.add("error.type", record.get("sqlstate") or "querywarden.auth_failed")
        attrs.add("querywarden.audit.seq", seq)
        span = _SpanParts(
            trace_id, span_id, b"", AUTH_FAILED_SPAN_NAME, _KIND_SERVER, now, now, attrs.data
        )
        span.error(str(record.get("reason") or "authentication failed"))
        return span.encode()

    # -- closing what will never be finished --

    def _unanswered(self, statement_id: str, now: int, why: str) -> bytes:
        pending = self._statements.pop(statement_id)
        session = self._sessions.get(pending.session_id)
        if session is not None:
            session.statements.discard(statement_id)
        span = pending.span
        if not pending.refused:
            span.end_ns = now
            span.error(why)
            span.attributes += _INTERRUPTED
        # A refused request ran nothing: its own instant is the whole of it.
        return span.encode()

    def _interrupt_statement(self, statement_id: str, reason: str) -> bytes:
        return self._unanswered(statement_id, self._last_ns, reason)

    def _interrupt_session(self, session_id: str, reason: str) -> bytes:
        session = self._sessions.pop(session_id)
        span = _SpanParts(
            trace_id_of(session_id),
            session_span_id(session_id),
            b"",
            SESSION_SPAN_NAME,
            _KIND_SERVER,
            session.start_ns,
            self._last_ns,
            bytearray(session.shared + session.own + _INTERRUPTED),
        )
        span.error(reason)
        return span.encode()

    def _evict(self) -> list[bytes]:
        done: list[bytes] = []
        reason = "still open when the exporter's limit of open entries was reached"
        while len(self._statements) > self.max_open:
            done.append(self._interrupt_statement(next(iter(self._statements)), reason))
        while len(self._sessions) > self.max_open:
            session_id = next(iter(self._sessions))
            for statement_id in sorted(self._sessions[session_id].statements):
                done.append(self._interrupt_statement(statement_id, reason))
            done.append(self._interrupt_session(session_id, reason))
        return done


_POSTGRESQL = _attribute("db.system.name", "postgresql")


# A steady workload repeats its texts: one parse per distinct text, not per record
# (long texts, rarely repeated, are not kept).
_CACHED_TEXT = 4096
_cached_sanitized = functools.lru_cache(maxsize=4096)(sanitized_text)


def _sanitized(text: str) -> str | None:
    return _cached_sanitized(text) if len(text) <= _CACHED_TEXT else sanitized_text(text)


# --- the offset file ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OffsetState:
    """What the exporter persists.

    ``offset``: a restart reads the records after it (everything before is either
    delivered or not needed). ``sent``: every span completed by a record up to it was
    delivered, so a restart rebuilds its state from ``offset`` without sending those
    again. ``offset <= sent``.
    """

    offset: int = 0
    sent: int = 0


def read_offset(path: Path) -> OffsetState:
    """The persisted offset; a missing or unreadable file means "from the start".

    Unreadable is read as zero on purpose: re-sending is safe, skipping is not.
    """
    try:
        data = json.loads(path.read_text())
        offset, sent = int(data["offset"]), int(data["sent"])
    except FileNotFoundError:
        return OffsetState()
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("audit export: unreadable offset file %s; exporting from the start", path)
        return OffsetState()
    return OffsetState(max(0, min(offset, sent)), max(0, sent))


def write_offset(path: Path, state: OffsetState) -> None:
    """Replace the offset file atomically and durably (temp file, fsync, rename, fsync)."""
    temp = path.with_name(path.name + ".tmp")
    data = json.dumps({"offset": state.offset, "sent": state.sent}).encode()
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    # The rename itself is only durable once the directory is synced.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- the I/O shell ------------------------------------------------------------------------


class RecordSource(Protocol):
    """Where the exporter reads records (the seam that lets tests run without files)."""

    def records(self, after_seq: int, up_to: int | None) -> Iterator[dict[str, Any]]:
        """Complete records with ``after_seq < seq <= up_to`` (no upper bound: None)."""
        ...

    def durable_seq(self) -> int | None:
        """The last seq known durable (nothing after it is exported yet); None: no limit."""
        ...


_SEGMENT = re.compile(r"^audit-(\d{20})\.jsonl$")
_SEQ_PREFIX = b'{"seq":'


class DirectorySource:
    """An audit directory: its segment files, and ``HEAD`` for what is durable.

    Only records up to HEAD are exported. A record past HEAD is in the operating system
    but not yet on disk; a power failure could take it away and the log would then reuse
    its seq for another record, which an offset that had moved past it would skip.

    Reading resumes where the last read stopped (segment and byte offset), which is why
    this does not call :func:`querywarden.audit.log.read_records`: that one starts at the
    top of the segment and parses every line up to ``after_seq``, so a pass a second
    over a 64 MiB segment would cost about a second of CPU. When a read starts anywhere
    else (the first pass, after a failure), lines up to ``after_seq`` are skipped by their
    ``{"seq":N,`` prefix, which the log always writes first, without parsing them.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        #: (seq of the last record read, its segment, the byte offset after its line).
        self._position: tuple[int, str, int] | None = None

    def durable_seq(self) -> int | None:
        """HEAD's seq; 0 while there is no HEAD (nothing synced yet)."""
        try:
            head = json.loads((self.directory / HEAD_FILE).read_bytes())
        except FileNotFoundError:
            return 0
        seq = head.get("seq") if isinstance(head, dict) else None
        if not isinstance(seq, int):
            # The log itself refuses to open on such a HEAD: someone must look.
            raise ValueError(f"{self.directory / HEAD_FILE} holds no seq")
        return seq

    def records(self, after_seq: int, up_to: int | None) -> Iterator[dict[str, Any]]:
        """See :class:`RecordSource`. Raises AuditFormatError on a line that is no record."""
        segments = sorted(
            (int(match.group(1)), name)
            for name in os.listdir(self.directory)
            if (match := _SEGMENT.match(name))
        )
        if not segments:
            return
        if self._position is not None and self._position[0] == after_seq:
            _, start, offset = self._position
        else:
            # The last segment that starts at or before the next record.
            start = segments[0][1]
            for first, name in segments:
                if first <= after_seq + 1:
                    start = name
            offset = 0
        for _, name in segments:
            if name < start:
                continue
            if name != start:
                offset = 0
            try:
                handle = (self.directory / name).open("rb")
            except FileNotFoundError:
                continue  # deleted by retention meanwhile: what follows is in later files
            with handle:
                handle.seek(offset)
                # Line numbers (for errors) are only known when the file is read whole.
                counted = offset == 0
                for number, raw in enumerate(handle, start=1):
                    if not raw.endswith(b"\n"):
                        break  # a write in progress (or torn): not a record yet
                    seq = _leading_seq(raw)
                    if seq is not None and seq <= after_seq:
                        offset += len(raw)
                        continue
                    if seq is not None and up_to is not None and seq > up_to:
                        return
                    record = _record(raw, name, number if counted else None)
                    if up_to is not None and record["seq"] > up_to:
                        return
                    offset += len(raw)
                    if record["seq"] <= after_seq:
                        continue
                    self._position = (record["seq"], name, offset)
                    yield record


def _leading_seq(line: bytes) -> int | None:
    """The seq of a line as the log writes it (``{"seq":N,...``), without parsing it."""
    if line.startswith(_SEQ_PREFIX):
        comma = line.find(b",", 7, 40)
        if comma > 7 and line[7:comma].isdigit():
            return int(line[7:comma])
    return None


def _record(line: bytes, segment: str, number: int | None) -> dict[str, Any]:
    try:
        # orjson: a record parses in about a third of json.loads' time, and the exporter
        # parses every record of the log. (It is stricter: no NaN, no integers past 64
        # bits; the log writes neither.)
        record = orjson.loads(line)
    except ValueError as exc:
        raise AuditFormatError(f"{segment}{_where(number)}: not a valid audit record") from exc
    if not isinstance(record, dict) or type(record.get("seq")) is not int:
        raise AuditFormatError(f"{segment}{_where(number)}: not a valid audit record (no seq)")
    return record


def _where(number: int | None) -> str:
    return f" line {number}" if number is not None else ""


class LogExporter:
    """Delivers the audit log to ``<endpoint>/v1/traces``, at least once.

    :meth:`export_pending` does one pass (synchronously); :meth:`run` repeats it in a
    worker thread until ``stop`` is set, backing off while the Collector is down.

    Only records up to the log's ``HEAD`` (durable on disk) are exported; with batched
    fsync that is a few tens of milliseconds behind the newest record.

    ``interrupted_through``: the last seq written by a previous gateway process, i.e.
    ``AuditLog.last_seq`` read right after opening the log, before this process appends
    anything. Sessions and requests still open at that seq will never end; they are
    exported as interrupted (status ERROR, ``querywarden.interrupted``) once the exporter
    has read that far, instead of holding the restart offset back forever. ``None``: not
    known, nothing is closed that way.

    ``max_open`` bounds the sessions and requests held open (see :class:`SpanAssembler`);
    ``query_text`` is what ``db.query.text`` carries (see the module docstring);
    ``source`` replaces the directory as the record source (tests).
    """

    def __init__(
        self,
        directory: Path,
        endpoint: str,
        *,
        offset_file: Path | None = None,
        instance_id: str = "",
        headers: dict[str, str] | None = None,
        batch_max: int = 512,
        timeout: float = 10.0,
        interrupted_through: int | None = None,
        max_open: int = 100_000,
        query_text: str = "normalized",
        source: RecordSource | None = None,
    ) -> None:
        base = endpoint.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ValueError(f"the OTLP endpoint must be an http(s) URL, not {endpoint!r}")
        if batch_max < 1:
            raise ValueError("batch_max must be at least 1")
        if query_text not in QUERY_TEXT_MODES:
            raise ValueError(f"query_text must be one of {', '.join(QUERY_TEXT_MODES)}")
        self.directory = directory
        self.url = f"{base}/v1/traces"
        self.offset_file = offset_file if offset_file is not None else directory / "otlp.offset"
        self.instance_id = instance_id
        self.headers = dict(headers or {})
        self.batch_max = batch_max
        self.timeout = timeout
        self.interrupted_through = interrupted_through
        self.max_open = max_open
        self.query_text = query_text
        self.source: RecordSource = source if source is not None else DirectorySource(directory)
        # Encoded once, framed around every batch.
        self._resource = _resource(instance_id)
        self._scope = bytes(
            InstrumentationScope(name=SCOPE_NAME, version=__version__).SerializeToString()
        )
        self._lock = threading.Lock()
        # None until the first pass, and again after a failure other than the Collector's:
        # the next pass then rebuilds its state from the persisted offset.
        self._assembler: SpanAssembler | None = None
        # Spans built but not accepted when the Collector failed (at most about one
        # batch: reading stops at the first failed POST). Sent first by the next pass, so
        # an outage costs no re-reading of the log, however far back the offset is.
        self._unsent: list[bytes] = []
        self._state = OffsetState()
        self._cursor = 0
        self._interrupt_done = False
        #: Consecutive failed passes, and the last failure (for health reporting).
        self.failures = 0
        self.last_error: str | None = None

    @property
    def state(self) -> OffsetState:
        """The offset as last persisted (or loaded)."""
        return self._state

    def export_pending(self) -> int:
        """Export every span the log completes after the offset; return how many were sent.

        The offset file moves forward after each batch the Collector accepts. Raises
        :class:`ExportError` when a batch is not accepted: the offset stays at the last
        accepted batch, and the next call sends the refused spans first. Other errors
        (reading the log, writing the offset) make the next call start over from the
        persisted offset.
        """
        return self._export(None)

    def _export(self, halt: threading.Event | None) -> int:
        """:meth:`export_pending`; once ``halt`` is set, return after the current batch."""
        with self._lock:
            try:
                sent = self._export_pending(halt)
            except BaseException as exc:
                if not isinstance(exc, ExportError):
                    # A disk or record error may have left the state half-updated.
                    self._assembler = None
                    self._unsent = []
                self.failures += 1
                self.last_error = str(exc)
                raise
            self.failures = 0
            self.last_error = None
            return sent

    def _export_pending(self, halt: threading.Event | None) -> int:
        if self._assembler is None:
            self._state = read_offset(self.offset_file)
            self._assembler = SpanAssembler(max_open=self.max_open, query_text=self.query_text)
            self._cursor = self._state.offset
            self._assembler.last_seq = self._cursor
            self._interrupt_done = (
                self.interrupted_through is None or self._cursor >= self.interrupted_through
            )
        assembler = self._assembler
        skip_through = self._state.sent
        sent = self._deliver(self._unsent) if self._unsent else 0
        batch: list[bytes] = []
        limit = self.interrupted_through
        durable = self.source.durable_seq()
        if durable is not None and durable <= self._cursor:
            return sent + self._deliver(batch)  # nothing new on disk: no file is opened
        for record in self.source.records(self._cursor, durable):
            seq = record.get("seq")
            if not isinstance(seq, int) or seq <= self._cursor:
                continue
            if durable is not None and seq > durable:
                break
            if limit is not None and not self._interrupt_done and seq > limit:
                self._interrupt(batch, limit, skip_through)
            spans = assembler.feed(record)
            self._cursor = seq
            if seq > skip_through:
                batch.extend(spans)
            if limit is not None and not self._interrupt_done and seq == limit:
                self._interrupt(batch, limit, skip_through)
            if len(batch) >= self.batch_max:
                sent += self._deliver(batch)
                batch = []
                if halt is not None and halt.is_set():
                    return sent
        sent += self._deliver(batch)
        return sent

    def _interrupt(self, batch: list[bytes], limit: int, skip_through: int) -> None:
        assert self._assembler is not None
        spans = self._assembler.close_all("the gateway stopped before this was finished")
        # These spans are complete as of ``limit``: sent already if the watermark is there.
        if limit > skip_through:
            batch.extend(spans)
        self._interrupt_done = True

    def _deliver(self, spans: list[bytes]) -> int:
        """POST ``spans`` (in as many requests as the limits need), then persist the offset."""
        assert self._assembler is not None
        chunks = list(_chunks(spans, self.batch_max, MAX_REQUEST_BYTES))
        for index, chunk in enumerate(chunks):
            try:
                self._post(self._request(chunk))
            except ExportError:
                self._unsent = [span for rest in chunks[index:] for span in rest]
                raise
        self._unsent = []
        state = OffsetState(self._assembler.safe_offset(), max(self._cursor, self._state.sent))
        if state != self._state:
            write_offset(self.offset_file, state)
            self._state = state
        return len(spans)

    def _request(self, spans: list[bytes]) -> bytes:
        return _export_request(self._resource, self._scope, spans)

    def _post(self, body: bytes) -> None:
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked in __init__
            self.url,
            data=body,
            method="POST",
            headers={**self.headers, "Content-Type": "application/x-protobuf"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read(512).decode(errors="replace")
            exc.close()
            raise ExportError(f"{self.url} answered {exc.code}: {detail}") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise ExportError(f"{self.url} could not be reached: {exc}") from exc
        _check_partial_success(payload, self.url)

    async def run(self, *, interval: float = 1.0, stop: asyncio.Event, drain: float = 0.0) -> None:
        """Export every ``interval`` seconds until ``stop`` is set; never drop a record.

        Each pass runs in a thread of its own (HTTP and disk reads stay off the event
        loop). After a failure the wait doubles, up to 30 s; the records wait in the log.
        When ``stop`` is set mid-pass, the pass ends after its current batch; then, if the
        Collector was reachable, a last pass sends what is left for up to ``drain``
        seconds (at least one batch). A pod's log on an emptyDir goes with the pod: the
        drain, within its termination grace period, is what gets the rest out.
        """
        loop = asyncio.get_running_loop()
        # A thread of its own: a pass waiting on an unreachable Collector must not hold
        # a worker of the loop's default executor (DNS lookups and the like use those).
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="otlp-export")
        halt = threading.Event()
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                delay = await self._attempt(loop, executor, stopping, halt, interval)
                if not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(stopping), timeout=delay)
            if self.failures == 0:
                # Shutting down with the Collector up: send what is left, batch by batch,
                # until it is all out or the drain time is up (then after one more batch).
                halt.clear()
                if drain <= 0:
                    halt.set()
                timer = loop.call_later(drain, halt.set) if drain > 0 else None
                try:
                    with contextlib.suppress(Exception):
                        await loop.run_in_executor(executor, self._export, halt)
                finally:
                    if timer is not None:
                        timer.cancel()
        finally:
            halt.set()
            stopping.cancel()
            executor.shutdown(wait=False)

    async def _attempt(
        self,
        loop: asyncio.AbstractEventLoop,
        executor: concurrent.futures.Executor,
        stopping: asyncio.Future[Any],
        halt: threading.Event,
        interval: float,
    ) -> float:
        """One pass; return how long to wait before the next."""
        failed_before = self.failures
        task = loop.run_in_executor(executor, self._export, halt)
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            halt.set()
        try:
            sent = await task
        except Exception as exc:
            # Anything (the Collector, a disk error, a bug in a record) only delays export.
            if self.failures == 1 or self.failures % 10 == 0:
                log.warning(
                    "audit export failed %d time(s), retrying (records wait in the log): %s",
                    self.failures,
                    exc,
                )
            return float(min(MAX_BACKOFF, interval * 2 ** min(self.failures, 16)))
        if failed_before:
            log.warning("audit export works again after %d failed attempts", failed_before)
        if sent:
            log.debug("audit export: %d spans sent, offset %s", sent, self._state)
        return interval


def _resource(instance_id: str) -> bytes:
    """The encoded ``Resource``: the service and this gateway instance."""
    pairs = {"service.name": "querywarden", "service.version": __version__}
    if instance_id:
        pairs["service.instance.id"] = instance_id
    resource = Resource(
        attributes=[KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in pairs.items()]
    )
    return bytes(resource.SerializeToString())


def _chunks(spans: list[bytes], count: int, size: int) -> Iterable[list[bytes]]:
    """Split ``spans`` into lists of at most ``count`` spans and about ``size`` bytes."""
    chunk: list[bytes] = []
    total = 0
    for span in spans:
        length = len(span)
        if chunk and (len(chunk) >= count or total + length > size):
            yield chunk
            chunk, total = [], 0
        chunk.append(span)
        total += length
    if chunk:
        yield chunk


def _check_partial_success(payload: bytes, url: str) -> None:
    # Spans the Collector rejects as invalid would be rejected again: retrying them would
    # block the log forever, so they are reported and the offset moves on.
    if not payload:
        return
    response = ExportTraceServiceResponse()
    try:
        response.ParseFromString(payload)
    except Exception:  # a 2xx with an odd body still accepted the batch
        return
    if response.partial_success.rejected_spans:
        log.error(
            "audit export: %s rejected %d span(s): %s",
            url,
            response.partial_success.rejected_spans,
            response.partial_success.error_message,
        )


# --- a process of its own -----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m querywarden.audit.export DIR --endpoint URL``: export until SIGTERM.

    Building spans costs some 30 µs of CPU per statement; in a process of its own that
    work does not compete with the gateway's event loop for the interpreter lock.
    """
    import argparse
    import signal

    parser = argparse.ArgumentParser(
        prog="python -m querywarden.audit.export",
        description="Export an audit log directory to an OpenTelemetry Collector (OTLP/HTTP).",
    )
    parser.add_argument("directory", type=Path)
    parser.add_argument("--endpoint", required=True, help="OTLP/HTTP base URL")
    parser.add_argument("--instance-id", default="")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--interrupted-through", type=int, default=None)
    parser.add_argument(
        "--drain", type=float, default=0.0, help="seconds to keep sending after SIGTERM"
    )
    parser.add_argument(
        "--query-text",
        choices=QUERY_TEXT_MODES,
        default="normalized",
        help="db.query.text: sanitized (default), exact, or left out",
    )
    parser.add_argument(
        "--header", action="append", default=[], metavar="NAME=VALUE", help="repeatable"
    )
    parser.add_argument("--once", action="store_true", help="one pass, then exit (1 on failure)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    headers = dict(h.split("=", 1) for h in args.header)
    exporter = LogExporter(
        args.directory,
        args.endpoint,
        instance_id=args.instance_id,
        headers=headers,
        interrupted_through=args.interrupted_through,
        query_text=args.query_text,
    )
    if args.once:
        try:
            print(exporter.export_pending())
        except (ExportError, OSError) as exc:
            log.error("audit export failed: %s", exc)
            return 1
        return 0

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await exporter.run(interval=args.interval, stop=stop, drain=args.drain)

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
