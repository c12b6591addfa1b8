"""Reading sequential scans out of an EXPLAIN (FORMAT JSON, VERBOSE) plan."""

from __future__ import annotations

from querywarden.policy.plans import sequential_scans

PLAN = [
    {
        "Plan": {
            "Node Type": "Hash Join",
            "Plans": [
                {"Node Type": "Seq Scan", "Relation Name": "orders", "Schema": "public"},
                {
                    "Node Type": "Hash",
                    "Plans": [
                        {
                            "Node Type": "Index Scan",
                            "Relation Name": "customers",
                            "Schema": "public",
                        },
                        {"Node Type": "Seq Scan", "Relation Name": "audit", "Schema": "hr"},
                    ],
                },
            ],
        }
    }
]


def test_every_sequential_scan_is_found_with_its_schema() -> None:
    assert sorted(sequential_scans(PLAN)) == [("hr", "audit"), ("public", "orders")]


def test_a_plan_without_sequential_scans() -> None:
    plan = [{"Plan": {"Node Type": "Result"}}]
    assert list(sequential_scans(plan)) == []
