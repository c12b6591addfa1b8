"""The request record's summary: merged once per statement shape, the same as merged anew."""

from __future__ import annotations

from querywarden.analysis import Analyzer
from querywarden.approvals.model import ReviewSummary
from querywarden.audit import recorder

STATEMENTS = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 1",
    "SELECT abalance FROM pgbench_accounts WHERE aid = 2; UPDATE t SET x = 1 WHERE y = 2",
    "WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d",
    "SELECT pg_sleep(1), lower(name) FROM public.people JOIN s.accounts USING (id)",
]


def test_the_summary_is_what_merging_the_analysis_gives() -> None:
    analyzer = Analyzer()
    for sql in STATEMENTS:
        summaries = analyzer.analyze(sql)
        reference = ReviewSummary.from_analysis(summaries)
        assert recorder._summary(summaries) == {
            "operations": list(reference.operations),
            "reads": list(reference.reads),
            "writes": list(reference.writes),
            "functions": list(reference.functions),
        }


def test_a_statement_shape_is_merged_once_whatever_its_constants() -> None:
    analyzer = Analyzer()
    recorder._merged.cache_clear()
    for n in range(20):
        recorder._summary(
            analyzer.analyze(f"SELECT abalance FROM pgbench_accounts WHERE aid = {n}")
        )
    info = recorder._merged.cache_info()
    assert (info.misses, info.hits) == (1, 19)
