"""Live gateway metrics: exported over OTLP/HTTP, and served for Prometheus to scrape.

Standard metrics (OpenTelemetry semantic conventions 1.44.0, see docs/audit.md):

* ``db.client.operation.duration`` (histogram, seconds): a statement from its request to
  its result; ``db.system.name``, ``db.namespace``, ``server.address``, ``server.port``,
  ``error.type`` and ``db.response.status_code`` when it failed, and
  ``querywarden.decision``.
* ``db.client.connection.count`` (up-down counter): upstream connections held, one per
  session; ``db.client.connection.state`` (always ``used``: a session holds its
  connection) and ``db.client.connection.pool.name`` (``server.address:server.port/
  db.namespace``, as the conventions suggest when there is no pool name).

The gateway's own, under ``querywarden.*``:

* ``querywarden.decisions`` (counter; ``outcome``, ``rule``): every statement decided.
* ``querywarden.masked_values`` (counter): values masked in results.
* ``querywarden.auth.refused`` (counter; ``reason``): refused connections, by SQLSTATE.

These are called once or twice per statement, so the calls must cost next to nothing.
A synchronous SDK instrument costs about 6 µs per call (attribute sets, locks, view
lookups), a sizeable share of what the gateway spends on a whole statement; so the
facade counts into plain dicts and bucket lists (well under a microsecond) and readers
take a :class:`Snapshot` when they need one: the OTLP exporter at each export (the
counters are observable instruments; the histogram, which has no observable form in the
API, is added to each export by a thin wrapper around the OTLP exporter) and the admin
API's ``GET /metrics`` (:mod:`querywarden.audit.prometheus`).

Unlike the audit spans (see :mod:`querywarden.audit.export`), metrics are live figures:
a point lost while the Collector is down is covered by the next cumulative one.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from querywarden import __version__

__all__ = [
    "DURATION_BOUNDS",
    "SCHEMA_URL",
    "GatewayMetrics",
    "HistogramSeries",
    "OperationKey",
    "Snapshot",
]

SCOPE_NAME = "querywarden"
#: The semantic conventions these metrics follow.
SCHEMA_URL = "https://opentelemetry.io/schemas/1.44.0"
#: Histogram bucket bounds in seconds. Finer at the low end than the conventions'
#: advice (which starts at 1 ms): a relayed statement takes a fraction of a millisecond,
#: an analytical one seconds.
DURATION_BOUNDS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: What one duration series is keyed by: (db.namespace, server address, server port,
#: decision outcome, SQLSTATE or None).
OperationKey = tuple[str, str, int | None, str, str | None]


@dataclass(slots=True)
class HistogramSeries:
    """One histogram series (cumulative since start)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BOUNDS) + 1))
    total: float = 0.0
    low: float = float("inf")
    high: float = float("-inf")

    def copy(self) -> HistogramSeries:
        """A copy that later increments do not change."""
        return HistogramSeries(list(self.counts), self.total, self.low, self.high)


