"""The gateway decides on exactly the text the server runs: encodings and string syntax.

Every check here is made against the real server: its own conversion (``convert_from``),
its own reading of a statement, its own ParameterStatus reports.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway_harness import POLICY, RunningGateway, token_for
from querywarden import codec, encodings
from querywarden.audit.log import read_records
from querywarden.devcluster import EphemeralCluster
from querywarden.policy import PolicyDocument
from querywarden.policy.gate import PolicyGate
from raw_client import Message, RawClient, assert_alive, connect, data_rows

RULES = [
    {
        "name": "agents-read",
        "subjects": {"groups": ["ai-agents"]},
        "allow": {
            "operations": ["select", "set", "reset", "show", "transaction", "discard"],
            "tables": ["public.*", "pg_catalog.*"],
            # The test's own functions, vouched for (a user's function is side_effects):
            # what they do is the server's business, as in a real deployment.
            "functions": ["qw_enc_*"],
        },
        "deny": {
            "tables": ["public.qw_enc_secrets", "public.qw_enc_sécrÉts", f"public.{'q' * 63}"]
        },
    },
    {
        "name": "dba-settings",
        "subjects": {"groups": ["dba"]},
        "allow": {
            "operations": ["*", "set_role", "set_session_authorization"],
            "tables": ["*"],
            "functions": ["set_config"],
        },
    },
]

# A name of 63 bytes, PostgreSQL's longest: a longer one is cut to it.
LONG_NAME = "q" * 63


@pytest.fixture(scope="module")
def objects(pg: EphemeralCluster) -> Iterator[None]:
    pg.psql(
        "CREATE TABLE qw_enc_secrets (secret text);"
        'CREATE TABLE "qw_enc_sécrÉts" (secret text);'
        f'CREATE TABLE "{LONG_NAME}" (secret text);'
        "CREATE TABLE qw_enc_open (note text);"
        "CREATE SEQUENCE qw_enc_seq; GRANT ALL ON SEQUENCE qw_enc_seq TO PUBLIC;"
        "INSERT INTO qw_enc_secrets VALUES ('hunter2');"
        """INSERT INTO "qw_enc_sécrÉts" VALUES ('hunter3');"""
        f"""INSERT INTO "{LONG_NAME}" VALUES ('hunter4');"""
        "GRANT ALL ON qw_enc_secrets, qw_enc_open, "
        f'"qw_enc_sécrÉts", "{LONG_NAME}" TO PUBLIC;'
        # Run on the server only, as an application's function would be: the gateway sees
        # a call to it, never what it does.
        "CREATE FUNCTION qw_enc_switch(setting text, value text) RETURNS text "
        "LANGUAGE sql AS $$ SELECT set_config(setting, value, false) $$;"
        # convert_from that answers NULL where PostgreSQL rejects the bytes.
        "CREATE FUNCTION qw_enc_decode(b bytea, enc name) RETURNS text LANGUAGE plpgsql "
        "AS $$ BEGIN RETURN convert_from(b, enc); "
        "EXCEPTION WHEN others THEN RETURN NULL; END $$;"
    )
    yield
    pg.psql(
        f'DROP TABLE qw_enc_secrets, qw_enc_open, "qw_enc_sécrÉts", "{LONG_NAME}";'
        "DROP SEQUENCE qw_enc_seq;"
        "DROP FUNCTION qw_enc_switch(text, text); DROP FUNCTION qw_enc_decode(bytea, name)"
    )


@pytest.fixture
def policed(make_gateway: Callable[..., RunningGateway], objects: None) -> RunningGateway:
    policy = PolicyDocument.model_validate(
        {"identity": POLICY.identity.model_dump(by_alias=True), "rules": RULES}
    )
    return make_gateway(gate=PolicyGate(policy))


# --- every accepted encoding decodes as the server's own conversion ----------------------

SINGLES = [bytes([i]) for i in range(1, 256)]
PAIRS = [bytes([i, j]) for i in range(1, 256) for j in range(1, 256)]


def _differences(conn: psycopg.Connection, pg_name: str, python: str) -> list[object]:
    """Byte sequences the server and the Python codec read differently (None: rejected)."""
    found: list[object] = []
    groups = [SINGLES, PAIRS]
    if pg_name == "UTF8":
        # Longer sequences: every three-byte one and the four-byte leads, each around
        # the edges of the continuation range (surrogates, overlong forms, > U+10FFFF).
        edge = range(0x7F, 0xC1)
        groups.append([bytes([a, b, c]) for a in range(0xE0, 0xF0) for b in edge for c in edge])
        groups.append([bytes([a, b, 0x80, 0x80]) for a in range(0xF0, 0xF6) for b in edge])
    for group in groups:
        rows = conn.execute(
            "SELECT qw_enc_decode(b, %s) FROM unnest(%s::bytea[]) WITH ORDINALITY AS u(b, n) "
            "ORDER BY n",
            (pg_name, group),
        ).fetchall()
        assert len(rows) == len(group)
        for raw, (server,) in zip(group, rows, strict=True):
            try:
                ours: str | None = raw.decode(python)
            except UnicodeDecodeError:
                ours = None
            if ours != server:
                found.append((raw, server, ours))
    return found


@pytest.mark.parametrize("pg_name", list(encodings.ACCEPTED))
def test_accepted_encoding_decodes_every_byte_and_pair_as_the_server(
    pg: EphemeralCluster, objects: None, pg_name: str
) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        assert conn.execute("SHOW server_encoding").fetchone() == (encodings.SERVER_ENCODING,)
        # PostgreSQL does not convert SQL_ASCII: it checks the bytes against the database
        # encoding and reads them in it (convert_from(b, 'SQL_ASCII') would skip the check).
        server_name = "UTF8" if pg_name == "SQL_ASCII" else pg_name
        python = encodings.python_codec(pg_name, source="the test")
        assert _differences(conn, server_name, python) == []
        # ASCII-safe: no byte below 0x80 is ever part of a multibyte character.
        for raw in PAIRS:
            if raw[1] < 0x80 and raw[0] >= 0x80:
                try:
                    text = raw.decode(python)
                except UnicodeDecodeError:
                    continue
                assert text.endswith(chr(raw[1])), (raw, text)


@pytest.mark.parametrize(
    ("pg_name", "python"),
    [("SHIFT_JIS_2004", "shift-jis-2004"), ("EUC_JP", "euc-jp"), ("JOHAB", "johab")],
)
def test_the_comparison_finds_the_refused_encodings_differences(
    pg: EphemeralCluster, objects: None, pg_name: str, python: str
) -> None:
    """The same comparison tells why these are refused (0x5C is ¥ to Python's SJIS 2004)."""
    assert encodings.canonical(pg_name) is None
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        found = _differences(conn, pg_name, python)
    assert found
    if pg_name == "SHIFT_JIS_2004":
        assert (b"\\", "\\", "\u00a5") in found


# --- start-up --------------------------------------------------------------------------


def _start(client: RawClient, user: str = "alice", **params: str) -> Message:
    """Send the StartupMessage (and the token, if asked); return the first answer."""
    client.startup(user, **params)
    first = client.read_message()
    assert first is not None
    if first.mtype == b"R":
        client.password(token_for(user))
        answer = client.read_message()
        assert answer is not None
        return answer
    return first


def _to_ready(client: RawClient) -> list[Message]:
    """Everything up to the next ReadyForQuery (errors included)."""
    out: list[Message] = []
    while not out or out[-1].mtype != b"Z":
        out.extend(client.read_until(b"Z"))
    return out


def _bypass_attempts(client: RawClient) -> list[str]:
    """The original bypass, simple and extended protocol: what the server answered."""
    answers: list[str] = []
    sql = rb'SELECT * FROM public.U&"qw_enc_\0073ecrets"'
    client.send(codec.message(b"Q", sql + b"\0"))
    for m in _to_ready(client):
        if m.mtype in (b"D", b"E"):
            answers.append(repr(m.frame))
    calls = [
        rb'SELECT U&"pg_read_\0066ile"' + b"('/etc/hostname')",
        rb'SELECT U&"set_\0063onfig"' + b"('role', 'postgres', false)",
    ]
    for call in calls:
        client.send(
            codec.message(b"P", b"\0" + call + b"\0\0\0")
            + codec.message(b"B", b"\0\0\0\0\0\0\0\0")
            + codec.message(b"E", b"\0\0\0\0\0")
            + codec.message(b"S")
        )
        for m in _to_ready(client):
            if m.mtype in (b"D", b"E"):
                answers.append(repr(m.frame))
    return answers


def _assert_refused_encoding(answer: Message, client: RawClient, name: str) -> None:
    if answer.mtype != b"E":
        _to_ready(client)
        pytest.fail(f"a {name} session started; the bypass ran: {_bypass_attempts(client)}")
    assert answer.sqlstate == "0A000", answer.fields
    assert answer.fields["S"] == "FATAL"
    assert "UTF8" in answer.text and "LATIN1" in answer.text  # the accepted list
    assert "PGCLIENTENCODING" in answer.text
    assert client.read_message() is None  # and the connection is closed


@pytest.mark.parametrize(
    "params",
    [
        {"client_encoding": "SHIFT_JIS_2004"},
        {"client_encoding": "sjis"},
        {"client_encoding": "BIG5"},
        {"client_encoding": "GBK"},
        {"client_encoding": "EUC_JP"},
        {"options": "-c client_encoding=SHIFT_JIS_2004"},
        {"options": "--client-encoding=UHC"},
        {"CLIENT_ENCODING": "JOHAB"},
    ],
    ids=["sjis2004", "sjis", "big5", "gbk", "euc_jp", "options", "options-long", "upper"],
)
def test_an_encoding_the_gateway_cannot_read_as_the_server_is_refused_at_start_up(
    policed: RunningGateway, params: dict[str, str]
) -> None:
    with RawClient.to(policed) as client:
        _assert_refused_encoding(_start(client, **params), client, str(params))


def test_an_encoding_set_by_alter_role_is_refused_at_start_up(
    policed: RunningGateway, pg: EphemeralCluster
) -> None:
    """The server's own default for the role comes in its ParameterStatus at start-up."""
    pg.psql("ALTER ROLE qw_scram SET client_encoding = 'SHIFT_JIS_2004'")
    try:
        with RawClient.to(policed) as client:
            _assert_refused_encoding(_start(client), client, "role default SHIFT_JIS_2004")
    finally:
        pg.psql("ALTER ROLE qw_scram RESET client_encoding")
    with connect(policed) as conn:
        assert_alive(conn)


def test_standard_conforming_strings_off_by_default_is_refused_at_start_up(
    policed: RunningGateway, pg: EphemeralCluster
) -> None:
    pg.psql("ALTER ROLE qw_scram SET standard_conforming_strings = off")
    try:
        with RawClient.to(policed) as client:
            answer = _start(client)
            assert answer.mtype == b"E", answer.mtype
            assert answer.sqlstate == "0A000" and answer.fields["S"] == "FATAL"
            assert "standard_conforming_strings=off" in answer.text
            assert client.read_message() is None
    finally:
        pg.psql("ALTER ROLE qw_scram RESET standard_conforming_strings")


@pytest.mark.parametrize("encoding", ["LATIN1", "WIN1251", "KOI8R", "EUC_CN", "SQL_ASCII"])
def test_accepted_encodings_carry_their_text_through(
    policed: RunningGateway, encoding: str
) -> None:
    sample = {"LATIN1": "café", "WIN1251": "привет", "KOI8R": "привет", "EUC_CN": "中文"}
    text = sample.get(encoding, "naïve")  # SQL_ASCII: the server reads the bytes as UTF-8
    with connect(policed, client_encoding=encoding) as conn:
        # psycopg hands SQL_ASCII text out as bytes
        shown = conn.execute("SHOW client_encoding").fetchone()
        assert shown in ((encoding,), (encoding.encode(),))
        if encoding != "SQL_ASCII":
            assert conn.execute(f"SELECT '{text}'").fetchone() == (text,)
        # Drivers set the encoding the session already has; that keeps working.
        conn.execute(f"SET client_encoding TO '{encoding.lower()}'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="qw_enc_secrets"):
            conn.execute("SELECT * FROM qw_enc_secrets")


def test_sql_ascii_is_read_as_the_database_encoding(policed: RunningGateway) -> None:
    """SQL_ASCII is not converted: UTF-8 bytes are text, others are refused (as upstream)."""
    with RawClient.to(policed) as client:
        client.login("alice", client_encoding="SQL_ASCII")
        rows = data_rows(client.simple_query("SELECT 'naïve'"))
        assert rows == [["naïve"]]
        client.send(codec.message(b"Q", b"SELECT 'na\xefve'\0"))
        errors = [m for m in _to_ready(client) if m.mtype == b"E"]
        assert [(e.sqlstate, e.fields["S"]) for e in errors] == [("22021", "ERROR")]
        assert "not valid text in the session's client encoding" in errors[0].text
        assert data_rows(client.simple_query("SELECT 1")) == [["1"]]


def test_text_the_encoding_rejects_is_refused_as_the_server_would(
    policed: RunningGateway,
) -> None:
    """Invalid bytes end the statement (22021), not the session, in both protocols."""
    with RawClient.to(policed) as client:
        client.login("alice")
        client.send(codec.message(b"Q", b"SELECT '\xff'\0"))
        errors = [m for m in _to_ready(client) if m.mtype == b"E"]
        assert [(e.sqlstate, e.fields["S"]) for e in errors] == [("22021", "ERROR")]
        client.send(
            codec.message(b"P", b"s1\0SELECT '\xc3('\0\0\0")
            + codec.message(b"B", b"\0s1\0\0\0\0\0\0\0")
            + codec.message(b"E", b"\0\0\0\0\0")
            + codec.message(b"S")
        )
        answer = _to_ready(client)
        assert [(m.sqlstate, m.fields["S"]) for m in answer if m.mtype == b"E"] == [
            ("22021", "ERROR")
        ]
        assert answer[-1].mtype == b"Z"
        assert data_rows(client.simple_query("SELECT 2")) == [["2"]]
        # A name that does not decode (Bind, Describe, Execute) cannot be tracked: FATAL.
        client.send(codec.message(b"B", b"\xff\0\0\0\0\0\0\0\0"))
        errors = [m for m in client.read_to_close() if m.mtype == b"E"]
        assert [(e.sqlstate, e.fields["S"]) for e in errors] == [("22021", "FATAL")]


# --- changes in the session --------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SET client_encoding TO 'LATIN1'",
        "SET SESSION client_encoding = 'SJIS'",
        "SET LOCAL client_encoding = 'WIN1252'",
        "SET NAMES 'SHIFT_JIS_2004'",
        "SET \"CLIENT_ENCODING\" TO 'latin1'",
        "SET client_encoding = 6",
        "SELECT 1; SET client_encoding TO 'KOI8R'",
        "SET standard_conforming_strings = off",
        "SET standard_conforming_strings TO 0",
        "SET LOCAL standard_conforming_strings = 'false'",
    ],
)
def test_a_change_of_how_text_is_read_is_refused(policed: RunningGateway, sql: str) -> None:
    with connect(policed) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as refused:
            conn.execute(sql)
        diag = refused.value.diag
        assert diag.message_hint is not None and "PGCLIENTENCODING" in diag.message_hint
        conn.rollback()
        assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)
        assert conn.execute("SHOW standard_conforming_strings").fetchone() == ("on",)


