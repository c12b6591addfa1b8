"""Masking in the session state machine: which result each row belongs to, bytes in/out."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from querywarden import codec
from querywarden.errors import UpstreamError
from querywarden.hooks import Decision, SessionInfo, StatementRequest
from querywarden.masking import compiled
from querywarden.masking.detectors import ContentScanner
from querywarden.masking.plan import ColumnMask, MaskPlan
from querywarden.masking.strategies import MaskSpec
from querywarden.session import Session
from unit.test_session import INFO, RFQ_I, SYNC, bind, command_complete, data_row, drain
from wire_client import execute

TABLE = 16384
PLAN = MaskPlan(
    origins={(TABLE, 2): ColumnMask(MaskSpec("redact"), "public.t.ssn")},
    computed=None,
    scanner=None,
    scrub_errors=True,
    key=b"k" * 32,
)


class MaskingGate:
    def decide(self, session: SessionInfo, request: StatementRequest) -> Decision:
        return Decision(True, mask=PLAN)


@pytest.fixture(autouse=True, params=["on", "off"], ids=["native", "python"])
def row_masker(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every session here masks with the compiled row masker, then with the reference."""
    before = compiled.enabled()
    compiled.select(request.param)
    try:
        yield
    finally:
        compiled.select("on" if before else "off")


def description(*columns: tuple[str, int, int, int, int]) -> bytes:
    """RowDescription of (name, table oid, attnum, type oid, format) columns."""
    body = struct.pack("!h", len(columns))
    for name, table, attnum, type_oid, fmt in columns:
        body += codec.cstr(name) + struct.pack("!IhIhih", table, attnum, type_oid, -1, -1, fmt)
    return codec.message(b"T", body)


COLUMNS = (("id", TABLE, 1, 25, 0), ("ssn", TABLE, 2, 25, 0))


def frames(out: bytes) -> list[bytes]:
    found, pos = [], 0
    while pos < len(out):
        length = int.from_bytes(out[pos + 1 : pos + 5], "big")
        found.append(out[pos : pos + 1 + length])
        pos += 1 + length
    return found


def session() -> Session:
    return Session(INFO, MaskingGate(), masked=True)


def test_simple_query_rows_are_masked_by_origin() -> None:
    s = session()
    s.receive_client(codec.query("SELECT id, ssn FROM t"))
    s.receive_server(
        description(*COLUMNS)
        + data_row(b"1", b"123-45-6789")
        + data_row(b"2", None)
        + command_complete("SELECT 2")
        + RFQ_I
    )
    out = drain(s.to_client)
    assert b"123-45-6789" not in out
    rows = [f for f in frames(out) if f[:1] == b"D"]
    assert rows[0] == data_row(b"1", b"****")
    assert rows[1] == data_row(b"2", None)  # NULL stays NULL
    assert s.mask_counts.values["public.t.ssn"] == 1


def test_execute_without_describe_gets_one_from_the_gateway() -> None:
    s = session()
    s.receive_client(codec.parse("", "SELECT id, ssn FROM t") + bind() + execute() + SYNC)
    sent = frames(drain(s.to_server))
    assert [f[:1] for f in sent] == [b"P", b"B", b"D", b"E", b"S"]
    assert sent[2] == codec.describe("P", "")
    s.receive_server(
        codec.message(b"1")
        + codec.message(b"2")
        + description(*COLUMNS)
        + data_row(b"1", b"123-45-6789")
        + command_complete("SELECT 1")
        + RFQ_I
    )
    out = frames(drain(s.to_client))
    # The client never asked for the description: it does not get it.
    assert [f[:1] for f in out] == [b"1", b"2", b"D", b"C", b"Z"]
    assert out[2] == data_row(b"1", b"****")


def test_statement_description_and_bind_formats_make_the_layout() -> None:
    s = session()
    s.receive_client(codec.parse("q", "SELECT id, ssn FROM t") + codec.describe("S", "q") + SYNC)
    assert b"D" in drain(s.to_server)
    s.receive_server(
        codec.message(b"1") + codec.message(b"t", b"\0\0") + description(*COLUMNS) + RFQ_I
    )
    assert [f[:1] for f in frames(drain(s.to_client))] == [b"1", b"t", b"T", b"Z"]
    # Bind asking for binary results; no Describe: the statement's description is enough.
    binary_bind = codec.message(b"B", b"\0q\0" + b"\0\0" + b"\0\0" + b"\0\x01\0\x01")
    s.receive_client(binary_bind + execute() + SYNC)
    assert [f[:1] for f in frames(drain(s.to_server))] == [b"B", b"E", b"S"]
    s.receive_server(
        codec.message(b"2") + data_row(b"\0\0\0\1", b"123-45-6789") + command_complete("SELECT 1")
    )
    out = drain(s.to_client)
    assert b"123-45-6789" not in out


