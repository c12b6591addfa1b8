"""The OpenTelemetry Collector built by ``make tools``: OTLP in, JSON files out.

The Collector receives OTLP over HTTP on a free loopback port and writes every trace,
metric and log batch it receives as one line of OTLP JSON to a file per signal (the
contrib file exporter), and a summary to its own log (the debug exporter). Tests read
the files back to see exactly what reached the Collector.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from k8sharness.processes import ManagedProcess, free_port
from k8sharness.tools import tool

SIGNALS = ("traces", "metrics", "logs")
#: OTLP enum values, as the file exporter writes them (numbers, not names).
SPAN_KIND_INTERNAL = 1
SPAN_KIND_SERVER = 2
STATUS_CODE_UNSET = 0
STATUS_CODE_ERROR = 2
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the Collector wrote it, with OTLP JSON values decoded."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str
    status_code: int
    status_message: str


def any_value(value: Mapping[str, Any]) -> Any:
    """Decode an OTLP JSON ``AnyValue`` (ints arrive as strings, bytes as base64)."""
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "bytesValue" in value:
        return base64.b64decode(value["bytesValue"])
    if "arrayValue" in value:
        return [any_value(v) for v in value["arrayValue"].get("values", [])]
    if "kvlistValue" in value:
        return attributes(value["kvlistValue"].get("values", []))
    return None


def attributes(items: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Decode an OTLP JSON attribute list into a dict."""
    return {item["key"]: any_value(item.get("value", {})) for item in items}


class Collector:
    """A running Collector; ``endpoint`` takes OTLP/HTTP (``/v1/traces`` and so on)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.files = {signal: workdir / f"{signal}.jsonl" for signal in SIGNALS}
        self.config_file = workdir / "otelcol.yaml"
        self.process: ManagedProcess | None = None

    def config(self, *, listen: str | None = None, directory: str | None = None) -> dict[str, Any]:
        """The Collector configuration this harness runs.

        ``listen`` and ``directory`` are for a Collector that runs elsewhere (a pod): the
        OTLP/HTTP address it listens on, and where it sees this harness's directory.
        """
        exporters: dict[str, Any] = {
            # Flush often: tests poll the files and should not wait a second per batch.
            f"file/{signal}": {
                "path": f"{directory}/{path.name}" if directory else str(path),
                "format": "json",
                "flush_interval": "100ms",
            }
            for signal, path in self.files.items()
        }
        exporters["debug"] = {"verbosity": "basic"}
        return {
            "receivers": {
                # HTTP only, on our port: the gRPC default (4317) may be taken on a dev machine.
                "otlp": {"protocols": {"http": {"endpoint": listen or f"127.0.0.1:{self.port}"}}}
            },
            "exporters": exporters,
            "service": {
                # No internal metrics endpoint: it would listen on :8888 and collide.
                "telemetry": {"metrics": {"level": "none"}},
                "pipelines": {
                    signal: {"receivers": ["otlp"], "exporters": [f"file/{signal}", "debug"]}
                    for signal in SIGNALS
                },
            },
        }

    def start(self) -> Collector:
        """Start the Collector and wait until its OTLP receiver accepts connections."""
        self.config_file.write_text(yaml.safe_dump(self.config()))
        self.process = ManagedProcess(
            "otelcol",
            [tool("otelcol"), f"--config=file:{self.config_file}"],
            self.workdir / "otelcol.log",
        )
        try:
            self.process.wait_until(self._listening, timeout=START_TIMEOUT, what="listening")
        except BaseException:
            self.stop()
            raise
        return self

    def _listening(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True

    def stop(self) -> None:
        """Stop the Collector (it flushes its exporters on SIGTERM)."""
        if self.process is not None:
            self.process.stop()
            self.process = None

    def records(self, signal: str) -> list[dict[str, Any]]:
        """Every OTLP JSON export request written for ``signal`` so far."""
        path = self.files[signal]
        if not path.exists():
            return []
        text = path.read_text()
        lines = text.splitlines()
        # The exporter may be mid-write: a last line without its newline is not done yet.
        if lines and not text.endswith("\n"):
            lines.pop()
        return [json.loads(line) for line in lines if line.strip()]

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far."""
        found = []
        for request in self.records("traces"):
            for resource_spans in request.get("resourceSpans", []):
                resource = attributes(resource_spans.get("resource", {}).get("attributes", []))
                for scope_spans in resource_spans.get("scopeSpans", []):
                    scope = scope_spans.get("scope", {}).get("name", "")
                    for span in scope_spans.get("spans", []):
                        status = span.get("status", {})
                        found.append(
                            ReceivedSpan(
                                name=span["name"],
                                trace_id=span["traceId"],
                                span_id=span["spanId"],
                                parent_span_id=span.get("parentSpanId", ""),
                                kind=int(span.get("kind", 0)),
                                attributes=attributes(span.get("attributes", [])),
                                resource=resource,
                                scope=scope,
                                status_code=int(status.get("code", STATUS_CODE_UNSET)),
                                status_message=status.get("message", ""),
                            )
                        )
        return found

    def wait_for_spans(
        self,
        select: Callable[[ReceivedSpan], bool],
        *,
        count: int,
        timeout: float = 20.0,
    ) -> list[ReceivedSpan]:
        """Wait until ``count`` received spans satisfy ``select``; return those spans."""
        deadline = time.monotonic() + timeout
        while True:
            chosen = [span for span in self.spans() if select(span)]
            if len(chosen) >= count:
                return chosen
            if time.monotonic() > deadline:
                log = self.process.tail() if self.process else ""
                raise TimeoutError(
                    f"the Collector wrote {len(chosen)} of {count} expected spans in "
                    f"{timeout:.0f}s; its log:\n{log}"
                )
            time.sleep(0.1)