# A setting name the gateway cannot see is refused by the policy engine itself (42501),
# before the encoding check: which setting it is decides how a change is judged.
_UNNAMED = (psycopg.errors.InsufficientPrivilege, "a setting whose name querywarden cannot see")


@pytest.mark.parametrize(
    ("sql", "params", "refusal"),
    [
        ("SELECT set_config('client_encoding', 'LATIN1', false)", None, None),
        ("SELECT set_config('Client_Encoding', 'SJIS', true)", None, None),
        ("SELECT set_config('standard_conforming_strings', 'off', false)", None, None),
        ("SELECT set_config(%s, 'SJIS', false)", ("client_encoding",), _UNNAMED),
        ("SELECT set_config('client_encoding', %s, false)", ("SJIS",), None),
        (
            "UPDATE pg_settings SET setting = 'SJIS' WHERE name = 'client_encoding'",
            None,
            _UNNAMED,
        ),
    ],
)
def test_set_config_of_how_text_is_read_is_refused_even_where_set_config_is_allowed(
    policed: RunningGateway,
    sql: str,
    params: tuple[str, ...] | None,
    refusal: tuple[type[psycopg.Error], str] | None,
) -> None:
    error, message = refusal or (psycopg.errors.FeatureNotSupported, "not run")
    with connect(policed, user="bob") as conn:
        with pytest.raises(error, match=message):
            conn.execute(sql, params)
        conn.rollback()
        assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)
        # set_config of another setting is still the rules' business.
        assert conn.execute("SELECT set_config('application_name', 'x', false)").fetchone()


