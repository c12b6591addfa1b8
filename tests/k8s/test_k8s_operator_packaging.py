"""Packaging around the operator: the image, skaffold, the Collector example, the dashboard.

The Dockerfile is checked here for what the chart and the sidecar rely on (the image
itself is built and run in tests/test_image.py and test_k8s_image.py); skaffold's deploy
settings are rendered with the real helm; the example Collector configuration is
validated by a real Collector as far as the test build's components go.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from k8sharness.helm import Helm
from k8sharness.qwoperator import CHART, minimal_spec
from k8sharness.tools import REPO, tool
from querywarden_operator.config import OperatorConfig
from querywarden_operator.reconcile import parse_spec
from querywarden_operator.render import SIDECAR_UID, effective_sidecar, sidecar_container

DOCKERFILE = REPO / "Dockerfile"
SKAFFOLD = REPO / "skaffold.yaml"
COLLECTOR = REPO / "examples" / "otel-collector.yaml"
DASHBOARD = REPO / "examples" / "dashboards" / "querywarden.json"


def instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile's final stage."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), rest.strip()))
    return stages[-1]


def test_image_runs_as_non_root_with_the_querywarden_entrypoint() -> None:
    final = instructions()
    users = [args for instruction, args in final if instruction == "USER"]
    assert users == [f"{SIDECAR_UID}:{SIDECAR_UID}"]  # numeric: runAsNonRoot can check it
    entrypoint = [json.loads(a) for i, a in final if i == "ENTRYPOINT"]
    assert entrypoint == [["querywarden"]]
    cmd = [json.loads(a) for i, a in final if i == "CMD"]
    assert cmd == [["serve", "--config", "/etc/querywarden/gateway.yaml"]]
    env = " ".join(a for i, a in final if i == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # read-only root filesystem
    # The injected sidecar and the chart's Deployment run the same entry point.
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert "command: [querywarden]" in deployment
    assert "operator]" in deployment


def test_sidecar_matches_the_image() -> None:
    spec = parse_spec(minimal_spec())
    sidecar = effective_sidecar(spec.sidecar, OperatorConfig(), native_supported=True)
    container = sidecar_container(spec, sidecar)
    assert container["command"] == ["querywarden"]
    assert container["securityContext"]["runAsUser"] == SIDECAR_UID


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied: set[str] = set()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            copied.update(source.rstrip("/") for source in line.split()[1:-1])
    assert copied == kept
    # The native wheel is made by the build (scripts/build-image.sh, skaffold's hook);
    # everything else the Dockerfile copies is in the repository.
    generated = {"build/native-wheel"}
    for name in copied - generated:
        assert (REPO / name).exists(), name
    assert (
        "--wheel-dir build/native-wheel ./native"
        in (REPO / "scripts" / "build-image.sh").read_text()
    )
    hooks = yaml.safe_load(SKAFFOLD.read_text())["build"]["artifacts"][0]["hooks"]["before"]
    assert any("--wheel-dir build/native-wheel ./native" in " ".join(h["command"]) for h in hooks)


def test_skaffold_deploys_the_built_image_with_the_chart(helm: Helm) -> None:
    config = yaml.safe_load(SKAFFOLD.read_text())
    assert config["apiVersion"].startswith("skaffold/v4")
    (artifact,) = config["build"]["artifacts"]
    assert artifact["docker"]["dockerfile"] == "Dockerfile"
    (release,) = config["deploy"]["helm"]["releases"]
    assert (REPO / release["chartPath"] / "Chart.yaml").exists()
    name = artifact["image"]
    assert release["setValueTemplates"] == {
        "image.repository": f"{{{{.IMAGE_REPO_{name}}}}}",
        "image.tag": f"{{{{.IMAGE_TAG_{name}}}}}",
        "image.digest": f"{{{{.IMAGE_DIGEST_{name}}}}}",
    }
    # What skaffold would pass to helm renders (with stand-ins for the built image).
    values = {
        **{k: str(v) for k, v in release["setValues"].items()},
        "image.repository": "localhost/querywarden",
        "image.tag": "dev",
        "image.digest": "sha256:" + "1" * 64,
    }
    args = [item for k, v in values.items() for item in ("--set", f"{k}={v}")]
    rendered = helm("template", release["name"], str(REPO / release["chartPath"]),
                    "--namespace", release["namespace"], *args).stdout  # fmt: skip
    documents = [d for d in yaml.safe_load_all(rendered) if d]
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 1
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "localhost/querywarden:dev@sha256:" + "1" * 64
    service = next(d for d in documents if d["kind"] == "Service")
    (forward,) = config["portForward"]
    assert forward["resourceName"] == service["metadata"]["name"]


def test_collector_example_wires_otlp_to_traces_and_metrics(tmp_path: Path) -> None:
    config = yaml.safe_load(COLLECTOR.read_text())
    http = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert http.endswith(":4318")  # the sidecar exports OTLP/HTTP
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"traces", "metrics"}
    for pipeline in pipelines.values():
        assert "otlp" in pipeline["receivers"]
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], component
    prometheus = config["exporters"]["prometheus"]
    assert prometheus["add_metric_suffixes"] is True  # the dashboard's names
    assert prometheus["resource_to_telemetry_conversion"]["enabled"] is True

    # The real Collector accepts the parts the test build has (OTLP receiver, batch).
    reduced: dict[str, Any] = {
        "receivers": config["receivers"],
        "processors": {"batch": config["processors"]["batch"]},
        "exporters": {"debug": config["exporters"]["debug"]},
        "service": {
            "telemetry": {"metrics": {"level": "none"}},
            "pipelines": {
                name: {"receivers": ["otlp"], "processors": ["batch"], "exporters": ["debug"]}
                for name in pipelines
            },
        },
    }
    path = tmp_path / "collector.yaml"
    path.write_text(yaml.safe_dump(reduced))
    result = subprocess.run(
        [str(tool("otelcol")), "validate", f"--config=file:{path}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_dashboard_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in dashboard["panels"]]
    for wanted in (
        "Decisions by outcome",
        "Refusals by rule",
        "Masked values",
        "Statement latency",
    ):
        assert any(wanted in title for title in titles), wanted
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    inputs = {i["name"] for i in dashboard["__inputs"]}
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"].strip("${}") in inputs
        for target in panel["targets"]:
            expression = target.get("expr") or target.get("query")
            assert expression
            assert expression.count("(") == expression.count(")")
    traceql = [t["query"] for p in dashboard["panels"] for t in p["targets"] if "query" in t]
    assert any('span.querywarden.decision = "refuse"' in q for q in traceql)
    assert all(re.search(r'resource\.service\.name = "querywarden"', q) for q in traceql)
