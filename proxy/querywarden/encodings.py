r"""The client encodings the gateway reads exactly as PostgreSQL does. Sans-I/O.

The policy decides on the text the gateway decodes from a client's bytes; the server runs
the text its own conversion to the database encoding gives. The two must be the same
text, or a statement is judged on one reading and run on another: Python's
``shift-jis-2004`` codec reads byte 0x5C as a yen sign where PostgreSQL reads a backslash,
so ``U&"\0073ecrets"`` was ``"¥0073ecrets"`` to the policy and ``secrets`` to the server.

So a session may use only the encodings listed in :data:`ACCEPTED`: those whose Python
codec decodes every byte and every byte pair to the same text as PostgreSQL's conversion
to UTF8 and rejects the same sequences (tests/test_encodings.py checks this against the
server with ``convert_from``), and that are ASCII-safe (a byte below 0x80 is always that
ASCII character, never part of a multibyte one), so quotes, backslashes and keywords are
the same bytes in every accepted encoding. The multibyte encodings whose characters may
end in an ASCII byte (SJIS, SHIFT_JIS_2004, BIG5, GBK, GB18030, UHC, JOHAB) and those
whose tables differ from Python's (EUC_JP, EUC_JIS_2004, EUC_KR) are refused, as are
encodings Python has no codec for (EUC_TW, MULE_INTERNAL).

The table holds for a UTF8 database, the only server encoding the gateway serves: with a
single-byte server encoding PostgreSQL also case-folds non-ASCII letters of identifiers,
which the analyzer (PostgreSQL's parser, configured for UTF8) does not.
"""

from __future__ import annotations

from typing import Final

from querywarden.errors import QuerywardenError

#: The only database encoding the gateway serves (``server_encoding``).
SERVER_ENCODING: Final = "UTF8"

#: Accepted client encodings, as PostgreSQL names them -> the Python codec that decodes
#: them as PostgreSQL does (for a UTF8 database).
ACCEPTED: Final[dict[str, str]] = {
    "UTF8": "utf-8",
    # PostgreSQL does not convert SQL_ASCII: it checks the bytes are valid in the database
    # encoding and reads them as such, so for a UTF8 database they are UTF-8.
    "SQL_ASCII": "utf-8",
    "LATIN1": "latin-1",
    "LATIN2": "iso8859-2",
    "LATIN3": "iso8859-3",
    "LATIN4": "iso8859-4",
    "LATIN5": "iso8859-9",
    "LATIN6": "iso8859-10",
    "LATIN7": "iso8859-13",
    "LATIN8": "iso8859-14",
    "LATIN9": "iso8859-15",
    "LATIN10": "iso8859-16",
    "ISO_8859_5": "iso8859-5",
    "ISO_8859_6": "iso8859-6",
    "ISO_8859_7": "iso8859-7",
    "ISO_8859_8": "iso8859-8",
    "WIN866": "cp866",
    "WIN874": "cp874",
    **{f"WIN{n}": f"cp{n}" for n in range(1250, 1259)},
    "KOI8R": "koi8-r",
    "KOI8U": "koi8-u",
    "EUC_CN": "gb2312",
}

# PostgreSQL's names for the accepted encodings, as its encoding-name lookup compares
# them: lower case, letters and digits only ("UTF-8", "utf_8" and "Unicode" are UTF8).
# A name PostgreSQL knows and this table does not is refused: the safe side.
_ALIASES: Final[dict[str, str]] = {
    "utf8": "UTF8",
    "unicode": "UTF8",
    "sqlascii": "SQL_ASCII",
    **{f"latin{n}": f"LATIN{n}" for n in range(1, 11)},
    "iso88591": "LATIN1",
    "iso88592": "LATIN2",
    "iso88593": "LATIN3",
    "iso88594": "LATIN4",
    "iso88599": "LATIN5",
    "iso885910": "LATIN6",
    "iso885913": "LATIN7",
    "iso885914": "LATIN8",
    "iso885915": "LATIN9",
    "iso885916": "LATIN10",
    **{f"iso8859{n}": f"ISO_8859_{n}" for n in range(5, 9)},
    "win866": "WIN866",
    "windows866": "WIN866",
    "alt": "WIN866",
    "win874": "WIN874",
    "windows874": "WIN874",
    **{f"win{n}": f"WIN{n}" for n in range(1250, 1259)},
    **{f"windows{n}": f"WIN{n}" for n in range(1250, 1259)},
    "win": "WIN1251",
    "abc": "WIN1258",
    "tcvn": "WIN1258",
    "tcvn5712": "WIN1258",
    "vscii": "WIN1258",
    "koi8": "KOI8R",
    "koi8r": "KOI8R",
    "koi8u": "KOI8U",
    "euccn": "EUC_CN",
}