def test_errors_of_a_request_touching_masked_data_are_scrubbed() -> None:
    s = session()
    s.receive_client(codec.query("SELECT ssn::int FROM t"))
    error = codec.error_response(
        "22P02",
        'invalid input syntax for type integer: "123-45-6789"',
        detail="Key (ssn)=(123-45-6789) already exists.",
    )
    s.receive_server(error + RFQ_I)
    out = drain(s.to_client)
    assert b"123-45-6789" not in out
    fields = codec.decode_fields(frames(out)[0])
    assert fields["C"] == "22P02"
    assert "invalid input syntax for type integer" in fields["M"]


def test_rows_that_cannot_be_attributed_carry_no_values() -> None:
    s = session()
    # An Execute of a portal the session never saw bound: nothing says what it holds.
    s.receive_client(execute("ghost") + SYNC)
    drain(s.to_server)
    s.receive_server(data_row(b"123-45-6789") + command_complete("SELECT 1") + RFQ_I)
    out = drain(s.to_client)
    assert b"123-45-6789" not in out
    assert frames(out)[0] == data_row(None)


def test_a_malformed_row_from_the_server_is_an_upstream_error() -> None:
    """A column length past the row's end is refused, not read from the next message."""
    s = session()
    s.receive_client(codec.query("SELECT id, ssn FROM t"))
    drain(s.to_server)
    s.receive_server(description(*COLUMNS))
    row = data_row(b"1", b"123-45-6789")
    lying = row[:-15] + struct.pack("!i", 40) + row[-11:]  # ssn claims 40 bytes
    with pytest.raises(UpstreamError) as info:
        s.receive_server(lying + command_complete("SELECT 1") + RFQ_I)
    assert info.value.sqlstate == "08P01"
    assert "DataRow ends inside its column 2" in info.value.message


def test_runs_of_rows_split_anywhere_mask_as_whole_rows() -> None:
    # Whole rows of a read go through RowLayout.mask_rows as one run; a row cut by the
    # read waits for the next one. Every split gives the client the same bytes.
    rows = [(b"%d" % i, b"123-45-67%02d" % i if i % 3 else None) for i in range(40)]
    reply = (
        description(*COLUMNS)
        + b"".join(data_row(*row) for row in rows)
        + command_complete("SELECT 40")
        + RFQ_I
    )
    expected = [data_row(key, None if ssn is None else b"****") for key, ssn in rows]
    for cut in range(0, len(reply) + 1, 5):
        s = session()
        s.receive_client(codec.query("SELECT id, ssn FROM t"))
        s.receive_server(reply[:cut])
        s.receive_server(reply[cut:])
        out = frames(drain(s.to_client))
        assert [f for f in out if f[:1] == b"D"] == expected, cut
        assert s.mask_counts.rows == 26
        assert s.mask_counts.values["public.t.ssn"] == 26


def test_a_malformed_row_in_a_run_ends_the_session() -> None:
    s = session()
    s.receive_client(codec.query("SELECT id, ssn FROM t"))
    good = data_row(b"1", b"123-45-6789")
    bad = good[:7] + struct.pack("!i", 50) + good[11:]  # the first value runs past the row
    with pytest.raises(UpstreamError, match="DataRow ends inside its column 1"):
        s.receive_server(description(*COLUMNS) + good + bad + good)


def close_complete() -> bytes:
    return codec.message(b"3")


