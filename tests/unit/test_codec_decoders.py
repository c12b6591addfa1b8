"""Every decoder, fed any bytes, either decodes or raises ProtocolViolation (08P01, or
22021 for text the client encoding rejects).

A decoder reads counts and lengths the peer chose; none of them may be trusted to fit the
frame. Valid frames are built, then truncated, mutated and extended at random; anything
other than a ProtocolViolation escaping (struct.error, IndexError, ValueError) fails.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from querywarden import codec
from querywarden.errors import ProtocolViolation


def bind_frame(
    formats: tuple[int, ...], values: tuple[bytes | None, ...], results: tuple[int, ...]
) -> bytes:
    body = b"p\0s\0" + struct.pack(f"!H{len(formats)}h", len(formats), *formats)
    body += struct.pack("!H", len(values))
    for value in values:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    body += struct.pack(f"!H{len(results)}h", len(results), *results)
    return codec.message(b"B", body)


def function_call_frame(args: tuple[bytes | None, ...]) -> bytes:
    body = struct.pack("!IHh", 1234, 1, 0) + struct.pack("!H", len(args))
    for arg in args:
        body += struct.pack("!i", -1) if arg is None else struct.pack("!i", len(arg)) + arg
    return codec.message(b"F", body + struct.pack("!h", 0))


def row_description_frame(names: list[bytes]) -> bytes:
    body = struct.pack("!H", len(names))
    for name in names:
        body += name + b"\0" + struct.pack("!IhIhih", 1, 2, 25, -1, -1, 0)
    return codec.message(b"T", body)


def data_row_frame(values: tuple[bytes | None, ...]) -> bytes:
    body = struct.pack("!H", len(values))
    for value in values:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return codec.message(b"D", body)


values_st = st.lists(st.none() | st.binary(max_size=12), max_size=6).map(tuple)

#: Each decoder with a strategy of valid frames for it.
DECODERS: dict[str, tuple[Callable[[bytes], object], st.SearchStrategy[bytes]]] = {
    "query": (codec.decode_query, st.text(max_size=20).map(lambda t: codec.query(t))),
    "parse": (
        codec.decode_parse,
        st.lists(st.integers(0, 2**32 - 1), max_size=8).map(
            lambda types: codec.parse("s", "SELECT $1", tuple(types))
        ),
    ),
    "bind_names": (
        codec.decode_bind_names,
        st.tuples(values_st).map(lambda v: bind_frame((0,), v[0], (1,))),
    ),
    "bind_parameters": (
        codec.decode_bind_parameters,
        values_st.map(lambda v: bind_frame((0,) * len(v), v, (0, 1))),
    ),
    "bind_text_parameters": (
        codec.decode_bind_parameters,
        values_st.map(lambda v: bind_frame((), v, (1,))),
    ),
    "describe": (
        lambda f: codec.decode_target(f),
        st.sampled_from("SP").map(lambda k: codec.describe(k, "name")),
    ),
    "execute": (
        codec.decode_execute_portal,
        st.text(
            st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=8
        ).map(lambda p: codec.message(b"E", codec.cstr(p) + b"\0\0\0\0")),
    ),
    "function_call": (codec.decode_function_call_oid, values_st.map(function_call_frame)),
    "password": (
        codec.decode_password,
        st.binary(max_size=20).map(lambda p: codec.password_message(p + b"\0")),
    ),
    "fields": (
        codec.decode_fields,
        st.text(max_size=20).map(lambda t: codec.error_response("42000", t)),
    ),
    "parameter_status": (
        codec.decode_parameter_status,
        st.text(max_size=10).map(lambda t: codec.parameter_status("n", t)),
    ),
    "notification": (
        codec.decode_notification,
        st.text(max_size=10).map(lambda t: codec.notification_response(7, b"ch", t)),
    ),
    "backend_key_data": (
        codec.decode_backend_key_data,
        st.binary(min_size=4, max_size=8).map(lambda k: codec.backend_key_data(9, k)),
    ),
    "authentication": (
        codec.decode_authentication,
        st.binary(max_size=8).map(lambda p: codec.authentication(10, p)),
    ),
    "row_description": (
        codec.decode_row_description,
        st.lists(st.binary(max_size=6).map(lambda n: n.replace(b"\0", b"")), max_size=4).map(
            row_description_frame
        ),
    ),
    "data_row": (codec.decode_data_row, values_st.map(data_row_frame)),
}


@st.composite
def damaged(draw: st.DrawFn, frames: st.SearchStrategy[bytes]) -> bytes:
    """A valid frame truncated, with bytes overwritten, or with bytes added."""
    frame = bytearray(draw(frames))
    how = draw(st.sampled_from(["truncate", "mutate", "extend", "random"]))
    if how == "truncate":
        del frame[draw(st.integers(0, len(frame))) :]
    elif how == "mutate":
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(frame) - 1))
            frame[at] = draw(st.integers(0, 255))
    elif how == "extend":
        frame += draw(st.binary(min_size=1, max_size=8))
    else:
        frame = bytearray(draw(st.binary(max_size=40)))
    return bytes(frame)


@pytest.mark.parametrize("name", sorted(DECODERS))
@given(data=st.data())
def test_decoders_raise_only_protocol_violations(name: str, data: st.DataObject) -> None:
    decode, frames = DECODERS[name]
    frame = data.draw(damaged(frames))
    try:
        decode(frame)
    except codec.InvalidText as exc:
        # Text the client encoding rejects: 22021, as the server says it.
        assert exc.sqlstate == "22021"
        assert exc.message
    except ProtocolViolation as exc:
        assert exc.sqlstate == "08P01"
        assert exc.message


@pytest.mark.parametrize("name", sorted(DECODERS))
@given(data=st.data())
def test_valid_frames_decode(name: str, data: st.DataObject) -> None:
    decode, frames = DECODERS[name]
    decode(data.draw(frames))


def test_bind_with_fewer_parameters_than_declared_names_the_fault() -> None:
    frame = bind_frame((0,), (b"1",), ())
    # Declare five parameters but send one, as a broken driver did.
    broken = frame.replace(b"\0\x01\0\0\0\x011", b"\0\x05\0\0\0\x011")
    with pytest.raises(ProtocolViolation, match="insufficient data left in message"):
        codec.decode_bind_parameters(broken)


def test_bind_with_mismatched_format_count_names_both_counts() -> None:
    frame = bind_frame((0, 0), (b"1",), ())
    with pytest.raises(
        ProtocolViolation, match="bind message has 2 parameter formats but 1 parameters"
    ):
        codec.decode_bind_parameters(frame)


def test_parse_parameter_count_is_unsigned() -> None:
    types = tuple(range(40_000))
    parse = codec.decode_parse(codec.parse("s", "SELECT 1", types))
    assert parse.param_types == types


def test_bind_values_round_trip() -> None:
    decoded = codec.decode_bind_parameters(bind_frame((1,), (b"a", None, b""), (0, 1)))
    assert decoded == codec.BindParameters((1,), (b"a", None, b""), (0, 1))
