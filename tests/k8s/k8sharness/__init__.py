"""Test harness for the real Kubernetes API server, helm and the OpenTelemetry Collector.

The binaries are built from their official Go modules by ``make tools``
(``scripts/build-tools.sh``); this package starts and drives them for ``tests/k8s``.
See docs/test-harness.md.
"""
