"""Where sensitive columns live in one database: names and result-column origins.

A RowDescription names each plain result column by its origin, ``(table OID, attribute
number)``. The policy names sensitive columns as ``schema.table.column``. The
:class:`SensitiveCatalog` joins the two, once per database and refreshed on DDL or after
a TTL, so the result path only does dictionary lookups.

What counts as sensitive, beyond the configured columns:

* the same-named column of every partition and inheritance child of a configured table
  (a query on a partition reports the partition as the origin);
* the columns of a view or materialized view that carry a sensitive column, transitively.
  PostgreSQL records which columns a view's query uses, not which output column each one
  feeds, so the view's definition is read (:mod:`querywarden.masking.lineage`): when it
  is one plain SELECT whose sensitive references all sit in its output list, an output
  column that passes a sensitive column through takes that column's strategy, one whose
  expression uses a sensitive column is redacted, and the others are not sensitive.
  Otherwise (a sensitive column in WHERE, JOIN ON, GROUP BY...: the view's rows depend on
  it; set operations, subqueries, anything the lineage does not follow) every column of
  the view is sensitive, as before: a column named like a sensitive column it references
  takes that column's strategy, the others are redacted. Over-masking, never
  under-masking;
* every column of a view whose query calls a function outside pg_catalog (a user's or an
  extension's): PostgreSQL records the call, not what the function reads;
* the columns of PostgreSQL's statistics that hold sampled values (``pg_stats``'
  ``histogram_bounds`` and ``most_common_vals``, ``pg_statistic``'s ``stavalues``...):
  ANALYZE copies values of every column into them, sensitive ones included.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from querywarden.masking.lineage import ViewLineage, view_lineage
from querywarden.policy.model import MaskedColumn, MaskingSection

#: ``(table OID, attribute number)``, as a RowDescription field names its origin.
Origin = tuple[int, int]
#: ``("schema.relation", "column")``.
ColumnName = tuple[str, str]


@dataclass(frozen=True, slots=True)
class SensitiveCatalog:
    """The sensitive columns of one database, by origin and by name."""

    #: origin -> the configured column whose values it carries (its strategy applies).
    by_origin: dict[Origin, MaskedColumn] = field(default_factory=dict)
    #: (schema.relation, column) -> configured column, for tables, children and views.
    by_name: dict[ColumnName, MaskedColumn] = field(default_factory=dict)
    #: schema.relation of every table or view that has a sensitive column (whole-row
    #: references to these carry sensitive values).
    relations: frozenset[str] = frozenset()
    #: Bare column names of ``by_name`` (an unqualified column reference may be any).
    column_names: frozenset[str] = frozenset()
    #: Names of pg_catalog's functions: any other function may read sensitive tables.
    builtin_functions: frozenset[str] = frozenset()
    #: Every relation (table, view, partition...) the snapshot saw, sensitive or not: a
    #: result whose RowDescription names another one comes from a newer state.
    relation_oids: frozenset[int] = frozenset()
    #: What the catalog looked like when the snapshot was read (see ``_FINGERPRINT``).
    fingerprint: str = ""
    #: What maskers derived from this snapshot (per identity), kept here so that it lives
    #: and dies with the snapshot it was derived from: a cache keyed by something else
    #: (an address, a name) could hand a later snapshot another one's columns.
    derived: dict[object, object] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(
        cls,
        masked: Iterable[MaskedColumn],
        *,
        attributes: Iterable[tuple[int, str, str, int, str]],
        children: Iterable[tuple[int, int]],
        view_references: Iterable[tuple[int, int, int]],
        view_columns: Iterable[tuple[int, str, str, int, str]],
        view_definitions: Iterable[tuple[int, str]] = (),
        function_views: Iterable[int] = (),
        statistics_columns: Iterable[tuple[int, str, str, int, str]] = (),
        builtin_functions: Iterable[str] = (),
        relation_oids: Iterable[int] = (),
        fingerprint: str = "",
    ) -> SensitiveCatalog:
        """Join the policy's columns with catalog rows (see :func:`load_catalog`).

        ``attributes``: (relation OID, schema, relation, attnum, column) of every column of
        the configured tables and their children. ``children``: (child OID, parent OID)
        of inheritance and partitioning. ``view_references``: (view OID, referenced
        relation OID, referenced attnum). ``view_columns``: the views' columns, as
        ``attributes``. ``view_definitions``: (view OID, ``pg_get_viewdef`` text); a view
        without one has every column sensitive. ``function_views``: views whose query
        calls a function outside pg_catalog: what such a function reads is invisible
        here, so every column of those views is redacted (their columns must be in
        ``view_columns``). ``statistics_columns``: the catalog's columns of sampled values
        (as ``attributes``), redacted.
        """
        configured = {(c.qualified_table, c.column): c for c in masked}
        rows = list(attributes)
        parents: dict[int, list[int]] = {}
        for child, parent in children:
            parents.setdefault(child, []).append(parent)
        names_by_oid = {oid: f"{schema}.{rel}" for oid, schema, rel, _, _ in rows}
        by_origin: dict[Origin, MaskedColumn] = {}
        by_name: dict[ColumnName, MaskedColumn] = {}

        def ancestors(oid: int) -> list[int]:
            seen, todo = [], [oid]
            while todo:
                current = todo.pop()
                if current in seen:
                    continue
                seen.append(current)
                todo.extend(parents.get(current, ()))
            return seen

        for oid, schema, rel, attnum, column in rows:
            for ancestor in ancestors(oid):
                spec = configured.get((names_by_oid.get(ancestor, ""), column))
                if spec is not None:
                    by_origin[(oid, attnum)] = spec
                    by_name[(f"{schema}.{rel}", column)] = spec
                    break

        # Views: iterate to a fixpoint, since a view may be defined over another view.
        references: dict[int, set[Origin]] = {}
        for view, referenced, referenced_attnum in view_references:
            references.setdefault(view, set()).add((referenced, referenced_attnum))
        columns_of: dict[int, list[tuple[str, str, int, str]]] = {}
        for view_oid, view_schema, view_name, view_attnum, view_column in view_columns:
            columns_of.setdefault(view_oid, []).append(
                (view_schema, view_name, view_attnum, view_column)
            )
        # Where each origin's column lives, to match the lineage's (relation, column) names.
        origin_names: dict[Origin, tuple[str, str]] = {
            (oid, attnum): (rel, column) for oid, _, rel, attnum, column in rows
        }
        for view_oid, columns in columns_of.items():
            for _, rel, attnum, column in columns:
                origin_names[(view_oid, attnum)] = (rel, column)
        for oid, schema, rel, attnum, column in statistics_columns:
            spec = _redacted(schema, rel, column)
            by_origin[(oid, attnum)] = spec
            by_name[(f"{schema}.{rel}", column)] = spec
        lineages = {oid: view_lineage(text) for oid, text in view_definitions}
        for view in function_views:
            for schema, rel, attnum, column in columns_of.get(view, ()):
                spec = _redacted(schema, rel, column)
                by_origin[(view, attnum)] = spec
                by_name[(f"{schema}.{rel}", column)] = spec
        changed = True
        while changed:
            changed = False
            for view, used in references.items():
                sensitive = {o: by_origin[o] for o in used if o in by_origin}
                if not sensitive:
                    continue
                columns = sorted(columns_of.get(view, ()), key=lambda c: c[2])
                carried = _carried(lineages.get(view), sensitive, origin_names, len(columns))
                by_column = {spec.column: spec for spec in sensitive.values()}
                for position, (schema, rel, attnum, column) in enumerate(columns):
                    if (view, attnum) in by_origin:
                        continue
                    if carried is None:  # every column: the conservative reading
                        spec = by_column.get(column) or _redacted(schema, rel, column)
                    else:
                        found = carried[position]
                        if found is None:
                            continue  # carries no sensitive column
                        spec = found if found is not _REDACT else _redacted(schema, rel, column)
                    by_origin[(view, attnum)] = spec
                    by_name[(f"{schema}.{rel}", column)] = spec
                    changed = True
        return cls(
            by_origin=by_origin,
            by_name=by_name,
            relations=frozenset(name for name, _ in by_name),
            column_names=frozenset(column for _, column in by_name),
            builtin_functions=frozenset(builtin_functions),
            relation_oids=frozenset(relation_oids),
            fingerprint=fingerprint,
        )


#: Marks an output column whose expression uses a sensitive column (redacted whole).
_REDACT = MaskedColumn(table="querywarden.lineage", column="redact", strategy="redact")


def _carried(
    lineage: ViewLineage | None,
    sensitive: dict[Origin, MaskedColumn],
    origin_names: dict[Origin, tuple[str, str]],
    width: int,
) -> list[MaskedColumn | None] | None:
    """Per output column of a view: the spec it carries, :data:`_REDACT`, or None (clean).

    None for the whole view when the lineage cannot say: no lineage, a column count that
    does not match, a sensitive origin without a name, or a sensitive column used outside
    the output list (the view's rows then depend on it, whatever its columns show).
    """
    if lineage is None or len(lineage.outputs) != width:
        return None
    named: dict[Origin, tuple[str, str]] = {}
    for origin in sensitive:
        name = origin_names.get(origin)
        if name is None:
            return None
        named[origin] = name

    def denotes(ref: tuple[str | None, str]) -> set[Origin]:
        relation, column = ref
        return {
            origin
            for origin, (rel, col) in named.items()
            if col == column and (relation is None or rel == relation)
        }

    if any(denotes(ref) for ref in lineage.elsewhere):
        return None
    carried: list[MaskedColumn | None] = []
    for output in lineage.outputs:
        hits = set().union(*(denotes(ref) for ref in output.references))
        if not hits:
            carried.append(None)
        elif output.passthrough is not None and len(hits) == 1:
            carried.append(sensitive[hits.pop()])
        else:
            carried.append(_REDACT)
    return carried


def _redacted(schema: str, relation: str, column: str) -> MaskedColumn:
    return MaskedColumn(table=f"{schema}.{relation}", column=column, strategy="redact")


_ATTRIBUTES = """
WITH RECURSIVE configured AS (
    SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN unnest($1::text[], $2::text[]) AS t(nsp, rel) ON n.nspname = t.nsp AND c.relname = t.rel
), tree AS (
    SELECT oid FROM configured
    UNION
    SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid
)
SELECT c.oid, n.nspname, c.relname, a.attnum, a.attname
FROM tree JOIN pg_class c ON c.oid = tree.oid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
"""

_CHILDREN = "SELECT inhrelid, inhparent FROM pg_inherits"

_BUILTINS = "SELECT DISTINCT proname FROM pg_proc WHERE pronamespace = 'pg_catalog'::regnamespace"

_VIEW_REFERENCES = """
SELECT r.ev_class, d.refobjid, d.refobjsubid
FROM pg_depend d JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
WHERE d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0 AND d.refobjid <> r.ev_class
"""

# Views whose query calls a function that is not PostgreSQL's own (a user's or an
# extension's): it may read any table, and PostgreSQL records only the call.
_FUNCTION_VIEWS = """
SELECT DISTINCT r.ev_class
FROM pg_depend d JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
JOIN pg_proc p ON d.refclassid = 'pg_proc'::regclass AND d.refobjid = p.oid
WHERE p.pronamespace <> 'pg_catalog'::regnamespace
"""

# Where PostgreSQL keeps sampled column values (ANALYZE): the statistics views any role
# may read for the columns it may read, and the tables behind them (superuser only).
_STATISTICS_COLUMNS = """
SELECT c.oid, n.nspname, c.relname, a.attnum, a.attname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE n.nspname = 'pg_catalog' AND (
    (c.relname IN ('pg_stats', 'pg_stats_ext', 'pg_stats_ext_exprs')
     AND a.attname IN ('most_common_vals', 'histogram_bounds', 'most_common_elems'))
    OR (c.relname = 'pg_statistic' AND a.attname LIKE 'stavalues%')
    OR (c.relname = 'pg_statistic_ext_data' AND a.attname IN ('stxdmcv', 'stxdexpr'))
)
"""

_VIEW_DEFINITIONS = """
SELECT c.oid, pg_get_viewdef(c.oid) FROM pg_class c
WHERE c.oid = ANY($1::oid[]) AND c.relkind IN ('v', 'm')
"""

_VIEW_COLUMNS = """
SELECT c.oid, n.nspname, c.relname, a.attnum, a.attname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.oid = ANY($1::oid[])
"""


# Every relation a RowDescription may name as a column's origin.
_RELATIONS = "SELECT oid FROM pg_class WHERE relkind IN ('r', 'v', 'm', 'p', 'f')"

# Changes with any DDL that can change what a result column carries: a relation created,
# dropped, altered or rewritten (its pg_class row gets a new xmin or relfilenode), a
# view's query replaced (CREATE OR REPLACE VIEW keeps the OID; its pg_rewrite row gets a
# new xmin), a partition attached or detached.
_FINGERPRINT = """
SELECT md5(concat_ws('|',
    (SELECT string_agg(oid::text || ':' || xmin::text || ':' || relfilenode::text, ','
                       ORDER BY oid)
     FROM pg_class WHERE relkind IN ('r', 'v', 'm', 'p', 'f')),
    (SELECT string_agg(oid::text || ':' || xmin::text, ',' ORDER BY oid) FROM pg_rewrite),
    (SELECT string_agg(inhrelid::text || ':' || inhparent::text, ','
                       ORDER BY inhrelid, inhparent) FROM pg_inherits)))
"""


async def read_fingerprint(connection: Any) -> str:
    """The catalog's fingerprint now (compare with :attr:`SensitiveCatalog.fingerprint`)."""
    return str(await connection.fetchval(_FINGERPRINT))


async def load_catalog(connection: Any, masking: MaskingSection) -> SensitiveCatalog:
    """Read what :meth:`SensitiveCatalog.build` needs over an asyncpg connection.

    One repeatable-read transaction: the fingerprint describes exactly the state read.
    """
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        return await _load_catalog(connection, masking)


async def _load_catalog(connection: Any, masking: MaskingSection) -> SensitiveCatalog:
    fingerprint = await read_fingerprint(connection)
    relation_oids = [r[0] for r in await connection.fetch(_RELATIONS)]
    if not masking.columns:
        return SensitiveCatalog(relation_oids=frozenset(relation_oids), fingerprint=fingerprint)
    tables = sorted({c.qualified_table for c in masking.columns})
    schemas = [t.split(".", 1)[0] for t in tables]
    relations = [t.split(".", 1)[1] for t in tables]
    attributes = await connection.fetch(_ATTRIBUTES, schemas, relations)
    children = await connection.fetch(_CHILDREN)
    references = await connection.fetch(_VIEW_REFERENCES)
    function_views = [r[0] for r in await connection.fetch(_FUNCTION_VIEWS)]
    views = sorted({r[0] for r in references} | set(function_views))
    view_columns = await connection.fetch(_VIEW_COLUMNS, views) if views else []
    definitions = await connection.fetch(_VIEW_DEFINITIONS, views) if views else []
    statistics = await connection.fetch(_STATISTICS_COLUMNS)
    builtins = await connection.fetch(_BUILTINS)
    return SensitiveCatalog.build(
        masking.columns,
        attributes=[tuple(r) for r in attributes],
        children=[tuple(r) for r in children],
        view_references=[tuple(r) for r in references],
        view_columns=[tuple(r) for r in view_columns],
        view_definitions=[(r[0], r[1]) for r in definitions if r[1] is not None],
        function_views=function_views,
        statistics_columns=[tuple(r) for r in statistics],
        builtin_functions=[r[0] for r in builtins],
        relation_oids=relation_oids,
        fingerprint=fingerprint,
    )


class CatalogCache:
    """One :class:`SensitiveCatalog` per database, loaded on demand and kept current.

    ``loader(database)`` reads a fresh catalog. A snapshot is used for ``ttl`` seconds at
    most, and, when a ``fingerprinter(database)`` is given, only while the catalog's
    fingerprint (checked at most every ``recheck`` seconds) is the one it was read with:
    DDL run outside the gateway (a migration, the application) is seen within that
    interval. :meth:`invalidate` (DDL through the gateway) and :meth:`refresh` (a result
    named a relation the snapshot does not know) read it again at once. Concurrent
    requests for the same database share one load. A failed load raises: the caller
    refuses (fail closed).
    """

    def __init__(
        self,
        loader: Callable[[str], Awaitable[SensitiveCatalog]],
        *,
        ttl: float = 60.0,
        fingerprinter: Callable[[str], Awaitable[str]] | None = None,
        recheck: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loader = loader
        self._fingerprinter = fingerprinter
        self.ttl = ttl
        self.recheck = recheck
        self._clock = clock
        # database -> (read at, last confirmed current at, snapshot)
        self._snapshots: dict[str, tuple[float, float, SensitiveCatalog]] = {}
        self._loading: dict[str, asyncio.Future[SensitiveCatalog]] = {}

    def current(self, database: str) -> SensitiveCatalog | None:
        """The snapshot if it is known to be current, else None (call :meth:`get`)."""
        found = self._snapshots.get(database)
        if found is None:
            return None
        now = self._clock()
        if now - found[0] > self.ttl:
            return None
        if self._fingerprinter is not None and now - found[1] > self.recheck:
            return None
        return found[2]

    async def get(self, database: str) -> SensitiveCatalog:
        """A current snapshot: the one held if the catalog did not change, else a new one."""
        snapshot = self.current(database)
        if snapshot is not None:
            return snapshot
        return await self._shared(database, self._check_or_load)

    async def refresh(self, database: str, seen: SensitiveCatalog | None) -> SensitiveCatalog:
        """A snapshot newer than ``seen`` (read now, unless another one already was)."""
        found = self._snapshots.get(database)
        if found is not None and found[2] is not seen and self.current(database) is not None:
            return found[2]
        pending = self._loading.get(database)
        if pending is not None:
            snapshot = await asyncio.shield(pending)
            if snapshot is not seen:
                return snapshot
        self._snapshots.pop(database, None)
        return await self._shared(database, self._load)

    async def _shared(
        self, database: str, how: Callable[[str], Awaitable[SensitiveCatalog]]
    ) -> SensitiveCatalog:
        pending = self._loading.get(database)
        if pending is None:
            pending = asyncio.ensure_future(how(database))
            self._loading[database] = pending
            pending.add_done_callback(lambda done: self._forget_load(database, done))
        return await asyncio.shield(pending)

    def _forget_load(self, database: str, done: asyncio.Future[SensitiveCatalog]) -> None:
        if self._loading.get(database) is done:
            del self._loading[database]

    async def _check_or_load(self, database: str) -> SensitiveCatalog:
        found = self._snapshots.get(database)
        if (
            found is not None
            and self._fingerprinter is not None
            and self._clock() - found[0] <= self.ttl
        ):
            started = self._clock()
            if await self._fingerprinter(database) == found[2].fingerprint:
                if self._snapshots.get(database) is found:
                    self._snapshots[database] = (found[0], started, found[2])
                return found[2]
        return await self._load(database)

    async def _load(self, database: str) -> SensitiveCatalog:
        started = self._clock()
        snapshot = await self._loader(database)
        self._snapshots[database] = (started, started, snapshot)
        return snapshot

    def invalidate(self, database: str | None = None) -> None:
        """Forget the snapshot of ``database`` (all when None): DDL may have changed it."""
        if database is None:
            self._snapshots.clear()
        else:
            self._snapshots.pop(database, None)