_HINT: Final = (
    "connect with an accepted encoding, e.g. PGCLIENTENCODING=UTF8 or client_encoding=UTF8 "
    "in the connection string"
)


class EncodingRefused(QuerywardenError):
    """A client encoding (or string syntax) the gateway cannot read as the server does.

    Not a :class:`ProtocolViolation`: the bytes are well formed, the session is refused on
    purpose (and a server's report of such a change is no malformed message).
    """

    default_sqlstate = "0A000"


def accepted_list() -> str:
    """The accepted encodings, for messages."""
    return ", ".join(ACCEPTED)


def canonical(name: str) -> str | None:
    """PostgreSQL's name for an accepted encoding given by any of its names, else None."""
    cleaned = "".join(c for c in name.lower() if c.isascii() and c.isalnum())
    return _ALIASES.get(cleaned)


def python_codec(name: str, *, source: str) -> str:
    """The Python codec for an accepted client encoding; EncodingRefused for any other.

    ``source`` says where the name came from, for the message (``"the start-up
    parameters"``, ``"the server"``).
    """
    found = canonical(name)
    if found is None:
        raise EncodingRefused(
            f"querywarden: client_encoding {name!r} (from {source}) is not accepted: the "
            "gateway decides on the text it decodes, and only reads these encodings exactly "
            f"as PostgreSQL does: {accepted_list()}. {_HINT}"
        )
    return ACCEPTED[found]


def check_startup_settings(settings: dict[str, str]) -> None:
    """Refuse (0A000) a client_encoding the client asks for at start-up, if not accepted."""
    requested = settings.get("client_encoding")
    if requested is not None:
        python_codec(requested, source="the start-up parameters")


def check_server_parameters(parameters: dict[str, str]) -> str:
    """Check what the server reported at start-up; return the session's client_encoding.

    The server's own defaults (ALTER ROLE / DATABASE ... SET) apply after the client's
    start-up parameters were checked, so its report is what counts.
    """
    server = parameters.get("server_encoding", SERVER_ENCODING)
    if server.upper() != SERVER_ENCODING:
        raise EncodingRefused(
            f"querywarden: the database's server_encoding is {server}; the gateway serves "
            f"only {SERVER_ENCODING} databases, where it reads statements as PostgreSQL does"
        )
    check_string_syntax(parameters.get("standard_conforming_strings", "on"))
    name = parameters.get("client_encoding", "UTF8")
    python_codec(name, source="the server")
    return canonical(name) or name


def check_string_syntax(value: str) -> None:
    r"""Refuse a session whose server reads backslashes in plain string literals.

    The analyzer reads ``'...'`` as PostgreSQL does with standard_conforming_strings on;
    with it off, ``'x\'; DELETE ...`` is one string to the gateway and a DELETE to the
    server.
    """
    if not is_true(value):
        raise EncodingRefused(
            f"querywarden: the server reports standard_conforming_strings={value}; the "
            "gateway reads string literals only as PostgreSQL does with it on, so the "
            "session is closed. Ask the database's owner to remove the setting that turns "
            "it off (ALTER ROLE / DATABASE ... RESET standard_conforming_strings)"
        )


def is_true(value: str) -> bool:
    """Whether PostgreSQL reads a boolean setting's text as true (prefixes included)."""
    text = value.strip().lower()
    return text in ("on", "1") or (
        text != "" and ("true".startswith(text) or "yes".startswith(text))
    )


def setting_refusal(name: str, value: str | None, client_encoding: str) -> str | None:
    """Why a statement may not give ``name`` this value (``None``: it may).

    client_encoding may only be set to the encoding the session already has (drivers do
    that): a change would make the server read the messages that follow, some perhaps
    already pipelined behind it, in another encoding than the gateway. The
    standard_conforming_strings setting may only be turned on.
    """
    if name == "client_encoding":
        if value is not None and canonical(value) == client_encoding:
            return None
        shown = "a value the gateway cannot see" if value is None else repr(value)
        return (
            f"changing client_encoding (to {shown}) is refused: the gateway reads the whole "
            f"session in the encoding it started with ({client_encoding}), as the server "
            "must, so that both read the same statements"
        )
    if value is not None and is_true(value):
        return None
    return (
        "turning standard_conforming_strings off is refused: the server would then read "
        "backslashes in '...' strings as escapes, and a statement would mean something "
        "else to the server than to the gateway that checked it"
    )


#: What a client refused by :func:`setting_refusal` can do instead.
SETTING_HINT: Final = (
    "set client_encoding when connecting (PGCLIENTENCODING, or client_encoding in the "
    f"connection string), to one of: {accepted_list()}; keep standard_conforming_strings on "
    "and write backslash escapes as E'...' strings"
)