@pytest.mark.parametrize(
    "sql",
    [
        "SET client_encoding TO 'UTF8'",
        "SET client_encoding = 'utf-8'",
        "SET NAMES 'unicode'",
        "SET client_encoding TO DEFAULT",
        "RESET client_encoding",
        "RESET ALL",
        "DISCARD ALL",
        "SET standard_conforming_strings = on",
        "RESET standard_conforming_strings",
    ],
)
def test_settings_that_keep_the_reading_run(policed: RunningGateway, sql: str) -> None:
    with connect(policed, user="bob") as conn:  # RESET ALL resets the role: bob may
        conn.execute(sql)
        assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)
        assert conn.execute("SHOW standard_conforming_strings").fetchone() == ("on",)
        assert conn.execute("SELECT count(*) FROM qw_enc_open").fetchone() == (0,)


def test_a_change_pipelined_before_a_statement_never_runs(policed: RunningGateway) -> None:
    """The SET and the statement behind it arrive in one write; neither is read twice."""
    with RawClient.to(policed) as client:
        client.login("alice")
        client.send(
            codec.query("SET client_encoding TO 'SHIFT_JIS_2004'")
            + codec.message(b"Q", rb'SELECT * FROM public.U&"qw_enc_\0073ecrets"' + b"\0")
        )
        first = _to_ready(client)
        second = _to_ready(client)
        assert [m.sqlstate for m in first if m.mtype == b"E"] == ["0A000"]
        # Refused too (its ErrorResponse is the policy's, or the sentinel's syntax error
        # when the refusal is pipelined behind another: a relay matter, not this one's).
        assert len([m for m in second if m.mtype == b"E"]) == 1
        assert not [m for m in second if m.mtype == b"D"]


