"""The chart's optional MCP server (mcp.enabled): rendered, refused and installed.

``helm template`` renders nothing of it by default; with its values, a Deployment running
``querywarden mcp --transport http`` (arguments the real command line accepts), a Service
and a PodDisruptionBudget; without a required value it fails with a message naming it;
and ``helm install`` puts it into the API server.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from mcp.server.auth.routes import build_resource_metadata_url
from pydantic import AnyHttpUrl

from k8sharness.cluster import Cluster
from k8sharness.helm import Helm
from k8sharness.qwoperator import CHART, create_namespace
from querywarden.cli import _build_parser
from querywarden.mcp.command import run_mcp

NAMESPACE = "qw-system"
MCP_NAME = "qw-querywarden-mcp"
REQUIRED = {
    "gateway": "postgres.app.svc:5432",
    "authorizationServer": "https://issuer.example.com",
}
#: Optional, but set in most tests (its arguments are checked).
ADMIN = {"adminUrl": "http://postgres.app.svc:8081"}
ENABLED = ("--set", "mcp.enabled=true", "--set", "reviews.enabled=false")


def values(**extra: str) -> list[str]:
    """``--set`` arguments: the MCP server enabled with its required values, and ``extra``."""
    settings = {**REQUIRED, **ADMIN, **extra}
    return [
        *ENABLED,
        *(item for key, value in settings.items() for item in ("--set", f"mcp.{key}={value}")),
    ]


def template(helm: Helm, *args: str, check: bool = True, namespace: str = NAMESPACE) -> Any:
    """``helm template``: the documents, or (``check=False``) helm's result as it is."""
    result = helm("template", "qw", str(CHART), "--namespace", namespace, *args, check=check)
    if not check:
        return result
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def mcp_objects(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The MCP server's objects by kind (its labels say component: mcp)."""
    found = [
        d
        for d in documents
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "mcp"
    ]
    by_kind = {d["kind"]: d for d in found}
    assert len(by_kind) == len(found), [d["kind"] for d in found]
    return by_kind


def test_nothing_of_it_is_rendered_by_default(helm: Helm) -> None:
    documents = template(helm)
    assert mcp_objects(documents) == {}
    assert not [d for d in documents if "mcp" in d["metadata"]["name"]]


def test_enabled_it_renders_the_server_its_service_and_budget(helm: Helm) -> None:
    settings = values(
        database="orders", publicUrl="https://mcp.example.com/mcp", sslmode="verify-ca"
    )
    more = {
        "allowedHosts": "{mcp.example.com,mcp.example.com:443}",
        "ca.configMap": "gateway-ca",
        "adminCA.secret": "admin-ca",
        "adminCA.key": "root.pem",
        "extraArgs": "{--held-wait,10}",
    }
    settings += [item for key, value in more.items() for item in ("--set", f"mcp.{key}={value}")]
    objects = mcp_objects(template(helm, *settings))
    assert sorted(objects) == ["Deployment", "PodDisruptionBudget", "Service"]
    deployment = objects["Deployment"]
    assert deployment["metadata"]["name"] == MCP_NAME
    assert deployment["spec"]["replicas"] == 2
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/component"] == "mcp"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/querywarden/querywarden:0.1.0"
    assert container["command"] == ["querywarden"]
    assert container["args"] == [
        "--log-level", "INFO", "mcp", "--transport", "http",
        "--listen", "0.0.0.0:8765",
        "--gateway", "postgres.app.svc:5432",
        "--database", "orders",
        "--sslmode", "verify-ca",
        "--sslrootcert", "/etc/querywarden-mcp/ca/ca.crt",
        "--admin-url", "http://postgres.app.svc:8081",
        "--admin-cacert", "/etc/querywarden-mcp/admin-ca/root.pem",
        "--authorization-server", "https://issuer.example.com",
        "--public-url", "https://mcp.example.com/mcp",
        "--allowed-host", "mcp.example.com",
        "--allowed-host", "mcp.example.com:443",
        "--held-wait", "10",
    ]  # fmt: skip
    # The real command line takes them as meant.
    args = _build_parser().parse_args(container["args"])
    assert args.handler is run_mcp
    assert (args.transport, args.gateway, args.database) == ("http", REQUIRED["gateway"], "orders")
    assert args.allowed_host == ["mcp.example.com", "mcp.example.com:443"]
    assert str(args.sslrootcert) == "/etc/querywarden-mcp/ca/ca.crt"
    assert args.held_wait == 10.0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    # The probes ask for what needs no token: the protected resource metadata.
    metadata = {"path": "/.well-known/oauth-protected-resource/mcp", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == metadata
    assert container["livenessProbe"]["httpGet"] == metadata
    assert container["ports"] == [{"name": "http", "containerPort": 8765, "protocol": "TCP"}]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {
        "tmp": "/tmp",
        "ca": "/etc/querywarden-mcp/ca",
        "admin-ca": "/etc/querywarden-mcp/admin-ca",
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["ca"]["configMap"] == {
        "name": "gateway-ca",
        "items": [{"key": "ca.crt", "path": "ca.crt"}],
    }
    assert volumes["admin-ca"]["secret"] == {
        "secretName": "admin-ca",
        "items": [{"key": "root.pem", "path": "root.pem"}],
    }

    service = objects["Service"]
    assert service["metadata"]["name"] == MCP_NAME
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8765, "targetPort": "http", "protocol": "TCP"}
    ]
    budget = objects["PodDisruptionBudget"]
    assert budget["spec"] == {"minAvailable": 1, "selector": {"matchLabels": selector}}


def test_defaults_the_public_url_to_the_service_and_follows_its_path(helm: Helm) -> None:
    objects = mcp_objects(template(helm, *values(), "--set", "mcp.replicas=1"))
    assert "PodDisruptionBudget" not in objects  # one replica: nothing to keep
    container = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--public-url") + 1] == f"http://{MCP_NAME}.{NAMESPACE}.svc:8765/mcp"
    assert args[args.index("--sslmode") + 1] == "verify-full"
    assert "--sslrootcert" not in args and "--allowed-host" not in args
    # Under a path of an Ingress: the metadata (and so the probes) follow it.
    objects = mcp_objects(template(helm, *values(publicUrl="https://agents.example.com/db/mcp")))
    container = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    path = "/.well-known/oauth-protected-resource/db/mcp"
    assert container["readinessProbe"]["httpGet"]["path"] == path
    # The path as the SDK builds it: a trailing slash kept, a lone "/" dropped.
    for public_url, expected in (
        ("https://agents.example.com/db/mcp/", "/.well-known/oauth-protected-resource/db/mcp/"),
        ("https://agents.example.com/", "/.well-known/oauth-protected-resource"),
        ("https://agents.example.com", "/.well-known/oauth-protected-resource"),
    ):
        objects = mcp_objects(template(helm, *values(publicUrl=public_url)))
        container = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
        assert container["livenessProbe"]["httpGet"]["path"] == expected, public_url
        sdk = build_resource_metadata_url(AnyHttpUrl(public_url))
        assert urlparse(str(sdk)).path == expected, public_url


def test_the_install_notes_say_where_agents_connect(helm: Helm) -> None:
    notes = helm("install", "qw", str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
                 *values(publicUrl="https://mcp.example.com/mcp")).stdout  # fmt: skip
    assert "streamable HTTP at\nhttps://mcp.example.com/mcp" in notes
    assert "gateway postgres.app.svc:5432 with the caller's own token" in notes
    default = helm("install", "qw", str(CHART), "--dry-run=client", "--namespace", NAMESPACE)
    assert "MCP" not in default.stdout


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_a_missing_required_value_fails_with_its_name(helm: Helm, missing: str) -> None:
    settings = [
        item
        for key, value in REQUIRED.items()
        if key != missing
        for item in ("--set", f"mcp.{key}={value}")
    ]
    result = template(helm, *ENABLED, *settings, check=False)
    assert result.returncode != 0
    assert f"mcp.enabled needs mcp.{missing}: " in result.stderr


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["mcp.gateway=postgres.app.svc"], 'mcp.gateway must be HOST:PORT, not "postgres.app.svc"'),
        (["mcp.sslmode=allow"], "mcp.sslmode must be disable, prefer, require, verify-ca or"),
        (["mcp.ca.key=ca.crt"], "mcp.ca: name a configMap or a secret holding the CA certificate"),
        (
            ["mcp.adminCA.configMap=a", "mcp.adminCA.secret=b"],
            "mcp.adminCA: name a configMap or a secret, not both",
        ),
    ],
)
def test_invalid_values_fail_with_a_message(helm: Helm, settings: list[str], message: str) -> None:
    more = [item for setting in settings for item in ("--set", setting)]
    result = template(helm, *values(), *more, check=False)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.fixture
