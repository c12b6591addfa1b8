"""Live gateway metrics, exported over OTLP/HTTP with the OpenTelemetry SDK.

* ``querywarden.decisions`` (counter; ``outcome``, ``rule``): every statement decided.
* ``querywarden.masked_values`` (counter): values masked in results.
* ``querywarden.auth.refused`` (counter; ``reason``): refused connections.
* ``querywarden.statement.duration`` (histogram, ms; ``outcome``): statement latency.

These are called once or twice per statement, so the calls must cost next to nothing.
A synchronous SDK instrument costs about 6 µs per call (attribute sets, locks, view
lookups), a sizeable share of what the gateway spends on a whole statement; so the
facade counts into plain dicts and bucket lists (well under a microsecond) and the SDK
reads them only when it exports: the counters are observable counters, and the
histogram, which has no observable form in the API, is added to each export as a
cumulative explicit-bucket histogram by a thin wrapper around the OTLP exporter.

Unlike the audit spans (see :mod:`querywarden.audit.export`), metrics are live figures:
a point lost while the Collector is down is covered by the next cumulative one.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable
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

__all__ = ["LATENCY_BOUNDS_MS", "GatewayMetrics"]

SCOPE_NAME = "querywarden"
#: Histogram bucket bounds in milliseconds: a relayed statement takes a fraction of a
#: millisecond, an analytical one seconds; the SDK's defaults start at 5 ms.
LATENCY_BOUNDS_MS: tuple[float, ...] = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1000.0,
    2500.0,
    5000.0,
    10000.0,
)


@dataclass(slots=True)
class _Series:
    """One histogram series (cumulative since start)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))
    total: float = 0.0
    low: float = float("inf")
    high: float = float("-inf")


class GatewayMetrics:
    """The gateway's metrics; with ``endpoint=None`` every method does nothing.

    ``endpoint`` is the Collector's OTLP/HTTP base URL (``http://collector:4318``);
    metrics go to ``<endpoint>/v1/metrics`` every ``export_interval`` seconds.
    """

    def __init__(
        self,
        endpoint: str | None,
        *,
        instance_id: str = "",
        export_interval: float = 10.0,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.enabled = endpoint is not None
        self._decisions: dict[tuple[str, str | None], int] = {}
        self._refused: dict[str, int] = {}
        self._masked = 0
        self._latency: dict[str, _Series] = {}
        self._provider: MeterProvider | None = None
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
            _WithLatency(exporter, self, resource),
            export_interval_millis=export_interval * 1000,
        )
        # A provider of its own, not the global one: embedding applications keep theirs.
        self._provider = MeterProvider(resource=resource, metric_readers=[reader])
        meter = self._provider.get_meter(SCOPE_NAME, __version__)
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
        self._start_ns = time.time_ns()

    # -- the hot path: plain arithmetic, read by the SDK at export time --

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

    def statement_latency(self, ms: float, outcome: str) -> None:
        """Record a statement's duration in milliseconds."""
        if not self.enabled:
            return
        series = self._latency.get(outcome)
        if series is None:
            series = self._latency[outcome] = _Series()
        series.counts[bisect_left(LATENCY_BOUNDS_MS, ms)] += 1
        series.total += ms
        series.low = min(series.low, ms)
        series.high = max(series.high, ms)

    def shutdown(self) -> None:
        """Export once more and stop (the provider flushes on shutdown)."""
        if self._provider is not None:
            self._provider.shutdown()
            self._provider = None

    # -- read at export time, on the reader's thread --
    # list(d.items()) copies in one C call under the GIL, so a concurrent increment on the
    # event loop cannot break the iteration; it just lands in the next export.

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

    def latency_metric(self) -> Metric | None:
        """The latency histogram as the SDK's export model (cumulative), or None if empty."""
        now = time.time_ns()
        points = []
        for outcome, series in list(self._latency.items()):
            counts = list(series.counts)
            count = sum(counts)
            if not count:
                continue
            points.append(
                HistogramDataPoint(
                    attributes={"outcome": outcome},
                    start_time_unix_nano=self._start_ns,
                    time_unix_nano=now,
                    count=count,
                    sum=series.total,
                    bucket_counts=counts,
                    explicit_bounds=LATENCY_BOUNDS_MS,
                    min=series.low,
                    max=series.high,
                )
            )
        if not points:
            return None
        return Metric(
            name="querywarden.statement.duration",
            description="Statement duration, from the request to its result",
            unit="ms",
            data=Histogram(
                data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE
            ),
        )


class _WithLatency(MetricExporter):
    """Adds the facade's latency histogram to every export of the wrapped exporter."""

    def __init__(self, inner: MetricExporter, metrics: GatewayMetrics, resource: Resource) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self._inner = inner
        self._metrics = metrics
        self._resource = resource
        self._scope = InstrumentationScope(SCOPE_NAME, __version__)

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        """Export ``metrics_data`` with the latency histogram added to our scope."""
        latency = self._metrics.latency_metric()
        if latency is not None:
            metrics_data = self._with(metrics_data, latency)
        return self._inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)

    def _with(self, data: MetricsData, metric: Metric) -> MetricsData:
        resources = list(data.resource_metrics)
        if not resources:
            return MetricsData(
                [ResourceMetrics(self._resource, [ScopeMetrics(self._scope, [metric], "")], "")]
            )
        first = resources[0]
        scopes = list(first.scope_metrics)
        for i, scope in enumerate(scopes):
            if scope.scope.name == SCOPE_NAME:
                scopes[i] = ScopeMetrics(scope.scope, [*scope.metrics, metric], scope.schema_url)
                break
        else:
            scopes.append(ScopeMetrics(self._scope, [metric], ""))
        resources[0] = ResourceMetrics(first.resource, scopes, first.schema_url)
        return MetricsData(resources)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        """Flush the wrapped exporter."""
        return self._inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Shut the wrapped exporter down."""
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)
