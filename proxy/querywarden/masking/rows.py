"""Masking result bytes: DataRows, COPY rows, and error and notice texts. Sans-I/O.

A :class:`RowLayout` is built once per result from its RowDescription (or from a
Describe's, with the Bind's formats), the request's :class:`MaskPlan` and the client
encoding; then every DataRow of the result goes through :meth:`RowLayout.mask_row`, or a
run of consecutive DataRows through :meth:`RowLayout.mask_rows`, which rewrite only the
values they must and return ``None`` when nothing changed (the common case for rows whose
masked values are NULL or whose text is clean).

The loops here are the reference implementation. A layout made while the compiled row
masker is selected (:mod:`querywarden.masking.compiled`) hands the same per-column
decisions to ``querywarden_native`` and delegates both methods to it.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from querywarden import codec
from querywarden.codec import FieldDescription
from querywarden.errors import ProtocolViolation
from querywarden.masking import compiled
from querywarden.masking.detectors import ContentScanner
from querywarden.masking.plan import ColumnMask, MaskPlan
from querywarden.masking.strategies import (
    JSONBOID,
    JSONOID,
    XMLOID,
    CompiledOp,
    MaskSpec,
    compiled_op,
    is_text_like,
    make_masker,
)

if TYPE_CHECKING:
    from querywarden_native import RowMasker

_LENGTH = struct.Struct("!i")
_REDACT = MaskSpec("redact")
_DOCUMENT_TYPES = frozenset({JSONOID, JSONBOID, XMLOID})
_COUNT = struct.Struct("!h")
_NULL = b"\xff\xff\xff\xff"
_DATA_ROW = ord("D")

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
        "_actions",
        "_all",
        "_counts",
        "_names",
        "_native",
        "_scan",
        "_tally",
        "masked_columns",
        "width",
    )

    def __init__(
        self,
        fields: Sequence[FieldDescription] | None,
        formats: Sequence[int],
        plan: MaskPlan,
        encoding: str,
        counts: MaskCounts,
        *,
        native: bool | None = None,
    ) -> None:
        """Decide what each column needs, once per result.

        ``native``: use the compiled row masker (None: as
        :func:`querywarden.masking.compiled.select` chose; True needs it installed).
        """
        # Without a description (or with a plan that says so) every value goes: NULL is
        # valid for any type, so the client can still decode the rows.
        self._all = fields is None or plan.mask_all
        fields = fields or ()
        self.width = len(fields)
        self._counts = counts
        scanner = plan.scanner
        # Not a bound method: the compiled masker holds it, and must not hold the layout.
        self._scan = None if scanner is None else partial(_scan, scanner, encoding, counts)
        if native is None:
            native = compiled.enabled()
        #: Per column up to the last one that needs work: None (pass), a masker (mask),
        #: or (None, document masker or None) to scan with the content detectors.
        actions: list[_Action] = []
        #: The same decisions for the compiled row masker (built only when it is used).
        ops: list[CompiledOp | None] = []
        self._names: list[str] = []
        #: What happens to each column that is not passed as it is: (index, its name in
        #: the result, the configured ``schema.table.column`` or "", the strategy or
        #: "detectors"). Read only when a client asks (``querywarden.annotations``).
        masked_columns: list[tuple[int, bytes, str, str]] = []
        for index, f in enumerate(fields):
            binary = _format_of(formats, index, f.format) == 1
            mask: ColumnMask | None = None
            if f.table_oid and f.attnum > 0:
                mask = plan.origins.get((f.table_oid, f.attnum))
            elif plan.computed is not None:
                # No origin (an expression), or a whole row (attnum 0): masked whole.
                mask = plan.computed
            self._names.append(mask.name if mask is not None else "")
            if mask is not None:
                masker = make_masker(
                    mask.spec,
                    type_oid=f.type_oid,
                    binary=binary,
                    key=plan.key,
                    encoding=encoding,
                )
                actions.append(masker)
                masked_columns.append((index, f.name, mask.name, mask.spec.strategy))
                if native:
                    ops.append(
                        compiled_op(masker, mask.spec, type_oid=f.type_oid, encoding=encoding)
                    )
            elif scanner is not None and is_text_like(f.type_oid):
                # Structured text (json, jsonb, xml): a replacement inside could break its
                # syntax, so a value a detector flags is masked whole, type-validly.
                document = None
                if f.type_oid in _DOCUMENT_TYPES:
                    document = make_masker(
                        _REDACT, type_oid=f.type_oid, binary=binary, key=plan.key, encoding=encoding
                    )
                actions.append((None, document))
                ops.append(("scan", document))
                masked_columns.append((index, f.name, "", "detectors"))
            else:
                actions.append(None)
                ops.append(None)
        while actions and actions[-1] is None:
            actions.pop()  # columns after the last interesting one are copied untouched
        self._actions = tuple(actions)
        self.masked_columns = tuple(masked_columns)
        self._tally = [0] * len(actions)
        self._native: RowMasker | None = None
        if native and self.needed:
            if compiled.ROW_MASKER is None:
                raise RuntimeError("the compiled row masker (querywarden_native) is not installed")
            hints, min_digits = scanner.prefilter if scanner is not None else ((), None)
            self._native = compiled.ROW_MASKER(
                self.width,
                self._all,
                ops[: len(actions)],
                self._scan,
                hints,
                min_digits,
                counts,
            )

    @property
    def masks_all(self) -> bool:
        """Whether every value is withheld (sent as NULL), whatever its column."""
        return self._all

    @property
    def needed(self) -> bool:
        """Whether any column is masked or scanned (else rows pass untouched)."""
        return bool(self._all or self._actions)

    def mask_row(self, frame: bytes, start: int, end: int) -> bytes | None:
        """The DataRow at ``frame[start:end]`` masked, or None if nothing changed.

        ``frame`` holds more than the row: every length is checked against ``end`` (a
        malformed row from the server is a ProtocolViolation, never the next message's
        bytes read as a value).
        """
        if self._native is not None:
            return self._native.mask_row(frame, start, end)
        if end - start < 7:
            raise ProtocolViolation("insufficient data left in message: DataRow")
        (count,) = _COUNT.unpack_from(frame, start + 5)
        if self._all:
            self._counts.values["(unattributed)"] += count
            return _all_null(count)
        if count != self.width:
            # A row that does not match its description: send no values at all.
            return _all_null(count)
        unpack = _LENGTH.unpack_from
        pack = _LENGTH.pack
        tally = self._tally
        pos = done = start + 7  # frame[done:pos] is copied as it is
        out: list[bytes] | None = None
        index = -1
        for action in self._actions:
            index += 1
            if pos + 4 > end:
                raise _truncated(index + 1)
            length = unpack(frame, pos)[0]
            if length < 0:
                pos += 4  # NULL stays NULL
                continue
            value_end = pos + 4 + length
            if value_end > end:
                raise _truncated(index + 1)
            if action is None:
                pos = value_end
                continue
            value = frame[pos + 4 : value_end]
            replacement: bytes | None
            if type(action) is tuple:
                if not length:
                    pos = value_end
                    continue
                found = self._scan(value)  # type: ignore[misc]
                if found is None:
                    pos = value_end
                    continue
                document = action[1]
                replacement = found if document is None else document(value)
            else:
                replacement = action(value)  # type: ignore[operator]
                tally[index] += 1
            if out is None:
                out = [frame[done:pos]]
            else:
                out.append(frame[done:pos])
            if replacement is None:
                out.append(_NULL)
            else:
                out.append(pack(len(replacement)))
                out.append(replacement)
            done = pos = value_end
        if out is None:
            return None
        out.append(frame[done:end])
        body = b"".join(out)
        self._counts.rows += 1
        return b"D" + pack(len(body) + 6) + _COUNT.pack(count) + body

    def mask_rows(self, frame: bytes, start: int, end: int) -> tuple[int, bytes | None]:
        """Mask the run of whole DataRows that starts at ``frame[start]``.

        The run ends before the first message in ``frame[start:end]`` that is not a
        DataRow, is not whole before ``end``, or has a length under 4 (the caller's
        framing reports that one). Returns where the run stopped and the run's bytes with
        every row masked as :meth:`mask_row` masks it, or None if no row changed. A
        malformed row raises as in :meth:`mask_row`; the rows before it are lost with it.
        """
        if self._native is not None:
            return self._native.mask_rows(frame, start, end)
        unpack = _LENGTH.unpack_from
        mask_row = self.mask_row
        out: list[bytes] | None = None
        pos = copied = start  # frame[copied:pos] is not in ``out`` yet
        while end - pos >= 5 and frame[pos] == _DATA_ROW:
            length = unpack(frame, pos + 1)[0]
            row_end = pos + 1 + length
            if length < 4 or row_end > end:
                break
            masked = mask_row(frame, pos, row_end)
            if masked is not None:
                if out is None:
                    out = []
                out.append(frame[copied:pos])
                out.append(masked)
                copied = row_end
            pos = row_end
        if out is None:
            return pos, None
        out.append(frame[copied:pos])
        return pos, b"".join(out)

    def flush(self) -> None:
        """Add this layout's counts of masked values to the session's."""
        values = self._counts.values
        if self._native is not None:
            tally = self._native.take_tally()
        else:
            tally, self._tally = self._tally, [0] * len(self._tally)
        for index, n in enumerate(tally):
            if n:
                values[self._names[index]] += n


def _scan(scanner: ContentScanner, encoding: str, counts: MaskCounts, value: bytes) -> bytes | None:
    """A scanned value with the detectors' matches replaced (and counted), or None."""
    # jsonb's binary form is a version byte and the JSON text: both scan as text, and a
    # replacement inside never touches the version byte.
    found = scanner.scan_bytes(value, encoding)
    if found is None:
        return None
    masked, names = found
    for name in names:
        counts.values[f"detector:{name}"] += 1
    return masked


