"""One statement's exchange with the gateway, sans I/O: the bytes to send, the frames back.

``querywarden mcp`` runs every tool call as one extended-protocol exchange on its own
connection: Parse, Bind (parameters and results as text), Describe the portal, Execute
with a row limit, Sync. The statement is never split, rewritten or checked here: the
gateway decides it exactly as it decides any client's. This module only frames the
request and reads the answer into an :class:`Outcome`; :mod:`querywarden.mcp.client`
moves the bytes.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from querywarden import codec

#: What a text-format value becomes: PostgreSQL's own spelling, or None for SQL NULL.
Value = str | None

#: The most row bytes one exchange keeps: past it, rows are read and dropped, and the
#: result is reported cut (1000 rows of megabyte values must not exhaust the server).
MAX_RESULT_BYTES: Final = 16 * 1024 * 1024

_INT16: Final = struct.Struct("!h")
_INT32: Final = struct.Struct("!i")

#: Names of the built-in types a result column is most likely to have (pg_type.typname,
#: as ``format_type`` spells them). Other types are named by their OID.
TYPE_NAMES: Final = {
    16: "boolean",
    17: "bytea",
    18: "char",
    19: "name",
    20: "bigint",
    21: "smallint",
    23: "integer",
    25: "text",
    26: "oid",
    114: "json",
    142: "xml",
    650: "cidr",
    700: "real",
    701: "double precision",
    790: "money",
    829: "macaddr",
    869: "inet",
    1000: "boolean[]",
    1005: "smallint[]",
    1007: "integer[]",
    1009: "text[]",
    1015: "character varying[]",
    1016: "bigint[]",
    1042: "character",
    1043: "character varying",
    1082: "date",
    1083: "time without time zone",
    1114: "timestamp without time zone",
    1184: "timestamp with time zone",
    1186: "interval",
    1266: "time with time zone",
    1560: "bit",
    1562: "bit varying",
    1700: "numeric",
    2249: "record",
    2278: "void",
    2950: "uuid",
    3802: "jsonb",
    3614: "tsvector",
    3904: "int4range",
    3926: "int8range",
    3906: "numrange",
    3910: "tstzrange",
    3912: "daterange",
    705: "unknown",
}

#: The gateway's notice when it holds a statement for an approver (policy/gate.py).
_HELD: Final = re.compile(r"held for approval as review ([A-Za-z0-9_-]+)")
#: A review named in a refusal ("review k3m9x2p7qa is still pending ...").
_REVIEW: Final = re.compile(r"\breview ([A-Za-z0-9_-]+) (?:is|was)\b")
#: The start of the gateway's masking annotation (session/masking.py).
_MASKING_NOTE: Final = "querywarden: masked in this result"
_WITHHELD_NOTE: Final = "querywarden: every value in this result is withheld"
#: The gateway's annotation of a refusal (session/policy.py).
_REFUSED_NOTE: Final = "querywarden: refused by "


def type_name(oid: int) -> str:
    """The name of a result column's type, or ``oid <n>`` for one not in the table."""
    return TYPE_NAMES.get(oid, f"oid {oid}")


@dataclass(frozen=True, slots=True)
class Column:
    """One result column: its name, its type, and what masking did to it (None: nothing)."""

    name: str
    type: str
    masked: str | None = None
    #: The configured ``schema.table.column`` whose values the column carries, if masked.
    source: str | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """An ErrorResponse, every field kept: the gateway's refusals name rule and hint."""

    sqlstate: str
    message: str
    detail: str | None = None
    hint: str | None = None
    position: str | None = None
    #: The rule the gateway's annotation named (None: no rule allows it, or not said).
    rule: str | None = None
    #: Whether the gateway itself refused (it annotated the refusal), not PostgreSQL.
    by_gateway: bool = False

    @property
    def review(self) -> str | None:
        """The review a refusal is about (still pending, denied, expired), if any."""
        found = _REVIEW.search(self.message)
        return found.group(1) if found else None


@dataclass(slots=True)
class Outcome:
    """What the gateway answered to one statement."""

    columns: list[Column] = field(default_factory=list)
    rows: list[list[Value]] = field(default_factory=list)
    #: The CommandComplete tag ("SELECT 3", "UPDATE 1"), None if the statement failed.
    command: str | None = None
    #: The row limit stopped the result (PortalSuspended): more rows exist.
    cut: bool = False
    failure: Failure | None = None
    notices: list[str] = field(default_factory=list)
    #: The review the gateway opened for this statement, once its hold notice arrived.
    review: str | None = None
    #: The gateway withheld every value of the result (it could not attribute them).
    withheld: bool = False