# --- the backstop: the server reports a change the gateway did not see ------------------


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("client_encoding", "SJIS"),
        ("client_encoding", "LATIN1"),
        ("standard_conforming_strings", "off"),
    ],
)
def test_a_change_made_by_a_function_ends_the_session(
    policed: RunningGateway, setting: str, value: str
) -> None:
    with RawClient.to(policed) as client:
        client.login("alice")
        # The function is vouched for (allow.functions), and its body is the server's.
        client.send(codec.query(f"SELECT qw_enc_switch('{setting}', '{value}')"))
        messages = client.read_to_close()
    errors = [m for m in messages if m.mtype == b"E"]
    assert len(errors) == 1, [m.mtype for m in messages]
    assert errors[0].sqlstate == "0A000" and errors[0].fields["S"] == "FATAL"
    assert setting in errors[0].text
    with connect(policed) as conn:
        assert_alive(conn)


# --- the server and the gateway read string syntax alike ---------------------------------


@pytest.mark.parametrize(
    ("sql", "rows"),
    [
        # E'' strings: \' is a quote inside the string, for both.
        (
            r"SELECT E'a\'; SELECT * FROM qw_enc_secrets; --'",
            [["a'; SELECT * FROM qw_enc_secrets; --"]],
        ),
        (
            r"SELECT E'\x27 || (SELECT secret FROM qw_enc_secrets)'",
            [["' || (SELECT secret FROM qw_enc_secrets)"]],
        ),
        # Plain strings: a backslash is a backslash (standard_conforming_strings is on).
        (r"SELECT 'a\\', 'b'", [["a\\\\", "b"]]),
        # U& strings and identifiers with their own escape character.
        (r"SELECT U&'!0027 OR 1=1' UESCAPE '!'", [["' OR 1=1"]]),
        (r'SELECT note FROM U&"qw_enc_!006fpen" UESCAPE ' + "'!' WHERE false", []),
    ],
)
def test_string_syntax_is_read_alike(policed: RunningGateway, sql: str, rows: list[object]) -> None:
    with RawClient.to(policed) as client:
        client.login("alice")
        assert data_rows(client.simple_query(sql)) == rows


