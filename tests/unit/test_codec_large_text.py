"""codec.LargeText: a Query or Parse collected chunk by chunk reads as the whole message.

Every way of cutting the message into reads gives the same text, name, parameter types
and errors as ``decode_query`` / ``decode_parse`` on the joined bytes, and the chunks
handed on are the bytes received, in order.
"""

from __future__ import annotations

import itertools

import pytest

from querywarden import codec
from querywarden.errors import ProtocolViolation


def collect(
    message: bytes, cuts: list[int], encoding: str = "utf-8", after: bytes = b""
) -> tuple[codec.LargeText, bytes]:
    """Feed ``message + after`` cut at ``cuts`` (the first read holds at least the header)."""
    data = message + after
    bounds = [0, *cuts, len(data)]
    reads = [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    large = codec.LargeText(reads[0][: len(message)], encoding)
    rest = reads[0][len(message) :]
    for chunk in reads[1:]:
        rest += large.feed(chunk)
    return large, rest


def all_cuts(message: bytes) -> list[list[int]]:
    return (
        [[5]] + [[at] for at in range(5, len(message))] + [[5, at] for at in range(6, len(message))]
    )


QUERY = codec.query("SELECT 'é\\x', 'ü' -- ✓")
PARSE = codec.parse("näme", "SELECT $1::int, 'ö'", (23, 25))


@pytest.mark.parametrize("cuts", all_cuts(QUERY))
def test_a_query_cut_anywhere_reads_as_decode_query(cuts: list[int]) -> None:
    large, rest = collect(QUERY, cuts, after=b"S\0\0\0\4")
    assert large.complete
    assert rest == b"S\0\0\0\4"
    assert b"".join(large.chunks) == QUERY
    assert large.request() == ("", codec.decode_query(QUERY), ())
    assert large.unusual  # a backslash and non-ASCII letters


@pytest.mark.parametrize("cuts", all_cuts(PARSE))
def test_a_parse_cut_anywhere_reads_as_decode_parse(cuts: list[int]) -> None:
    large, rest = collect(PARSE, cuts)
    parse = codec.decode_parse(PARSE)
    assert rest == b""
    assert b"".join(large.chunks) == PARSE
    assert large.request() == (parse.statement, parse.sql, parse.param_types)


def test_plain_ascii_text_is_not_unusual() -> None:
    large, _ = collect(codec.query("SELECT 1"), [7])
    assert not large.unusual


def test_incomplete_until_the_last_byte() -> None:
    large = codec.LargeText(QUERY[:6], "utf-8")
    assert not large.complete
    assert large.feed(QUERY[6:-1]) == b""
    assert not large.complete
    with pytest.raises(RuntimeError):
        large.request()
    assert large.feed(QUERY[-1:]) == b""
    assert large.complete


@pytest.mark.parametrize("at", range(5, 12))
def test_invalid_text_split_anywhere_is_invalid_text(at: int) -> None:
    message = codec.message(b"Q", b"SELECT '\xc3\xa9\xc3' \xff'\0")
    with pytest.raises(codec.InvalidText):
        codec.decode_query(message)
    large, _ = collect(message, [at])
    assert large.invalid
    with pytest.raises(codec.InvalidText):
        large.request()
    name, sql = large.refused_request()
    assert (name, sql) == ("", message[5:-1].decode("utf-8", "replace"))


def test_a_sequence_cut_by_the_end_of_the_text_is_invalid() -> None:
    message = codec.message(b"Q", b"SELECT 1 \xc3\0")
    large, _ = collect(message, [12])
    with pytest.raises(codec.InvalidText):
        large.request()


def test_text_without_its_terminator_is_a_protocol_violation() -> None:
    large, _ = collect(codec.message(b"Q", b"SELECT 1"), [8])
    with pytest.raises(ProtocolViolation, match="not NUL-terminated"):
        large.request()


def test_a_parse_with_a_wrong_type_count_is_refused_as_decode_parse_refuses() -> None:
    message = codec.message(b"P", b"\0SELECT 1\0\0\2\0\0\0\x17")
    with pytest.raises(ProtocolViolation) as whole:
        codec.decode_parse(message)
    large, _ = collect(message, [9])
    with pytest.raises(ProtocolViolation) as collected:
        large.request()
    assert collected.value.message == whole.value.message


def test_an_invalid_statement_name_is_invalid_text() -> None:
    message = codec.message(b"P", b"\xff\0SELECT 1\0\0\0")
    large, _ = collect(message, [6])
    with pytest.raises(codec.InvalidText):
        large.refused_request()


def test_another_encoding_is_decoded_as_a_whole() -> None:
    message = codec.message(b"Q", "SELECT 'ソ表'".encode("shift_jis") + b"\0")
    for at in range(5, len(message)):
        large, _ = collect(message, [at], encoding="shift_jis")
        assert large.request()[1] == codec.decode_query(message, "shift_jis")
