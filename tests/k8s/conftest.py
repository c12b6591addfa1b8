"""Fixtures for the tests against a real Kubernetes API server, helm and the Collector.

Session-scoped: one etcd + kube-apiserver (or the cluster KUBECONFIG names) and one
OpenTelemetry Collector serve every test here. The binaries come from ``make tools``; if
they are missing these fixtures fail (they do not skip) and say so. See
docs/test-harness.md.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from k8sharness.cluster import NAMESPACE_LABEL, Cluster, KubeError, LocalControlPlane
from k8sharness.collector import Collector
from k8sharness.helm import Helm
from k8sharness.tools import require_tools


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    """A private temporary directory for the session's clusters, logs and keys.

    Removed at the end, unless QUERYWARDEN_K8S_KEEP_WORKDIR is set (to read the etcd,
    kube-apiserver and Collector logs after a failure).
    """
    path = Path(tempfile.mkdtemp(prefix="querywarden-k8s-"))
    try:
        yield path
    finally:
        if os.environ.get("QUERYWARDEN_K8S_KEEP_WORKDIR"):
            print(f"\nkept the k8s harness's work directory: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def k8s(workdir: Path) -> Iterator[Cluster]:
    """A Kubernetes API server: the cluster ``$KUBECONFIG`` names, else a local one.

    The local one is etcd + kube-apiserver on free loopback ports (no kubelet, no
    controllers), with a throwaway CA and an admin client certificate in system:masters.
    """
    kubeconfig = os.environ.get("KUBECONFIG")
    require_tools("kubectl")
    if kubeconfig:
        cluster = Cluster.from_kubeconfig(kubeconfig, local=False)
        cluster.tool_env["KUBECACHEDIR"] = str(workdir / "kube-cache")
        try:
            yield cluster
        finally:
            cluster.close()
        return
    require_tools("etcd", "kube-apiserver")
    control_plane = LocalControlPlane(workdir / "cluster")
    cluster = control_plane.start()
    cluster.tool_env["KUBECACHEDIR"] = str(workdir / "kube-cache")
    try:
        yield cluster
    finally:
        control_plane.stop()


@pytest.fixture
def namespace(k8s: Cluster) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards.

    On the local control plane the deletion never completes (no namespace controller),
    which costs nothing: the whole cluster is thrown away at the end of the session.
    """
    name = f"qw-test-{secrets.token_hex(4)}"
    k8s.create_namespace(name, {NAMESPACE_LABEL: name})
    try:
        yield name
    finally:
        k8s.delete(f"/api/v1/namespaces/{name}")


@pytest.fixture
def review_crd_as_found(k8s: Cluster) -> Iterator[None]:
    """Delete the QueryReview CRD after the test if it was not there before.

    A test that applies it with kubectl leaves it owned by no Helm release, and the helm
    tests that install the chart with its QueryReview template (test_k8s_operator_helm.py)
    cannot install over such a CRD. List this fixture before fixtures that apply it on
    teardown: teardowns run in reverse.
    """
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/queryreviews.querywarden.io"

    def present() -> bool:
        try:
            k8s.get(path)
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    existed = present()
    try:
        yield
    finally:
        if not existed:
            k8s.delete(path)
            deadline = time.monotonic() + 60
            while present():
                assert time.monotonic() < deadline, "the QueryReview CRD is not going away"
                time.sleep(0.2)


@pytest.fixture(scope="session")
def helm(k8s: Cluster, workdir: Path) -> Helm:
    """The pinned helm against ``k8s``, with its own config, cache and data directories."""
    require_tools("helm")
    return Helm(k8s, workdir / "helm")


@pytest.fixture(scope="session")
def otel_collector(workdir: Path) -> Iterator[Collector]:
    """An OpenTelemetry Collector: OTLP/HTTP in, one JSON-lines file per signal out."""
    require_tools("otelcol")
    directory = workdir / "otelcol"
    directory.mkdir()
    collector = Collector(directory).start()
    try:
        yield collector
    finally:
        collector.stop()