def operation_attributes(key: OperationKey) -> dict[str, str | int]:
    """The attributes of one ``db.client.operation.duration`` series."""
    namespace, address, port, outcome, sqlstate = key
    attributes: dict[str, str | int] = {"db.system.name": "postgresql"}
    if namespace:
        attributes["db.namespace"] = namespace
    if address:
        attributes["server.address"] = address
    if port is not None:
        attributes["server.port"] = port
    if sqlstate:
        attributes["error.type"] = sqlstate
        attributes["db.response.status_code"] = sqlstate
    elif outcome == "refuse":
        attributes["error.type"] = "querywarden.refused"
    attributes["querywarden.decision"] = outcome
    return attributes


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The metrics at one moment, for a reader on another thread or coroutine."""

    start_ns: int
    decisions: Mapping[tuple[str, str | None], int]
    masked: int
    refused: Mapping[str, int]
    durations: Mapping[OperationKey, HistogramSeries]
    connections: Mapping[str, int]


class GatewayMetrics:
    """The gateway's metrics; disabled (every method does nothing) without a reader.

    ``endpoint`` is the Collector's OTLP/HTTP base URL (``http://collector:4318``);
    metrics go to ``<endpoint>/v1/metrics`` every ``export_interval`` seconds.
    ``scrape``: counted for :meth:`snapshot` (``GET /metrics``) even without an endpoint.
    """

    def __init__(
        self,
        endpoint: str | None,
        *,
        scrape: bool = False,
        instance_id: str = "",
        export_interval: float = 10.0,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.enabled = endpoint is not None or scrape
        self.instance_id = instance_id
        self._decisions: dict[tuple[str, str | None], int] = {}
        self._refused: dict[str, int] = {}
        self._masked = 0
        self._durations: dict[OperationKey, HistogramSeries] = {}
        self._connections: dict[str, int] = {}
        self._provider: MeterProvider | None = None
        self._start_ns = time.time_ns()
        if endpoint is None:
            return
        attributes: dict[str, str] = {"service.name": "querywarden", "service.version": __version__}
        if instance_id:
            attributes["service.instance.id"] = instance_id
        resource = Resource.create(attributes)
        exporter = OTLPMetricExporter(
            endpoint=f"{endpoint.rstrip('/')}/v1/metrics", headers=headers, timeout=timeout
        )
        reader = PeriodicExportingMetricReader(
            _WithDurations(exporter, self, resource),
            export_interval_millis=export_interval * 1000,
        )
        # A provider of its own, not the global one: embedding applications keep theirs.
        self._provider = MeterProvider(resource=resource, metric_readers=[reader])
        meter = self._provider.get_meter(SCOPE_NAME, __version__, schema_url=SCHEMA_URL)
        meter.create_observable_counter(
            "querywarden.decisions",
            [self._observe_decisions],
            unit="{statement}",
            description="Statements decided, by outcome and rule",
        )
        meter.create_observable_counter(
            "querywarden.masked_values",
            [self._observe_masked],
            unit="{value}",
            description="Values masked in results",
        )
        meter.create_observable_counter(
            "querywarden.auth.refused",
            [self._observe_refused],
            unit="{connection}",
            description="Connections refused at authentication, by reason",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            [self._observe_connections],
            unit="{connection}",
            description="Upstream connections the gateway holds, by state and pool",
        )

    # -- the hot path: plain arithmetic, read by the readers when they read --

    def decision(self, outcome: str, rule: str | None) -> None:
        """Count a decision (``allow`` or ``refuse``) and the rule that made it."""
        if self.enabled:
            key = (outcome, rule)
            self._decisions[key] = self._decisions.get(key, 0) + 1

    def masked(self, count: int) -> None:
        """Count values masked in a result."""
        if self.enabled and count:
            self._masked += count

    def auth_refused(self, reason_kind: str) -> None:
        """Count a refused connection (``reason_kind``: a short, bounded label)."""
        if self.enabled:
            self._refused[reason_kind] = self._refused.get(reason_kind, 0) + 1

    def operation_duration(self, seconds: float, key: OperationKey) -> None:
        """Record a statement's duration in seconds (``key``: see :data:`OperationKey`)."""
        if not self.enabled:
            return
        series = self._durations.get(key)
        if series is None:
            series = self._durations[key] = HistogramSeries()
        series.counts[bisect_left(DURATION_BOUNDS, seconds)] += 1
        series.total += seconds
        series.low = min(series.low, seconds)
        series.high = max(series.high, seconds)

    def connection_opened(self, pool: str) -> None:
        """Count an upstream connection a session now holds (``pool``: its pool's name)."""
        if self.enabled:
            self._connections[pool] = self._connections.get(pool, 0) + 1

    def connection_closed(self, pool: str) -> None:
        """Count an upstream connection released."""
        if self.enabled and self._connections.get(pool, 0) > 0:
            self._connections[pool] -= 1

    def shutdown(self) -> None:
        """Export once more and stop (the provider flushes on shutdown)."""
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None

    # -- readers --
    # list(d.items()) copies in one C call under the GIL, so a concurrent increment on the
    # event loop cannot break the iteration; it just lands in the next read.

    def snapshot(self) -> Snapshot:
        """Every figure as of now, copied."""
        return Snapshot(
            start_ns=self._start_ns,
            decisions=dict(list(self._decisions.items())),
            masked=self._masked,
            refused=dict(list(self._refused.items())),
            durations={k: v.copy() for k, v in list(self._durations.items())},
            connections=dict(list(self._connections.items())),
        )

    def _observe_decisions(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(count, {"outcome": outcome, "rule": rule} if rule else {"outcome": outcome})
            for (outcome, rule), count in list(self._decisions.items())
        ]

    def _observe_masked(self, options: CallbackOptions) -> Iterable[Observation]:
        # Always observed, even at zero: an export with no data would skip the histogram.
        return [Observation(self._masked)]

    def _observe_refused(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(count, {"reason": reason}) for reason, count in list(self._refused.items())
        ]

    def _observe_connections(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(
                count,
                {"db.client.connection.state": "used", "db.client.connection.pool.name": pool},
            )
            for pool, count in list(self._connections.items())
        ]

    def duration_metric(self) -> Metric | None:
        """The duration histogram as the SDK's export model (cumulative), or None if empty."""
        now = time.time_ns()
        points = []
        for key, series in list(self._durations.items()):
            counts = list(series.counts)
            count = sum(counts)
            if not count:
                continue
            points.append(
                HistogramDataPoint(
                    attributes=operation_attributes(key),
                    start_time_unix_nano=self._start_ns,
                    time_unix_nano=now,
                    count=count,
                    sum=series.total,
                    bucket_counts=counts,
                    explicit_bounds=DURATION_BOUNDS,
                    min=series.low,
                    max=series.high,
                )
            )
        if not points:
            return None
        return Metric(
            name="db.client.operation.duration",
            description="Duration of database client operations, from the request to its result",
            unit="s",
            data=Histogram(
                data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE
            ),
        )


class _WithDurations(MetricExporter):
    """Adds the facade's duration histogram to every export of the wrapped exporter."""

    def __init__(self, inner: MetricExporter, metrics: GatewayMetrics, resource: Resource) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self._inner = inner
        self._metrics = metrics
        self._resource = resource
        self._scope = InstrumentationScope(SCOPE_NAME, __version__, SCHEMA_URL)

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        """Export ``metrics_data`` with the duration histogram added to our scope."""
        durations = self._metrics.duration_metric()
        if durations is not None:
            metrics_data = self._with(metrics_data, durations)
        return self._inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)

    def _with(self, data: MetricsData, metric: Metric) -> MetricsData:
        resources = list(data.resource_metrics)
        if not resources:
            return MetricsData(
                [
                    ResourceMetrics(
                        self._resource, [ScopeMetrics(self._scope, [metric], SCHEMA_URL)], ""
                    )
                ]
            )
        first = resources[0]
        scopes = list(first.scope_metrics)
        for i, scope in enumerate(scopes):
            if scope.scope.name == SCOPE_NAME:
                scopes[i] = ScopeMetrics(scope.scope, [*scope.metrics, metric], scope.schema_url)
                break
        else:
            scopes.append(ScopeMetrics(self._scope, [metric], SCHEMA_URL))
        resources[0] = ResourceMetrics(first.resource, scopes, first.schema_url)
        return MetricsData(resources)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        """Flush the wrapped exporter."""
        return self._inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Shut the wrapped exporter down."""
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)