@pytest.mark.parametrize(
    "sql",
    [
        r"SELECT 'a\'; SELECT * FROM qw_enc_secrets; --'",
        r'SELECT * FROM U&"qw_enc_!0073ecrets" UESCAPE ' + "'!'",
        r'SELECT * FROM public.U&"qw_enc_\0073ecrets"',
    ],
)
def test_escapes_that_spell_a_denied_name_are_read_as_the_server_reads_them(
    policed: RunningGateway, sql: str
) -> None:
    with (
        connect(policed) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="qw_enc_secrets"),
    ):
        conn.execute(sql)


# --- names in string arguments are folded and cut as the server does ------------------------


@pytest.mark.parametrize(
    "sql",
    [
        # regclass folds A-Z only: É stays upper case for the server.
        "SELECT table_to_xml('public.QW_ENC_sécrÉts', true, false, '')",
        "SELECT table_to_xml('public.qw_enc_sécrÉts', true, false, '')",
        # and cuts names to 63 bytes, as it does identifiers.
        f"SELECT table_to_xml('public.{LONG_NAME}q', true, false, '')",
        f"SELECT table_to_xml('public.\"{LONG_NAME}qqq\"', true, false, '')",
    ],
)
def test_a_name_in_a_string_is_read_as_the_server_reads_it(
    policed: RunningGateway, pg: EphemeralCluster, sql: str
) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as direct:
        # What the server reads: one of the denied tables.
        assert "hunter" in str(direct.execute(sql).fetchone())
    with (
        connect(policed) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="denied"),
    ):
        conn.execute(sql)


