"""An in-process OTLP/HTTP receiver for tests, built on the official protobuf definitions.

It listens on a loopback port in a thread, decodes ``/v1/traces`` and ``/v1/metrics``
requests (protobuf, gzip or not) with opentelemetry-proto and keeps what it received.
It can be stopped and started again on the same port (a Collector going down and coming
back), told to answer with an error status, and asked to wait for spans.
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


def any_value(value: AnyValue) -> Any:
    """Decode an OTLP ``AnyValue`` into a Python value."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, which)


def attributes(items: Any) -> dict[str, Any]:
    """Decode a repeated ``KeyValue`` into a dict."""
    return {kv.key: any_value(kv.value) for kv in items if isinstance(kv, KeyValue)}


@dataclass(frozen=True)
class ReceivedSpan:
    """One received span, ids in hex."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str
    status_code: int
    status_message: str


@dataclass(frozen=True)
class ReceivedPoint:
    """One received metric data point (sums and histograms)."""

    name: str
    unit: str
    attributes: dict[str, Any]
    value: float | None
    count: int | None
    bucket_counts: tuple[int, ...]
    resource: dict[str, Any]


class OtlpReceiver:
    """Receives OTLP/HTTP on ``endpoint`` (``http://127.0.0.1:<port>``)."""

    def __init__(self) -> None:
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self._points: list[ReceivedPoint] = []
        #: Every request, as (path, status answered).
        self.requests: list[tuple[str, int]] = []
        #: The bodies of the trace requests accepted, as received (decompressed): what
        #: left the exporter, byte for byte, whatever the decoding above makes of it.
        self.trace_bodies: list[bytes] = []
        #: When set, requests are answered with this status and their data is dropped.
        self.fail_with: int | None = None
        # Open connections: a stop must also cut keep-alive ones, or a client holding one
        # would still be served by a "stopped" receiver.
        self._connections: set[socket.socket] = set()

    @property
    def endpoint(self) -> str:
        """The base URL exporters are given."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the receiver is listening."""
        return self._server is not None

    def start(self) -> OtlpReceiver:
        """Listen (on a free port the first time, on the same port afterwards)."""
        handler = _handler_for(self)
        server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        # A short poll: stop() waits up to one poll interval for the serving loop.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="otlp-receiver"
        )
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: connections are refused until :meth:`start` again."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what was received --

    def spans(self) -> list[ReceivedSpan]:
        """Every span received, duplicates included, in arrival order."""
        with self._lock:
            return list(self._spans)

    def unique_spans(self) -> dict[str, ReceivedSpan]:
        """Spans by span id (the last copy of a re-sent span wins)."""
        return {span.span_id: span for span in self.spans()}

    def spans_by_attribute(self, key: str) -> dict[Any, ReceivedSpan]:
        """Unique spans by the value of one attribute (spans without it are left out)."""
        return {s.attributes[key]: s for s in self.unique_spans().values() if key in s.attributes}

    def points(self, name: str | None = None) -> list[ReceivedPoint]:
        """Metric data points received (of one metric, when ``name`` is given)."""
        with self._lock:
            return [p for p in self._points if name is None or p.name == name]

    def clear(self) -> None:
        """Forget everything received."""
        with self._lock:
            self._spans.clear()
            self._points.clear()
            self.requests.clear()
            self.trace_bodies.clear()

    def wait_for(
        self, select: Callable[[list[ReceivedSpan]], bool], *, timeout: float = 20.0
    ) -> list[ReceivedSpan]:
        """Wait until ``select(spans)`` holds for the spans received; return them."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            if select(spans):
                return spans
            if time.monotonic() > deadline:
                raise TimeoutError(f"received {len(spans)} spans; the condition still fails")
            time.sleep(0.02)

    # -- called by the handler --

    def _traces(self, body: bytes) -> bytes:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        received = []
        for resource_spans in request.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            attributes=attributes(span.attributes),
                            resource=resource,
                            scope=scope_spans.scope.name,
                            status_code=span.status.code,
                            status_message=span.status.message,
                        )
                    )
        with self._lock:
            self._spans.extend(received)
            self.trace_bodies.append(body)
        return bytes(ExportTraceServiceResponse().SerializeToString())

    def _metrics(self, body: bytes) -> bytes:
        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        received = []
        for resource_metrics in request.resource_metrics:
            resource = attributes(resource_metrics.resource.attributes)
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    which = metric.WhichOneof("data")
                    if which in ("sum", "gauge"):
                        for point in getattr(metric, which).data_points:
                            value = (
                                point.as_int
                                if point.WhichOneof("value") == "as_int"
                                else point.as_double
                            )
                            received.append(
                                ReceivedPoint(
                                    metric.name,
                                    metric.unit,
                                    attributes(point.attributes),
                                    value,
                                    None,
                                    (),
                                    resource,
                                )
                            )
                    elif which == "histogram":
                        for hpoint in metric.histogram.data_points:
                            received.append(
                                ReceivedPoint(
                                    metric.name,
                                    metric.unit,
                                    attributes(hpoint.attributes),
                                    hpoint.sum,
                                    hpoint.count,
                                    tuple(hpoint.bucket_counts),
                                    resource,
                                )
                            )
        with self._lock:
            self._points.extend(received)
        return bytes(ExportMetricsServiceResponse().SerializeToString())


def _handler_for(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with receiver._lock:
                receiver._connections.add(self.connection)

        def finish(self) -> None:
            with receiver._lock:
                receiver._connections.discard(self.connection)
            super().finish()

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            status, payload = 404, b""
            if receiver.fail_with is not None:
                status = receiver.fail_with
            elif self.headers.get("Content-Type") != "application/x-protobuf":
                status = 415
            elif self.path == "/v1/traces":
                status, payload = 200, receiver._traces(body)
            elif self.path == "/v1/metrics":
                status, payload = 200, receiver._metrics(body)
            with receiver._lock:
                receiver.requests.append((self.path, status))
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: pytest shows stderr of failing tests

    return Handler
