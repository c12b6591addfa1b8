"""helm, run against the test cluster with its own (throwaway) configuration and cache."""

from __future__ import annotations

import subprocess
from pathlib import Path

from k8sharness.cluster import Cluster
from k8sharness.tools import tool


class Helm:
    """The pinned helm, kept out of the user's ~/.config/helm and ~/.cache/helm."""

    def __init__(self, cluster: Cluster, home: Path) -> None:
        self.cluster = cluster
        self.env = {
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``helm ARGS...``; with ``check``, fail with its output if it fails."""
        return self.cluster.run(tool("helm"), *args, check=check, env=self.env)
