"""The compiled row masker against the pure-Python reference: same bytes, errors, counts.

Every case builds the same :class:`RowLayout` twice (``native=False``: the loops of
``rows.py``; ``native=True``: ``querywarden_native``) and feeds both the same DataRows:
random and adversarial rows (NULLs, empty values, binary formats, non-ASCII text, rows cut
short, lengths past the end, negative lengths other than -1, counts that do not match the
description, huge counts), every strategy on every type family, the content detectors and
the callbacks. The compiled module is imported unconditionally: without it these tests
fail, they do not skip (make builds it; see native/).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import querywarden_native
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from querywarden.codec import FieldDescription
from querywarden.errors import ProtocolViolation
from querywarden.masking import compiled
from querywarden.masking.detectors import DETECTOR_NAMES, ContentScanner
from querywarden.masking.plan import ColumnMask, MaskPlan
from querywarden.masking.rows import MaskCounts, RowLayout
from querywarden.masking.strategies import MaskSpec, compiled_op, make_masker

KEY = b"k" * 32
TABLE = 16384

TYPES = [
    25,  # text
    1043,  # varchar
    1042,  # bpchar
    19,  # name
    705,  # unknown
    18,  # "char"
    114,  # json
    3802,  # jsonb
    142,  # xml
    21,  # int2
    23,  # int4
    20,  # int8
    26,  # oid
    700,  # float4
    701,  # float8
    1700,  # numeric
    2950,  # uuid
    17,  # bytea
    16,  # bool
    1082,  # date
    123456,  # an extension's type
]
ENCODINGS = ["utf-8", "latin-1", "cp1251", "gb2312"]
STRATEGIES = ["redact", "null", "partial", "email", "hash", "digits"]

# --- values ---------------------------------------------------------------------------------

_TEXTS = [
    "",
    " ",
    "a",
    "123-45-6789",
    "078-05-1120",
    "4111 1111 1111 1111",
    "4111111111111111",
    "user@example.com",
    "a.b-c@sub.example.org",
    "x@y",
    "@example.com",
    "user@",
    "user@-bad.com",
    "user@bad-.com",
    "user@exa_mple.com",
    "user@exämple.com",
    "user@例え.jp",
    "ü@ß.de",
    "name@host name",
    "a@b@c.d",
    "Ünïcødé tëxt 🙂",
    "emoji 🙂🙂🙂🙂🙂🙂 and more",
    "AKIAABCDEFGHIJKLMNOP",
    "ghp_" + "a1B2" * 9,
    "sk-" + "aB3" * 12,
    "eyJhbGciOi.eyJzdWIiOi.c2ln",
    "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----",
    "customer 123456",
    "A_-" * 30,
    "x" * 60 + "@",
    "digits 1234567890123 in a long enough value to skip the short path",
    "padded   ",
    '"a json string"',
    '{"k": "v"}',
    "<x>&</x>",
    "12.50",
    "-0.0",
    "NaN",
    "1e400",
    "00042",
]


def _texts() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(_TEXTS),
        st.text(max_size=40),
        st.text(alphabet="0123456789 -@.abcAKIxo_", max_size=60),
    )


def _encoded(encoding: str) -> st.SearchStrategy[bytes]:
    def encode(text: str) -> bytes:
        return text.encode(encoding, "replace")

    return _texts().map(encode)


def values(encoding: str) -> st.SearchStrategy[bytes | None]:
    """Wire values: text in the encoding, raw bytes, binary numbers, NULL."""
    return st.one_of(
        st.none(),
        _encoded(encoding),
        st.binary(max_size=40),
        st.sampled_from(
            [
                b"",
                b"\x01",
                b'\x01"a json string"',
                b"\x00\x01",
                struct.pack("!i", 123456789),
                struct.pack("!q", -5),
                struct.pack("!d", 1.5),
                struct.pack("!f", 2.5),
                struct.pack("!hhHH", 1, 0, 0, 0) + struct.pack("!H", 42),
                bytes(range(16)),
                b"\\x414243",
                b"\xff\xfe\xfd",
                b"\xed\xa0\x80",  # a UTF-16 surrogate in UTF-8: invalid
                b"\xc0\xaf",  # overlong
                b"user@\xff.com",
            ]
        ),
    )


# --- rows -------------------------------------------------------------------------------------


def data_row(row: Sequence[bytes | None], *, count: int | None = None) -> bytes:
    body = struct.pack("!h", len(row) if count is None else count)
    for value in row:
        body += b"\xff\xff\xff\xff" if value is None else struct.pack("!i", len(value)) + value
    return b"D" + struct.pack("!i", len(body) + 4) + body


def _with_length(row: bytes, column: int, length: int) -> bytes:
    """``row`` with the length field of value ``column`` set to ``length``."""
    pos = 7
    for _ in range(column):
        (n,) = struct.unpack_from("!i", row, pos)
        pos += 4 + max(n, 0)
    if pos + 4 > len(row):
        return row
    return row[:pos] + struct.pack("!i", length) + row[pos + 4 :]


@st.composite
def adversarial_row(draw: st.DrawFn, width: int, encoding: str) -> bytes:
    row = draw(st.lists(values(encoding), min_size=width, max_size=width))
    kind = draw(
        st.sampled_from(["plain"] * 6 + ["count", "cut", "past", "negative", "short", "extra"])
    )
    if kind == "count":
        count = draw(st.one_of(st.integers(-(2**15), 2**15 - 1), st.sampled_from([0, -1, 32767])))
        assume(count != width)
        return data_row(row[: max(0, min(count, width))], count=count)
    frame = data_row(row)
    if kind == "cut":
        # The message's own length field still says the old length: mask_row goes by end.
        return frame[: draw(st.integers(5, len(frame)))]
    if kind == "past" and width:
        return _with_length(frame, draw(st.integers(0, width - 1)), draw(st.integers(1, 2**31 - 1)))
    if kind == "negative" and width:
        length = draw(st.sampled_from([-2, -3, -(2**31), -1000]))
        return _with_length(frame, draw(st.integers(0, width - 1)), length)
    if kind == "short":
        return frame[: draw(st.integers(0, 6))]
    if kind == "extra":
        return frame + draw(st.binary(min_size=1, max_size=8))
    return frame


# --- layouts ----------------------------------------------------------------------------------


@st.composite
def columns(draw: st.DrawFn) -> list[tuple[int, int, MaskSpec | None]]:
    """(type OID, format, spec or None) per column."""
    n = draw(st.integers(0, 6))
    out = []
    for _ in range(n):
        spec = draw(
            st.one_of(
                st.none(),
                st.builds(
                    MaskSpec,
                    st.sampled_from(STRATEGIES),
                    keep_first=st.integers(0, 4),
                    keep_last=st.integers(0, 4),
                    replacement=st.sampled_from(["****", "", "·", "xx\u2028", "\ud800"]),
                ),
            )
        )
        out.append((draw(st.sampled_from(TYPES)), draw(st.sampled_from([0, 1])), spec))
    return out


def make_plan(
    cols: Sequence[tuple[int, int, MaskSpec | None]],
    detectors: Sequence[str] | None,
    *,
    computed: MaskSpec | None = None,
    mask_all: bool = False,
) -> tuple[list[FieldDescription], MaskPlan]:
    fields = []
    origins = {}
    for index, (type_oid, fmt, spec) in enumerate(cols):
        attnum = index + 1
        # A column without a spec comes from the table too, or is an expression (0, 0).
        origin = (TABLE, attnum) if spec is not None or index % 2 else (0, 0)
        fields.append(FieldDescription(b"c%d" % index, origin[0], origin[1], type_oid, fmt))
        if spec is not None:
            origins[(TABLE, attnum)] = ColumnMask(spec, f"public.t.c{index}")
    plan = MaskPlan(
        origins=origins,
        computed=None if computed is None else ColumnMask(computed, "(computed)"),
        scanner=None if detectors is None else ContentScanner(detectors),
        scrub_errors=False,
        key=KEY,
        mask_all=mask_all,
    )
    return fields, plan


class Twins:
    """One layout per implementation, each with its own counts."""

    def __init__(
        self,
        fields: Sequence[FieldDescription] | None,
        formats: Sequence[int],
        plan: MaskPlan,
        encoding: str,
    ) -> None:
        self.counts = (MaskCounts(), MaskCounts())
        self.layouts = tuple(
            RowLayout(fields, formats, plan, encoding, counts, native=native)
            for counts, native in zip(self.counts, (False, True), strict=True)
        )
        assert self.layouts[0]._native is None
        assert self.layouts[1]._native is not None or not self.layouts[1].needed

    def same(self, call: Callable[[RowLayout], Any]) -> Any:
        """Run ``call`` on both layouts; both must answer (or raise) alike."""
        outcomes = []
        for layout in self.layouts:
            try:
                outcomes.append(("ok", call(layout)))
            except Exception as exc:  # the exception is the outcome compared
                outcomes.append(("raised", type(exc), str(exc)))
        assert outcomes[1] == outcomes[0]
        self.same_counts()
        return outcomes[0]

    def same_counts(self) -> None:
        reference, native = self.counts
        assert native.rows == reference.rows
        # The same keys in the same order: the audit record lists them as they came.
        assert list(native.values.items()) == list(reference.values.items())

    def flush(self) -> None:
        for layout in self.layouts:
            layout.flush()
        self.same_counts()


_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@given(
    cols=columns(),
    detectors=st.one_of(st.none(), st.lists(st.sampled_from(DETECTOR_NAMES), unique=True)),
    encoding=st.sampled_from(ENCODINGS),
    computed=st.one_of(st.none(), st.just(MaskSpec("redact"))),
    formats=st.sampled_from(["described", "one", "each"]),
    data=st.data(),
)
@_SETTINGS
def test_random_rows_mask_alike(
    cols: list[tuple[int, int, MaskSpec | None]],
    detectors: list[str] | None,
    encoding: str,
    computed: MaskSpec | None,
    formats: str,
    data: st.DataObject,
) -> None:
    fields, plan = make_plan(cols, detectors, computed=computed)
    chosen = {"described": [], "one": [1], "each": [f for _, f, _ in cols]}[formats]
    twins = Twins(fields, chosen, plan, encoding)
    rows = data.draw(st.lists(adversarial_row(len(cols), encoding), max_size=8))
    for row in rows:
        twins.same(lambda layout, row=row: layout.mask_row(row, 0, len(row)))
    # The same rows as one run, inside a larger buffer (the run's bounds are honoured).
    head = data.draw(st.binary(max_size=6))
    tail = data.draw(st.sampled_from([b"", b"C\x00\x00\x00\x04", b"D\x00\x00\x00\x02", b"D\x00"]))
    frame = head + b"".join(rows) + tail
    end = data.draw(st.integers(len(head), len(frame)))
    twins.same(lambda layout: layout.mask_rows(frame, len(head), end))
    twins.flush()


@given(
    cols=columns(),
    encoding=st.sampled_from(ENCODINGS),
    data=st.data(),
)
@_SETTINGS
def test_runs_of_whole_rows_stop_where_the_reference_stops(
    cols: list[tuple[int, int, MaskSpec | None]], encoding: str, data: st.DataObject
) -> None:
    fields, plan = make_plan(cols, list(DETECTOR_NAMES))
    twins = Twins(fields, [], plan, encoding)
    width = len(cols)
    rows = [
        data_row(data.draw(st.lists(values(encoding), min_size=width, max_size=width)))
        for _ in range(data.draw(st.integers(0, 12)))
    ]
    stops = [b"C\x00\x00\x00\x0dSELECT 3\x00", b"Z\x00\x00\x00\x05I", b"D\x00\x00\x00\x03", b""]
    frame = b"".join(rows) + data.draw(st.sampled_from(stops)) + b"".join(rows[:2])
    outcome = twins.same(lambda layout: layout.mask_rows(frame, 0, len(frame)))
    assert outcome[0] == "ok"
    stop, masked = outcome[1]
    assert stop >= sum(len(r) for r in rows)
    if masked is None:
        assert all(layout.mask_row(r, 0, len(r)) is None for r in rows for layout in twins.layouts)
    twins.flush()


# --- each compiled strategy against its Python masker ----------------------------------------


@pytest.mark.parametrize("type_oid", TYPES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_each_strategy_on_each_type_masks_alike(
    type_oid: int, strategy: str, binary: bool, encoding: str
) -> None:
    specs = [MaskSpec(strategy)]  # type: ignore[arg-type]
    if strategy in ("partial", "email"):
        specs += [
            MaskSpec(strategy, keep_first=2, keep_last=4, replacement="··"),  # type: ignore[arg-type]
            MaskSpec(strategy, keep_last=1, replacement="\ud800x"),  # type: ignore[arg-type]
        ]
    samples: list[bytes | None] = [None]
    samples += [text.encode(encoding, "replace") for text in _TEXTS]
    samples += [b"\xff\xfe", b"\xed\xa0\x80", b"\x01abc", bytes(range(8)), b"pad   "]
    for spec in specs:
        fields, plan = make_plan([(type_oid, int(binary), spec)], None)
        twins = Twins(fields, [], plan, encoding)
        for value in samples:
            row = data_row([value])
            twins.same(lambda layout, row=row: layout.mask_row(row, 0, len(row)))
        twins.flush()


def test_the_compiled_forms_are_the_ones_expected() -> None:
    """The fast forms are used where they should be (else the tests above prove little)."""

    def op(spec: MaskSpec, type_oid: int, encoding: str = "utf-8") -> object:
        masker = make_masker(spec, type_oid=type_oid, binary=False, key=KEY, encoding=encoding)
        return compiled_op(masker, spec, type_oid=type_oid, encoding=encoding)[0]

    assert op(MaskSpec("partial", keep_last=4), 25) == "partial"
    assert op(MaskSpec("partial", keep_last=4), 1042) == "partial"
    assert op(MaskSpec("email"), 1043) == "email"
    assert op(MaskSpec("redact"), 25) == "constant"
    assert op(MaskSpec("redact"), 23) == "constant"
    assert op(MaskSpec("redact"), 2950) == "constant"
    assert op(MaskSpec("null"), 25) == "null"
    assert op(MaskSpec("hash"), 16) == "null"
    assert op(MaskSpec("hash"), 25) == "call"
    assert op(MaskSpec("partial"), 114) == "call"  # json: a JSON string literal
    assert op(MaskSpec("partial", keep_last=4), 25, "latin-1") == "call"


# --- detectors, callbacks, the whole-row paths --------------------------------------------------


@given(
    text=st.text(alphabet="0123456789 -_.@AKISaeyJghpxosk", max_size=120),
    detectors=st.lists(st.sampled_from(DETECTOR_NAMES), unique=True, min_size=1),
)
@_SETTINGS
def test_the_prefilter_never_skips_a_value_a_detector_flags(
    text: str, detectors: list[str]
) -> None:
    fields, plan = make_plan([(25, 0, None), (3802, 1, None)], detectors)
    twins = Twins(fields, [], plan, "utf-8")
    value = text.encode()
    row = data_row([value, b"\x01" + value])
    twins.same(lambda layout: layout.mask_row(row, 0, len(row)))


def test_detectors_fire_in_document_and_plain_columns_alike() -> None:
    fields, plan = make_plan([(25, 0, None), (114, 0, None), (142, 1, None)], list(DETECTOR_NAMES))
    twins = Twins(fields, [], plan, "utf-8")
    secrets = [
        b"ssn 123-45-6789",
        b'{"card": "4111 1111 1111 1111"}',
        b"<k>AKIAABCDEFGHIJKLMNOP</k>",
    ]
    oversize = b"x" * (1 << 20) + b"@example.com"
    for row in (data_row(secrets), data_row([oversize, None, b""]), data_row([b"", b"", b""])):
        twins.same(lambda layout, row=row: layout.mask_row(row, 0, len(row)))
    assert twins.counts[0].values["detector:ssn"] == 1
    twins.flush()


@pytest.mark.parametrize("fields_known", [True, False])
def test_rows_nobody_can_attribute_are_all_null(fields_known: bool) -> None:
    fields, plan = make_plan([(25, 0, None), (23, 0, None)], None, mask_all=fields_known)
    twins = Twins(fields if fields_known else None, [], plan, "utf-8")
    rows = [
        data_row([b"a", b"1"]),
        data_row([b"a", b"1"], count=-3),
        data_row([b"a", b"1"], count=0),
        data_row([b"a"] * 3, count=32767),
    ]
    frame = b"".join(rows)
    twins.same(lambda layout: layout.mask_rows(frame, 0, len(frame)))
    # Also a count of zero rows only: the key is recorded (with 0), as the reference does.
    zero = data_row([], count=0)
    twins.same(lambda layout: layout.mask_row(zero, 0, len(zero)))
    twins.same(lambda layout: layout.mask_row(b"D\x00\x00\x00\x06\x00", 0, 6))
    twins.flush()


def test_a_malformed_row_raises_the_same_violation_after_counting_the_rows_before() -> None:
    fields, plan = make_plan(
        [(25, 0, MaskSpec("partial", keep_last=2)), (25, 0, MaskSpec("redact"))], None
    )
    twins = Twins(fields, [], plan, "utf-8")
    good = data_row([b"secret value", b"x"])
    bad = _with_length(data_row([b"secret value", b"x"]), 1, 99)
    frame = good + good + bad + good
    outcome = twins.same(lambda layout: layout.mask_rows(frame, 0, len(frame)))
    assert outcome[:2] == ("raised", ProtocolViolation)
    assert outcome[2] == "insufficient data left in message: DataRow ends inside its column 2"
    assert twins.counts[1].rows == 2
    twins.flush()
    # The bad row's first value was masked (and counted) before its second was found short.
    assert twins.counts[1].values["public.t.c0"] == 3
    assert twins.counts[1].values["public.t.c1"] == 2


def test_a_masker_that_raises_raises_through_the_compiled_loop() -> None:
    def boom(value: bytes | None) -> bytes | None:
        raise ValueError(f"boom {value!r}")

    counts = MaskCounts()
    masker = querywarden_native.RowMasker(2, False, [None, ("call", boom)], None, (), None, counts)
    row = data_row([b"a", b"b"])
    with pytest.raises(ValueError, match="boom b'b'"):
        masker.mask_row(row, 0, len(row))
    assert masker.take_tally() == [0, 0]
    assert counts.rows == 0
    returns_text = querywarden_native.RowMasker(
        1, False, [("call", lambda value: "text")], None, (), None, counts
    )
    row = data_row([b"a"])
    with pytest.raises(TypeError, match="bytes or None"):
        returns_text.mask_row(row, 0, len(row))


def test_bounds_outside_the_frame_are_refused() -> None:
    counts = MaskCounts()
    masker = querywarden_native.RowMasker(1, False, [("null",)], None, (), None, counts)
    with pytest.raises(ValueError, match="within the frame"):
        masker.mask_rows(b"D\x00", 0, 10)


# --- the setting ----------------------------------------------------------------------------


def test_the_setting_selects_the_implementation(monkeypatch: pytest.MonkeyPatch) -> None:
    before = compiled.enabled()
    try:
        assert compiled.select("on") is True
        assert "compiled" in compiled.describe()
        fields, plan = make_plan([(25, 0, MaskSpec("redact"))], None)
        assert RowLayout(fields, [], plan, "utf-8", MaskCounts())._native is not None
        assert compiled.select("off") is False
        assert RowLayout(fields, [], plan, "utf-8", MaskCounts())._native is None
        monkeypatch.setattr(compiled, "ROW_MASKER", None)
        with pytest.raises(RuntimeError, match="not installed"):
            compiled.select("on")
        assert compiled.select("auto") is False
        assert "not installed" in compiled.describe()
    finally:
        monkeypatch.undo()
        compiled.select("on" if before else "off")


def test_the_compiled_module_is_built_and_selected_by_default() -> None:
    # make builds native/ into the venv; "auto" then uses it (QUERYWARDEN_PERFORMANCE__NATIVE
    # may turn it off for a run of the suite against the reference).
    assert compiled.ROW_MASKER is querywarden_native.RowMasker
