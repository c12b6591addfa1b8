"""What an identity may do with some tables, and what it sees masked there. Sans-I/O.

:func:`describe_access` answers ``POST /access`` on the admin API (the MCP server's
``describe`` tool asks it): for each relation, the outcome of ``select``, ``insert``,
``update`` and ``delete`` under the gateway's policy engine, and the columns masked for
the identity with their strategies. Nothing here is a second policy: each operation is
decided by :meth:`PolicyEngine.evaluate` on the summary the analyzer would give one
statement of that operation on that relation, and each column by the
:class:`~querywarden.masking.plan.Masker` over the database's
:class:`~querywarden.masking.catalog.SensitiveCatalog`, as the gateway decides a session's
statements and masks its results.

What the answer cannot say, because it depends on a statement not yet written:

* the statements are *bounded* (``UPDATE``/``DELETE`` with a ``WHERE``): a whole-table
  write may still need review (``review.unboundedWrite``), and a read may be held when a
  rule reviews full-table scans (the upstream's plan decides, at run time);
* functions called, other tables joined and the built-in protections on them;
* with ``masking.predicates: deny``, a masked column may not be used in WHERE, JOIN,
  GROUP BY, ORDER BY ... nor copied by INSERT ... SELECT or UPDATE SET.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from querywarden.analysis import ColumnRef, QualifiedName, StatementSummary
from querywarden.identity import Principal
from querywarden.masking.catalog import SensitiveCatalog
from querywarden.masking.plan import Masker
from querywarden.policy.engine import Outcome, PolicyEngine
from querywarden.policy.model import MaskedColumn

__all__ = [
    "MAX_RELATIONS",
    "OPERATIONS",
    "AccessReport",
    "AskedRelation",
    "OperationAccess",
    "RelationAccess",
    "describe_access",
]

#: The operations each relation is described for, in the answer's order.
OPERATIONS: tuple[str, ...] = ("select", "insert", "update", "delete")
#: Relations one request may ask about (the admin API refuses more).
MAX_RELATIONS = 500
#: PostgreSQL's identifiers are at most 63 bytes (NAMEDATALEN - 1); a schema, a dot, a name.
_MAX_NAME = 2 * 63 + 1
#: PostgreSQL's limit on a table's columns.
_MAX_COLUMNS = 1600


@dataclass(frozen=True, slots=True)
class AskedRelation:
    """A relation to describe: ``schema.table``, and optionally the columns it has.

    ``columns``, when given, limits the masked columns reported to those (in that order);
    without it every masked column the catalog knows for the relation is reported.
    """

    relation: str
    columns: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, relation: object, columns: object = None) -> AskedRelation:
        """Validate a relation name (and column list) from a request; ValueError if bad.

        A relation is ``schema.table``, as the policy names tables (no pattern: ``*``
        would stand for every table of a schema, not one table).
        """
        if not isinstance(relation, str):
            raise ValueError("a relation must be a string, schema.table")
        schema, dot, name = relation.partition(".")
        if not dot or not schema or not name:
            raise ValueError(f"relation {relation!r} must be schema-qualified: schema.table")
        if "*" in relation or "\x00" in relation:
            raise ValueError(f"relation {relation!r} must name one table (no * and no NUL)")
        if len(relation.encode("utf-8", "surrogatepass")) > _MAX_NAME:
            raise ValueError(f"relation {relation[:40]!r}... is longer than a PostgreSQL name")
        if columns is None:
            return cls(relation)
        if not isinstance(columns, list) or len(columns) > _MAX_COLUMNS:
            raise ValueError(
                f"columns of {relation} must be a list of at most {_MAX_COLUMNS} names"
            )
        for column in columns:
            if not isinstance(column, str) or not column or "\x00" in column:
                raise ValueError(f"columns of {relation} must be non-empty strings")
        return cls(relation, tuple(columns))

    @property
    def name(self) -> QualifiedName:
        """The relation as the analyzer reports a schema-qualified name."""
        schema, _, name = self.relation.partition(".")
        return QualifiedName(schema, name)


@dataclass(frozen=True, slots=True)
class OperationAccess:
    """The policy's outcome for one operation on one relation, and the rule behind it."""

    outcome: Outcome
    rule: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        """``{"outcome", "rule", "reason"}``."""
        return {"outcome": self.outcome, "rule": self.rule, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class RelationAccess:
    """What one identity may do with one relation, and which of its columns are masked."""

    relation: str
    #: Operation (:data:`OPERATIONS`) -> outcome.
    operations: Mapping[str, OperationAccess]
    #: Column -> strategy (``redact``, ``partial``, ``hash`` ...), after overrides.
    masked: Mapping[str, str]

    def to_json(self) -> dict[str, Any]:
        """``{"relation", "operations": {op: OperationAccess}, "masked": {column: strategy}}``."""
        return {
            "relation": self.relation,
            "operations": {op: found.to_json() for op, found in self.operations.items()},
            "masked": dict(self.masked),
        }


@dataclass(frozen=True, slots=True)
class AccessReport:
    """The answer for one identity, one database and the relations asked about."""

    subject: str
    database: str
    #: Whether masking applies to the identity at all (the policy masks, it is not exempt).
    masked: bool
    #: Whether the content detectors scan the text columns of its results.
    scans_text: bool
    #: The detectors that do (empty when ``scans_text`` is false).
    detectors: tuple[str, ...]
    relations: tuple[RelationAccess, ...]

    def to_json(self) -> dict[str, Any]:
        """The admin API's answer to ``POST /access`` (docs/approvals.md)."""
        return {
            "subject": self.subject,
            "database": self.database,
            "masked": self.masked,
            "detectors": list(self.detectors),
            "relations": [r.to_json() for r in self.relations],
        }


def describe_access(
    principal: Principal,
    database: str,
    relations: Sequence[AskedRelation],
    *,
    engine: PolicyEngine,
    masker: Masker | None,
    catalog: SensitiveCatalog | None,
) -> AccessReport:
    """What ``principal`` may do with each relation of ``database``, and what it sees masked.

    Each operation is decided by ``engine.evaluate`` on the summary of one bounded
    statement (``SELECT * FROM r``, ``INSERT INTO r ...``, ``UPDATE r ... WHERE ...``,
    ``DELETE FROM r WHERE ...``): whole-table writes (without WHERE) may still need review
    (``review.unboundedWrite``), and a read may still be held when a rule reviews
    full-table scans, which the upstream's plan decides when the statement runs.

    Masked columns come from ``catalog`` (its columns by name: configured tables, their
    partitions and children, views over them), each with the strategy this identity
    gets after the column's overrides (``none`` leaves it out); an exempt identity has
    none. Without a catalog, the policy's configured columns of the relation are used
    (children and views are then not known): the gateway passes one whenever masking
    applies to the identity.
    """
    applies = masker is not None and masker.applies_to(principal)
    detectors = tuple(masker.section.detectors) if masker is not None and applies else ()
    sensitive = _sensitive_columns(masker, catalog, {r.relation for r in relations})
    described = []
    for asked in relations:
        name = asked.name
        operations = {
            operation: _decide(engine, principal, database, operation, name)
            for operation in OPERATIONS
        }
        masked: dict[str, str] = {}
        if applies:
            assert masker is not None
            columns = sensitive.get(asked.relation, {})
            wanted = asked.columns if asked.columns is not None else sorted(columns)
            for column in wanted:
                configured = columns.get(column)
                spec = masker.spec_for(configured, principal) if configured else None
                if spec is not None:
                    masked[column] = spec.strategy
        described.append(RelationAccess(asked.relation, operations, masked))
    return AccessReport(
        subject=principal.subject,
        database=database,
        masked=applies,
        scans_text=bool(detectors),
        detectors=detectors,
        relations=tuple(described),
    )


def _sensitive_columns(
    masker: Masker | None, catalog: SensitiveCatalog | None, relations: Iterable[str]
) -> dict[str, dict[str, MaskedColumn]]:
    """Relation -> column -> its configured column, for the relations asked about."""
    wanted = set(relations)
    found: dict[str, dict[str, MaskedColumn]] = {}
    if masker is None:
        return found
    if catalog is not None:
        for (relation, column), configured in catalog.by_name.items():
            if relation in wanted:
                found.setdefault(relation, {})[column] = configured
        return found
    for configured in masker.section.columns:
        if configured.qualified_table in wanted:
            found.setdefault(configured.qualified_table, {})[configured.column] = configured
    return found


def _decide(
    engine: PolicyEngine,
    principal: Principal,
    database: str,
    operation: str,
    relation: QualifiedName,
) -> OperationAccess:
    verdict = engine.evaluate(principal, database, [_summary(operation, relation)])
    return OperationAccess(verdict.outcome, verdict.rule, verdict.reason)


def _summary(operation: str, relation: QualifiedName) -> StatementSummary:
    """What the analyzer reports for one bounded statement of ``operation`` on ``relation``.

    As for ``SELECT * FROM r``, ``INSERT INTO r VALUES (...)``, ``UPDATE r SET c = ...
    WHERE k = ...`` and ``DELETE FROM r WHERE k = ...``: a DML target is written, not
    read, and a WHERE makes the write bounded.
    """
    reading = operation == "select"
    alias = ((relation.name, relation),)
    target = () if reading else (("old", relation), ("new", relation))
    return StatementSummary(
        text=f"-- {operation} on {relation} (POST /access)",
        fingerprint="",
        operations=frozenset({operation}),
        reads=frozenset({relation}) if reading else frozenset(),
        writes=frozenset() if reading else frozenset({relation}),
        functions=frozenset(),
        columns=(ColumnRef(None, "*", "select", direct=True),) if reading else (),
        unbounded_write=False,
        row_locks=False,
        set_parameters=frozenset(),
        command=operation,
        aliases=alias + target,
    )
