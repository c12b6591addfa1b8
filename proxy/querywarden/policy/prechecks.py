"""Before a statement is held for an approver: checks of whether the server would run it.

A human is asked only about statements that would run. Two kinds are checked with the
server on a side connection (the session's upstream, role and database), where the
statement itself is never executed:

* DML and queries (SELECT, INSERT, UPDATE, DELETE, MERGE): Parse and Describe. Parse
  analysis resolves every table, column, function and type, so a misspelt name fails
  there with the server's own error, which the client then gets instead of a hold.
* ``DROP ... IF EXISTS`` of relations, schemas and types: a lookup in the catalog. When
  none of the objects exists the statement only raises a NOTICE, so it is not held.

Everything else (utility statements: most DDL) is held as before: PostgreSQL parses a
utility statement without looking up its names, so Parse would say nothing.

A side connection sees what is committed, not the session itself: its open transaction,
its temporary tables, the order of its search_path. :func:`check_before_hold` therefore
asks for a check only when none of that can change the answer, and the I/O side trusts
a failure only when it is one that depends on the catalog alone. In every other case,
and whenever the check itself fails, the statement is held as before (fail closed).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import asyncpg
import pglast.parser as _pg

from querywarden.analysis import QualifiedName, StatementSummary
from querywarden.hooks import WireState
from querywarden.upstream import UpstreamTarget, side_connection

log = logging.getLogger(__name__)

#: Statements Parse analysis resolves completely.
_PARSED_COMMANDS: Final = frozenset({"select", "insert", "update", "delete", "merge"})

#: DROP object types whose existence is one catalog lookup by name.
_DROPPED_KINDS: Final[dict[str, Literal["relation", "schema", "type"]]] = {
    "OBJECT_TABLE": "relation",
    "OBJECT_VIEW": "relation",
    "OBJECT_MATVIEW": "relation",
    "OBJECT_INDEX": "relation",
    "OBJECT_SEQUENCE": "relation",
    "OBJECT_FOREIGN_TABLE": "relation",
    "OBJECT_SCHEMA": "schema",
    "OBJECT_TYPE": "type",
    "OBJECT_DOMAIN": "type",
}

#: Errors of Parse that depend on the catalog alone, not on the session: syntax and
#: name resolution (class 42) and a missing schema (3F000). Not 42501: privileges depend
#: on the role the session may have SET.
_TRUSTED_CLASS: Final = "42"
_TRUSTED_CODES: Final = frozenset({"3F000"})
_UNTRUSTED_CODES: Final = frozenset({"42501"})

#: ErrorResponse field codes of asyncpg's exception attributes (the protocol's names).
_FIELD_CODES: Final = (
    ("S", "severity"),
    ("V", "severity_en"),
    ("C", "sqlstate"),
    ("M", "message"),
    ("D", "detail"),
    ("H", "hint"),
    ("P", "position"),
    ("p", "internal_position"),
    ("q", "internal_query"),
    ("W", "context"),
    ("s", "schema_name"),
    ("t", "table_name"),
    ("c", "column_name"),
    ("d", "data_type_name"),
    ("n", "constraint_name"),
    ("F", "server_source_filename"),
    ("L", "server_source_line"),
    ("R", "server_source_function"),
)

#: How long one check may take, and how long it may wait for a lock (Parse takes the
#: locks its statement would: an ALTER TABLE in progress would block it).
CHECK_TIMEOUT: Final = 5.0
LOCK_TIMEOUT_MS: Final = 2000


@dataclass(frozen=True, slots=True)
class ParseCheck:
    """Parse and Describe the statement; a failure is the server's answer to the client."""

    #: Exactly the text the client sent, so the error's position points into it.
    text: str
    #: The session's search_path (one schema: its order is then known).
    search_path: str
    #: Relations named without a schema or in pg_temp: a temporary table of the session,
    #: which the side connection cannot see, could stand behind any of them.
    unqualified: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AbsenceCheck:
    """``DROP ... IF EXISTS``: a no-op when none of its objects exists."""

    kind: Literal["relation", "schema", "type"]
    names: tuple[QualifiedName, ...]
    #: Every schema the session's search_path may hold, for unqualified names.
    search_path: tuple[str, ...]


