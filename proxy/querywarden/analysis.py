"""SQL analysis: what each statement would do, found before it reaches the database.

:func:`analyze` turns SQL text into one :class:`StatementSummary` per statement: every
operation, relation, function and column reference *anywhere* in the parse tree (CTEs,
subqueries, set operations, EXPLAIN's and PREPARE's inner statements, rule actions,
SQL-standard function bodies). The policy engine decides on these summaries; this module
only describes, it never allows or refuses.

The parser is PostgreSQL's own (libpg_query, through pglast), so identifiers come out as
the server resolves them: unquoted names lower-cased, quoted names as written, ``U&"..."``
decoded. Text the parser rejects raises :class:`AnalysisError`, and the gateway refuses
it: what cannot be analyzed does not run.

The module is sans-I/O: it knows nothing about the catalog. Unqualified names are
reported unqualified (``schema=None``) and must be resolved against the session's
``search_path`` by the caller; what a view, trigger, rule or user-defined function does
inside the server is not visible here (see :attr:`StatementSummary.opaque`).

:class:`Analyzer` caches summaries by statement *shape*. The key is the statement with its
constants replaced by ``$n`` (libpg_query's normalization), not the bare pglast
fingerprint: the fingerprint ignores schema names, aliases and the names of prepared
statements, cursors, channels and grantees, which would confuse ``public.t`` with
``secret.t``. Summaries that depend on a constant's value (``set_config('role', ...)``,
``query_to_xml('SELECT ...')``) are cached by their exact text only.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import pglast.parser as _pg

__all__ = [
    "MODELED_FUNCTIONS",
    "AnalysisError",
    "Analyzer",
    "ColumnRef",
    "QualifiedName",
    "StatementSummary",
    "analyze",
    "sanitized_text",
]

#: SQLSTATE of text the parser rejects.
SYNTAX_ERROR: Final = "42601"
#: SQLSTATE of input the analyzer cannot describe (fail closed).
FEATURE_NOT_SUPPORTED: Final = "0A000"
#: SQLSTATE of statements nested too deeply to analyze.
STATEMENT_TOO_COMPLEX: Final = "54001"
#: SQLSTATE of text that is not valid UTF-8 (NUL bytes, lone surrogates).
CHARACTER_NOT_IN_REPERTOIRE: Final = "22021"


class AnalysisError(Exception):
    """SQL text that cannot be analyzed: the gateway refuses it (fail closed).

    ``message`` is meant for the client and names what was wrong; ``sqlstate`` is the
    SQLSTATE to send (``42601`` syntax error, ``0A000`` unsupported, ``54001`` too deeply
    nested, ``22021`` invalid characters); ``position`` is the 1-based character position
    of the error in the text given to :func:`analyze`, when known (ErrorResponse field P).
    """

    def __init__(
        self, message: str, sqlstate: str = SYNTAX_ERROR, *, position: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.position = position

    def __repr__(self) -> str:
        return f"AnalysisError({self.message!r}, {self.sqlstate!r})"


@dataclass(frozen=True, slots=True)
class QualifiedName:
    """A relation or function name as written (identifiers already resolved for case).

    ``schema`` is ``None`` when the name is unqualified: it is resolved later against the
    session's ``search_path`` (where ``pg_temp`` comes first for relations and
    ``pg_catalog`` is implicit). A temporary relation created without a schema is
    reported in ``pg_temp``. A ``name`` of ``"*"`` stands for every relation of the
    schema (``DROP SCHEMA s CASCADE``, ``GRANT ... ON ALL TABLES IN SCHEMA s``,
    ``schema_to_xml('s', ...)``) and a ``schema`` of ``"*"`` for every schema.
    """

    schema: str | None
    name: str

    def __str__(self) -> str:
        return self.name if self.schema is None else f"{self.schema}.{self.name}"


@dataclass(frozen=True, slots=True)
class ColumnRef:
    """One column reference and the clause it appears in.

    ``relation`` is the qualifier as written (an alias or a table name, dotted when
    schema-qualified), ``None`` if unqualified. ``column`` is ``"*"`` for a star and for
    a whole-row reference (``SELECT c FROM customers c``, ``row_to_json(c)``,
    ``c::text``): a bare name that matches a range variable is reported both as a column
    and as ``(name, "*")``, because only the catalog can tell which it is.

    ``clause`` is one of ``select``, ``where``, ``join``, ``group``, ``order``,
    ``having``, ``returning``, ``set``, ``values``, ``other``. The output columns of a
    subquery used in a predicate take the predicate's clause (``WHERE x IN (SELECT ssn
    ...)`` reports ``ssn`` in ``where``), and those of a query whose rows are stored
    (INSERT ... SELECT, CREATE TABLE AS, SELECT INTO, CREATE VIEW) are in ``values``.
    Positional ``ORDER BY 1`` / ``GROUP BY 1`` / ``DISTINCT ON (1)`` report every column
    of the select list in that clause. The column lists of INSERT and COPY are in
    ``values`` (COPY TO: ``select``), UPDATE SET targets in ``set``; their ``relation``
    is the target table's alias or name.

    ``direct`` is true only for a plain column of a top-level select list or RETURNING
    list (or of a FROM subquery or CTE feeding it), whose value reaches the client as
    itself, so result-side masking by column origin can see it. Anything inside an
    expression, function call, cast, aggregate, scalar subquery, set operation branch,
    COPY or predicate is ``direct=False``.
    """

    relation: str | None
    column: str
    clause: str
    direct: bool = False


class StatementSummary(NamedTuple):
    """What one statement touches, anywhere in its parse tree.

    ``operations`` holds every operation found (``select``, ``delete``, ``ddl`` and
    ``ddl:<kind>``, ``copy_out`` ...), including those of bodies this statement does not
    run now; those are also listed in ``deferred_operations`` (plain EXPLAIN's statement,
    PREPARE's body, CREATE RULE actions, SQL-standard function bodies). ``reads``,
    ``writes`` and ``functions`` include deferred bodies too. A DML target is in
    ``writes`` only, although WHERE and RETURNING can read it.

    ``command`` is the top-level operation (``select``, ``explain``, ``ddl:drop`` ...).
    ``aliases`` maps every visible range name (alias, or table name when unaliased, plus
    ``excluded``/``old``/``new`` of a DML target) to its relation, so that
    ``ColumnRef.relation`` can be resolved. ``opaque`` is true when the statement runs
    SQL the analyzer cannot see (DO blocks, dblink, dynamic-SQL functions such as
    ``query_to_xml`` with a non-constant query). ``prepared_name`` is the name of the
    prepared statement of PREPARE, EXECUTE and DEALLOCATE (``None`` for DEALLOCATE ALL).
    ``set_parameters`` contains ``"all"`` for RESET ALL / DISCARD ALL and ``"*"`` when a
    parameter is changed whose name is not a constant (``set_config($1, ...)``, UPDATE of
    ``pg_settings``). ``search_path`` lists the schemas a statement puts on the session's
    search_path (``SET search_path``, ``set_config('search_path', ...)``), as PostgreSQL
    reads them; ``"*"`` stands for a value the analyzer cannot see.
    """

    text: str
    fingerprint: str
    operations: frozenset[str]
    reads: frozenset[QualifiedName]
    writes: frozenset[QualifiedName]
    functions: frozenset[QualifiedName]
    columns: tuple[ColumnRef, ...]
    unbounded_write: bool
    row_locks: bool
    set_parameters: frozenset[str]
    command: str = ""
    deferred_operations: frozenset[str] = frozenset()
    aliases: tuple[tuple[str, QualifiedName], ...] = ()
    opaque: bool = False
    prepared_name: str | None = None
    search_path: tuple[str, ...] = ()
    #: Values this statement gives the settings that decide how the server reads
    #: statement text (client_encoding, standard_conforming_strings): ``(name, value)``,
    #: value ``None`` when it is not a constant. RESET and SET ... DEFAULT are not listed:
    #: they return to the session's start-up value.
    text_settings: tuple[tuple[str, str | None], ...] = ()
    #: Whether rows flow through a derived table (a CTE, a FROM subquery or function):
    #: names there can stand for expressions over other columns.
    derived: bool = False
    #: Signalling functions (``pg_terminate_backend``, ``pg_cancel_backend``) every call
    #: of which targets the session's own backend (``pg_backend_pid()``), as written.
    own_backend: frozenset[QualifiedName] = frozenset()


# --- the tree walk ------------------------------------------------------------------------
#
# libpg_query's JSON: a node held in a ``Node *`` field is wrapped as {"TypeName": {...}};
# a field of a specific struct type (RangeVar *relation, SelectStmt *larg, WithClause ...)
# holds the bare struct. Fields with default values (false, 0, null, empty) are omitted.

_Json = Any  # a decoded JSON value: dict, list, str, int, bool
_Handler = Callable[["_Walk", dict[str, Any], str], None]

# Clauses whose column references are predicates or groupings, not output.
_SELECT: Final = "select"
_RETURNING: Final = "returning"
_DIRECT_CLAUSES: Final = frozenset({_SELECT, _RETURNING})

# Wrapped nodes that hold nothing the analysis needs.
_LEAVES: Final = frozenset(
    {
        "String",
        "Integer",
        "Float",
        "Boolean",
        "BitString",
        "A_Const",
        "ParamRef",
        "A_Star",
        "TypeName",
        "RoleSpec",
        "SQLValueFunction",
        "AccessPriv",
        "LockingClause",
        "MergeSupportFunc",
    }
)

_ROLE_PARAMS: Final = frozenset({"role", "all", "*"})
_AUTH_PARAMS: Final = frozenset({"session_authorization", "all", "*"})
_PATH_PARAMS: Final = frozenset({"search_path", "all", "*"})
#: Settings that change how the server reads the bytes and string literals it receives.
TEXT_SETTINGS: Final = frozenset({"client_encoding", "standard_conforming_strings"})

# Functions that run SQL text given as an argument: name -> index of that argument.
_DYNAMIC_SQL: Final = {
    "query_to_xml": 0,
    "query_to_xmlschema": 0,
    "query_to_xml_and_xmlschema": 0,
    "ts_stat": 0,
}
# Functions that read a whole relation named by a regclass argument (index 0).
_TABLE_READERS: Final = frozenset(
    {"table_to_xml", "table_to_xmlschema", "table_to_xml_and_xmlschema"}
)
_SCHEMA_READERS: Final = frozenset(
    {"schema_to_xml", "schema_to_xmlschema", "schema_to_xml_and_xmlschema"}
)
_DATABASE_READERS: Final = frozenset(
    {"database_to_xml", "database_to_xmlschema", "database_to_xml_and_xmlschema"}
)
#: Functions that read whole relations named by their arguments (no column references).
RELATION_READERS: Final = _TABLE_READERS | _SCHEMA_READERS | _DATABASE_READERS
_MAX_DYNAMIC_DEPTH: Final = 4
# Functions that write the sequence named by their regclass argument (index 0): PostgreSQL
# itself asks for UPDATE (or USAGE) on the sequence.
_SEQUENCE_WRITERS: Final = frozenset({"nextval", "setval"})
# Large objects live in pg_catalog.pg_largeobject: these functions read or change it.
_LARGE_OBJECT: Final = QualifiedName("pg_catalog", "pg_largeobject")
_LARGE_OBJECT_WRITERS: Final = frozenset(
    {
        "lo_create", "lo_creat", "lo_from_bytea", "lo_unlink", "lo_put", "lo_truncate",
        "lo_truncate64", "lowrite", "lo_import",
    }
)  # fmt: skip
_LARGE_OBJECT_READERS: Final = frozenset({"lo_get", "loread", "lo_open", "lo_export"})
#: Functions that signal a backend process given by its pid (the first argument).
_SIGNALS: Final = frozenset({"pg_terminate_backend", "pg_cancel_backend"})
#: Functions whose effect a summary already reports as operations and relations
#: (``set_config`` as ``set``, ``nextval`` as ``update`` of its sequence, ``query_to_xml``
#: as the statement it runs ...): the policy engine does not count them again as
#: functions with side effects.
MODELED_FUNCTIONS: Final = (
    frozenset({"set_config", "pg_notify", "ts_rewrite"})
    | frozenset(_DYNAMIC_SQL)
    | _SEQUENCE_WRITERS
    | _LARGE_OBJECT_WRITERS
    | _LARGE_OBJECT_READERS
)

# Object types whose qualified name (a List of String) names a relation.
_RELATION_OBJECTS: Final = frozenset(
    {
        "OBJECT_TABLE",
        "OBJECT_VIEW",
        "OBJECT_MATVIEW",
        "OBJECT_INDEX",
        "OBJECT_SEQUENCE",
        "OBJECT_FOREIGN_TABLE",
    }
)
# Object types named by their relation's name plus one more element (column, trigger...).
_SUBRELATION_OBJECTS: Final = frozenset(
    {
        "OBJECT_COLUMN",
        "OBJECT_TRIGGER",
        "OBJECT_RULE",
        "OBJECT_POLICY",
        "OBJECT_TABCONSTRAINT",
    }
)

# ddl:<kind> names that do not follow from the node name.
_DDL_KINDS: Final = {
    "CreateStmt": "create_table",
    "IndexStmt": "create_index",
    "ViewStmt": "create_view",
    "CreateTrigStmt": "create_trigger",
    "RuleStmt": "create_rule",
    "CreateSeqStmt": "create_sequence",
    "CreatedbStmt": "create_database",
    "DropdbStmt": "drop_database",
    "CreateEventTrigStmt": "create_event_trigger",
    "AlterEventTrigStmt": "alter_event_trigger",
    "CreatePLangStmt": "create_language",
    "CreateFdwStmt": "create_foreign_data_wrapper",
    "AlterFdwStmt": "alter_foreign_data_wrapper",
    "CreateForeignServerStmt": "create_server",
    "AlterForeignServerStmt": "alter_server",
    "CompositeTypeStmt": "create_type",
    "CreateEnumStmt": "create_type",
    "CreateRangeStmt": "create_type",
    "AlterEnumStmt": "alter_type",
    "CreateTableSpaceStmt": "create_tablespace",
    "DropTableSpaceStmt": "drop_tablespace",
    "CreateOpClassStmt": "create_operator_class",
    "CreateOpFamilyStmt": "create_operator_family",
    "AlterOpFamilyStmt": "alter_operator_family",
    "CreateAmStmt": "create_access_method",
    "CreateStatsStmt": "create_statistics",
    "AlterStatsStmt": "alter_statistics",
    "ReturnStmt": "return",
}
_CAMEL: Final = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def _ddl_kind(node: str) -> str:
    kind = _DDL_KINDS.get(node)
    if kind is None:
        kind = _CAMEL.sub("_", node.removesuffix("Stmt")).lower()
    return kind


def _object_kind(objtype: str) -> str:
    """``OBJECT_FOREIGN_TABLE`` -> ``foreign_table``."""
    return objtype.removeprefix("OBJECT_").lower()


def _strings(items: Iterable[_Json]) -> list[str]:
    """The values of a list of String nodes (other nodes are skipped)."""
    out: list[str] = []
    for item in items:
        if type(item) is dict:
            s = item.get("String")
            if s is not None:
                out.append(s.get("sval", ""))
    return out


def _qualified(parts: list[str]) -> QualifiedName:
    if len(parts) >= 2:
        return QualifiedName(parts[-2], parts[-1])
    return QualifiedName(None, parts[0] if parts else "")


_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _ascii_lower(text: str) -> str:
    """Lower case as PostgreSQL folds names in a UTF8 database: A-Z only.

    ``str.lower`` folds other letters too (the Kelvin sign to ``k``, ``É`` to ``é``),
    which would make the gateway read a name the server does not.
    """
    return text.translate(_ASCII_LOWER)


#: PostgreSQL's longest name in bytes (NAMEDATALEN - 1); longer names are cut to it.
_NAME_BYTES: Final = 63
#: The white space PostgreSQL skips between names in a string (scanner_isspace).
_NAME_SPACE: Final = " \t\n\r\f"


def _name(text: str) -> str:
    """A name as PostgreSQL stores it: cut to 63 bytes, never inside a character."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= _NAME_BYTES:
        return text
    return raw[:_NAME_BYTES].decode("utf-8", "ignore")


def _const_string(arg: _Json) -> str | None:
    """The value of a string constant, also through a cast (``'t'::regclass``)."""
    if type(arg) is not dict:
        return None
    cast = arg.get("TypeCast")
    if cast is not None:
        arg = cast.get("arg")
        if type(arg) is not dict:
            return None
    const = arg.get("A_Const")
    if const is None:
        return None
    sval = const.get("sval")
    if sval is None:
        return None
    return str(sval.get("sval", ""))


def _regclass_name(text: str) -> QualifiedName | None:
    """Parse a regclass literal (``public."Orders"``) the way regclassin does.

    None for what is not a name: digits alone are an OID to regclassin, any table.
    """
    if text.isascii() and text.isdigit():
        return None
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _NAME_SPACE:
            i += 1
        if i < n and text[i] == '"':
            i += 1
            buf: list[str] = []
            while True:
                j = text.find('"', i)
                if j < 0:
                    return None
                buf.append(text[i:j])
                if j + 1 < n and text[j + 1] == '"':
                    buf.append('"')
                    i = j + 2
                    continue
                i = j + 1
                break
            parts.append(_name("".join(buf)))
        else:
            j = i
            while j < n and text[j] not in '."' and text[j] not in _NAME_SPACE:
                j += 1
            if j == i:
                return None
            parts.append(_name(_ascii_lower(text[i:j])))
            i = j
        while i < n and text[i] in _NAME_SPACE:
            i += 1
        if i == n:
            break
        if text[i] != ".":
            return None
        i += 1
    if not 1 <= len(parts) <= 3:
        return None
    return _qualified(parts)


def _explain_analyze(options: list[_Json]) -> tuple[bool, bool]:
    """(ANALYZE is on, the decision looked at an option value)."""
    analyze = False
    looked = False
    for opt in options:
        d = opt.get("DefElem") if type(opt) is dict else None
        if d is None or d.get("defname") != "analyze":
            continue
        arg = d.get("arg")
        if arg is None:
            analyze = True
            continue
        looked = True
        analyze = not _is_false(arg)
    return analyze, looked


def _is_false(arg: _Json) -> bool:
    """True only for values PostgreSQL's boolean options read as false."""
    if type(arg) is not dict:
        return False
    if "Integer" in arg:
        return not arg["Integer"].get("ival", 0)
    if "Boolean" in arg:
        return not arg["Boolean"].get("boolval", False)
    s = arg.get("String")
    if s is None:
        return False
    value = str(s.get("sval", "")).strip().lower()
    return value in {"0", "off", "of"} or (
        value != "" and ("false".startswith(value) or "no".startswith(value))
    )


class _Walk:
    """Collects a summary while walking one statement's JSON parse tree."""

    __slots__ = (
        "aliases",
        "columns",
        "command",
        "ctes",
        "default_write",
        "deferred",
        "derived",
        "direct",
        "dynamic_depth",
        "functions",
        "literal_dependent",
        "names",
        "opaque",
        "ops",
        "other_signals",
        "own_signals",
        "params",
        "prepared_name",
        "reads",
        "row_locks",
        "search_path",
        "singles",
        "sink",
        "text_settings",
        "unbounded",
        "writes",
    )

    def __init__(self) -> None:
        self.ops: set[str] = set()
        self.deferred: set[str] = set()
        self.sink = self.ops  # where op() adds: ops, or deferred inside a deferred body
        self.command = ""
        self.reads: set[QualifiedName] = set()
        self.writes: set[QualifiedName] = set()
        self.functions: set[QualifiedName] = set()
        self.columns: list[tuple[str | None, str, str, bool]] = []  # ColumnRef fields
        self.singles: list[tuple[str, str]] = []  # bare names that may be whole-row refs
        self.names: set[str] = set()  # range variable names, for whole-row detection
        self.aliases: dict[tuple[str, QualifiedName], None] = {}
        self.params: set[str] = set()
        self.unbounded = False
        self.row_locks = False
        self.opaque = False
        self.prepared_name: str | None = None
        self.literal_dependent = False
        self.search_path: list[str] = []
        self.text_settings: list[tuple[str, str | None]] = []
        self.derived = False
        self.ctes: list[set[str]] = []  # CTE names in scope, innermost last
        self.default_write = True  # a bare RangeVar met by the generic walk is written
        self.direct = True  # plain select-list columns reach the client as themselves
        self.dynamic_depth = 0
        self.own_signals: set[QualifiedName] = set()
        self.other_signals: set[QualifiedName] = set()

    # -- generic walk ------------------------------------------------------------------

    def op(self, name: str) -> None:
        if not self.command:
            self.command = name
        self.sink.add(name)

    def node(self, v: _Json, clause: str) -> None:
        """Walk any JSON value, dispatching wrapped nodes to their handlers."""
        if type(v) is list:
            for item in v:
                if type(item) is dict or type(item) is list:
                    self.node(item, clause)
            return
        if type(v) is not dict or not v:
            return
        if len(v) == 1:
            for key, body in v.items():
                if key[:1].isupper():
                    handler = _HANDLERS.get(key)
                    if handler is not None:
                        handler(self, body, clause)
                        return
                    if key in _LEAVES:
                        return
                    if key.endswith("Stmt"):
                        self.ddl(key, body)
                        return
                    v = body
                    if type(v) is not dict:
                        return
        if "relname" in v:
            self.range_var(v, self.default_write)
            return
        for val in v.values():
            if type(val) is dict or type(val) is list:
                self.node(val, clause)

    def deferred_body(self, v: _Json, clause: str) -> None:
        """Walk a body this statement stores or plans but does not run now."""
        sink = self.sink
        self.sink = self.deferred
        try:
            self.node(v, clause)
        finally:
            self.sink = sink

    # -- names ---------------------------------------------------------------------------

    def range_var(self, b: dict[str, Any], write: bool) -> str:
        """Record a relation; return the name it is visible under."""
        name: str = b.get("relname", "")
        schema: str | None = b.get("schemaname")
        alias = b.get("alias")
        visible: str = alias.get("aliasname", name) if alias else name
        self.names.add(visible)
        if schema is None:
            if b.get("relpersistence") == "t":
                schema = "pg_temp"
            elif not write and self.ctes:
                for scope in self.ctes:
                    if name in scope:
                        return visible  # a CTE, not a relation
        qn = QualifiedName(schema, name)
        (self.writes if write else self.reads).add(qn)
        self.aliases[(visible, qn)] = None
        return visible

    def target(self, b: dict[str, Any]) -> tuple[str, QualifiedName]:
        """Record a DML target (always a real table: CTE names never shadow it)."""
        visible = self.range_var(b, True)
        qn = QualifiedName(b.get("schemaname"), b.get("relname", ""))
        for pseudo in ("old", "new"):  # RETURNING old.* / new.*
            self.aliases[(pseudo, qn)] = None
        return visible, qn

    def column_ref(self, b: dict[str, Any], clause: str, direct: bool) -> None:
        parts: list[str] = []
        star = False
        for f in b.get("fields", ()):
            s = f.get("String")
            if s is None:
                star = True
            else:
                parts.append(s.get("sval", ""))
        if star:
            column = "*"
        elif parts:
            column = parts.pop()
        else:
            return
        if parts:
            self.columns.append((".".join(parts), column, clause, direct))
            return
        self.columns.append((None, column, clause, direct))
        if not star:
            self.singles.append((column, clause))

    def targets(self, items: list[_Json], clause: str, direct: bool) -> None:
        """A select or RETURNING list: a plain column there may be direct output."""
        for item in items:
            rt = item.get("ResTarget") if type(item) is dict else None
            if rt is None:
                self.node(item, clause)
                continue
            val = rt.get("val")
            if type(val) is dict and "ColumnRef" in val and not rt.get("indirection"):
                self.column_ref(val["ColumnRef"], clause, direct)
            else:
                self.node(val, clause)

    def set_targets(self, items: list[_Json], relation: str, clause: str) -> None:
        """UPDATE SET / ON CONFLICT SET / MERGE SET, or INSERT's column list."""
        for item in items:
            rt = item.get("ResTarget") if type(item) is dict else None
            if rt is None:
                continue
            name = rt.get("name")
            if name:
                self.columns.append((relation, name, clause, False))
            self.node(rt.get("indirection"), clause)
            self.node(rt.get("val"), clause)

    def set_param(self, name: str, *, reset: bool = False) -> None:
        """A setting the statement changes; ``reset``: back to its value at start-up.

        Resetting role or session_authorization returns to the role the gateway connected
        with (a client cannot give either at start-up), so it is no role switch.
        """
        self.params.add(name)
        if name == "*":
            self.search_path.append("*")  # might be search_path, to a value unseen
        if name in _ROLE_PARAMS and not reset:
            self.op("set_role")
        if name in _AUTH_PARAMS and not reset:
            self.op("set_session_authorization")
        if name in _PATH_PARAMS:
            self.op("set_search_path")

    def object_names(self, objtype: str, obj: _Json) -> None:
        """Relations named by DROP / COMMENT / GRANT ... object lists (written)."""
        if type(obj) is not dict:
            return
        if objtype == "OBJECT_SCHEMA":
            s = obj.get("String")
            if s is not None:
                self.writes.add(QualifiedName(s.get("sval", ""), "*"))
            return
        lst = obj.get("List")
        if lst is None:
            if "RangeVar" in obj:
                self.range_var(obj["RangeVar"], True)
            return
        parts = _strings(lst.get("items", ()))
        if objtype in _SUBRELATION_OBJECTS:
            parts = parts[:-1]
        elif objtype not in _RELATION_OBJECTS:
            return
        if parts:
            self.writes.add(_qualified(parts))

    # -- clauses -------------------------------------------------------------------------

    def with_clause(self, w: dict[str, Any], clause: str) -> None:
        """Push a CTE scope and walk the CTE bodies; the caller pops the scope."""
        scope: set[str] = set()
        ctes = w.get("ctes", ())
        self.derived = True
        recursive = bool(w.get("recursive"))
        if recursive:
            for cte in ctes:
                scope.add(cte["CommonTableExpr"]["ctename"])
        self.ctes.append(scope)
        for cte in ctes:
            c = cte["CommonTableExpr"]
            self.node(c.get("ctequery"), clause)
            scope.add(c["ctename"])  # a non-recursive CTE is visible after its own body
            self.names.add(c["ctename"])

    def sort_list(self, items: list[_Json], clause: str, outputs: tuple[int, int] | None) -> None:
        for item in items:
            sb = item.get("SortBy") if type(item) is dict else None
            self.group_item(sb.get("node") if sb is not None else item, clause, outputs)

    def group_item(self, item: _Json, clause: str, outputs: tuple[int, int] | None) -> None:
        """A GROUP BY / ORDER BY / DISTINCT ON item; a constant there is positional."""
        if type(item) is dict and ("A_Const" in item or "ParamRef" in item):
            if outputs is not None:
                start, end = outputs
                for relation, column, _, _ in self.columns[start:end]:
                    self.columns.append((relation, column, clause, False))
            return
        self.node(item, clause)

    def window(self, w: dict[str, Any]) -> None:
        self.node(w.get("partitionClause"), "group")
        self.sort_list(w.get("orderClause", ()), "order", None)
        self.node(w.get("startOffset"), "other")
        self.node(w.get("endOffset"), "other")

    def from_item(self, item: _Json, clause: str) -> None:
        if type(item) is not dict:
            return
        for key, b in item.items():
            if key == "RangeVar":
                self.range_var(b, False)
            elif key == "JoinExpr":
                self.from_item(b.get("larg"), clause)
                self.from_item(b.get("rarg"), clause)
                for name in _strings(b.get("usingClause", ())):
                    self.columns.append((None, name, "join", False))
                self.node(b.get("quals"), "join")
                for key_ in ("alias", "join_using_alias"):
                    alias = b.get(key_)
                    if alias:
                        self.names.add(alias.get("aliasname", ""))
            elif key == "RangeSubselect":
                self.derived = True
                self.node(b.get("subquery"), clause)
                self.alias(b)
            elif key == "RangeFunction":
                self.derived = True
                for fn in b.get("functions", ()):
                    items = fn.get("List", {}).get("items", ()) if type(fn) is dict else ()
                    for part in items[:1]:
                        self.node(part, clause)
                        call = part.get("FuncCall") if type(part) is dict else None
                        if call is not None and not b.get("alias"):
                            self.names.add(_qualified(_strings(call.get("funcname", ()))).name)
                self.alias(b)
            elif key == "RangeTableSample":
                self.from_item(b.get("relation"), clause)
                self.functions.add(_qualified(_strings(b.get("method", ()))))
                self.node(b.get("args"), "other")
                self.node(b.get("repeatable"), "other")
            else:
                write = self.default_write
                self.default_write = False
                try:
                    self.node(item, clause)
                finally:
                    self.default_write = write
                self.alias(b if type(b) is dict else {})

    def alias(self, b: dict[str, Any]) -> None:
        alias = b.get("alias")
        if alias:
            self.names.add(alias.get("aliasname", ""))

    def returning(self, b: dict[str, Any]) -> None:
        ret = b.get("returningClause")
        if ret:
            self.targets(ret.get("exprs", ()), _RETURNING, self.direct)

    # -- statements ----------------------------------------------------------------------

    def select(self, b: dict[str, Any], clause: str) -> None:
        """SelectStmt; ``clause`` is where its output columns count."""
        write, direct = self.default_write, self.direct
        self.default_write = False
        into = b.get("intoClause")
        if into:
            self.op("select_into")
            self.op("ddl:create_table_as")
            self.op("ddl")
            self.range_var(into.get("rel", {}), True)
            clause = "values"
        if clause != "values" or "valuesLists" not in b:
            self.op("select")  # a bare VALUES list feeding INSERT is no read
        scoped = False
        w = b.get("withClause")
        if w:
            self.with_clause(w, clause)
            scoped = True
        try:
            start = len(self.columns)
            if b.get("op", "SETOP_NONE") != "SETOP_NONE":
                self.direct = False  # set-operation output has no column origin
                for side in ("larg", "rarg"):
                    arm = b.get(side)
                    if arm:
                        self.select(arm, clause)
                self.direct = direct
                outputs = (start, len(self.columns))
            else:
                self.targets(b.get("targetList", ()), clause, direct and clause in _DIRECT_CLAUSES)
                outputs = (start, len(self.columns))
                for item in b.get("fromClause", ()):
                    self.from_item(item, clause)
                for item in b.get("distinctClause", ()):
                    self.group_item(item, "group", outputs)
                self.node(b.get("whereClause"), "where")
                for item in b.get("groupClause", ()):
                    self.group_item(item, "group", outputs)
                self.node(b.get("havingClause"), "having")
                for wd in b.get("windowClause", ()):
                    self.window(wd.get("WindowDef", {}))
                self.node(b.get("valuesLists"), "values")
            self.sort_list(b.get("sortClause", ()), "order", outputs)
            self.node(b.get("limitOffset"), "other")
            self.node(b.get("limitCount"), "other")
            if b.get("lockingClause"):
                self.row_locks = True
                self.op("row_lock")
        finally:
            if scoped:
                self.ctes.pop()
            self.default_write, self.direct = write, direct

    def dml_start(self, b: dict[str, Any], op: str, cte_clause: str) -> tuple[bool, bool]:
        self.op(op)
        write = self.default_write
        self.default_write = False
        w = b.get("withClause")
        if w:
            self.with_clause(w, cte_clause)
            return write, True
        return write, False

    def dml_end(self, state: tuple[bool, bool]) -> None:
        write, scoped = state
        if scoped:
            self.ctes.pop()
        self.default_write = write

    def insert(self, b: dict[str, Any], clause: str) -> None:
        state = self.dml_start(b, "insert", "values")
        try:
            name, qn = self.target(b.get("relation", {}))
            self.set_targets(b.get("cols", ()), name, "values")
            self.node(b.get("selectStmt"), "values")
            occ = b.get("onConflictClause")
            if occ:
                self.aliases[("excluded", qn)] = None
                self.names.add("excluded")
                infer = occ.get("infer")
                if infer:
                    for elem in infer.get("indexElems", ()):
                        ie = elem.get("IndexElem", {}) if type(elem) is dict else {}
                        if ie.get("name"):
                            self.columns.append((name, ie["name"], "other", False))
                        self.node(ie.get("expr"), "other")
                    self.node(infer.get("whereClause"), "where")
                if occ.get("action") == "ONCONFLICT_UPDATE":
                    self.op("update")
                    self.set_targets(occ.get("targetList", ()), name, "set")
                    self.node(occ.get("whereClause"), "where")
            self.returning(b)
        finally:
            self.dml_end(state)

    def update(self, b: dict[str, Any], clause: str) -> None:
        state = self.dml_start(b, "update", "other")
        try:
            name, qn = self.target(b.get("relation", {}))
            if qn.name == "pg_settings" and qn.schema in (None, "pg_catalog"):
                # pg_settings' update rule calls set_config() with the row's name
                self.op("set")
                self.set_param("*")
            self.set_targets(b.get("targetList", ()), name, "set")
            for item in b.get("fromClause", ()):
                self.from_item(item, "other")
            self.write_where(b)
            self.returning(b)
        finally:
            self.dml_end(state)

    def write_where(self, b: dict[str, Any]) -> None:
        """The WHERE of an UPDATE or DELETE; without one, the write is unbounded."""
        where = b.get("whereClause")
        if where is None:
            self.unbounded = True
        self.node(where, "where")

    def delete(self, b: dict[str, Any], clause: str) -> None:
        state = self.dml_start(b, "delete", "other")
        try:
            self.target(b.get("relation", {}))
            for item in b.get("usingClause", ()):
                self.from_item(item, "other")
            self.write_where(b)
            self.returning(b)
        finally:
            self.dml_end(state)

    def merge(self, b: dict[str, Any], clause: str) -> None:
        state = self.dml_start(b, "merge", "other")
        try:
            name, _ = self.target(b.get("relation", {}))
            self.from_item(b.get("sourceRelation"), "other")
            self.node(b.get("joinCondition"), "join")
            for wc in b.get("mergeWhenClauses", ()):
                w = wc.get("MergeWhenClause", {}) if type(wc) is dict else {}
                command = w.get("commandType")
                if command == "CMD_UPDATE":
                    self.op("update")
                    self.set_targets(w.get("targetList", ()), name, "set")
                elif command == "CMD_INSERT":
                    self.op("insert")
                    self.set_targets(w.get("targetList", ()), name, "values")
                    self.node(w.get("values"), "values")
                elif command == "CMD_DELETE":
                    self.op("delete")
                self.node(w.get("condition"), "where")
            self.returning(b)
        finally:
            self.dml_end(state)

    def ddl(self, node: str, b: _Json) -> None:
        """Any statement without its own handler: DDL, its targets written."""
        self.op("ddl:" + _ddl_kind(node))
        self.op("ddl")
        write = self.default_write
        self.default_write = True
        try:
            self.node(b, "other")
        finally:
            self.default_write = write

    # -- functions -----------------------------------------------------------------------

    def func_call(self, b: dict[str, Any], clause: str) -> None:
        qn = _qualified(_strings(b.get("funcname", ())))
        self.functions.add(qn)
        args = b.get("args", ())
        name = qn.name
        if name == "set_config":
            self.literal_dependent = True
            param = _const_string(args[0]) if args else None
            self.op("set")
            self.set_param(_ascii_lower(param) if param is not None else "*")
            if param is not None and _ascii_lower(param) == "search_path":
                value = _const_string(args[1]) if len(args) > 1 else None
                self.search_path.extend(_schema_list(value) if value is not None else ["*"])
            if param is not None and _ascii_lower(param) in TEXT_SETTINGS:
                value = _const_string(args[1]) if len(args) > 1 else None
                self.text_settings.append((_ascii_lower(param), value))
        elif name in _SIGNALS:
            own = len(args) >= 1 and _is_own_backend_pid(args[0])
            (self.own_signals if own else self.other_signals).add(qn)
        elif name == "pg_notify":
            self.op("notify")
        elif name in _DYNAMIC_SQL or (name == "ts_rewrite" and len(args) == 2):
            self.literal_dependent = True
            index = 1 if name == "ts_rewrite" else 0
            text = _const_string(args[index]) if len(args) > index else None
            if text is None:
                self.opaque = True
            else:
                self.dynamic_sql(text)
        elif name in _TABLE_READERS:
            self.literal_dependent = True
            text = _const_string(args[0]) if args else None
            rel = _regclass_name(text) if text is not None else None
            if rel is None:
                self.opaque = True
                self.reads.add(QualifiedName("*", "*"))
            else:
                self.reads.add(rel)
        elif name in _SCHEMA_READERS:
            self.literal_dependent = True
            text = _const_string(args[0]) if args else None
            self.reads.add(QualifiedName(text if text is not None else "*", "*"))
        elif name in _DATABASE_READERS:
            self.reads.add(QualifiedName("*", "*"))
        elif name.startswith("dblink"):
            self.opaque = True
        elif name in _LARGE_OBJECT_WRITERS:
            self.op("update")
            self.writes.add(_LARGE_OBJECT)
        elif name in _LARGE_OBJECT_READERS:
            self.reads.add(_LARGE_OBJECT)
        elif name in _SEQUENCE_WRITERS:
            self.literal_dependent = True
            self.op("update")
            text = _const_string(args[0]) if args else None
            rel = _regclass_name(text) if text is not None else None
            self.writes.add(rel if rel is not None else QualifiedName("*", "*"))
        self.node(args, clause)
        self.sort_list(b.get("agg_order", ()), "order", None)
        self.node(b.get("agg_filter"), "where")
        over = b.get("over")
        if over:
            self.window(over)

    def dynamic_sql(self, text: str) -> None:
        """SQL text run by a function (query_to_xml ...): analyze it in place."""
        if self.dynamic_depth >= _MAX_DYNAMIC_DEPTH or "\x00" in text:
            self.opaque = True
            return
        try:
            tree = json.loads(_pg.parse_sql_json(text))
        except (_pg.ParseError, UnicodeError, ValueError):
            self.opaque = True  # the server will most likely reject it as well
            return
        ctes, write, direct = self.ctes, self.default_write, self.direct
        self.ctes, self.default_write, self.direct = [], False, False
        self.dynamic_depth += 1
        try:
            for raw in tree.get("stmts", ()):
                self.node(raw.get("stmt"), "other")
        finally:
            self.ctes, self.default_write, self.direct = ctes, write, direct
            self.dynamic_depth -= 1

    # -- result --------------------------------------------------------------------------

    def columns_out(self) -> tuple[ColumnRef, ...]:
        columns = self.columns
        names = self.names
        for name, clause in self.singles:
            if name in names:
                columns.append((name, "*", clause, False))
        return tuple(ColumnRef(*c) for c in dict.fromkeys(columns))


# --- handlers for wrapped nodes -----------------------------------------------------------


def _h_select(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.select(b, clause)


def _h_insert(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.insert(b, clause)


def _h_update(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.update(b, clause)


def _h_delete(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.delete(b, clause)


def _h_merge(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.merge(b, clause)


def _h_column_ref(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.column_ref(b, clause, False)


def _h_func_call(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.func_call(b, clause)


def _h_sublink(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.node(b.get("testexpr"), clause)
    direct = w.direct
    w.direct = False  # a scalar subquery's value is an expression
    try:
        w.node(b.get("subselect"), clause)
    finally:
        w.direct = direct


def _h_range_var(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.range_var(b, w.default_write)


def _h_table_like(w: _Walk, b: dict[str, Any], clause: str) -> None:
    rel = b.get("relation")
    if rel:
        w.range_var(rel, False)


def _h_window_def(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.window(b)


def _h_explain(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("explain")
    analyze, looked = _explain_analyze(b.get("options", ()))
    if looked:
        w.literal_dependent = True
    if analyze:
        w.op("explain_analyze")
        w.node(b.get("query"), _SELECT)
    else:
        w.deferred_body(b.get("query"), _SELECT)


def _h_copy(w: _Walk, b: dict[str, Any], clause: str) -> None:
    is_from = bool(b.get("is_from"))
    if b.get("is_program"):
        w.op("copy_program")
    elif b.get("filename") is not None:
        w.op("copy_file")
    else:
        w.op("copy_in" if is_from else "copy_out")
    rel = b.get("relation")
    if rel:
        name = w.range_var(rel, is_from)
        cols = _strings(b.get("attlist", ()))
        col_clause = "values" if is_from else _SELECT
        for col in cols:
            w.columns.append((name, col, col_clause, False))
        if not cols and not is_from:
            w.columns.append((name, "*", _SELECT, False))
    query = b.get("query")
    if query:
        direct = w.direct
        w.direct = False  # COPY's rows are CopyData, not described by RowDescription
        try:
            w.node(query, _SELECT)
        finally:
            w.direct = direct
    w.node(b.get("whereClause"), "where")


def _h_variable_set(w: _Walk, b: dict[str, Any], clause: str) -> None:
    if w.command:
        return  # ALTER FUNCTION ... SET x: stored with the object, the session is unchanged
    kind = b.get("kind", "")
    if kind in ("VAR_RESET", "VAR_RESET_ALL"):
        w.op("reset")
    w.op("set")
    name = _ascii_lower(str(b.get("name", "")))
    if kind == "VAR_RESET_ALL":
        w.set_param("all", reset=True)
    elif name in ("role", "session_authorization"):
        # SET ROLE NONE and SET ROLE admin have one normalized shape: cache by text.
        w.literal_dependent = True
        args = b.get("args", ())
        none = name == "role" and len(args) == 1 and _const_string(args[0]) == "none"
        w.set_param(name, reset=kind != "VAR_SET_VALUE" or none)
    elif kind == "VAR_SET_MULTI":
        prefix = "default_" if name == "session characteristics" else ""
        for arg in b.get("args", ()):
            d = arg.get("DefElem") if type(arg) is dict else None
            if d is not None:
                w.set_param(prefix + _ascii_lower(str(d.get("defname", ""))))
    else:
        w.set_param(name)
        if name in TEXT_SETTINGS and kind == "VAR_SET_VALUE":
            w.literal_dependent = True
            args = b.get("args", ())
            w.text_settings.append((name, _const_string(args[0]) if len(args) == 1 else None))
        if name == "search_path" and kind == "VAR_SET_VALUE":
            w.literal_dependent = True
            for arg in b.get("args", ()):
                # Each item is one schema name as written: the parser has folded unquoted
                # names already, and a string constant is one name too ('a,b' is "a,b").
                value = _const_string(arg)
                w.search_path.append(value if value is not None else "*")


def _is_own_backend_pid(arg: _Json) -> bool:
    """Whether ``arg`` is ``pg_backend_pid()``: the pid of the session's own backend.

    pg_catalog is searched first for an unqualified name (the gateway pins search_path),
    so the bare name is PostgreSQL's function, as :func:`side_effects` assumes too.
    """
    call = arg.get("FuncCall") if type(arg) is dict else None
    if type(call) is not dict or call.get("args") or call.get("agg_star"):
        return False
    name = _strings(call.get("funcname", ()))
    return name in (["pg_backend_pid"], ["pg_catalog", "pg_backend_pid"]) and not (
        call.get("over") or call.get("agg_filter") or call.get("agg_order")
    )


def _schema_list(value: str) -> list[str]:
    """A search_path string as PostgreSQL splits it when it is used (``set_config``).

    Unquoted names fold A-Z to lower case; ``""`` inside quotes is a quote; names are cut
    to 63 bytes. Anything malformed
    gives ``["*"]`` (unknown).
    """
    schemas: list[str] = []
    rest = value.strip(_NAME_SPACE)
    while rest:
        if rest.startswith('"'):
            end = 1
            name = ""
            while True:
                close = rest.find('"', end)
                if close < 0:
                    return ["*"]  # unterminated: PostgreSQL rejects it; so does the caller
                name += rest[end:close]
                if rest.startswith('"', close + 1):
                    name += '"'
                    end = close + 2
                    continue
                rest = rest[close + 1 :]
                break
        else:
            cut = len(rest)
            for stop in (",", *_NAME_SPACE):
                found = rest.find(stop)
                if 0 <= found < cut:
                    cut = found
            name, rest = _ascii_lower(rest[:cut]), rest[cut:]
            if not name:
                return ["*"]
        schemas.append(_name(name))
        rest = rest.strip(_NAME_SPACE)
        if rest.startswith(","):
            rest = rest[1:].strip(_NAME_SPACE)
            if not rest:
                return ["*"]
        elif rest:
            return ["*"]
    return schemas


def _h_role(node: str) -> _Handler:
    """CREATE / ALTER ROLE (USER, GROUP): DDL, and ``password`` when it sets a password.

    ``password`` is its own operation because the gateway's identities are tokens: a
    database password set through it changes nobody's way in (see the policy engine).
    """

    def handler(w: _Walk, b: dict[str, Any], clause: str) -> None:
        w.ddl(node, b)
        for option in b.get("options", ()):
            d = option.get("DefElem") if type(option) is dict else None
            if d is not None and d.get("defname") == "password":
                w.op("password")

    return handler


def _h_alter_default_setting(kind: str) -> _Handler:
    """ALTER ROLE / DATABASE ... SET x: a default for every later session.

    That includes the sessions of the gateway's shared upstream role, so it is what SET x
    is, and the rules for SET apply.
    """

    def handler(w: _Walk, b: dict[str, Any], clause: str) -> None:
        w.op("ddl:" + kind)
        w.op("ddl")
        setstmt = b.get("setstmt") or {}
        if setstmt.get("kind") == "VAR_RESET_ALL":
            w.set_param("all")
        elif setstmt.get("name"):
            w.set_param(_ascii_lower(str(setstmt["name"])))

    return handler


def _h_discard(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("discard")
    if b.get("target") == "DISCARD_ALL":
        # DISCARD ALL includes SET SESSION AUTHORIZATION DEFAULT and RESET ALL
        w.set_param("all", reset=True)


def _h_prepare(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("prepare")
    w.prepared_name = b.get("name", "")
    w.deferred_body(b.get("query"), _SELECT)


def _h_execute(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("execute")
    w.prepared_name = b.get("name", "")
    w.node(b.get("params"), "other")


def _h_deallocate(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("deallocate")
    w.prepared_name = None if b.get("isall") else b.get("name", "")


def _h_call(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("call")
    call = b.get("funccall")
    if call:
        w.func_call(call, "other")


def _h_do(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("do")
    w.opaque = True


def _h_declare_cursor(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("declare_cursor")
    w.node(b.get("query"), _SELECT)


def _h_create_table_as(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("select_into")
    kind = _object_kind(b.get("objtype", "OBJECT_TABLE"))
    w.op("ddl:create_materialized_view" if kind == "matview" else "ddl:create_table_as")
    w.op("ddl")
    into = b.get("into", {})
    w.range_var(into.get("rel", {}), True)
    w.node(b.get("query"), "values")


def _h_view(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("ddl:create_view")
    w.op("ddl")
    w.range_var(b.get("view", {}), True)
    w.node(b.get("query"), "values")
    w.node(b.get("options"), "other")


def _h_create_function(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("ddl:create_function")
    w.op("ddl")
    for param in b.get("parameters", ()):
        fp = param.get("FunctionParameter", {}) if type(param) is dict else {}
        w.node(fp.get("defexpr"), "other")
    w.deferred_body(b.get("sql_body"), _SELECT)


def _h_return(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.node(b.get("returnval"), clause)


def _h_create_trigger(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("ddl:create_trigger")
    w.op("ddl")
    w.range_var(b.get("relation", {}), True)
    constrrel = b.get("constrrel")
    if constrrel:
        w.range_var(constrrel, True)
    w.functions.add(_qualified(_strings(b.get("funcname", ()))))
    w.node(b.get("whenClause"), "where")


def _h_create_event_trigger(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("ddl:create_event_trigger")
    w.op("ddl")
    w.functions.add(_qualified(_strings(b.get("funcname", ()))))


def _h_rule(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("ddl:create_rule")
    w.op("ddl")
    w.range_var(b.get("relation", {}), True)
    w.node(b.get("whereClause"), "where")
    w.deferred_body(b.get("actions"), _SELECT)


def _h_drop(w: _Walk, b: dict[str, Any], clause: str) -> None:
    objtype = b.get("removeType", "")
    w.op("ddl:drop")
    w.op("ddl:drop_" + _object_kind(objtype))
    w.op("ddl")
    for obj in b.get("objects", ()):
        w.object_names(objtype, obj)


def _h_truncate(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("truncate")
    for rel in b.get("relations", ()):
        if type(rel) is dict and "RangeVar" in rel:
            w.range_var(rel["RangeVar"], True)


def _h_lock(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("lock")
    write = b.get("mode", 8) != 1  # ACCESS SHARE only reads
    for rel in b.get("relations", ()):
        if type(rel) is dict and "RangeVar" in rel:
            w.range_var(rel["RangeVar"], write)


def _h_vacuum(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("vacuum" if b.get("is_vacuumcmd") else "analyze")
    for opt in b.get("options", ()):
        d = opt.get("DefElem") if type(opt) is dict else None
        if d is not None and d.get("defname") == "analyze":
            w.op("analyze")
    for rel in b.get("rels", ()):
        vr = rel.get("VacuumRelation", {}) if type(rel) is dict else {}
        if vr.get("relation"):
            w.range_var(vr["relation"], True)


def _h_maintenance(op: str) -> _Handler:
    def handler(w: _Walk, b: dict[str, Any], clause: str) -> None:
        w.op(op)
        rel = b.get("relation")
        if rel:
            w.range_var(rel, True)
        if b.get("kind") == "REINDEX_OBJECT_SCHEMA" and b.get("name"):
            w.writes.add(QualifiedName(b["name"], "*"))

    return handler


def _h_simple(op: str) -> _Handler:
    def handler(w: _Walk, b: dict[str, Any], clause: str) -> None:
        w.op(op)

    return handler


def _h_comment(op: str) -> _Handler:
    def handler(w: _Walk, b: dict[str, Any], clause: str) -> None:
        w.op(op)
        w.object_names(b.get("objtype", ""), b.get("object"))

    return handler


def _h_grant(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("grant" if b.get("is_grant") else "revoke")
    objtype = b.get("objtype", "")
    all_in_schema = b.get("targtype") == "ACL_TARGET_ALL_IN_SCHEMA"
    for obj in b.get("objects", ()):
        if type(obj) is not dict:
            continue
        if "RangeVar" in obj:
            w.range_var(obj["RangeVar"], True)
        elif all_in_schema or objtype == "OBJECT_SCHEMA":
            for schema in _strings((obj,)):
                w.writes.add(QualifiedName(schema, "*"))


def _h_grant_role(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("grant" if b.get("is_grant") else "revoke")


def _h_default_privileges(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("ddl:alter_default_privileges")
    w.op("ddl")
    action = b.get("action", {})
    w.op("grant" if action.get("is_grant") else "revoke")


def _h_rename(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("ddl:rename")
    w.op("ddl")
    rel = b.get("relation")
    if rel:
        w.range_var(rel, True)
    rtype = b.get("renameType", "")
    if rtype == "OBJECT_SCHEMA" and b.get("subname"):
        w.writes.add(QualifiedName(b["subname"], "*"))
    w.object_names(rtype, b.get("object"))


def _h_object_ddl(kind: str, type_field: str) -> _Handler:
    def handler(w: _Walk, b: dict[str, Any], clause: str) -> None:
        w.op("ddl:" + kind)
        w.op("ddl")
        rel = b.get("relation")
        if rel:
            w.range_var(rel, True)
        w.object_names(b.get(type_field, ""), b.get("object"))

    return handler


def _h_create_extension(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("create_extension")
    w.op("ddl:create_extension")
    w.op("ddl")


def _h_create_schema(w: _Walk, b: dict[str, Any], clause: str) -> None:
    w.op("ddl:create_schema")
    w.op("ddl")
    write = w.default_write
    w.default_write = True
    try:
        w.node(b.get("schemaElts"), "other")
    finally:
        w.default_write = write


_HANDLERS: Final[dict[str, _Handler]] = {
    "SelectStmt": _h_select,
    "InsertStmt": _h_insert,
    "UpdateStmt": _h_update,
    "DeleteStmt": _h_delete,
    "MergeStmt": _h_merge,
    "ColumnRef": _h_column_ref,
    "FuncCall": _h_func_call,
    "SubLink": _h_sublink,
    "RangeVar": _h_range_var,
    "TableLikeClause": _h_table_like,
    "WindowDef": _h_window_def,
    "ExplainStmt": _h_explain,
    "CopyStmt": _h_copy,
    "VariableSetStmt": _h_variable_set,
    "VariableShowStmt": _h_simple("show"),
    "DiscardStmt": _h_discard,
    "AlterRoleSetStmt": _h_alter_default_setting("alter_role_set"),
    "CreateRoleStmt": _h_role("CreateRoleStmt"),
    "AlterRoleStmt": _h_role("AlterRoleStmt"),
    "AlterDatabaseSetStmt": _h_alter_default_setting("alter_database_set"),
    "PrepareStmt": _h_prepare,
    "ExecuteStmt": _h_execute,
    "DeallocateStmt": _h_deallocate,
    "CallStmt": _h_call,
    "DoStmt": _h_do,
    "DeclareCursorStmt": _h_declare_cursor,
    "FetchStmt": _h_simple("fetch"),
    "ClosePortalStmt": _h_simple("close_cursor"),
    "TransactionStmt": _h_simple("transaction"),
    "ConstraintsSetStmt": _h_simple("transaction"),
    "LockStmt": _h_lock,
    "ListenStmt": _h_simple("listen"),
    "UnlistenStmt": _h_simple("unlisten"),
    "NotifyStmt": _h_simple("notify"),
    "VacuumStmt": _h_vacuum,
    "ReindexStmt": _h_maintenance("reindex"),
    "ClusterStmt": _h_maintenance("cluster"),
    "RefreshMatViewStmt": _h_maintenance("refresh_materialized_view"),
    "CheckPointStmt": _h_simple("checkpoint"),
    "LoadStmt": _h_simple("load"),
    "AlterSystemStmt": _h_simple("alter_system"),
    "TruncateStmt": _h_truncate,
    "CreateTableAsStmt": _h_create_table_as,
    "ViewStmt": _h_view,
    "CreateFunctionStmt": _h_create_function,
    "ReturnStmt": _h_return,
    "CreateTrigStmt": _h_create_trigger,
    "CreateEventTrigStmt": _h_create_event_trigger,
    "RuleStmt": _h_rule,
    "DropStmt": _h_drop,
    "CommentStmt": _h_comment("comment"),
    "SecLabelStmt": _h_comment("security_label"),
    "GrantStmt": _h_grant,
    "GrantRoleStmt": _h_grant_role,
    "AlterDefaultPrivilegesStmt": _h_default_privileges,
    "RenameStmt": _h_rename,
    "AlterObjectSchemaStmt": _h_object_ddl("alter_object_schema", "objectType"),
    "AlterOwnerStmt": _h_object_ddl("alter_owner", "objectType"),
    "CreateExtensionStmt": _h_create_extension,
    "CreateSchemaStmt": _h_create_schema,
}


# --- entry points -------------------------------------------------------------------------

# Everything of a summary except its text, in field order: what the cache stores.
_Values = tuple[Any, ...]


def _error(exc: BaseException) -> AnalysisError:
    if isinstance(exc, _pg.ParseError):
        message = str(exc.args[0]) if exc.args else "syntax error"
        location = exc.args[1] if len(exc.args) > 1 else None
        position = location + 1 if isinstance(location, int) else None
        sqlstate = STATEMENT_TOO_COMPLEX if "stack depth" in message else SYNTAX_ERROR
        return AnalysisError(message, sqlstate, position=position)
    if isinstance(exc, RecursionError):
        return AnalysisError("statement is nested too deeply to analyze", STATEMENT_TOO_COMPLEX)
    if isinstance(exc, UnicodeError):
        return AnalysisError(
            "invalid character in statement text (not encodable as UTF-8)",
            CHARACTER_NOT_IN_REPERTOIRE,
        )
    return AnalysisError(
        f"statement not supported by the analyzer ({type(exc).__name__})", FEATURE_NOT_SUPPORTED
    )


# PostgreSQL's whitespace. str.strip() also removes characters such as U+00A0 that the
# server reads as part of an identifier: "SELECT * FROM t\u00a0" reads table "t\u00a0".
_PG_SPACE: Final = " \t\n\r\f\v"


def split_text(sql: str) -> list[str]:
    """The statements of ``sql`` as PostgreSQL's parser delimits them (empty ones dropped)."""
    return [piece for piece in _split(sql) if piece]


def _split(sql: str) -> list[str]:
    """The statements of ``sql`` as the parser delimits them, trimmed of whitespace only."""
    if "\x00" in sql:
        raise AnalysisError(
            'invalid byte sequence for encoding "UTF8": 0x00', CHARACTER_NOT_IN_REPERTOIRE
        )
    try:
        slices = _pg.split(sql, only_slices=True)
    except (_pg.ParseError, UnicodeError) as exc:
        raise _error(exc) from None
    pieces: list[str] = []
    for part in slices:
        # pglast trims each slice with str.strip(); only whitespace (by Python's measure)
        # lies between the trimmed end and the statement's ";" or the end of the text,
        # so extend to there and trim PostgreSQL's whitespace alone.
        end = sql.find(";", part.stop)
        pieces.append(sql[part.start : end if end >= 0 else len(sql)].rstrip(_PG_SPACE))
    return pieces


def _analyze_statement(text: str) -> tuple[_Values, bool]:
    """Walk one statement's tree: (summary values without the text, literal-dependent)."""
    try:
        tree = json.loads(_pg.parse_sql_json(text))
        try:
            fingerprint: str = _pg.fingerprint(text)
        except _pg.ParseError:  # an identifier for audit, not needed for the decision
            fingerprint = ""
        w = _Walk()
        for raw in tree.get("stmts", ()):
            w.node(raw.get("stmt"), _SELECT)
        columns = w.columns_out()
    except AnalysisError:
        raise
    except Exception as exc:  # fail closed: whatever the walk did not expect is refused
        raise _error(exc) from None
    values: _Values = (
        fingerprint,
        frozenset(w.ops | w.deferred),
        frozenset(w.reads),
        frozenset(w.writes),
        frozenset(w.functions),
        columns,
        w.unbounded,
        w.row_locks,
        frozenset(w.params),
        w.command,
        frozenset(w.deferred - w.ops),
        tuple(w.aliases),
        w.opaque,
        w.prepared_name,
        tuple(w.search_path),
        tuple(w.text_settings),
        w.derived,
        frozenset(w.own_signals - w.other_signals),
    )
    return values, w.literal_dependent


_BY_TEXT: Final[_Values] = ("by-text",)  # marker: this shape is cached by exact text only
_EXACT: Final = "\x00"  # prefix of exact-text keys (statement text never holds NUL)


# Non-ASCII text is excluded too: PostgreSQL reads every non-ASCII character as part of an
# identifier, but \b does not (qwc€1 would become qwc€0).
def _fast_key_safe(text: str) -> bool:
    """No quote, dollar, backslash, comment or non-ASCII character (a few C scans)."""
    return (
        text.isascii()
        and "'" not in text
        and '"' not in text
        and "$" not in text
        and "\\" not in text
        and "--" not in text
        and "/*" not in text
    )


_NUMBER: Final = re.compile(r"\b\d+\b")
_FAST_PREFIX: Final = "\x00fast:"


class Analyzer:
    """:func:`analyze` with a cache of summaries by statement shape.

    A repeated shape (same statement, other constants) costs a normalization (one parse
    in C), a dictionary lookup and the summary's construction; text holding a semicolon
    is first split by the parser. Up to ``max_entries`` shapes are kept, oldest evicted
    first; statements whose normalized text is longer than ``max_key_length`` characters
    are not cached. ``hits`` and ``misses`` count statements.
    """

    def __init__(self, max_entries: int = 10000, *, max_key_length: int = 16384) -> None:
        self.max_entries = max_entries
        self.max_key_length = max_key_length
        self._cache: dict[str, _Values] = {}
        self.hits = 0
        self.misses = 0

    def analyze(self, sql: str) -> tuple[StatementSummary, ...]:
        """One summary per statement in ``sql``; raises :class:`AnalysisError`."""
        body = sql.rstrip(_PG_SPACE)
        if body.endswith(";") and ";" not in body[:-1]:
            # One statement with its terminator (pgbench, most drivers): the parser's
            # slice is the text before the ";".
            sql = body[:-1]
        if ";" not in sql and "\x00" not in sql:
            # Without a semicolon there is at most one statement, and unless a comment
            # leads, the parser's slice of it is the stripped text: skip the split.
            text = sql.strip(_PG_SPACE)
            if text and not text.startswith(("--", "/*")):
                try:
                    return (self._statement(text),)
                except AnalysisError:
                    pass  # let the split report the error against the whole text
        return tuple(self._statement(piece) for piece in _split(sql))

    def clear(self) -> None:
        """Forget every cached shape."""
        self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)

    def _statement(self, text: str) -> StatementSummary:
        cache = self._cache
        # Fast key for text with no quotes, escapes, dollar signs or comments: there, a
        # run of digits standing alone can only be a numeric constant, so replacing it
        # keeps every identifier, keyword and operator. It saves the normalizing parse.
        fast = None
        if _fast_key_safe(text):
            fast = _FAST_PREFIX + _NUMBER.sub("0", text)
            values = cache.get(fast)
            if values is not None and values is not _BY_TEXT:
                self.hits += 1
                return StatementSummary(text, *values)
        key = ""
        if self.max_entries > 0:
            try:
                key = _pg.normalize(text)
            except Exception:  # normalization is an optimization: analyze without it
                key = ""
        if key:
            values = cache.get(key)
            by_text = values is _BY_TEXT
            if by_text:
                values = cache.get(_EXACT + text)
            if values is not None:
                self.hits += 1
                if fast is not None and not by_text:
                    self._store(fast, values)
                return StatementSummary(text, *values)
        self.misses += 1
        values, literal_dependent = _analyze_statement(text)
        if key and self.max_entries > 0 and len(key) <= self.max_key_length:
            if literal_dependent:
                self._store(key, _BY_TEXT)
                self._store(_EXACT + text, values)
            else:
                self._store(key, values)
                if fast is not None:
                    self._store(fast, values)
        return StatementSummary(text, *values)

    def _store(self, key: str, values: _Values) -> None:
        cache = self._cache
        if key not in cache:
            while len(cache) >= self.max_entries:
                cache.pop(next(iter(cache)), None)
        cache[key] = values


_DEFAULT = Analyzer()


def analyze(sql: str) -> tuple[StatementSummary, ...]:
    """Analyze SQL text: one :class:`StatementSummary` per statement, ``()`` if empty.

    Raises :class:`AnalysisError` for text the parser rejects. Uses a shared
    :class:`Analyzer`, so repeated shapes are cheap.
    """
    return _DEFAULT.analyze(sql)


# Scanner tokens the normalizer can leave in place: constants inside utility statements
# (a DEFAULT, a PREPARE's body, a role's PASSWORD in some forms) and comments, which it
# keeps verbatim. Either may carry values ("/* ssn 123-45-6789 */").
_CONSTANT_TOKENS: Final = frozenset({"SCONST", "USCONST", "BCONST", "XCONST", "ICONST", "FCONST"})
_COMMENT_TOKENS: Final = frozenset({"C_COMMENT", "SQL_COMMENT"})


def sanitized_text(sql: str) -> str | None:
    """``sql`` with every constant a ``$n`` and no comments; None when it does not parse.

    The text for places outside the audit log (the OTLP export): the same normalization
    the :class:`Analyzer` keys its cache by (libpg_query's, ``... WHERE ssn = $1``), then
    a pass of the scanner over its result for what it leaves (constants in utility
    statements, comments). Text the parser rejects has no sanitized form: None, never
    the text itself.
    """
    try:
        normalized: str = _pg.normalize(sql)
    except Exception:  # a parse error, or input the C library refuses: nothing to show
        return None
    return _sanitized_normalized(normalized)


@functools.lru_cache(maxsize=4096)
def _sanitized_normalized(normalized: str) -> str | None:
    """The rest of :func:`sanitized_text`, a function of the normalized text alone.

    Statements of one shape normalize to the same text whatever their constants, so this
    part (the scanner pass, three quarters of the cost) runs once per shape.
    """
    try:
        tokens = _pg.scan(normalized)
    except Exception:
        return None
    # Scanner offsets are character offsets into the text, ends inclusive.
    numbers = [
        int(normalized[t.start + 1 : t.end + 1])
        for t in tokens
        if t.name == "PARAM" and normalized[t.start + 1 : t.end + 1].isdigit()
    ]
    last = max(numbers, default=0)
    pieces: list[str] = []
    done = 0
    for token in tokens:
        if token.name in _CONSTANT_TOKENS:
            last += 1
            replacement = f"${last}"
        elif token.name in _COMMENT_TOKENS:
            replacement = " "  # a comment separates tokens: keep them apart
        else:
            continue
        pieces += (normalized[done : token.start], replacement)
        done = token.end + 1
    pieces.append(normalized[done:])
    return "".join(pieces).strip(_PG_SPACE)
