"""GatewayMetrics -> Prometheus text exposition: names, labels, escaping, histograms.

Every rendering is read back twice: by Prometheus's own parser (tools/promtext) and by the
strict reader in tests/prometheus_text.py.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from prometheus_text import parse, promtext
from querywarden import __version__
from querywarden.audit.metrics import DURATION_BOUNDS, GatewayMetrics
from querywarden.audit.prometheus import render
from querywarden.audit.recorder import pool_name


def _metrics() -> GatewayMetrics:
    metrics = GatewayMetrics(None, scrape=True, instance_id="gw-1")
    metrics.decision("allow", "agents-read")
    metrics.decision("allow", "agents-read")
    metrics.decision("refuse", None)
    metrics.masked(4)
    metrics.auth_refused("28000")
    allowed = ("shop", "db.internal", 5433, "allow", None)
    for seconds in (0.00005, 0.0003, 0.0003, 0.007, 20.0):
        metrics.operation_duration(seconds, allowed)
    metrics.operation_duration(0.0002, ("shop", "db.internal", 5433, "refuse", "42501"))
    metrics.connection_opened(pool_name("shop", "db.internal", 5433))
    return metrics


def test_the_exposition_is_what_prometheus_reads() -> None:
    text = render(_metrics().snapshot(), instance_id="gw-1")
    ours = parse(text)
    theirs = promtext(text)
    assert (
        set(ours)
        == set(theirs)
        == {
            "target_info",
            "db_client_operation_duration_seconds",
            "db_client_connection_count",
            "querywarden_decisions_total",
            "querywarden_masked_values_total",
            "querywarden_auth_refused_total",
        }
    )
    kinds = {name: family["type"] for name, family in theirs.items()}
    assert kinds == {
        "target_info": "GAUGE",
        "db_client_operation_duration_seconds": "HISTOGRAM",
        "db_client_connection_count": "GAUGE",
        "querywarden_decisions_total": "COUNTER",
        "querywarden_masked_values_total": "COUNTER",
        "querywarden_auth_refused_total": "COUNTER",
    }

    decisions = {
        tuple(sorted(s["labels"].items())): s["value"]
        for s in theirs["querywarden_decisions_total"]["samples"]
    }
    assert decisions == {
        (("outcome", "allow"), ("rule", "agents-read")): 2,
        (("outcome", "refuse"),): 1,
    }
    assert theirs["querywarden_masked_values_total"]["samples"][0]["value"] == 4
    (refused,) = theirs["querywarden_auth_refused_total"]["samples"]
    assert (refused["labels"], refused["value"]) == ({"reason": "28000"}, 1)
    (connections,) = theirs["db_client_connection_count"]["samples"]
    assert connections["labels"] == {
        "db_client_connection_state": "used",
        "db_client_connection_pool_name": "db.internal:5433/shop",
    }
    assert connections["value"] == 1
    (target,) = theirs["target_info"]["samples"]
    assert target["labels"] == {
        "service_name": "querywarden",
        "service_version": __version__,
        "service_instance_id": "gw-1",
    }

    durations = {
        s["labels"]["querywarden_decision"]: s
        for s in theirs["db_client_operation_duration_seconds"]["samples"]
    }
    allow = durations["allow"]
    assert allow["labels"] == {
        "db_system_name": "postgresql",
        "db_namespace": "shop",
        "server_address": "db.internal",
        "server_port": "5433",
        "querywarden_decision": "allow",
    }
    assert allow["count"] == 5
    assert math.isclose(allow["sum"], 20.00765)
    buckets = {b["le"]: b["count"] for b in allow["buckets"]}
    assert len(buckets) == len(DURATION_BOUNDS) + 1
    assert buckets["0.0001"] == 1
    assert buckets["0.0005"] == 3
    assert buckets["10"] == 4
    assert buckets["+Inf"] == 5
    refusal = durations["refuse"]["labels"]
    assert (refusal["error_type"], refusal["db_response_status_code"]) == ("42501", "42501")
    # The strict reader sees the same figures.
    ours_allow = ours["db_client_operation_duration_seconds"]
    assert (
        ours_allow.value("db_client_operation_duration_seconds_count", querywarden_decision="allow")
        == 5
    )


def test_label_values_are_escaped() -> None:
    metrics = GatewayMetrics(None, scrape=True)
    awkward = 'rule "quoted" \\ back\nslash, {brace}'
    metrics.decision("refuse", awkward)
    text = render(metrics.snapshot())
    (sample,) = promtext(text)["querywarden_decisions_total"]["samples"]
    assert sample["labels"]["rule"] == awkward
    assert (
        parse(text)["querywarden_decisions_total"].value(
            "querywarden_decisions_total", rule=awkward
        )
        == 1
    )


def test_an_empty_gateway_still_exposes_every_family() -> None:
    # A dashboard's queries find their metrics (at zero) before the first statement.
    text = render(GatewayMetrics(None, scrape=True).snapshot())
    families = promtext(text)
    assert families["querywarden_masked_values_total"]["samples"][0]["value"] == 0
    assert "db_client_operation_duration_seconds" in parse(text)
    # HELP comes with every family.
    assert all(family["help"] for family in families.values())


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=20, unique=True))
def test_any_rule_name_reads_back_exactly(rules: list[str]) -> None:
    # Rule and database names come from the policy and settings: any text at all.
    metrics = GatewayMetrics(None, scrape=True)
    for rule in rules:
        metrics.decision("refuse", rule)
    text = render(metrics.snapshot())
    samples = promtext(text)["querywarden_decisions_total"]["samples"]
    assert sorted(s["labels"]["rule"] for s in samples) == sorted(rules)
    ours = parse(text)["querywarden_decisions_total"].samples
    assert sorted(labels["rule"] for _, labels, _ in ours) == sorted(rules)
