"""The real node (k8sharness.node): one per test module that asks for it.

Starting it takes about a minute (most of it loading the images into containerd); the
tests here then work as a user of a cluster does: helm, kubectl and pods.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from k8sharness.node import Node
from k8sharness.tools import REPO, require_tools

#: What the node's pods run: the product's image and those scripts/build-node-images.sh
#: makes from Debian's packages and the tools cache.
QUERYWARDEN_IMAGE = "localhost/querywarden:dev"
NODE_TOOLS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
    "helm",
    "otelcol",
    "coredns",
)


def _build(*argv: str) -> None:
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr}{result.stdout}",
            pytrace=False,
        )


def image_archives(directory: Path) -> list[Path]:
    """Every image the node needs, saved as archives containerd imports.

    The builds are no-ops when the images are current (``make test`` built them already).
    """
    directory.mkdir(parents=True, exist_ok=True)
    _build("bash", "scripts/build-image.sh")
    _build("bash", "scripts/build-node-images.sh", "--save", str(directory))
    archive = directory / "querywarden.tar"
    _build("bash", "scripts/podman.sh", "save", "--format", "oci-archive", "-o", str(archive),
           QUERYWARDEN_IMAGE)  # fmt: skip
    return sorted(directory.glob("*.tar"))


@pytest.fixture(scope="module")
def node(workdir: Path, request: pytest.FixtureRequest) -> Iterator[Node]:
    """A one-node cluster: control plane, kubelet, containerd, kube-proxy, CoreDNS.

    Module-scoped: it stops (and gives back its CPU and memory) once the module using it
    is done, instead of idling through the rest of the test session. Each module starts
    from an empty cluster: a directory of its own, so no etcd data (releases, bindings)
    of an earlier module's cluster is read again.
    """
    require_tools(*NODE_TOOLS)
    if os.geteuid() != 0:
        pytest.fail("the node tests need root (network namespaces, containerd)", pytrace=False)
    archives = image_archives(workdir / "node-images")
    running = Node(workdir / f"node-{request.module.__name__.rsplit('.', 1)[-1]}", archives)
    running.start()
    try:
        yield running
    finally:
        running.stop()
