"""helm renders a chart offline and installs it into the API server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from k8sharness.cluster import Cluster, KubeError
from k8sharness.helm import Helm

CHART_YAML = """\
apiVersion: v2
name: qw-harness
description: A trivial chart for the test harness
type: application
version: 0.1.0
appVersion: "1.0"
"""

VALUES_YAML = """\
greeting: hello
"""

# .Capabilities.KubeVersion is a default when rendering offline and the API server's
# own version when installing: it shows which helm talked to.
CONFIGMAP_TEMPLATE = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-settings
  labels:
    app.kubernetes.io/managed-by: {{ .Release.Service }}
    app.kubernetes.io/instance: {{ .Release.Name }}
data:
  greeting: {{ .Values.greeting | quote }}
  namespace: {{ .Release.Namespace | quote }}
  kubeVersion: {{ .Capabilities.KubeVersion.Version | quote }}
"""


@pytest.fixture
def chart(tmp_path: Path) -> Path:
    """A one-ConfigMap chart written to a temporary directory."""
    root = tmp_path / "qw-harness"
    (root / "templates").mkdir(parents=True)
    (root / "Chart.yaml").write_text(CHART_YAML)
    (root / "values.yaml").write_text(VALUES_YAML)
    (root / "templates" / "configmap.yaml").write_text(CONFIGMAP_TEMPLATE)
    return root


def test_helm_template_renders_offline(helm: Helm, chart: Path) -> None:
    result = helm("template", "demo", str(chart), "--namespace", "rendered", "--set", "greeting=hi")
    documents = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert [(d["kind"], d["metadata"]["name"]) for d in documents] == [
        ("ConfigMap", "demo-settings")
    ]
    configmap = documents[0]
    assert configmap["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert configmap["data"]["greeting"] == "hi"
    assert configmap["data"]["namespace"] == "rendered"


def test_helm_install_and_uninstall(helm: Helm, k8s: Cluster, chart: Path, namespace: str) -> None:
    helm("install", "demo", str(chart), "--namespace", namespace, "--set", "greeting=installed")

    path = f"/api/v1/namespaces/{namespace}/configmaps/demo-settings"
    configmap = k8s.get(path)
    assert configmap["data"]["greeting"] == "installed"
    assert configmap["data"]["namespace"] == namespace
    assert configmap["data"]["kubeVersion"] == k8s.get("/version")["gitVersion"]
    assert configmap["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"

    releases = json.loads(helm("list", "--namespace", namespace, "--output", "json").stdout)
    assert [(r["name"], r["status"], r["chart"]) for r in releases] == [
        ("demo", "deployed", "qw-harness-0.1.0")
    ]
    # helm keeps its release record in a Secret of the release's namespace.
    secrets = k8s.request(
        "GET",
        f"/api/v1/namespaces/{namespace}/secrets",
        query={"labelSelector": "owner=helm,name=demo"},
    )
    assert [s["type"] for s in secrets["items"]] == ["helm.sh/release.v1"]

    helm("uninstall", "demo", "--namespace", namespace)
    with pytest.raises(KubeError) as gone:
        k8s.get(path)
    assert gone.value.status == 404
    assert json.loads(helm("list", "--namespace", namespace, "--output", "json").stdout) == []
