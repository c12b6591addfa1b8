"""What to mask in one request's results, decided with the statement. Sans-I/O.

Two sources say which result columns carry sensitive values:

* **Origins.** A RowDescription names each plain column by ``(table OID, attnum)``,
  traced by PostgreSQL through aliases, FROM subqueries and CTEs. Origins in the
  :class:`~querywarden.masking.catalog.SensitiveCatalog` are masked with their column's
  strategy, whatever the statement looks like.
* **The statement.** A column computed from a sensitive one (``upper(ssn)``,
  ``ssn || ''``, ``row_to_json(c)``, ``string_agg(ssn, ',')``, a UNION branch, a scalar
  subquery) has no origin. When the analyzer finds a sensitive column in such a place,
  or anything whose lineage it cannot follow (a user-defined function, dynamic SQL, a
  cursor FETCH), the request is *tainted*: every result column without an origin is
  masked whole (redacted, or NULL where the type has no safe constant).

With ``predicates: deny`` a statement may not use a sensitive column where its value
would steer the result (WHERE, JOIN, GROUP BY, ORDER BY, HAVING, windows, LIMIT) or be
stored somewhere unmasked (INSERT ... SELECT, UPDATE SET, CREATE TABLE AS); such a
statement is refused, not masked. ``COPY ... TO STDOUT`` of sensitive data is refused
too: use SELECT, whose results are masked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from querywarden.analysis import RELATION_READERS, QualifiedName, StatementSummary
from querywarden.identity import Principal
from querywarden.masking.catalog import Origin, SensitiveCatalog
from querywarden.masking.detectors import ContentScanner
from querywarden.masking.strategies import MIN_KEY_BYTES, MaskSpec
from querywarden.policy.model import MaskedColumn, MaskingSection, MaskStrategy

#: Clauses whose column values reach the client as result columns.
_OUTPUT_CLAUSES = frozenset({"select", "returning"})
#: What a tainted request's computed columns become.
_COMPUTED = MaskSpec("redact")
#: Statements that run code of their own (PL/pgSQL and the like): opaque to the analyzer.
_OPAQUE_CODE = frozenset({"do", "call"})
#: Entries a catalog snapshot keeps for the maskers (resolved columns, plans) before
#: starting over: a bound on memory for clients that never repeat a statement shape.
_DERIVED_LIMIT = 4096
#: Marks a plan's cache key apart from :meth:`Masker._resolve`'s.
_PLAN = "plan"
#: Functions whose arguments leave the session unmasked, what becomes of them, and what to
#: do instead. A setting's value comes back through SHOW and current_setting(), which are
#: no result column of the masked table.
_UNMASKED_CHANNELS: dict[str, tuple[str, str]] = {
    "pg_notify": (
        "notification payloads are not masked",
        "notify without masked values (for example the row's primary key)",
    ),
    "set_config": (
        "a setting's value comes back unmasked (SHOW, current_setting)",
        "keep masked values out of settings; SELECT them instead (results are masked)",
    ),
}


@dataclass(frozen=True, slots=True)
class ColumnMask:
    """One masked column as applied for one identity."""

    spec: MaskSpec
    #: ``schema.table.column`` of the configured column (for the audit summary).
    name: str


@dataclass(frozen=True, slots=True)
class MaskPlan:
    """How one request's results are masked (shared by the statements it holds)."""

    origins: dict[Origin, ColumnMask]
    #: Applied to result columns without an origin; None: they pass (the request does
    #: not derive anything from a sensitive column).
    computed: ColumnMask | None
    scanner: ContentScanner | None
    #: Error and notice texts may echo sensitive values: scrub them.
    scrub_errors: bool
    key: bytes = field(repr=False, default=b"")
    #: Code the gateway cannot see into runs (a user's function, dynamic SQL): it may
    #: RAISE any value in any words, so error and notice texts are withheld whole.
    withhold_messages: bool = False
    #: Every value of every column is masked (NULL): rows the session cannot attribute.
    mask_all: bool = False
    #: The relations the catalog behind this plan knows (None: not checked). A result
    #: naming another one comes from a newer catalog state: the plan is made again.
    relations: frozenset[int] | None = field(default=None, repr=False)
    #: What the plan was made from, to make it again with a newer catalog.
    catalog: SensitiveCatalog | None = field(default=None, repr=False, compare=False)
    statements: tuple[StatementSummary, ...] = field(default=(), repr=False, compare=False)
    search_path: tuple[str, ...] = field(default=(), repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class MaskRefusal:
    """A statement masking cannot allow, with what the client may do instead."""

    reason: str
    hint: str


def _spec(strategy: MaskStrategy) -> MaskSpec:
    return MaskSpec(
        strategy.strategy,
        keep_first=strategy.keep_first,
        keep_last=strategy.keep_last,
        replacement=strategy.replacement,
    )


@dataclass(frozen=True, slots=True)
class _Resolved:
    """A catalog's sensitive columns as one identity sees them (by origin and by name)."""

    origins: dict[Origin, ColumnMask]
    names: set[tuple[str, str]]
    #: The tables of ``names``: worked out once per snapshot and identity, not per
    #: statement (the set can hold every column of a large schema).
    relations: frozenset[str]


class Masker:
    """The masking section of a policy, applied per identity and per request."""

    def __init__(self, section: MaskingSection, key: bytes | None) -> None:
        if section.uses_key and len(key or b"") < MIN_KEY_BYTES:
            raise ValueError(
                "the policy masks with strategy hash or digits, which needs masking.hashKey "
                f"(or hashKeyFile) of at least {MIN_KEY_BYTES} bytes in the gateway settings"
            )
        self.section = section
        self.key = key or b""
        self.scanner = ContentScanner(section.detectors) if section.detectors else None

    @property
    def active(self) -> bool:
        """Whether the policy masks anything at all."""
        return bool(self.section.columns or self.section.detectors)

    def applies_to(self, principal: Principal) -> bool:
        """Whether this identity's results are masked (it is not exempt)."""
        exempt = self.section.exempt
        return self.active and not (
            principal.subject in exempt.users or not principal.groups.isdisjoint(exempt.groups)
        )

    def spec_for(self, column: MaskedColumn, principal: Principal) -> MaskSpec | None:
        """How ``column`` is masked for this identity (None: it sees the real value).

        The first override naming the identity wins (``none``: None), else the column's
        own strategy. Exemption is not checked here: see :meth:`applies_to`.
        """
        for override in column.overrides:
            if principal.subject in override.users or not principal.groups.isdisjoint(
                override.groups
            ):
                return None if override.strategy == "none" else _spec(override)
        return _spec(column)

    def _resolve(self, catalog: SensitiveCatalog, principal: Principal) -> _Resolved:
        # Cached on the catalog snapshot itself, per masker and identity: a new snapshot
        # (or a reloaded policy's masker) starts empty, and the entries die with it.
        key = (self, principal.subject, principal.groups)
        found = catalog.derived.get(key)
        if isinstance(found, _Resolved):
            return found
        origins: dict[Origin, ColumnMask] = {}
        names: set[tuple[str, str]] = set()
        for origin, column in catalog.by_origin.items():
            spec = self.spec_for(column, principal)
            if spec is not None:
                origins[origin] = ColumnMask(spec, f"{column.qualified_table}.{column.column}")
        for name, column in catalog.by_name.items():
            if self.spec_for(column, principal) is not None:
                names.add(name)
        if len(catalog.derived) > _DERIVED_LIMIT:
            catalog.derived.clear()
        resolved = _Resolved(origins, names, frozenset(table for table, _ in names))
        catalog.derived[key] = resolved
        return resolved

    def plan(
        self,
        principal: Principal,
        catalog: SensitiveCatalog,
        summaries: Sequence[StatementSummary],
        search_path: Sequence[str],
    ) -> MaskPlan | MaskRefusal:
        """The plan for a request, or why masking cannot let it run.

        Made once per statement shape: an agent repeats the same statements with other
        constants, which analyze to the same summaries but for their text. Cached on the
        catalog snapshot (as
        :meth:`_resolve` is), per masker, identity, summaries and search_path: everything
        the plan is made of. Plans are immutable.
        """
        summaries = tuple(summaries)
        path = tuple(search_path)
        # A summary carries its statement's text, which the plan does not use: keyed
        # without it, the same shape with other constants finds the same plan.
        shape = tuple(s._replace(text="") for s in summaries)
        key = (_PLAN, self, principal.subject, principal.groups, shape, path)
        found = catalog.derived.get(key)
        if isinstance(found, MaskPlan | MaskRefusal):
            return found
        made = self._plan(principal, catalog, summaries, path)
        if len(catalog.derived) > _DERIVED_LIMIT:
            catalog.derived.clear()
        catalog.derived[key] = made
        return made

    def _plan(
        self,
        principal: Principal,
        catalog: SensitiveCatalog,
        summaries: tuple[StatementSummary, ...],
        search_path: tuple[str, ...],
    ) -> MaskPlan | MaskRefusal:
        resolved = self._resolve(catalog, principal)
        origins, names, relations = resolved.origins, resolved.names, resolved.relations
        tainted = False
        touches = False
        withhold = False
        for summary in summaries:
            found = _Findings(summary, names, relations, search_path)
            touches = touches or found.any_sensitive or found.touches
            if found.any_sensitive and "copy_out" in summary.operations:
                return MaskRefusal(
                    f"COPY ... TO STDOUT would send masked column {found.first} unmasked",
                    "use SELECT instead: its results are masked",
                )
            if self.section.predicates == "deny":
                refusal = found.predicate_refusal()
                if refusal is not None:
                    return refusal
            if names and summary.operations & _OPAQUE_CODE:
                return MaskRefusal(
                    "DO blocks and procedures run code the gateway cannot see into: with "
                    "masked columns in this database their values could leave through "
                    "notices, settings or other tables, unmasked",
                    "run the statements the block would run as plain SQL (SELECT results "
                    "are masked)",
                )
            channel = next(
                (f.name for f in summary.functions if f.name in _UNMASKED_CHANNELS), None
            )
            if found.any_sensitive and channel is not None:
                why, instead = _UNMASKED_CHANNELS[channel]
                return MaskRefusal(
                    f"masked column {found.first} may not be sent with {channel}: {why}",
                    instead,
                )
            opaque = _opaque_lineage(summary, catalog)
            withhold = withhold or (opaque and bool(names))
            tainted = tainted or found.tainted or opaque
        computed = ColumnMask(_COMPUTED, "(computed)") if tainted and names else None
        return MaskPlan(
            origins=origins,
            computed=computed,
            scanner=self.scanner,
            scrub_errors=touches or tainted,
            key=self.key,
            withhold_messages=withhold,
            relations=catalog.relation_oids or None,
            catalog=catalog,
            statements=tuple(summaries),
            search_path=tuple(search_path),
        )


def _opaque_lineage(summary: StatementSummary, catalog: SensitiveCatalog) -> bool:
    """Whether results may carry values whose origin the analyzer cannot follow."""
    if summary.opaque or "fetch" in summary.operations:
        return True
    # A user-defined function may read any table; built-ins see only their arguments.
    # Unqualified names resolve to pg_catalog first, so they are built-ins when
    # pg_catalog has a function of that name.
    builtins = catalog.builtin_functions
    return any(
        (f.schema is None and f.name not in builtins)
        or (f.schema is not None and f.schema != "pg_catalog")
        for f in summary.functions
    )


class _Findings:
    """Sensitive column references of one statement, by where they appear."""

    def __init__(
        self,
        summary: StatementSummary,
        names: set[tuple[str, str]],
        relations: frozenset[str],
        search_path: Sequence[str],
    ) -> None:
        self.summary = summary
        self.any_sensitive = False
        self.tainted = False
        self.first = ""
        self.predicate: tuple[str, str] | None = None
        self.unresolved_predicate = False
        aliases: dict[str, list[QualifiedName]] = {}
        for visible, relation in summary.aliases:
            aliases.setdefault(visible, []).append(relation)
        read = list(summary.reads | summary.writes)
        #: The statement reads or writes a relation with sensitive columns: its errors
        #: may echo their values (``Failing row contains (...)``).
        self.touches = any(
            c in relations for relation in read for c in _candidates(relation, search_path)
        )
        for ref in summary.columns:
            if ref.relation is not None:
                targets = aliases.get(ref.relation)
                if targets is None:
                    targets = [_qualified(ref.relation)] if "." in ref.relation else []
                    if ref.clause not in _OUTPUT_CLAUSES:
                        self.unresolved_predicate = True
            else:
                targets = read
                if ref.clause not in _OUTPUT_CLAUSES and summary.derived:
                    self.unresolved_predicate = True
            hit = self._hit(ref.column, targets, names, relations, search_path)
            if hit is None:
                continue
            self.any_sensitive = True
            self.first = self.first or hit
            if ref.clause in _OUTPUT_CLAUSES:
                if not ref.direct:
                    self.tainted = True
            elif self.predicate is None:
                self.predicate = (hit, ref.clause)
        if not self.any_sensitive:
            # A relation with sensitive columns read whole by a function, not through
            # column references (table_to_xml('customers'), database_to_xml(...)).
            whole = any(f.name in RELATION_READERS for f in summary.functions)
            for relation in read:
                if whole and any(c in relations for c in _candidates(relation, search_path)):
                    self.any_sensitive = self.tainted = True
                    self.first = str(relation)

    @staticmethod
    def _hit(
        column: str,
        targets: Iterable[QualifiedName],
        names: set[tuple[str, str]],
        relations: frozenset[str],
        search_path: Sequence[str],
    ) -> str | None:
        for target in targets:
            for candidate in _candidates(target, search_path):
                if column == "*":
                    if candidate in relations:
                        return f"{candidate}.*"
                elif (candidate, column) in names:
                    return f"{candidate}.{column}"
        return None

    def predicate_refusal(self) -> MaskRefusal | None:
        if self.predicate is not None:
            column, clause = self.predicate
            where = _CLAUSE_WORDS.get(clause, clause.upper())
            return MaskRefusal(
                f"masked column {column} may not be used in {where}: that would reveal or "
                "copy its values",
                "select the column (its values are masked) and filter or join on other "
                "columns, such as the primary key",
            )
        if self.any_sensitive and self.unresolved_predicate:
            return MaskRefusal(
                f"masked column {self.first} flows through a subquery, CTE or function "
                "whose columns are used in a condition, so the gateway cannot tell whether "
                "the condition uses masked values",
                "filter on columns of the base tables directly, qualified with their table "
                "name or alias",
            )
        return None


_CLAUSE_WORDS = {
    "where": "WHERE",
    "join": "JOIN conditions",
    "group": "GROUP BY, DISTINCT or PARTITION BY",
    "order": "ORDER BY",
    "having": "HAVING",
    "values": "values stored by INSERT, CREATE TABLE AS or a view",
    "set": "UPDATE SET",
    "other": "this position (LIMIT, function arguments in FROM, ...)",
}


def _qualified(dotted: str) -> QualifiedName:
    schema, _, name = dotted.rpartition(".")
    return QualifiedName(schema or None, name)


def _candidates(relation: QualifiedName, search_path: Sequence[str]) -> list[str]:
    if relation.schema is not None:
        return [f"{relation.schema}.{relation.name}"]
    return [f"{schema}.{relation.name}" for schema in ("pg_catalog", *search_path)]