def test_closed_statements_leave_nothing_behind() -> None:
    # A client preparing every statement under a fresh name and closing it (drivers with
    # a statement cache do) grew the session's notes of texts, plans and descriptions
    # for as long as it stayed connected.
    s = session()
    for n in range(200):
        name = f"s{n}"
        s.receive_client(
            codec.parse(name, "SELECT id, ssn FROM t")
            + codec.describe("S", name)
            + codec.message(b"B", codec.cstr("") + codec.cstr(name) + b"\0\0\0\0\0\0")
            + execute()
            + codec.message(b"C", b"S" + codec.cstr(name))
            + SYNC
        )
        drain(s.to_server)
        s.receive_server(
            codec.message(b"1")
            + codec.message(b"t", b"\0\0")
            + description(*COLUMNS)
            + codec.message(b"2")
            + data_row(b"1", b"123-45-6789")
            + command_complete("SELECT 1")
            + close_complete()
            + RFQ_I
        )
        assert b"123-45-6789" not in drain(s.to_client)
    # Every statement's text, plan and description live on its record: Close drops it.
    assert not s.records.statements and not s.records.portals and not s.statements


def test_a_name_defined_again_behind_its_close_keeps_the_new_statement() -> None:
    s = session()
    s.receive_client(codec.parse("q", "SELECT id FROM t") + SYNC)
    drain(s.to_server)
    s.receive_server(codec.message(b"1") + RFQ_I)
    drain(s.to_client)
    # Close q and define it again in one pipeline: the CloseComplete arrives while the
    # new Parse is still owed; what the session noted for the new q must stay.
    s.receive_client(
        codec.message(b"C", b"S" + codec.cstr("q"))
        + codec.parse("q", "SELECT id, ssn FROM t")
        + codec.describe("S", "q")
        + SYNC
    )
    drain(s.to_server)
    s.receive_server(
        close_complete()
        + codec.message(b"1")
        + codec.message(b"t", b"\0\0")
        + description(*COLUMNS)
        + RFQ_I
    )
    drain(s.to_client)
    assert s.records.statements["q"].plan is PLAN
    s.receive_client(
        codec.message(b"B", codec.cstr("") + codec.cstr("q") + b"\0\0\0\0\0\0") + execute() + SYNC
    )
    drain(s.to_server)
    s.receive_server(
        codec.message(b"2") + data_row(b"1", b"123-45-6789") + command_complete("SELECT 1") + RFQ_I
    )
    out = drain(s.to_client)
    assert b"123-45-6789" not in out and data_row(b"1", b"****") in out


# --- COPY TO STDOUT rows with no plan to scan them by ------------------------------------


def _scanning_plan() -> MaskPlan:
    """A plan with no masked column whose content detectors look for SSNs (a new object
    each call: two texts of one statement name get two plans)."""
    return MaskPlan(origins={}, computed=None, scanner=ContentScanner(["ssn"]), scrub_errors=True)


class PlanPerTextGate:
    """Every text gets its own plan, as the real gate's plans differ by statement shape."""

    generation = 0

    def decide(self, session: SessionInfo, request: StatementRequest) -> Decision:
        return Decision(True, mask=_scanning_plan())


def test_copy_rows_whose_plan_is_not_known_are_withheld_not_sent_unscanned() -> None:
    # After a reload, an Execute of a name that may run either of two texts (a Parse of
    # the name that the server may reject, and the confirmed one) is decided for both;
    # with two different plans, which one applies is not known. DataRows are then
    # masked whole; COPY rows cannot be masked column by column, so none may pass.
    gate = PlanPerTextGate()
    s = Session(INFO, gate, masked=True)
    s.receive_client(codec.parse("s1", "COPY (SELECT notes FROM t) TO STDOUT") + SYNC)
    drain(s.to_server)
    s.receive_server(codec.message(b"1") + RFQ_I)
    drain(s.to_client)
    gate.generation += 1  # a policy reload
    s.receive_client(
        codec.parse("s1", "COPY (SELECT note FROM t) TO STDOUT")
        + SYNC
        + bind("", "s1")
        + execute()
        + SYNC
    )
    drain(s.to_server)
    s.receive_server(
        codec.error_response("42P05", 'prepared statement "s1" already exists')
        + RFQ_I
        + codec.message(b"2")
        + codec.message(b"H", b"\0\0\x01\0\0")  # CopyOutResponse, text, one column
        + codec.message(b"d", b"my ssn is 123-45-6789\n")
        + codec.message(b"c")
        + command_complete("COPY 1")
        + RFQ_I
    )
    out = drain(s.to_client)
    assert b"123-45-6789" not in out
    errors = [codec.decode_fields(f) for f in frames(out) if f[:1] == b"E"]
    assert [e["C"] for e in errors] == ["42P05", "42501"], errors
    assert out.endswith(RFQ_I)