Check = ParseCheck | AbsenceCheck


@dataclass(frozen=True, slots=True)
class Checked:
    """What the server would do with the statement.

    ``refused``: it fails at once (``error`` holds the server's ErrorResponse fields);
    ``no-op``: it does nothing; ``hold``: it would run, or the check cannot tell.
    """

    outcome: Literal["refused", "no-op", "hold"]
    error: dict[str, str] | None = None


HOLD: Final = Checked("hold")
NO_OP: Final = Checked("no-op")


def check_before_hold(
    kind: str,
    text: str,
    summaries: Sequence[StatementSummary],
    wire: WireState,
    search_path: Sequence[str],
) -> Check | None:
    """The check that may spare a human this statement, or None: hold it as before."""
    if kind not in ("query", "parse") or len(summaries) != 1 or not wire.settled:
        # Several statements: an earlier one may create what a later one names. In a
        # transaction block: the session's uncommitted changes are not visible elsewhere.
        return None
    if any(schema in ("*", "$user") for schema in search_path):
        return None
    summary = summaries[0]
    if summary.command in _PARSED_COMMANDS:
        if len(search_path) != 1:
            # The session put more schemas on its path: which comes first is not known,
            # so a name missing on one order may resolve on the other.
            return None
        names = summary.reads | summary.writes
        unqualified = sorted(
            {n.name for n in names if _maybe_temporary(n.schema) and n.name != "*"}
        )
        return ParseCheck(text, search_path[0], tuple(unqualified))
    if summary.command == "ddl:drop" and kind == "query":
        # Only a simple Query runs as it is decided: a Parse prepares a statement the
        # client may execute much later, when the object may exist.
        return _absence_check(text, tuple(search_path))
    return None


def _maybe_temporary(schema: str | None) -> bool:
    return schema is None or schema.startswith("pg_temp")


def _absence_check(text: str, search_path: tuple[str, ...]) -> AbsenceCheck | None:
    try:
        tree = json.loads(_pg.parse_sql_json(text))
        (statement,) = tree["stmts"]
        drop = statement["stmt"]["DropStmt"]
    except Exception:  # anything unexpected: no check, the statement is held
        return None
    kind = _DROPPED_KINDS.get(drop.get("removeType", ""))
    if kind is None or not drop.get("missing_ok"):
        return None
    names = [_object_name(kind, obj) for obj in drop.get("objects", ())]
    if not names or any(n is None for n in names):
        return None
    return AbsenceCheck(kind, tuple(n for n in names if n is not None), search_path)


def _object_name(kind: str, obj: Any) -> QualifiedName | None:
    """The name of one DROP object as the parser gives it; None for a shape not handled."""
    if not isinstance(obj, dict):
        return None
    if kind == "schema":
        value = obj.get("String", {}).get("sval")
        return QualifiedName(None, value) if isinstance(value, str) else None
    if kind == "type":
        type_name = obj.get("TypeName")
        if not isinstance(type_name, dict) or set(type_name) - {"names", "typemod", "location"}:
            return None  # arrays, %TYPE, type modifiers: not a plain name
        items = type_name.get("names", ())
    else:
        items = obj.get("List", {}).get("items", ())
    parts = [item.get("String", {}).get("sval") for item in items if isinstance(item, dict)]
    if not parts or len(parts) != len(items) or not all(isinstance(p, str) for p in parts):
        return None
    if len(parts) == 1:
        return QualifiedName(None, parts[0])
    if len(parts) == 2:
        return QualifiedName(parts[0], parts[1])
    return None  # database.schema.name: not checked


def _trusted(sqlstate: str) -> bool:
    if sqlstate in _UNTRUSTED_CODES:
        return False
    return sqlstate.startswith(_TRUSTED_CLASS) or sqlstate in _TRUSTED_CODES


def error_fields(exc: asyncpg.PostgresError) -> dict[str, str]:
    """The server's ErrorResponse fields of an asyncpg error, by their protocol codes."""
    fields: dict[str, str] = {}
    for code, attribute in _FIELD_CODES:
        value = getattr(exc, attribute, None)
        if value is not None:
            fields[code] = str(value)
    return fields


