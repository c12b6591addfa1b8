"""The built image, run as a user runs it: read-only, non-root, from a mounted config.

The first wave's image never started (its package was an empty stub); these tests run the
image itself with podman, in front of the test PostgreSQL, with a real psql.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

import querywarden
from gateway_harness import DATABASE, POLICY, RunningGateway, token_for
from image_harness import (
    IMAGE_UID,
    REPO,
    built_image,
    container,
    podman,
    readable_by_image,
    wait_until_serving,
)
from querywarden.devcluster import ROLE_PASSWORD, EphemeralCluster, free_port
from querywarden.identity.dev import mint_token
from querywarden.policy import PolicyDocument

SITE = "/opt/querywarden/lib/python3.11/site-packages"


@pytest.fixture(scope="module")
def image() -> str:
    return built_image()


def test_version_is_the_package_version(image: str) -> None:
    result = podman("run", "--rm", "--read-only", image, "--version")
    assert result.stdout.strip() == f"querywarden {querywarden.__version__}"


def test_the_installed_packages_are_the_sources(image: str) -> None:
    # Every module of both packages, byte for byte: a stale build/ copy or a stub left by
    # the dependency layer would differ (the empty __init__.py did).
    script = (
        "import hashlib, json, pathlib\n"
        f"site = pathlib.Path({SITE!r})\n"
        "print(json.dumps({str(p.relative_to(site)): hashlib.sha256(p.read_bytes()).hexdigest()"
        " for pkg in ('querywarden', 'querywarden_operator')"
        " for p in sorted((site / pkg).rglob('*')) if p.is_file() and p.suffix != '.pyc'}))"
    )
    result = podman("run", "--rm", "--read-only", "--entrypoint", "python", image, "-c", script)
    installed = json.loads(result.stdout)
    packages = ((REPO / "proxy", "querywarden"), (REPO / "operator", "querywarden_operator"))
    sources = {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for root, package in packages
        for path in sorted((root / package).rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert installed == sources


def test_runs_as_its_own_non_root_user(image: str) -> None:
    config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"  # numeric, for runAsNonRoot
    result = podman("run", "--rm", "--read-only", "--entrypoint", "id", image)
    assert result.stdout.startswith(f"uid={IMAGE_UID}(querywarden) gid={IMAGE_UID}")


def test_the_gateway_in_the_image_serves_psql(
    image: str, pg: EphemeralCluster, tmp_path: Path
) -> None:
    config_dir = tmp_path / "config"
    audit_dir = tmp_path / "audit"
    config_dir.mkdir()
    audit_dir.mkdir()
    port = free_port()
    (config_dir / "gateway.yaml").write_text(
        f"""
listen: {{host: 127.0.0.1, port: {port}, plaintext: loopback}}
upstream:
  host: 127.0.0.1
  port: {pg.port}
  user: qw_scram
  passwordFile: upstream-password
  sslmode: require
audit:
  directory: /var/lib/querywarden/audit