_Action = Masker | tuple[None, Masker | None] | None


def _truncated(column: int) -> ProtocolViolation:
    return ProtocolViolation(
        f"insufficient data left in message: DataRow ends inside its column {column}"
    )


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

# PostgreSQL quotes a value in a message without escaping the quotes inside it
# (``invalid input syntax for type integer: "{"a": "..."}"``), so no quoted segment can be
# told from the next: everything from the first quote to the last one goes.
_QUOTED = re.compile(r'"[\s\S]*"')
_KEY_VALUES = re.compile(r"\)=\(.*?\)(?= |$|\.)", re.DOTALL)
_WITHHELD = "querywarden: withheld, it may show masked values"
#: Fields that carry a failing statement's values: detail, context, internal query.
_ECHOING_TEXTS: tuple[str, ...] = ("D", "W", "q")
#: Every free-text field: message and hint too.
_ALL_TEXTS: tuple[str, ...] = ("M", "D", "W", "q", "H")


def scrub_quoted(message: str) -> str:
    """``message`` with what PostgreSQL quotes in it taken out.

    Values, and the parser's ``at or near "..."``: ``"****"`` from the first quote to the
    last; ``Key (ssn)=(...)`` becomes ``)=(****)``.
    """
    return _KEY_VALUES.sub(")=(****)", _QUOTED.sub('"****"', message))


def scrub_fields(
    frame: bytes, plan: MaskPlan | None, encoding: str, counts: MaskCounts
) -> bytes | None:
    """An ErrorResponse/NoticeResponse with values that may be sensitive taken out.

    With a plan that withholds messages (the request runs code the gateway cannot see
    into), the message, detail, hint, context and internal query are all withheld. With
    a plan that says errors may echo masked values (the request touched a masked
    column): the quoted part of the message (from its first quote to its last) becomes
    ``"****"``, and the detail, context and internal query are withheld (they carry
    ``Key (ssn)=(...)``, ``Failing row contains (...)``, the statement's values).
    Content detectors, if any, run over every text field either way. Returns None when
    nothing changed.
    """
    fields = codec.decode_fields(frame)
    changed = False
    if plan is not None and (plan.withhold_messages or plan.scrub_errors):
        if plan.withhold_messages:
            # RAISE NOTICE '%', ssn in a function: the value is the message, in no quotes.
            withheld = _ALL_TEXTS
        else:
            withheld = _ECHOING_TEXTS
            message = fields.get("M")
            if message is not None:
                scrubbed = scrub_quoted(message)
                if scrubbed != message:
                    fields["M"] = scrubbed
                    changed = True
        for code in withheld:
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
