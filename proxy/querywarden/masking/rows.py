"""Masking result bytes: DataRows, COPY rows, and error and notice texts. Sans-I/O.

A :class:`RowLayout` is built once per result from its RowDescription (or from a
Describe's, with the Bind's formats), the request's :class:`MaskPlan` and the client
encoding; then every DataRow of the result goes through :meth:`RowLayout.mask_row`,
which rewrites only the values it must and returns ``None`` when the row is unchanged
(the common case for rows whose masked values are NULL or whose text is clean).
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from querywarden import codec
from querywarden.codec import FieldDescription
from querywarden.masking.plan import ColumnMask, MaskPlan
from querywarden.masking.strategies import is_text_like, make_masker

_LENGTH = struct.Struct("!i")
_COUNT = struct.Struct("!h")
_NULL = b"\xff\xff\xff\xff"

Masker = Callable[[bytes | None], bytes | None]


@dataclass(slots=True)
class MaskCounts:
    """What masking did in a session, for the audit record."""

    #: ``schema.table.column`` (or ``(computed)``, ``detector:<name>``) -> values masked.
    values: Counter[str] = field(default_factory=Counter)
    rows: int = 0

    def summary(self) -> dict[str, int]:
        """A plain mapping for records."""
        return dict(self.values)


class RowLayout:
    """How the columns of one result are masked."""

    __slots__ = (
        "_all",
        "_counts",
        "_encoding",
        "_maskers",
        "_names",
        "_scanned",
        "_scanner",
        "width",
    )

    def __init__(
        self,
        fields: Sequence[FieldDescription] | None,
        formats: Sequence[int],
        plan: MaskPlan,
        encoding: str,
        counts: MaskCounts,
    ) -> None:
        # Without a description (or with a plan that says so) every value goes: NULL is
        # valid for any type, so the client can still decode the rows.
        self._all = fields is None or plan.mask_all
        fields = fields or ()
        self.width = len(fields)
        self._counts = counts
        self._encoding = encoding
        self._scanner = plan.scanner
        self._maskers: dict[int, Masker] = {}
        self._names: dict[int, str] = {}
        self._scanned: set[int] = set()
        for index, f in enumerate(fields):
            binary = _format_of(formats, index, f.format) == 1
            mask: ColumnMask | None = None
            if f.table_oid and f.attnum > 0:
                mask = plan.origins.get((f.table_oid, f.attnum))
            elif plan.computed is not None:
                # No origin (an expression), or a whole row (attnum 0): masked whole.
                mask = plan.computed
            if mask is not None:
                self._maskers[index] = make_masker(
                    mask.spec, type_oid=f.type_oid, binary=binary, key=plan.key, encoding=encoding
                )
                self._names[index] = mask.name
            elif self._scanner is not None and is_text_like(f.type_oid):
                self._scanned.add(index)

    @property
    def needed(self) -> bool:
        """Whether any column is masked or scanned (else rows pass untouched)."""
        return bool(self._all or self._maskers or self._scanned)

    def mask_row(self, frame: bytes, start: int, end: int) -> bytes | None:
        """The DataRow at ``frame[start:end]`` masked, or None if nothing changed."""
        (count,) = _COUNT.unpack_from(frame, start + 5)
        if self._all:
            self._counts.values["(unattributed)"] += count
            return _all_null(count)
        if count != self.width:
            # A row that does not match its description: send no values at all.
            return _all_null(count)
        maskers = self._maskers
        scanned = self._scanned
        pos = start + 7
        out: list[bytes] | None = None
        done = start + 7  # frame[done:pos] is copied as it is
        for index in range(count):
            (length,) = _LENGTH.unpack_from(frame, pos)
            value_end = pos + 4 + (length if length > 0 else 0)
            masker = maskers.get(index)
            replacement: bytes | None
            if masker is not None:
                value = bytes(frame[pos + 4 : value_end]) if length >= 0 else None
                if value is None:
                    pos = value_end
                    continue
                replacement = masker(value)
                self._counts.values[self._names[index]] += 1
            elif scanned and index in scanned and length > 0:
                found = self._scan(bytes(frame[pos + 4 : value_end]))
                if found is None:
                    pos = value_end
                    continue
                replacement = found
            else:
                pos = value_end
                continue
            if out is None:
                out = []
            out.append(bytes(frame[done:pos]))
            out.append(_NULL if replacement is None else _LENGTH.pack(len(replacement)))
            if replacement is not None:
                out.append(replacement)
            done = pos = value_end
        if out is None:
            return None
        out.append(bytes(frame[done:end]))
        body = b"".join(out)
        self._counts.rows += 1
        return b"D" + _LENGTH.pack(len(body) + 6) + _COUNT.pack(count) + body

    def _scan(self, value: bytes) -> bytes | None:
        assert self._scanner is not None
        # jsonb's binary form is a version byte and the JSON text: both scan as text,
        # and a replacement inside never touches the version byte.
        found = self._scanner.scan_bytes(value, self._encoding)
        if found is None:
            return None
        masked, names = found
        for name in names:
            self._counts.values[f"detector:{name}"] += 1
        return masked


def _format_of(formats: Sequence[int], index: int, described: int) -> int:
    if not formats:
        return described
    if len(formats) == 1:
        return formats[0]
    return formats[index] if index < len(formats) else 0


def _all_null(count: int) -> bytes:
    body = _COUNT.pack(count) + _NULL * max(count, 0)
    return b"D" + _LENGTH.pack(len(body) + 4) + body


# --- error and notice texts ---------------------------------------------------------------

_QUOTED = re.compile(r'"(?:[^"]|"")*"')
_KEY_VALUES = re.compile(r"\)=\(.*?\)(?= |$|\.)", re.DOTALL)
_WITHHELD = "querywarden: withheld, it may show masked values"


def scrub_fields(
    frame: bytes, plan: MaskPlan | None, encoding: str, counts: MaskCounts
) -> bytes | None:
    """An ErrorResponse/NoticeResponse with values that may be sensitive taken out.

    With a plan that says errors may echo masked values (the request touched a masked
    column): quoted values in the message become ``"****"``, and the detail, context
    and internal query are withheld (they carry ``Key (ssn)=(...)``, ``Failing row
    contains (...)``, the statement's values). Content detectors, if any, run over every
    text field either way. Returns None when nothing changed.
    """
    fields = codec.decode_fields(frame)
    changed = False
    if plan is not None and plan.scrub_errors:
        message = fields.get("M")
        if message is not None:
            scrubbed = _KEY_VALUES.sub(")=(****)", _QUOTED.sub('"****"', message))
            if scrubbed != message:
                fields["M"] = scrubbed
                changed = True
        for code in ("D", "W", "q"):
            if code in fields:
                fields[code] = _WITHHELD
                changed = True
        if changed:
            counts.values["(error text)"] += 1
    scanner = plan.scanner if plan is not None else None
    if scanner is not None:
        for code, text in fields.items():
            if code in ("S", "V", "C", "F", "L", "R", "P", "p"):
                continue
            found = scanner.scan(text)
            if found is not None:
                fields[code] = found[0]
                changed = True
                for name in found[1]:
                    counts.values[f"detector:{name}"] += 1
    if not changed:
        return None
    return codec.encode_fields(bytes(frame[:1]), fields)


def scan_copy_row(frame: bytes, plan: MaskPlan, encoding: str, counts: MaskCounts) -> bytes | None:
    """A text or CSV CopyData row with detector matches replaced, or None."""
    if plan.scanner is None:
        return None
    found = plan.scanner.scan_bytes(frame[5:], encoding)
    if found is None:
        return None
    for name in found[1]:
        counts.values[f"detector:{name}"] += 1
    return codec.message(b"d", found[0])
