"""The gateway's metrics in Prometheus's text exposition format (version 0.0.4). Sans-I/O.

Served by the admin API at ``GET /metrics`` for deployments without a Collector. Names
are the ones a Collector's Prometheus exporter gives the same metrics received over
OTLP (dots become underscores, the unit becomes a suffix, counters end in ``_total``),
so one dashboard reads both: ``db_client_operation_duration_seconds``,
``db_client_connection_count``, ``querywarden_decisions_total``,
``querywarden_masked_values_total``, ``querywarden_auth_refused_total``. Attributes
become labels the same way (``db.namespace`` -> ``db_namespace``), and the resource is
``target_info``, as the OpenTelemetry compatibility specification writes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from querywarden import __version__
from querywarden.audit.metrics import (
    DURATION_BOUNDS,
    Snapshot,
    operation_attributes,
)

__all__ = ["CONTENT_TYPE", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = Mapping[str, str | int]


def render(snapshot: Snapshot, *, instance_id: str = "") -> str:
    """The exposition text of ``snapshot``: one family per metric, HELP and TYPE first."""
    lines: list[str] = []
    resource: dict[str, str | int] = {
        "service.name": "querywarden",
        "service.version": __version__,
    }
    if instance_id:
        resource["service.instance.id"] = instance_id
    _family(lines, "target_info", "gauge", "Target metadata")
    lines.append(_sample("target_info", resource, 1))

    _family(
        lines,
        "db_client_operation_duration_seconds",
        "histogram",
        "Duration of database client operations, from the request to its result",
    )
    for key, series in sorted(snapshot.durations.items(), key=lambda item: repr(item[0])):
        labels = operation_attributes(key)
        cumulative = 0
        for bound, count in zip((*DURATION_BOUNDS, math.inf), series.counts, strict=True):
            cumulative += count
            lines.append(
                _sample(
                    "db_client_operation_duration_seconds_bucket",
                    {**labels, "le": _number(bound)},
                    cumulative,
                )
            )
        lines.append(_sample("db_client_operation_duration_seconds_sum", labels, series.total))
        lines.append(_sample("db_client_operation_duration_seconds_count", labels, cumulative))

    _family(
        lines,
        "db_client_connection_count",
        "gauge",
        "Upstream connections the gateway holds, by state and pool",
    )
    for pool, count in sorted(snapshot.connections.items()):
        labels = {"db.client.connection.state": "used", "db.client.connection.pool.name": pool}
        lines.append(_sample("db_client_connection_count", labels, count))

    _family(
        lines, "querywarden_decisions_total", "counter", "Statements decided, by outcome and rule"
    )
    for (outcome, rule), count in sorted(
        snapshot.decisions.items(), key=lambda item: (item[0][0], item[0][1] or "")
    ):
        labels = {"outcome": outcome, "rule": rule} if rule else {"outcome": outcome}
        lines.append(_sample("querywarden_decisions_total", labels, count))

    _family(lines, "querywarden_masked_values_total", "counter", "Values masked in results")
    lines.append(_sample("querywarden_masked_values_total", {}, snapshot.masked))

    _family(
        lines,
        "querywarden_auth_refused_total",
        "counter",
        "Connections refused at authentication, by reason",
    )
    for reason, count in sorted(snapshot.refused.items()):
        lines.append(_sample("querywarden_auth_refused_total", {"reason": reason}, count))
    return "\n".join(lines) + "\n"


def _family(lines: list[str], name: str, kind: str, help_text: str) -> None:
    lines.append(f"# HELP {name} {_escape_help(help_text)}")
    lines.append(f"# TYPE {name} {kind}")


def _sample(name: str, labels: Labels, value: float) -> str:
    if not labels:
        return f"{name} {_number(value)}"
    pairs = ",".join(
        f'{_label_name(key)}="{_escape_value(str(val))}"' for key, val in labels.items()
    )
    return f"{name}{{{pairs}}} {_number(value)}"


def _label_name(key: str) -> str:
    # Prometheus label names are [a-zA-Z_][a-zA-Z0-9_]*: the Collector's translation.
    return "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in key)


def _escape_value(value: str) -> str:
    # Rule and database names come from configuration and may hold any character.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))