def release_namespace(k8s: Cluster) -> Iterator[str]:
    namespace = create_namespace(k8s, "qw-mcp")
    try:
        yield namespace
    finally:
        k8s.delete(f"/api/v1/namespaces/{namespace}")


def test_installed_the_api_server_accepts_its_objects(
    helm: Helm, k8s: Cluster, release_namespace: str
) -> None:
    namespace = release_namespace
    settings = [*values(publicUrl="https://mcp.example.com/mcp"), "--set", "mcp.ca.secret=gw-ca"]
    rendered = mcp_objects(template(helm, *settings, namespace=namespace))
    # The API server validates them in full (schemas, defaults, admission) without storing.
    dry_run = k8s.kubectl(
        "apply", "--server-side", "--dry-run=server", "-f", "-",
        stdin=yaml.safe_dump_all(list(rendered.values())),
    )  # fmt: skip
    assert dry_run.stdout.count("(server dry run)") == 3, dry_run.stdout

    helm("install", "qw", str(CHART), "--namespace", namespace, "--wait=false", *settings)
    try:
        base = f"/namespaces/{namespace}"
        deployment = k8s.get(f"/apis/apps/v1{base}/deployments/{MCP_NAME}")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["args"][2:5] == ["mcp", "--transport", "http"]
        assert container["readinessProbe"]["httpGet"]["path"] == (
            "/.well-known/oauth-protected-resource/mcp"
        )
        service = k8s.get(f"/api/v1{base}/services/{MCP_NAME}")
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        budget = k8s.get(f"/apis/policy/v1{base}/poddisruptionbudgets/{MCP_NAME}")
        assert budget["spec"]["minAvailable"] == 1
        # The operator's own Deployment is still there, its selector apart from the server's.
        operator = k8s.get(f"/apis/apps/v1{base}/deployments/qw-querywarden")
        assert operator["spec"]["selector"] != deployment["spec"]["selector"]
    finally:
        helm("uninstall", "qw", "--namespace", namespace, check=False)


def test_without_an_admin_url_the_server_verifies_tokens_on_the_gateway(helm: Helm) -> None:
    """The operator's sidecar serves no admin API: the server then needs none."""
    settings = [
        *ENABLED,
        *(item for key, value in REQUIRED.items() for item in ("--set", f"mcp.{key}={value}")),
        "--set",
        "mcp.adminCA.secret=ignored-without-an-admin-url",
    ]
    objects = mcp_objects(template(helm, *settings))
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert "--admin-url" not in args and "--admin-cacert" not in args
    parsed = _build_parser().parse_args(args)
    assert parsed.admin_url is None and parsed.gateway == REQUIRED["gateway"]
