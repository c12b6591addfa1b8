"""The MCP server's sans-I/O parts: the statement exchange, tokens, answers and refusals."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from pathlib import Path

import pytest

from querywarden import codec
from querywarden.errors import ProtocolViolation
from querywarden.mcp.client import GatewayAddress
from querywarden.mcp.tokens import CommandToken, TokenUnavailable, expiry
from querywarden.mcp.tools import GatewayTools, ToolFailure, _parameter, refusal_text
from querywarden.mcp.wire import Exchange, Failure, Outcome, type_name
from querywarden.startup import requested_annotations


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    reader = codec.FrameReader(1 << 20)
    reader.feed(data)
    frames = []
    while (frame := reader.next_frame()) is not None:
        frames.append(frame)
    return frames


def _row_description(*columns: tuple[str, int]) -> bytes:
    body = struct.pack("!h", len(columns))
    for name, type_oid in columns:
        body += codec.cstr(name) + struct.pack("!IhIhih", 0, 0, type_oid, -1, -1, 0)
    return codec.message(b"T", body)


def _data_row(*values: bytes | None) -> bytes:
    body = struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return codec.message(b"D", body)


def _feed(exchange: Exchange, *messages: bytes) -> bool:
    done = False
    for mtype, frame in _frames(b"".join(messages)):
        done = exchange.receive(mtype, frame)
    return done


def test_the_request_is_one_extended_exchange_with_text_values_and_the_row_limit() -> None:
    exchange = Exchange("SELECT $1, $2", ["é", None], 7)
    frames = _frames(exchange.request())
    assert [chr(t) for t, _ in frames] == ["P", "B", "D", "E", "S"]
    parse = codec.decode_parse(frames[0][1])
    assert parse.sql == "SELECT $1, $2" and parse.statement == ""
    values = codec.decode_bind_parameters(frames[1][1])
    assert values.values == ("é".encode(), None) and values.formats == ()
    assert values.result_formats == ()
    assert codec.decode_target(frames[2][1]) == ("P", "")
    assert frames[3][1][-4:] == struct.pack("!i", 7)


def test_rows_masking_annotation_and_completion_make_the_outcome() -> None:
    exchange = Exchange("SELECT", [], 10)
    detail = {
        "all": False,
        "columns": [{"index": 1, "name": "ssn", "source": "public.c.ssn", "strategy": "partial"}],
    }
    done = _feed(
        exchange,
        codec.message(b"1"),
        codec.message(b"2"),
        _row_description(("id", 23), ("ssn", 25), ("x", 999999)),
        codec.notice_response(
            "querywarden: masked in this result: ssn (partial)", detail=json.dumps(detail)
        ),
        _data_row(b"1", b"***-**-6789", None),
        codec.message(b"C", codec.cstr("SELECT 1")),
    )
    assert not done
    assert _feed(exchange, codec.ready_for_query(b"I"))
    outcome = exchange.outcome
    assert [(c.name, c.type, c.masked, c.source) for c in outcome.columns] == [
        ("id", "integer", None, None),
        ("ssn", "text", "partial", "public.c.ssn"),
        ("x", "oid 999999", None, None),
    ]
    assert outcome.rows == [["1", "***-**-6789", None]]
    assert outcome.command == "SELECT 1" and not outcome.cut and outcome.notices == []


def test_a_suspended_portal_is_a_cut_result_and_a_held_notice_names_the_review() -> None:
    exchange = Exchange("SELECT", [], 1)
    seen: list[str] = []
    exchange.on_held = seen.append
    _feed(
        exchange,
        codec.notice_response(
            "querywarden: DELETE needs approval (rule r): held for approval as review ab12cd; "
            "waiting up to 60s for an approver",
            hint="an approver runs: ...",
        ),
        codec.message(b"s"),
        codec.ready_for_query(b"I"),
    )
    assert seen == ["ab12cd"] and exchange.outcome.review == "ab12cd"
    assert exchange.outcome.cut and exchange.outcome.command is None
    assert exchange.outcome.notices[0].endswith("(hint: an approver runs: ...)")


def test_a_refusal_carries_the_annotated_rule_and_a_server_error_none() -> None:
    refused = Exchange("UPDATE t SET x = 1", [], 1)
    _feed(
        refused,
        codec.notice_response("querywarden: refused by rule agents", detail='{"rule": "agents"}'),
        codec.error_response("42501", "querywarden: UPDATE is not allowed", hint="use SELECT"),
        codec.ready_for_query(b"I"),
    )
    failure = refused.outcome.failure
    assert failure == Failure(
        "42501",
        "querywarden: UPDATE is not allowed",
        None,
        "use SELECT",
        None,
        rule="agents",
        by_gateway=True,
    )
    assert refusal_text(failure) == (
        "refused by the gateway (SQLSTATE 42501, rule agents): querywarden: UPDATE is not "
        "allowed\nhint: use SELECT"
    )
    server = Exchange("SELECT nosuch", [], 1)
    _feed(
        server,
        codec.message(b"E", b'SERROR\0C42703\0Mcolumn "nosuch" does not exist\0P8\0\0'),
        codec.ready_for_query(b"I"),
    )
    assert server.outcome.failure is not None and not server.outcome.failure.by_gateway
    assert refusal_text(server.outcome.failure) == (
        'failed in PostgreSQL (SQLSTATE 42703): column "nosuch" does not exist\n'
        "position: character 8 of the statement"
    )


def test_a_refusal_nobody_allows_says_so() -> None:
    failure = Failure("42501", "querywarden: no", rule=None, by_gateway=True)
    assert refusal_text(failure).startswith(
        "refused by the gateway (SQLSTATE 42501, no rule of the policy allows it)"
    )


def test_long_values_are_cut_with_a_marker_and_counted() -> None:
    tools = GatewayTools(GatewayAddress(), None, value_chars=5)
    outcome = Outcome(rows=[["abcdefgh", "abc", None]], command="SELECT 1")
    answer = tools._answer(outcome, 10)
    assert answer.rows == [["abcde…[cut by querywarden mcp: 3 more characters]", "abc", None]]
    assert answer.values_cut == 1 and answer.status == "done"


def test_parameters_become_postgres_text_and_structures_are_refused() -> None:
    assert [_parameter(v) for v in (None, True, False, 3, 2.5, "x")] == [
        None,
        "true",
        "false",
        "3",
        "2.5",
        "x",
    ]
    with pytest.raises(ToolFailure, match="PostgreSQL text"):
        _parameter([1, 2])


def _jwt(claims: dict[str, object]) -> str:
    part = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"e30.{part}.sig"


def test_expiry_is_read_from_a_jwt_only() -> None:
    assert expiry(_jwt({"exp": 1234})) == 1234.0
    assert expiry(_jwt({"sub": "x"})) is None
    assert expiry("PHNhbWw+") is None and expiry("a.b!.c") is None


def test_a_command_token_is_reused_until_shortly_before_it_expires(tmp_path: Path) -> None:
    now = [1000.0]
    script = tmp_path / "tok.sh"
    runs = tmp_path / "runs"
    script.write_text(f"#!/bin/sh\necho x >> {runs}\necho '{_jwt({'exp': 1100})}'\n")
    script.chmod(0o755)
    source = CommandToken(str(script), clock=lambda: now[0])

    async def take() -> str:
        return await source.token()

    first = asyncio.run(take())
    now[0] = 1030.0  # 70 s before exp: still fresh (the margin is 60 s)
    assert asyncio.run(take()) == first and runs.read_text().count("x") == 1
    now[0] = 1041.0
    asyncio.run(take())
    assert runs.read_text().count("x") == 2
    assert source.invalidate()
    asyncio.run(take())
    assert runs.read_text().count("x") == 3


def test_a_failing_token_command_says_why(tmp_path: Path) -> None:
    script = tmp_path / "fail.sh"
    script.write_text("#!/bin/sh\necho 'not logged in' >&2\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(TokenUnavailable, match=r"exit status 3\): not logged in"):
        asyncio.run(CommandToken(str(script)).token())


def test_start_up_annotations_are_parsed_and_unknown_ones_refused() -> None:
    assert requested_annotations({}) == frozenset()
    assert requested_annotations({"querywarden.annotations": "masking, decisions"}) == {
        "masking",
        "decisions",
    }
    assert requested_annotations({"options": "-c querywarden.annotations=masking"}) == {"masking"}
    with pytest.raises(ProtocolViolation, match=r"unknown querywarden\.annotations value 'rows'"):
        requested_annotations({"querywarden.annotations": "rows"})


def test_type_names_fall_back_to_the_oid() -> None:
    assert type_name(1700) == "numeric" and type_name(4242) == "oid 4242"


def test_rows_past_the_byte_budget_are_dropped_and_the_result_is_cut() -> None:
    exchange = Exchange("SELECT", [], 100, max_bytes=40)
    _feed(
        exchange,
        _row_description(("v", 25)),
        *(_data_row(b"x" * 10) for _ in range(5)),
        codec.message(b"C", codec.cstr("SELECT 5")),
        codec.ready_for_query(b"I"),
    )
    # Each DataRow is 21 bytes: the first fits, the second would pass 40.
    assert exchange.outcome.rows == [["x" * 10]]
    assert exchange.outcome.cut and exchange.outcome.command == "SELECT 5"
