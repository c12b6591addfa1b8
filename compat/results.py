"""What a client library's test suite reported, and how two runs of it compare.

No I/O here: the runner (compat/run.py) hands in what the suites printed or how their
processes ended, and prints what comes out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SuiteRun:
    """The outcome of every test of one run, by test id."""

    passed: frozenset[str] = frozenset()
    failed: frozenset[str] = frozenset()
    skipped: frozenset[str] = frozenset()

    def without(self, excluded: Iterable[str]) -> SuiteRun:
        """The same run with tests that no proxy can pass taken out of the count."""
        drop = frozenset(excluded)
        return SuiteRun(self.passed - drop, self.failed - drop, self.skipped - drop)


#: A ``t.TempDir()`` path in a subtest's name (``.../TestName2610695528/001/...``): its
#: digits differ at every run, so the same subtest would not match between two runs.
_GO_TEMP_DIR = re.compile(r"(Test\w*?)\d{6,}/\d{3}/")


def parse_go_test_json(lines: Iterable[str]) -> SuiteRun:
    """Outcomes from ``go test -json`` output, subtests included (``pkg Test/sub``).

    A test that started but never reported an outcome (its package panicked or hit the
    ``-timeout``) counts as failed: it did not pass.
    """
    outcome: dict[str, str] = {}
    for line in lines:
        if not line.startswith("{"):
            continue  # build output that go test prints outside the JSON stream
        event = json.loads(line)
        test = event.get("Test")
        if not test:
            continue
        name = _GO_TEMP_DIR.sub(r"\1*/*/", test)
        key = f"{event['Package']} {name}"
        action = event["Action"]
        if action == "run":
            outcome.setdefault(key, "fail")
        elif action in ("pass", "fail", "skip"):
            outcome[key] = action
    return _from_outcomes(outcome)


def from_exit_codes(codes: Mapping[str, int | None]) -> SuiteRun:
    """Outcomes of a suite whose unit is a script: exit 0 passes; None (killed) fails."""
    return _from_outcomes({test: "pass" if code == 0 else "fail" for test, code in codes.items()})


def _from_outcomes(outcome: Mapping[str, str]) -> SuiteRun:
    def having(action: str) -> frozenset[str]:
        return frozenset(test for test, got in outcome.items() if got == action)

    return SuiteRun(having("pass"), having("fail"), having("skip"))


@dataclass(frozen=True, slots=True)
class Comparison:
    """One suite run directly and through the gateway."""

    suite: str
    mode: str
    direct: SuiteRun
    through: SuiteRun
    #: Tests taken out of both counts, with why no proxy could pass them.
    excluded: Mapping[str, str] = field(default_factory=dict)

    @property
    def passed_directly(self) -> int:
        return len(self.direct.passed)

    @property
    def passed_through(self) -> int:
        return len(self.through.passed)

    @property
    def ratio(self) -> float:
        """Through-gateway passes over direct passes (1.0: transparent)."""
        return self.passed_through / self.passed_directly if self.passed_directly else 0.0

    @property
    def only_direct(self) -> list[str]:
        """Tests that pass directly and not through the gateway."""
        return sorted(self.direct.passed - self.through.passed)

    @property
    def only_through(self) -> list[str]:
        """Tests that pass only through the gateway (flaky, or order-dependent)."""
        return sorted(self.through.passed - self.direct.passed)

    def as_json(self) -> dict[str, object]:
        """A machine-readable form, for the docs and the smoke test."""
        return {
            "suite": self.suite,
            "mode": self.mode,
            "direct": _counts(self.direct),
            "through": _counts(self.through),
            "ratio": round(self.ratio, 4),
            "only_direct": self.only_direct,
            "only_through": self.only_through,
            "excluded": dict(self.excluded),
        }


def _counts(run: SuiteRun) -> dict[str, int]:
    return {"passed": len(run.passed), "failed": len(run.failed), "skipped": len(run.skipped)}


def render_table(comparisons: Iterable[Comparison]) -> str:
    """The summary `make compat` prints: one line per suite and gateway mode."""
    rows = [("suite", "gateway", "passed directly", "passed through", "ratio")]
    listed: list[str] = []
    for c in comparisons:
        rows.append(
            (c.suite, c.mode, str(c.passed_directly), str(c.passed_through), f"{c.ratio:.1%}")
        )
        listed.append(f"\n{c.suite}, {c.mode}: {len(c.only_direct)} pass only directly")
        listed += [f"  {test}" for test in c.only_direct]
        if c.only_through:
            listed.append(
                f"  ({len(c.only_through)} pass only through: {', '.join(c.only_through)})"
            )
        if c.excluded:
            listed.append(f"  ({len(c.excluded)} not counted: no proxy can pass them)")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join([*lines, *listed])
