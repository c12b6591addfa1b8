"""Where the test tools built by ``make tools`` live, and whether they are current."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
VERSIONS_FILE = REPO / "tools" / "versions.env"

#: The pin in tools/versions.env each tool's stamp must carry.
PIN_OF = {
    "etcd": "ETCD_VERSION",
    "kube-apiserver": "KUBERNETES_VERSION",
    "kubectl": "KUBERNETES_VERSION",
    "kubelet": "KUBERNETES_VERSION",
    "kube-controller-manager": "KUBERNETES_VERSION",
    "kube-scheduler": "KUBERNETES_VERSION",
    "kube-proxy": "KUBERNETES_VERSION",
    "helm": "HELM_VERSION",
    "otelcol": "OTELCOL_BUILDER_VERSION",
    "coredns": "COREDNS_VERSION",
    "promtext": "PROMETHEUS_COMMON_VERSION",
}


class ToolsMissing(RuntimeError):
    """A tool is not built, or was built at another version than the one pinned."""


def versions() -> dict[str, str]:
    """The pins in tools/versions.env (``KEY=value`` lines; ``#`` starts a comment)."""
    pins: dict[str, str] = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            pins[key.strip()] = value.strip()
    return pins


def tools_dir() -> Path:
    """The tools cache: ``$QUERYWARDEN_TOOLS_DIR``, else ``~/.cache/querywarden/tools``."""
    configured = os.environ.get("QUERYWARDEN_TOOLS_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "querywarden" / "tools"


def tool(name: str) -> Path:
    """The path of a built tool; raises ToolsMissing unless it is there at its pin.

    The stamp scripts/build-tools.sh writes says which version a binary was built from, so
    a cache left over from an older pin is reported instead of silently tested against.
    """
    binary = tools_dir() / "bin" / name
    stamp = tools_dir() / "stamps" / name
    hint = f"run `make tools` (scripts/build-tools.sh) to build the test tools into {tools_dir()}"
    if not (binary.exists() and os.access(binary, os.X_OK) and stamp.exists()):
        raise ToolsMissing(f"{name} is not built: {hint}")
    pinned = versions()[PIN_OF[name]]
    first = stamp.read_text().splitlines()[0]
    # A kubectl taken from PATH is stamped "system PATH 1.MINOR"; the script accepted it.
    if not (first == f"version {pinned}" or (name == "kubectl" and first.startswith("system "))):
        raise ToolsMissing(f"{name} in {binary} was built for {first!r}, not {pinned}: {hint}")
    return binary


def require_tools(*names: str) -> None:
    """Fail the test (not skip it) when a tool is not built at its pinned version."""
    try:
        for name in names:
            tool(name)
    except ToolsMissing as exc:
        pytest.fail(str(exc), pytrace=False)
