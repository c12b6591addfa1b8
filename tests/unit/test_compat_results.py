"""compat/results.py: what the suites report, and the direct/through comparison."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "compat_results", Path(__file__).resolve().parents[2] / "compat/results.py"
)
assert _spec and _spec.loader
results = importlib.util.module_from_spec(_spec)
sys.modules["compat_results"] = results
_spec.loader.exec_module(results)

PKG = "github.com/jackc/pgx/v5/pgconn"


def _event(action: str, test: str | None = None, **extra: object) -> str:
    event: dict[str, object] = {"Action": action, "Package": PKG, **extra}
    if test:
        event["Test"] = test
    return json.dumps(event)


def test_go_outcomes_count_subtests_and_ignore_package_lines() -> None:
    lines = [
        "# build output outside the JSON stream",
        _event("start"),
        _event("run", "TestConnect"),
        _event("run", "TestConnect/sslmode"),
        _event("output", "TestConnect/sslmode", Output="=== RUN\n"),
        _event("pass", "TestConnect/sslmode"),
        _event("pass", "TestConnect"),
        _event("run", "TestTLS"),
        _event("skip", "TestTLS"),
        _event("run", "TestCancel"),
        _event("fail", "TestCancel"),
        _event("fail"),
    ]
    run = results.parse_go_test_json(lines)
    assert run.passed == {f"{PKG} TestConnect", f"{PKG} TestConnect/sslmode"}
    assert run.skipped == {f"{PKG} TestTLS"}
    assert run.failed == {f"{PKG} TestCancel"}


def test_a_test_cut_off_by_a_panic_or_timeout_counts_as_failed() -> None:
    lines = [_event("run", "TestHangs"), _event("output", "TestHangs", Output="panic: x\n")]
    run = results.parse_go_test_json(lines)
    assert run.failed == {f"{PKG} TestHangs"}
    assert not run.passed


def test_exit_codes_pass_only_on_zero() -> None:
    run = results.from_exit_codes({"a-tests.js": 0, "b-tests.js": 255, "c-tests.js": None})
    assert run.passed == {"a-tests.js"}
    assert run.failed == {"b-tests.js", "c-tests.js"}


def test_comparison_lists_what_passes_only_directly_and_leaves_out_exclusions() -> None:
    direct = results.SuiteRun(frozenset({"a", "b", "c", "x"}), frozenset(), frozenset())
    through = results.SuiteRun(frozenset({"a", "d"}), frozenset({"b", "c", "x"}), frozenset())
    excluded = {"x": "needs the server's Unix socket"}
    comparison = results.Comparison(
        "pgx", "audit-off", direct.without(excluded), through.without(excluded), excluded
    )
    assert (comparison.passed_directly, comparison.passed_through) == (3, 2)
    assert comparison.ratio == 2 / 3
    assert comparison.only_direct == ["b", "c"]
    assert comparison.only_through == ["d"]
    table = results.render_table([comparison])
    assert "pgx    audit-off  3                2               66.7%" in table
    assert "pgx, audit-off: 2 pass only directly\n  b\n  c" in table
    assert json.loads(json.dumps(comparison.as_json()))["excluded"] == excluded


def test_a_temp_dir_in_a_subtest_name_matches_between_runs() -> None:
    def named(digits: str) -> str:
        return f"TestParseConfig/servicefile='/tmp/TestParseConfig{digits}/001/pg_service.conf'"

    first = results.parse_go_test_json([_event("pass", named("2610695528"))])
    second = results.parse_go_test_json([_event("pass", named("3141592653"))])
    assert (
        first.passed
        == second.passed
        == {f"{PKG} TestParseConfig/servicefile='/tmp/TestParseConfig*/*/pg_service.conf'"}
    )