def test_a_regclass_of_digits_is_an_oid_not_a_name(
    policed: RunningGateway, pg: EphemeralCluster
) -> None:
    oid = pg.psql("SELECT 'qw_enc_secrets'::regclass::oid").strip()
    sql = f"SELECT table_to_xml('{oid}', true, false, '')"
    with psycopg.connect(pg.dsn(), autocommit=True) as direct:
        assert "hunter2" in str(direct.execute(sql).fetchone())
    with connect(policed) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(sql)


def test_codec_names_resolve_as_postgresql_names_them() -> None:
    assert encodings.canonical("utf-8") == "UTF8"
    assert encodings.canonical("ISO-8859-1") == "LATIN1"
    assert encodings.canonical("Windows-1251") == "WIN1251"
    assert encodings.canonical("shift_jis_2004") is None
    for python in encodings.ACCEPTED.values():
        codecs.lookup(python)


# --- the audit records the text the server read ------------------------------------------


def test_the_audit_records_values_in_the_client_encoding(
    make_gateway: Callable[..., RunningGateway], objects: None, tmp_path: Path
) -> None:
    """KOI8-R "д─" is the bytes C4 80, which UTF-8 would read as "Ā"."""
    policy = PolicyDocument.model_validate(
        {"identity": POLICY.identity.model_dump(by_alias=True), "rules": RULES}
    )
    directory = tmp_path / "audit"
    gw = make_gateway(policy=policy, audit={"directory": str(directory), "sampleRows": 3})
    with connect(gw, client_encoding="KOI8R") as conn:
        assert conn.execute("SELECT %s::text AS v", ["д─"]).fetchone() == ("д─",)
    records: list[dict[str, Any]] = []
    for _ in range(200):  # the session's end is written when the gateway sees it close
        records = list(read_records(directory))
        if any(r["type"] == "session.end" for r in records):
            break
        time.sleep(0.05)
    executes = [r for r in records if r["type"] == "statement.request" and r["kind"] == "execute"]
    assert [e["parameters"] for e in executes] == [["д─"]]
    results = {r["statement_id"]: r for r in records if r["type"] == "statement.result"}
    assert results[executes[0]["statement_id"]]["sample"] == [["д─"]]


#: SQL the gateway reads as a SELECT of strings, and the server, once a function switched
#: the setting, as a SELECT that calls nextval (which no rollback undoes).
#: SJIS: "ぁ" is E3 81 81 in UTF-8; to SJIS, 81 5C is one character, so the backslash that
#: escapes the quote is gone. standard_conforming_strings off: the backslash in 'a\\'
#: escapes the quote after it.
TRICKS = {
    "client_encoding": "SELECT E'\u3041\\', nextval($s$qw_enc_seq$s$) --'".encode(),
    "standard_conforming_strings": b"SELECT 'a\\' || ', nextval($s$qw_enc_seq$s$) --'",
}
SWITCHES = [("client_encoding", "SJIS"), ("standard_conforming_strings", "off")]