policyFile: policy.yaml
"""
    )
    (config_dir / "upstream-password").write_text(ROLE_PASSWORD + "\n")
    (config_dir / "policy.yaml").write_text(
        "identity:\n  issuers:\n    - {name: dev, kind: dev, keyFile: dev-issuer.pem}\n"
        "rules:\n  - name: carol-reads\n    subjects: {users: [carol]}\n"
        "    allow: {operations: [select], tables: ['*']}\n"
        "    deny: {functions: [pg_catalog.pg_sleep]}\n"
    )
    key = config_dir / "dev-issuer.pem"
    token = mint_token("carol", key_file=key)
    readable_by_image(audit_dir, *config_dir.iterdir())
    with container(
        image,
        ["--log-level", "INFO", "serve", "--config", "/etc/querywarden/gateway.yaml"],
        volumes=[
            (config_dir, "/etc/querywarden", "ro"),
            (audit_dir, "/var/lib/querywarden/audit", "rw"),
        ],
    ) as running:
        dsn = f"host=127.0.0.1 port={port} dbname=app user=carol"
        wait_until_serving(running, lambda: _psql(dsn, "SELECT 1", token).returncode == 0)

        allowed = _psql(dsn, "SELECT current_user", token)
        assert allowed.returncode == 0, allowed.stderr
        assert allowed.stdout.strip() == "qw_scram"

        refused = _psql(dsn, "SELECT pg_sleep(0)", token)
        assert refused.returncode != 0
        assert "pg_sleep" in refused.stderr and "carol-reads" in refused.stderr

        anonymous = _psql(dsn, "SELECT 1", "not-a-token")
        assert anonymous.returncode != 0
        assert "password authentication failed" in anonymous.stderr or "token" in anonymous.stderr
        # The image carries the compiled row masker (built on the host as a wheel), and
        # the gateway says at start that it masks with it (performance.native: auto).
        assert "masking rows with the compiled (querywarden_native) row masker" in running.logs()
    # The container is gone; its audit log, on the volume, holds both statements and
    # verifies with the host's own copy of the tool.
    verify = subprocess.run(
        [sys.executable, "-m", "querywarden", "audit", "verify", str(audit_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    records = "".join(p.read_text(errors="replace") for p in audit_dir.rglob("*") if p.is_file())
    assert "SELECT current_user" in records
    assert "SELECT pg_sleep(0)" in records


def _psql(dsn: str, sql: str, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", dsn, "-X", "-A", "-t", "-c", sql],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "5"},
        check=False,
    )


# --- querywarden mcp --transport http, from the image ----------------------------------

ISSUER = "https://issuer.example.test"
PUBLIC_URL = "https://mcp.example.test/mcp"
#: Where the SDK serves the protected resource metadata (RFC 9728 section 3.1): the
#: well-known prefix, then the public URL's path. The chart's probes ask for it.
METADATA_PATH = "/.well-known/oauth-protected-resource/mcp"


@pytest.fixture
def mcp_gateway(
    pg: EphemeralCluster, make_gateway: Callable[..., RunningGateway]
) -> Iterator[RunningGateway]:
    """A gateway with its admin API (which verifies the MCP server's callers)."""
    pg.psql(
        "CREATE TABLE IF NOT EXISTS qimage_mcp (id int, ssn text);"
        "TRUNCATE qimage_mcp; INSERT INTO qimage_mcp VALUES (1, '123-45-6789');"
        "GRANT SELECT ON qimage_mcp TO PUBLIC;"
    )
    policy = PolicyDocument.model_validate(
        {
            "identity": POLICY.identity.model_dump(by_alias=True),
            "rules": [
                {
                    "name": "agents-read",
                    "subjects": {"groups": ["ai-agents"]},
                    "allow": {"operations": ["select"], "tables": ["public.qimage_mcp"]},
                }
            ],
            "masking": {
                "columns": [
                    {"table": "qimage_mcp", "column": "ssn", "strategy": "partial", "keepLast": 4}
                ]
            },
        }
    )
    yield make_gateway(
        policy=policy,
        masking={"hashKey": "test-image-mcp-masking-key-0123456789"},
        admin={"port": 0},
    )
    pg.psql("DROP TABLE qimage_mcp")


@pytest.mark.postgres
def test_the_mcp_server_in_the_image_serves_agents_over_http(
    image: str, mcp_gateway: RunningGateway
) -> None:
    admin = mcp_gateway.gateway.admin_address
    assert admin is not None
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # As the chart runs it: read-only, uid 65532, nothing mounted but /tmp.
    args = [
        "mcp", "--transport", "http", "--listen", f"127.0.0.1:{port}",
        "--gateway", f"{mcp_gateway.host}:{mcp_gateway.port}", "--database", DATABASE,
        "--admin-url", f"http://{admin[0]}:{admin[1]}",
        "--authorization-server", ISSUER, "--public-url", PUBLIC_URL,
        "--allowed-host", f"127.0.0.1:{port}",
    ]  # fmt: skip
    with container(image, args) as running:
        wait_until_serving(running, lambda: _get(base + METADATA_PATH) == 200)

        # The metadata names the issuer; it needs no token and takes any Host (a kubelet
        # probe sends the pod's IP), so the chart's probes can ask for it.
        metadata = httpx2.get(base + METADATA_PATH, headers={"Host": "10.1.2.3:8765"}, timeout=10)
        assert metadata.status_code == 200, metadata.text
        assert metadata.json()["resource"] == PUBLIC_URL
        assert metadata.json()["authorization_servers"] == [ISSUER + "/"]

        # /mcp without a bearer: 401, and where to find the metadata.
        initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
        accept = {"Accept": "application/json, text/event-stream"}
        refused = httpx2.post(base + "/mcp", json=initialize, headers=accept, timeout=10)
        assert refused.status_code == 401
        challenge = refused.headers.get("www-authenticate", "")
        assert challenge.startswith("Bearer")
        assert "https://mcp.example.test/.well-known/oauth-protected-resource/mcp" in challenge
        # A bearer the gateway does not know is refused too.
        forged = httpx2.post(
            base + "/mcp",
            json=initialize,
            headers={**accept, "Authorization": "Bearer not-a-token"},
            timeout=10,
        )
        assert forged.status_code == 401
        # A known bearer from a Host not allowed (DNS rebinding): refused.
        rebound = httpx2.post(
            base + "/mcp",
            json=initialize,
            headers={
                **accept,
                "Authorization": f"Bearer {token_for('alice')}",
                "Host": "attacker.example",
            },
            timeout=10,
        )
        assert rebound.status_code == 421

        # An agent's tool call runs through the gateway as the agent: masked by policy.
        result = asyncio.run(
            _query(base + "/mcp", token_for("alice"), "SELECT ssn FROM qimage_mcp")
        )
        assert not result["is_error"], result
        assert result["structured"]["rows"][0][0] != "123-45-6789"
        assert result["structured"]["rows"][0][0].endswith("6789")
        assert result["structured"]["columns"][0]["masked"] == "partial"
        assert running.running(), running.logs()


def _get(url: str) -> int:
    try:
        return httpx2.get(url, timeout=2).status_code
    except httpx2.HTTPError:
        return 0


async def _query(url: str, token: str, sql: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        result = await session.call_tool("query", {"sql": sql})
        text = "\n".join(getattr(c, "text", "") for c in result.content)
        return {"is_error": result.is_error, "structured": result.structured_content, "text": text}
