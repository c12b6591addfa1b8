"""Property tests for the SQL analyzer.

Statements come from a small grammar: SELECTs nested through FROM subqueries, IN / EXISTS /
scalar subqueries, LATERAL, CTEs and set operations, where one nesting level may hide an
INSERT, UPDATE, DELETE or MERGE in a data-modifying CTE, and the whole may be wrapped in
EXPLAIN [ANALYZE]. Whatever the shape, the analyzer must not crash and must find the DML.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from querywarden.analysis import AnalysisError, Analyzer, QualifiedName, analyze

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# table as written -> the name the analyzer must report
TABLES = {
    "t1": QualifiedName(None, "t1"),
    "T2": QualifiedName(None, "t2"),
    "s.t3": QualifiedName("s", "t3"),
    '"Mixed"': QualifiedName(None, "Mixed"),
    '"Sch"."Tab"': QualifiedName("Sch", "Tab"),
    "pg_temp.tmp": QualifiedName("pg_temp", "tmp"),
}
table_names = st.sampled_from(sorted(TABLES))
columns = st.sampled_from(["a", "b", "c"])
ints = st.integers(min_value=-5, max_value=10**6)


@dataclass
class Built:
    """A rendered statement and what the analyzer must find in it."""

    sql: str
    reads: set[QualifiedName] = field(default_factory=set)
    dml: list[tuple[str, QualifiedName, bool]] = field(default_factory=list)  # op, table, unbounded
    counter: list[int] = field(default_factory=lambda: [0])


def _kw(draw: st.DrawFn, word: str) -> str:
    return draw(st.sampled_from([word.upper(), word.lower(), word.capitalize()]))


def _name(state: list[int], prefix: str) -> str:
    state[0] += 1
    return f"{prefix}{state[0]}"


@st.composite
def dml(draw: st.DrawFn, state: list[int]) -> Built:
    """An INSERT/UPDATE/DELETE/MERGE ... RETURNING *, possibly without WHERE."""
    table = draw(table_names)
    qn = TABLES[table]
    kind = draw(st.sampled_from(["insert", "update", "delete", "merge"]))
    bounded = draw(st.booleans())
    col = draw(columns)
    where = f" {_kw(draw, 'where')} {col} = {draw(ints)}" if bounded else ""
    if kind == "insert":
        sql = f"{_kw(draw, 'insert')} INTO {table} ({col}) VALUES ({draw(ints)})"
        found = [("insert", qn, False)]
    elif kind == "update":
        sql = f"{_kw(draw, 'update')} {table} SET {col} = {draw(ints)}{where}"
        found = [("update", qn, not bounded)]
    elif kind == "delete":
        sql = f"{_kw(draw, 'delete')} FROM {table}{where}"
        found = [("delete", qn, not bounded)]
    else:
        action = draw(st.sampled_from(["DELETE", f"UPDATE SET {col} = 1"]))
        sql = f"{_kw(draw, 'merge')} INTO {table} USING t1 ON true WHEN MATCHED THEN {action}"
        found = [("merge", qn, False), (action.split()[0].lower(), qn, False)]
    return Built(f"{sql} RETURNING *", set(), found, state)


@st.composite
def select(draw: st.DrawFn, depth: int, hide: bool, state: list[int]) -> Built:
    """A SELECT; if ``hide``, some level of it holds a data-modifying CTE."""
    hide_here = hide and (depth == 0 or draw(st.booleans()))
    if depth == 0:
        table = draw(table_names)
        col = draw(columns)
        built = Built(
            f"{_kw(draw, 'select')} {col} FROM {table} WHERE {col} > {draw(ints)}",
            {TABLES[table]},
            [],
            state,
        )
    else:
        form = draw(st.integers(min_value=0, max_value=6))
        child = draw(select(depth - 1, hide and not hide_here, state))
        table = draw(table_names)
        col = draw(columns)
        built = Built("", set(child.reads), list(child.dml), state)
        if form == 0:
            built.sql = f"SELECT * FROM ({child.sql}) AS {_name(state, 'sub')}"
        elif form == 1:
            built.sql = f"SELECT {col} FROM {table} WHERE {col} {_kw(draw, 'in')} ({child.sql})"
            built.reads.add(TABLES[table])
        elif form == 2:
            built.sql = f"SELECT ({child.sql}) AS v, {draw(ints)}"
        elif form == 3:
            other = draw(select(depth - 1, False, state))
            op = draw(st.sampled_from(["UNION", "UNION ALL", "INTERSECT", "EXCEPT"]))
            built.sql = f"({child.sql}) {op} ({other.sql})"
            built.reads |= other.reads
        elif form == 4:
            cte = _name(state, "c")
            built.sql = f"WITH {cte} AS ({child.sql}) SELECT * FROM {cte}"
        elif form == 5:
            built.sql = f"SELECT * FROM {table} x, LATERAL ({child.sql}) {_name(state, 'l')}"
            built.reads.add(TABLES[table])
        else:
            built.sql = f"SELECT EXISTS ({child.sql}) /* {draw(ints)} */"
    if hide_here:
        hidden = draw(dml(state))
        cte = _name(state, "d")
        # the CTE's name is never reported as a relation, even when it is read
        built.sql = f"WITH {cte} AS ({hidden.sql}) SELECT * FROM {cte}, ({built.sql}) AS q"
        built.dml += hidden.dml
    return built


@st.composite
def statements(draw: st.DrawFn) -> tuple[Built, str]:
    """A statement, and its EXPLAIN wrapper: "", "explain" or "analyze"."""
    state = [0]
    depth = draw(st.integers(min_value=0, max_value=4))
    hide = draw(st.booleans())
    wrap = draw(st.sampled_from(["", "", "explain", "analyze"]))
    bare_dml = bool(wrap) and draw(st.booleans())  # EXPLAIN [ANALYZE] DELETE ... itself
    built = draw(dml(state)) if bare_dml else draw(select(depth, hide, state))
    if wrap == "explain":
        built.sql = f"EXPLAIN {built.sql}"
    elif wrap == "analyze":
        prefix = draw(st.sampled_from(["EXPLAIN ANALYZE", "explain (analyze, costs off)"]))
        built.sql = f"{prefix} {built.sql}"
    return built, wrap


@SETTINGS
@given(statements())
def test_hidden_dml_is_always_found(case: tuple[Built, str]) -> None:
    built, wrap = case
    (s,) = Analyzer().analyze(built.sql)
    for op, table, _ in built.dml:
        assert op in s.operations, built.sql
        assert table in s.writes, built.sql
    assert s.unbounded_write == any(unbounded for _, _, unbounded in built.dml), built.sql
    # CTE and subquery names are never relations; every table written is found
    assert s.reads <= set(TABLES.values()), built.sql
    assert built.reads <= s.reads | s.writes, built.sql
    assert s.writes == {table for _, table, _ in built.dml}, built.sql
    if wrap:
        assert "explain" in s.operations
        assert ("explain_analyze" in s.operations) == (wrap == "analyze")
        hidden_ops = {op for op, _, _ in built.dml}
        if wrap == "explain":
            assert hidden_ops <= s.deferred_operations, built.sql
        else:
            assert not s.deferred_operations, built.sql


@SETTINGS
@given(statements(), st.integers(min_value=0, max_value=10**9))
def test_cache_agrees_with_a_fresh_analysis(case: tuple[Built, str], seed: int) -> None:
    built, _ = case
    cached = Analyzer()
    first = cached.analyze(built.sql)
    # the same shape with other constants comes from the cache and matches a fresh analysis
    variant = built.sql.replace("1", str(seed % 10))
    again = cached.analyze(variant)
    fresh = Analyzer().analyze(variant)
    assert again == fresh
    assert [s.text for s in again] == [s.text for s in fresh]
    assert cached.analyze(built.sql) == first


@SETTINGS
@given(st.lists(statements(), min_size=1, max_size=4), st.sampled_from([";", ";\n", " ; "]))
def test_several_statements_split(cases: list[tuple[Built, str]], separator: str) -> None:
    sql = separator.join(built.sql for built, _ in cases)
    result = analyze(sql)
    assert len(result) == len(cases)
    for summary, (built, _) in zip(result, cases, strict=True):
        assert summary.text == built.sql
        for op, table, _ in built.dml:
            assert op in summary.operations
            assert table in summary.writes


def _only_analysis_errors(sql: str) -> None:
    try:
        result = analyze(sql)
    except AnalysisError as exc:
        assert exc.sqlstate in {"42601", "0A000", "54001", "22021"}
        assert exc.message
        return
    for summary in result:
        assert summary.text
        assert summary.text in sql
        assert summary.operations, summary.text


SQL_ALPHABET = st.sampled_from(
    [
        *"abcst ();,.*'\"$-/\\=<>:[]{}\n\tU&E0123456789",
        *("SELECT", "FROM", "WHERE", "WITH", "AS", "DELETE", "INSERT", "UPDATE", "EXPLAIN"),
        *("ANALYZE", "RETURNING", "UNION", "--", "/*", "*/", "$$", "$q$", "COPY", "SET", "ROLE"),
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_arbitrary_text_raises_only_analysis_error(sql: str) -> None:
    _only_analysis_errors(sql)


@settings(max_examples=400, deadline=None)
@given(st.lists(SQL_ALPHABET, max_size=40).map("".join))
def test_sql_like_noise_raises_only_analysis_error(sql: str) -> None:
    _only_analysis_errors(sql)


@SETTINGS
@given(statements(), st.data())
def test_mutated_statements_raise_only_analysis_error(
    case: tuple[Built, str], data: st.DataObject
) -> None:
    sql = case[0].sql
    start = data.draw(st.integers(min_value=0, max_value=len(sql)))
    end = data.draw(st.integers(min_value=start, max_value=min(len(sql), start + 8)))
    insert = data.draw(st.sampled_from(["", "(", ")", "'", '"', "$$", ";", "--", "/*", "\x00"]))
    _only_analysis_errors(sql[:start] + insert + sql[end:])


@pytest.mark.parametrize("depth", [0, 1, 2, 3, 4])
def test_grammar_examples_parse(depth: int) -> None:
    # a deterministic smoke check that the grammar produces valid SQL at every depth
    @settings(max_examples=10, deadline=None)
    @given(select(depth, True, [0]))
    def inner(built: Built) -> None:
        assert analyze(built.sql)

    inner()


@SETTINGS
@given(
    statements(),
    st.sampled_from(["", " ", "\n", "\t \r\n", "\u00a0", " \u00a0", "\u2003 "]),
    st.sampled_from(["", " ", "\n\t"]),
)
def test_single_statement_fast_path_matches_the_split(
    case: tuple[Built, str], tail: str, head: str
) -> None:
    # a text without ";" skips the parser's split: it must slice the statement the same way
    sql = head + case[0].sql + tail
    try:
        fast = Analyzer().analyze(sql)
    except AnalysisError:
        with pytest.raises(AnalysisError):
            Analyzer().analyze(sql + ";")
        return
    split = Analyzer().analyze(sql + ";")
    assert fast == split