def _sequence(pg: EphemeralCluster) -> str:
    return pg.psql("SELECT last_value, is_called FROM qw_enc_seq").strip()


@pytest.mark.parametrize(("setting", "value"), SWITCHES)
def test_sql_pipelined_behind_a_function_that_changes_how_text_is_read_never_runs(
    policed: RunningGateway, pg: EphemeralCluster, setting: str, value: str
) -> None:
    """Such text is read only once the server has answered the Query before it."""
    before = _sequence(pg)
    with RawClient.to(policed) as client:
        client.login("alice")
        client.send(
            codec.query(f"SELECT qw_enc_switch('{setting}', '{value}')")
            + codec.message(b"Q", TRICKS[setting] + b"\0")
        )
        messages = client.read_to_close()
    errors = [m for m in messages if m.mtype == b"E"]
    assert [(e.sqlstate, e.fields["S"]) for e in errors] == [("0A000", "FATAL")]
    # The server never received it (it would have called nextval after the switch).
    assert _sequence(pg) == before


@pytest.mark.parametrize(("setting", "value"), SWITCHES)
def test_such_sql_pipelined_behind_an_execute_without_sync_is_refused(
    policed: RunningGateway, pg: EphemeralCluster, setting: str, value: str
) -> None:
    """No ReadyForQuery comes between an Execute and the Parse after it: refuse the Parse."""
    before = _sequence(pg)
    call = f"SELECT qw_enc_switch('{setting}', '{value}')".encode()
    unnamed_run = codec.message(b"B", b"\0\0\0\0\0\0\0\0") + codec.message(b"E", b"\0\0\0\0\0")
    with RawClient.to(policed) as client:
        client.login("alice")
        client.send(
            codec.message(b"P", b"\0" + call + b"\0\0\0")
            + unnamed_run
            + codec.message(b"P", b"\0" + TRICKS[setting] + b"\0\0\0")
            + unnamed_run
            + codec.message(b"S")
        )
        messages = _to_ready(client)
        errors = [m for m in messages if m.mtype == b"E"]
        assert [(e.sqlstate, e.fields["S"]) for e in errors] == [("0A000", "ERROR")]
        assert "Sync" in errors[0].fields["H"]
        # The error ended the implicit transaction, and the function's change with it.
        shown = data_rows(client.simple_query(f"SHOW {setting}"))
        assert shown == [["UTF8" if setting == "client_encoding" else "on"]]
    assert _sequence(pg) == before


def test_plain_ascii_pipelines_are_not_held(policed: RunningGateway) -> None:
    """Text without non-ASCII bytes or backslashes reads alike in every case: it flows."""
    with RawClient.to(policed) as client:
        client.login("alice")
        client.send(
            codec.parse("", "SELECT 1")
            + codec.message(b"B", b"\0\0\0\0\0\0\0\0")
            + codec.message(b"E", b"\0\0\0\0\0")
            + codec.parse("", "SELECT 2")
            + codec.message(b"B", b"\0\0\0\0\0\0\0\0")
            + codec.message(b"E", b"\0\0\0\0\0")
            + codec.message(b"S")
            + codec.query("SELECT 3")
            + codec.query("SELECT 'caf\u00e9'")
        )
        answers = [_to_ready(client) for _ in range(3)]
    rows = [data_rows(a) for a in answers]
    assert rows == [[["1"], ["2"]], [["3"]], [["caf\u00e9"]]]


def test_text_after_an_extended_protocol_copy_is_not_held_forever(
    policed: RunningGateway,
) -> None:
    """The Sync pipelined behind COPY FROM STDIN is ignored by the server: none is owed."""
    with RawClient.to(policed) as client:
        client.login("bob")
        client.send(
            codec.parse("", "COPY qw_enc_open FROM STDIN")
            + codec.message(b"B", b"\0\0\0\0\0\0\0\0")
            + codec.message(b"E", b"\0\0\0\0\0")
            + codec.message(b"S")
        )
        assert client.read_until(b"G")[-1].mtype == b"G"
        client.send(codec.message(b"c") + codec.message(b"S"))
        assert _to_ready(client)[-1].mtype == b"Z"
        assert data_rows(client.simple_query("SELECT 'caf\u00e9'")) == [["caf\u00e9"]]
