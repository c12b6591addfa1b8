#!/usr/bin/env python3
"""Per-statement cost of the SQL analyzer, uncached and cached.

Measures ``Analyzer.analyze(sql)`` for about ten typical statements (pgbench's, an ORM's,
an AI agent's catalog and reporting queries):

* uncached: an ``Analyzer(max_entries=0)``, so every call splits, normalizes, parses,
  fingerprints and walks the statement;
* cached: the same shape with other constants each call (the cache key is the statement
  with its constants replaced, so these are hits; the summary is rebuilt with the new
  text).

Prints the median and p99 in microseconds per statement. The project's targets: cached
under 20 us, uncached under 300 us (median). Run ``.venv/bin/python bench/analysis_bench.py``;
``--profile`` prints a cProfile of the cached path.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
try:
    import querywarden  # noqa: F401
except ImportError:  # not installed in this interpreter: use the source tree
    sys.path.insert(0, str(REPO / "proxy"))

from querywarden.analysis import Analyzer  # noqa: E402

CACHED_TARGET_US = 20.0
UNCACHED_TARGET_US = 300.0

# name -> template; {0} and {1} are replaced with a different constant on every call.
STATEMENTS = {
    "pgbench select": "SELECT abalance FROM pgbench_accounts WHERE aid = {0}",
    "pgbench update": "UPDATE pgbench_accounts SET abalance = abalance + {1} WHERE aid = {0}",
    "pgbench insert": (
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
        "VALUES ({0}, 1, {1}, -42, CURRENT_TIMESTAMP)"
    ),
    "join + order": (
        "SELECT c.id, c.name, o.total FROM customers c JOIN orders o ON o.customer_id = c.id "
        "WHERE c.region = 'r{0}' AND o.created_at > now() - interval '{1} days' "
        "ORDER BY o.total DESC LIMIT 50"
    ),
    "group + having": (
        "SELECT customer_id, count(*), sum(total) FROM orders WHERE status = 's{0}' "
        "GROUP BY customer_id HAVING sum(total) > {1} ORDER BY 3 DESC"
    ),
    "catalog query": (
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'public{0}' AND table_name LIKE 'o%{1}' "
        "ORDER BY table_name, ordinal_position"
    ),
    "CTE + window": (
        "WITH recent AS (SELECT * FROM orders WHERE created_at > now() - interval '{0} days') "
        "SELECT customer_id, total, rank() OVER (PARTITION BY customer_id ORDER BY total DESC) "
        "FROM recent WHERE total > {1}"
    ),
    "upsert returning": (
        "INSERT INTO inventory (sku, qty) VALUES ('sku-{0}', {1}) "
        "ON CONFLICT (sku) DO UPDATE SET qty = inventory.qty + excluded.qty RETURNING qty"
    ),
    "delete + subquery": (
        "DELETE FROM sessions WHERE user_id IN "
        "(SELECT id FROM users WHERE last_seen < now() - interval '{0} days') AND id <> {1}"
    ),
    "union": (
        "SELECT id, email FROM customers WHERE id = {0} "
        "UNION ALL SELECT id, email FROM archived_customers WHERE id = {1}"
    ),
}


def variants(template: str, n: int) -> list[str]:
    return [template.format(i + 1, (i * 7919) % 100003 + 1) for i in range(n)]


def time_calls(call: Callable[[str], object], inputs: list[str]) -> list[float]:
    """Microseconds per call, one sample per input."""
    clock = time.perf_counter_ns
    samples: list[float] = []
    for sql in inputs:
        started = clock()
        call(sql)
        samples.append((clock() - started) / 1000)
    return samples


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


def run(iterations: int) -> dict[str, tuple[list[float], list[float]]]:
    results: dict[str, tuple[list[float], list[float]]] = {}
    for name, template in STATEMENTS.items():
        inputs = variants(template, iterations + 1)
        uncached = Analyzer(max_entries=0)
        uncached.analyze(inputs[0])  # warm imports and code paths
        cold = time_calls(uncached.analyze, inputs[1 : iterations // 4 + 1])
        cached = Analyzer()
        cached.analyze(inputs[0])
        warm = time_calls(cached.analyze, inputs[1:])
        assert cached.misses == 1, f"{name}: variants were not cache hits"
        results[name] = (cold, warm)
    return results


def profile(iterations: int) -> None:
    analyzer = Analyzer()
    inputs = [sql for template in STATEMENTS.values() for sql in variants(template, iterations)]
    analyzer.analyze(inputs[0])
    profiler = cProfile.Profile()
    profiler.enable()
    for sql in inputs:
        analyzer.analyze(sql)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--iterations", type=int, default=4000, help="cached calls each")
    parser.add_argument("--profile", action="store_true", help="cProfile the cached path")
    args = parser.parse_args()
    if args.profile:
        profile(args.iterations)
        return 0
    results = run(args.iterations)
    print(
        f"Analyzer.analyze() per statement, Python {sys.version.split()[0]}, "
        f"N={args.iterations // 4} uncached / {args.iterations} cached"
    )
    header = f"{'statement':<18} {'uncached med':>13} {'p99':>8} {'cached med':>11} {'p99':>8}"
    print(header)
    print("-" * len(header))
    for name, (cold, warm) in results.items():
        print(
            f"{name:<18} {statistics.median(cold):>13.1f} {p99(cold):>8.1f} "
            f"{statistics.median(warm):>11.1f} {p99(warm):>8.1f}"
        )
    cold_all = [statistics.median(cold) for cold, _ in results.values()]
    warm_all = [statistics.median(warm) for _, warm in results.values()]
    print("-" * len(header))
    print(
        f"{'median of medians':<18} {statistics.median(cold_all):>13.1f} {'':>8} "
        f"{statistics.median(warm_all):>11.1f}"
    )
    worst_cold, worst_warm = max(cold_all), max(warm_all)
    met = worst_cold < UNCACHED_TARGET_US and worst_warm < CACHED_TARGET_US
    print(
        f"targets (every statement's median): cached < {CACHED_TARGET_US:.0f} us "
        f"(worst {worst_warm:.1f}), uncached < {UNCACHED_TARGET_US:.0f} us "
        f"(worst {worst_cold:.1f}): {'met' if met else 'NOT met'}"
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