_TEMPORARY_NAMED: Final = (
    "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname LIKE 'pg\\_temp\\_%' AND c.relname = ANY($1::text[]::name[]))"
)
_RELATION_EXISTS: Final = (
    "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relname = $1::text::name AND (n.nspname = ANY($2::text[]::name[]) "
    "OR ($3 AND n.nspname LIKE 'pg\\_temp\\_%')))"
)
_TYPE_EXISTS: Final = (
    "SELECT EXISTS (SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
    "WHERE t.typname = $1::text::name AND (n.nspname = ANY($2::text[]::name[]) "
    "OR ($3 AND n.nspname LIKE 'pg\\_temp\\_%')))"
)
_SCHEMA_EXISTS: Final = "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1::text::name)"


class ServerCheck:
    """Runs checks on side connections (one per upstream, role and database), in turn.

    Names are compared as the server compares them: cast to ``name`` on the server, so
    an identifier longer than 63 bytes is truncated exactly as the statement's would be.
    """

    def __init__(self, *, timeout: float = CHECK_TIMEOUT) -> None:
        self._timeout = timeout
        self._connections: dict[tuple[str, int, str, str], asyncpg.Connection] = {}
        self._locks: dict[tuple[str, int, str, str], asyncio.Lock] = {}

    async def run(self, target: UpstreamTarget, database: str, check: Check) -> Checked:
        """What the server would do; raises when it cannot be asked (the caller holds)."""
        key = (target.host, target.port, target.user, database)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            conn = self._connections.get(key)
            if conn is None or conn.is_closed():
                conn = await side_connection(target, database, "querywarden-checks")
                self._connections[key] = conn
            try:
                async with asyncio.timeout(self._timeout):
                    if isinstance(check, ParseCheck):
                        return await self._parse(conn, check)
                    return NO_OP if await self._absent(conn, check) else HOLD
            except BaseException:
                # Its state is unknown (a timeout mid-transaction): start afresh next time.
                self._connections.pop(key, None)
                conn.terminate()
                raise

    async def _parse(self, conn: asyncpg.Connection, check: ParseCheck) -> Checked:
        try:
            # Read only and rolled back: Parse and Describe run nothing, and nothing the
            # server might do on their behalf outlives the check.
            async with conn.transaction(readonly=True):
                await conn.execute(
                    "SELECT set_config('search_path', $1, true), "
                    "set_config('lock_timeout', $2, true)",
                    _quoted(check.search_path),
                    f"{LOCK_TIMEOUT_MS}ms",
                )
                await conn.prepare(check.text)
                raise _RolledBack
        except _RolledBack:
            return HOLD
        except asyncpg.PostgresError as exc:
            fields = error_fields(exc)
        if not _trusted(fields.get("C", "")):
            log.info("checks: Parse failed with %s, which may depend on the session", fields)
            return HOLD
        if check.unqualified and await conn.fetchval(_TEMPORARY_NAMED, list(check.unqualified)):
            return HOLD  # the session's own temporary table could be the one it names
        return Checked("refused", fields)

    async def _absent(self, conn: asyncpg.Connection, check: AbsenceCheck) -> bool:
        for name in check.names:
            if check.kind == "schema":
                found = await conn.fetchval(_SCHEMA_EXISTS, name.name)
            else:
                if name.schema is None:
                    schemas = [*check.search_path, "pg_catalog"]
                    temporary = True
                else:
                    schemas = [name.schema]
                    temporary = name.schema.startswith("pg_temp")
                query = _RELATION_EXISTS if check.kind == "relation" else _TYPE_EXISTS
                found = await conn.fetchval(query, name.name, schemas, temporary)
            if found:
                return False
        return True

    async def close(self) -> None:
        """Close the side connections."""
        for conn in list(self._connections.values()):
            await conn.close()
        self._connections.clear()


class _RolledBack(Exception):
    """Leaves the check's transaction by rolling it back."""


def _quoted(schema: str) -> str:
    """A schema name as search_path reads it (always quoted: the name is exact)."""
    return '"' + schema.replace('"', '""') + '"'
