"""Client encodings and string syntax, sans I/O: names, settings, and the session's holds.

What the server itself does is checked in tests/test_encodings.py.
"""

from __future__ import annotations

import pytest

from querywarden import codec, encodings
from querywarden.analysis import analyze
from querywarden.hooks import AllowAll, SessionInfo
from querywarden.identity import Principal
from querywarden.session import SENTINEL_PREFIX, Session

INFO = SessionInfo("s1", Principal("alice"), "app", "127.0.0.1:1")
RFQ_I = codec.ready_for_query(b"I")
SYNC = codec.message(b"S")
BIND = codec.message(b"B", b"\0\0\0\0\0\0\0\0")
EXECUTE = codec.message(b"E", b"\0\0\0\0\0")


def drain(chunks: list[bytes]) -> bytes:
    data = b"".join(chunks)
    chunks.clear()
    return data


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("UTF8", "UTF8"),
        ("utf-8", "UTF8"),
        ("Unicode", "UTF8"),
        ("ISO_8859_1", "LATIN1"),
        ("iso-8859-15", "LATIN9"),
        ("windows-1251", "WIN1251"),
        ("koi8", "KOI8R"),
        ("SQL_ASCII", "SQL_ASCII"),
        ("SJIS", None),
        ("shift_jis_2004", None),
        ("GB18030", None),
        ("EUC_JP", None),
        ("auto", None),
        ("", None),
    ],
)
def test_names_resolve_to_an_accepted_encoding_or_none(name: str, canonical: str | None) -> None:
    assert encodings.canonical(name) == canonical


def test_a_refused_encoding_names_the_accepted_ones_and_the_way_out() -> None:
    with pytest.raises(encodings.EncodingRefused) as refused:
        encodings.check_startup_settings({"client_encoding": "BIG5"})
    assert refused.value.sqlstate == "0A000"
    assert "UTF8" in refused.value.message and "PGCLIENTENCODING" in refused.value.message


@pytest.mark.parametrize(
    ("parameters", "ok"),
    [
        ({"server_encoding": "UTF8", "client_encoding": "LATIN1"}, True),
        ({"server_encoding": "LATIN1", "client_encoding": "LATIN1"}, False),
        ({"server_encoding": "UTF8", "client_encoding": "SJIS"}, False),
        ({"server_encoding": "UTF8", "standard_conforming_strings": "off"}, False),
        ({"server_encoding": "UTF8", "standard_conforming_strings": "on"}, True),
    ],
)
def test_what_the_server_reports_at_start_up_is_checked(
    parameters: dict[str, str], ok: bool
) -> None:
    if ok:
        assert encodings.check_server_parameters(parameters) in encodings.ACCEPTED
    else:
        with pytest.raises(encodings.EncodingRefused):
            encodings.check_server_parameters(parameters)


@pytest.mark.parametrize(
    ("sql", "settings"),
    [
        ("SET client_encoding TO 'LATIN1'", (("client_encoding", "LATIN1"),)),
        ("SET NAMES 'sjis'", (("client_encoding", "sjis"),)),
        ("SET \"Client_Encoding\" = 'x'", (("client_encoding", "x"),)),
        ("SET client_encoding = 6", (("client_encoding", None),)),
        ("SET standard_conforming_strings = off", (("standard_conforming_strings", "off"),)),
        ("SELECT set_config('CLIENT_ENCODING', 'SJIS', false)", (("client_encoding", "SJIS"),)),
        ("SELECT set_config('client_encoding', $1, false)", (("client_encoding", None),)),
        ("RESET client_encoding", ()),
        ("SET client_encoding TO DEFAULT", ()),
        ("ALTER FUNCTION f() SET client_encoding = 'SJIS'", ()),
    ],
)
def test_the_analyzer_lists_what_a_statement_sets_them_to(
    sql: str, settings: tuple[tuple[str, str | None], ...]
) -> None:
    assert analyze(sql)[0].text_settings == settings


def test_a_change_reported_by_the_server_ends_the_session() -> None:
    session = Session(INFO, AllowAll())
    # The same encoding under another name is no change.
    session.receive_server(codec.parameter_status("client_encoding", "UTF8"))
    with pytest.raises(encodings.EncodingRefused):
        session.receive_server(codec.parameter_status("client_encoding", "SJIS"))
    with pytest.raises(encodings.EncodingRefused):
        Session(INFO, AllowAll()).receive_server(
            codec.parameter_status("standard_conforming_strings", "off")
        )


def test_text_that_could_read_otherwise_waits_for_the_ready_for_query_owed() -> None:
    session = Session(INFO, AllowAll())
    plain = codec.query("SELECT 2")
    escaped = codec.query("SELECT 'a\\'")
    accented = codec.query("SELECT 'caf\u00e9'")
    session.receive_client(codec.query("SELECT 1") + plain + escaped + accented)
    # Plain ASCII flows behind a running Query; the rest waits for its answer.
    assert drain(session.to_server) == codec.query("SELECT 1") + plain
    assert session.held_for_answer == len(escaped + accented)
    session.receive_server(RFQ_I)
    assert not session.input_released  # "SELECT 2" is still owed its ReadyForQuery
    session.receive_server(RFQ_I)
    assert session.input_released
    session.receive_client(b"")
    assert drain(session.to_server) == escaped
    session.receive_server(RFQ_I)
    session.receive_client(b"")
    assert drain(session.to_server) == accented


def test_such_text_after_an_execute_without_sync_is_refused_in_place() -> None:
    session = Session(INFO, AllowAll())
    session.receive_client(
        codec.parse("", "SELECT f()")
        + BIND
        + EXECUTE
        + codec.parse("", "SELECT 'caf\u00e9'")
        + BIND
        + EXECUTE
        + SYNC
    )
    sent = drain(session.to_server)
    # The second Parse is replaced by a sentinel: the server fails it and skips to Sync.
    assert codec.parse("", "SELECT 'caf\u00e9'") not in sent
    assert SENTINEL_PREFIX.encode() in sent
    assert sent.endswith(BIND + EXECUTE + SYNC)


def test_syncs_the_server_ignores_in_copy_in_are_not_owed() -> None:
    """A Sync pipelined behind COPY FROM STDIN gets no ReadyForQuery: nothing waits for it."""
    session = Session(INFO, AllowAll())
    session.receive_client(codec.parse("", "COPY t FROM STDIN") + BIND + EXECUTE + SYNC)
    drain(session.to_server)
    session.receive_server(codec.message(b"1") + codec.message(b"2"))
    session.receive_server(codec.message(b"G", b"\0\0\0"))
    session.receive_client(codec.message(b"c") + SYNC)
    session.receive_server(codec.message(b"C", b"COPY 0\0") + RFQ_I)
    drain(session.to_server)
    accented = codec.query("SELECT 'caf\u00e9'")
    session.receive_client(accented)
    assert drain(session.to_server) == accented
