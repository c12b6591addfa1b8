"""The analyzer's fast cache key (numbers replaced in quote-free text) never confuses shapes."""

from __future__ import annotations

import pytest

from querywarden.analysis import Analyzer


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("EXPLAIN (ANALYZE 0) DELETE FROM t", "EXPLAIN (ANALYZE 1) DELETE FROM t"),
        ("SELECT * FROM t1", "SELECT * FROM t2"),
        ("SELECT * FROM t LIMIT 5", "SELECT * FROM t LIMIT 5 FOR UPDATE"),
        ("SELECT * FROM s1.t", "SELECT * FROM s2.t"),
        ("SELECT 1", "SELECT '1'"),
    ],
)
def test_shapes_that_differ_are_analyzed_apart_in_both_orders(first: str, second: str) -> None:
    fresh = Analyzer()
    expected = {q: fresh.analyze(q)[0] for q in (first, second)}
    for order in ((first, second), (second, first)):
        cached = Analyzer()
        for query in order:
            got = cached.analyze(query)[0]
            assert got.operations == expected[query].operations, query
            assert got.reads == expected[query].reads, query
            assert got.writes == expected[query].writes, query
            assert got.row_locks == expected[query].row_locks, query
            assert got.text == query


def test_numeric_literals_share_one_entry_and_terminators_are_dropped() -> None:
    analyzer = Analyzer()
    analyzer.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 1;")
    misses = analyzer.misses
    for aid in (2, 30, 4000):
        (summary,) = analyzer.analyze(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};")
        assert summary.text == f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid}"
        assert summary.operations == frozenset({"select"})
    assert analyzer.misses == misses


def test_a_semicolon_inside_text_is_not_taken_for_a_terminator() -> None:
    summaries = Analyzer().analyze("SELECT ';' ; DELETE FROM t;")
    assert [sorted(s.operations) for s in summaries] == [["select"], ["delete"]]