class Exchange:
    """Frames one statement's request and reads its answer.

    Feed every frame the gateway sends after the request with :meth:`receive`; it
    returns True once ReadyForQuery ends the exchange.
    """

    def __init__(
        self,
        sql: str,
        parameters: list[Value],
        max_rows: int,
        encoding: str = "utf-8",
        *,
        max_bytes: int = MAX_RESULT_BYTES,
    ) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.sql = sql
        self.parameters = parameters
        self.max_rows = max_rows
        self.encoding = encoding
        self.outcome = Outcome()
        self._bytes_left = max_bytes
        #: Called with the review id when the gateway says it holds the statement.
        self.on_held: Callable[[str], None] | None = None
        self._masking: dict[int, tuple[str, str | None]] = {}
        #: The rule of the refusal annotation just received, for the error that follows.
        self._refused_by: tuple[str | None] | None = None

    def request(self) -> bytes:
        """Parse, Bind, Describe, Execute (at most ``max_rows``) and Sync, as one write."""
        values = b"".join(
            _INT32.pack(-1) if v is None else _INT32.pack(len(b := v.encode(self.encoding))) + b
            for v in self.parameters
        )
        bind = (
            codec.cstr("")
            + codec.cstr("")
            + _INT16.pack(0)  # every parameter in text format
            + _INT16.pack(len(self.parameters))
            + values
            + _INT16.pack(0)  # every result column in text format
        )
        return b"".join(
            (
                codec.parse("", self.sql),
                codec.message(b"B", bind),
                codec.describe("P", ""),
                codec.message(b"E", codec.cstr("") + _INT32.pack(self.max_rows)),
                codec.message(b"S"),
            )
        )

    def receive(self, mtype: int, frame: bytes) -> bool:
        """Take one frame (type byte included); True when the exchange is over."""
        outcome = self.outcome
        kind = chr(mtype)
        if kind == "D":
            self._bytes_left -= len(frame)
            if self._bytes_left >= 0:
                outcome.rows.append([self._text(v) for v in codec.decode_data_row(frame)])
            else:
                outcome.cut = True  # read to the end of the result, but not kept
        elif kind == "T":
            outcome.columns = [
                Column(f.name.decode(self.encoding, "replace"), type_name(f.type_oid))
                for f in codec.decode_row_description(frame)
            ]
            self._apply_masking()
        elif kind == "N":
            self._notice(codec.decode_fields(frame))
        elif kind == "E":
            fields = codec.decode_fields(frame)
            refused_by = self._refused_by
            self._refused_by = None
            outcome.failure = Failure(
                fields.get("C", "XX000"),
                fields.get("M", "(no message)"),
                fields.get("D"),
                fields.get("H"),
                fields.get("P"),
                rule=refused_by[0] if refused_by else None,
                by_gateway=refused_by is not None,
            )
        elif kind == "C":
            outcome.command = codec.decode_cstring(frame, 5, self.encoding)[0]
        elif kind == "s":
            outcome.cut = True
        elif kind == "Z":
            return True
        # ParseComplete, BindComplete, NoData, EmptyQueryResponse, ParameterStatus,
        # NotificationResponse: nothing to keep.
        return False

    def _text(self, value: bytes | None) -> Value:
        return None if value is None else value.decode(self.encoding, "replace")

    def _notice(self, fields: dict[str, str]) -> None:
        message = fields.get("M", "")
        outcome = self.outcome
        if message.startswith(_REFUSED_NOTE):
            try:
                rule = json.loads(fields.get("D", "{}")).get("rule")
            except (ValueError, AttributeError):
                rule = None
            self._refused_by = (str(rule) if rule else None,)
            return
        if message.startswith(_MASKING_NOTE):
            try:
                said = json.loads(fields.get("D", "{}"))
                self._masking = {
                    int(c["index"]): (str(c["strategy"]), c.get("source")) for c in said["columns"]
                }
            except (ValueError, KeyError, TypeError):
                # Masking happened, but the gateway's detail is unreadable: say so.
                outcome.notices.append(message)
            self._apply_masking()
            return
        if message.startswith(_WITHHELD_NOTE):
            outcome.withheld = True
            outcome.notices.append(message)
            return
        held = _HELD.search(message)
        if held is not None:
            outcome.review = held.group(1)
            if self.on_held is not None:
                self.on_held(held.group(1))
        outcome.notices.append(message if "H" not in fields else f"{message} (hint: {fields['H']})")

    def _apply_masking(self) -> None:
        columns = self.outcome.columns
        for index, (strategy, source) in self._masking.items():
            if index < len(columns):
                column = columns[index]
                columns[index] = Column(column.name, column.type, strategy, source)
