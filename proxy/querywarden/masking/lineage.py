"""Which output column of a view carries which base column: lineage from the view's SQL.

PostgreSQL records the columns a view's query uses (pg_depend), not which output column
each one feeds. :func:`view_lineage` reads the definition (``pg_get_viewdef``, which
qualifies every column with its relation) with PostgreSQL's own parser and answers, for
each output column, the column references its expression contains and whether it is a
plain pass-through of one column; plus every column reference outside the output list
(WHERE, JOIN ON, GROUP BY, ORDER BY, ...).

It answers only for the simple shape, one SELECT over tables, views and joins with
plain column references and expressions; anything else (set operations, CTEs, subqueries,
functions in FROM, VALUES, LATERAL, ``*``) gives None, and the caller keeps treating every
column of the view as sensitive. Sans-I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import pglast
from pglast import ast
from pglast.visitors import Visitor

__all__ = ["ColumnRef", "OutputColumn", "ViewLineage", "view_lineage"]

#: ``(relation name or None when unqualified, column name)``; the relation name is the
#: one in FROM (``relname``), whatever alias the query gives it.
ColumnRef = tuple[str | None, str]


@dataclass(frozen=True, slots=True)
class OutputColumn:
    """One output column of the view, by position."""

    #: Every column reference in its expression.
    references: frozenset[ColumnRef]
    #: The column it passes through unchanged (a bare column reference), else None.
    passthrough: ColumnRef | None


@dataclass(frozen=True, slots=True)
class ViewLineage:
    """The output columns in order, and the column references outside them."""

    outputs: tuple[OutputColumn, ...]
    elsewhere: frozenset[ColumnRef]


class _Refs(Visitor):
    """Collects ColumnRefs (relation resolved through the FROM aliases); notes the rest."""

    def __init__(self, aliases: dict[str, str]) -> None:
        super().__init__()
        self.aliases = aliases
        self.refs: set[ColumnRef] = set()
        self.unsupported = False

    def visit_ColumnRef(self, ancestors: object, node: ast.ColumnRef) -> None:
        names = [getattr(field, "sval", None) for field in node.fields or ()]
        if any(name is None for name in names) or not 1 <= len(names) <= 3:
            self.unsupported = True  # rel.* or an odd shape
            return
        column = str(names[-1])
        if len(names) == 1:
            self.refs.add((None, column))
            return
        qualifier = str(names[-2])
        relation = self.aliases.get(qualifier)
        if relation is None:
            self.unsupported = True  # an outer query's alias: a subquery
            return
        self.refs.add((relation, column))

    def visit_SubLink(self, ancestors: object, node: ast.SubLink) -> None:
        self.unsupported = True

    def visit_A_Star(self, ancestors: object, node: ast.A_Star) -> None:
        self.unsupported = True


def _aliases(from_clause: tuple[ast.Node, ...] | None) -> dict[str, str] | None:
    """Alias (or name) -> relation name, for RangeVars and joins of them; None otherwise."""
    aliases: dict[str, str] = {}
    todo = list(from_clause or ())
    while todo:
        item = todo.pop()
        if isinstance(item, ast.RangeVar) and item.relname:
            name = item.alias.aliasname if item.alias is not None else item.relname
            if not name or name in aliases:
                return None
            aliases[name] = item.relname
        elif isinstance(item, ast.JoinExpr) and item.larg is not None and item.rarg is not None:
            todo.extend((item.larg, item.rarg))
        else:
            return None  # a subquery, a function, VALUES, LATERAL...
    return aliases


def view_lineage(definition: str) -> ViewLineage | None:
    """The lineage of a view from its definition, or None for shapes it does not follow."""
    try:
        statements = pglast.parse_sql(definition)
    except pglast.parser.ParseError:
        return None
    if len(statements) != 1:
        return None
    select = statements[0].stmt
    if (
        not isinstance(select, ast.SelectStmt)
        or select.op != 0  # UNION / INTERSECT / EXCEPT
        or select.withClause is not None
        or select.valuesLists
        or select.intoClause is not None
    ):
        return None
    aliases = _aliases(select.fromClause)
    if aliases is None:
        return None
    outputs = []
    for target in select.targetList or ():
        if not isinstance(target, ast.ResTarget) or target.val is None:
            return None
        refs = _Refs(aliases)
        refs(target.val)
        if refs.unsupported:
            return None
        passthrough = None
        if isinstance(target.val, ast.ColumnRef) and len(refs.refs) == 1:
            passthrough = next(iter(refs.refs))
        outputs.append(OutputColumn(frozenset(refs.refs), passthrough))
    elsewhere = _Refs(aliases)
    for clause in (
        select.fromClause,
        select.whereClause,
        select.groupClause,
        select.havingClause,
        select.sortClause,
        select.windowClause,
        select.distinctClause,
        select.limitCount,
        select.limitOffset,
    ):
        if clause is None:
            continue
        for node in clause if isinstance(clause, tuple) else (clause,):
            if isinstance(node, ast.Node):
                elsewhere(node)
    if elsewhere.unsupported:
        return None
    return ViewLineage(tuple(outputs), frozenset(elsewhere.refs))
