"""``querywarden mcp`` with the MCP SDK's own client, over stdio and over HTTP.

The server runs as a real subprocess (``querywarden mcp``) in front of a real gateway and
PostgreSQL; the agent side is the official SDK's ``ClientSession``. Each tool call must
run through the gateway as the agent: masked values, refusals that carry the rule and the
hint, a held statement released by an approver, an expired token refused, an audit record
naming the agent per call, and the bypass shapes reported against other MCP database
servers decided by the gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult

from gateway_harness import DATABASE, DEV_KEY, POLICY, RunningGateway, token_for
from held_statement import admin_call
from querywarden.audit.log import read_records
from querywarden.devcluster import EphemeralCluster
from querywarden.policy import PolicyDocument

pytestmark = [pytest.mark.postgres]

SEED = """
CREATE TABLE IF NOT EXISTS qmcp_customers (id int PRIMARY KEY, name text, ssn text, notes text);
TRUNCATE qmcp_customers;
INSERT INTO qmcp_customers VALUES
    (1, 'Ada', '123-45-6789', 'long: ' || repeat('x', 5000)),
    (2, 'Bob', '987-65-4321', 'said his ssn is 078-05-1120');
CREATE TABLE IF NOT EXISTS qmcp_items (id int);
CREATE TABLE IF NOT EXISTS qmcp_secrets (v text);
GRANT ALL ON qmcp_customers, qmcp_items, qmcp_secrets TO PUBLIC;
"""

RULES = [
    {
        "name": "agents-read",
        "subjects": {"groups": ["ai-agents"]},
        "allow": {
            "operations": ["select", "explain", "transaction"],
            "tables": ["public.*", "pg_catalog.*"],
        },
        "review": {"operations": ["delete"]},
        "deny": {"tables": ["public.qmcp_secrets"]},
    },
    {
        "name": "dba-all",
        "subjects": {"groups": ["dba"]},
        "allow": {"operations": ["*"], "tables": ["*"]},
    },
]
MASKING = {
    "columns": [{"table": "qmcp_customers", "column": "ssn", "strategy": "partial", "keepLast": 4}],
    "detectors": ["ssn"],
    "exempt": {"groups": ["dba"]},
}
SECRETS = ("123-45-6789", "987-65-4321", "078-05-1120")


@pytest.fixture(scope="module")
def seeded(pg: EphemeralCluster) -> Iterator[None]:
    pg.psql(SEED)
    yield
    pg.psql("DROP TABLE qmcp_customers, qmcp_items, qmcp_secrets")


@pytest.fixture
def gw(make_gateway: Callable[..., RunningGateway], seeded: None, tmp_path: Path) -> RunningGateway:
    policy = PolicyDocument.model_validate(
        {
            "identity": POLICY.identity.model_dump(by_alias=True),
            "rules": RULES,
            "masking": MASKING,
            "approvals": {"approvers": {"groups": ["dba"]}, "hold": "30s", "grantTTL": "5m"},
        }
    )
    running = make_gateway(
        policy=policy,
        masking={"hashKey": "test-mcp-masking-key-0123456789abcdef"},
        stateDirectory=str(tmp_path / "state"),
        admin={"port": 0},
        audit={"directory": str(tmp_path / "audit")},
    )
    running.extra["audit"] = tmp_path / "audit"
    return running


def _admin_url(gw: RunningGateway) -> str:
    address = gw.gateway.admin_address
    assert address is not None
    return f"http://{address[0]}:{address[1]}"


def _mcp_args(gw: RunningGateway, *extra: str, admin: bool = True) -> list[str]:
    """``querywarden mcp`` in front of ``gw`` (with its admin API unless ``admin`` is False)."""
    return [
        "-m",
        "querywarden",
        "mcp",
        "--gateway",
        f"{gw.host}:{gw.port}",
        "--database",
        DATABASE,
        *(("--admin-url", _admin_url(gw)) if admin else ()),
        "--held-wait",
        "0.5",
        *extra,
    ]


@asynccontextmanager
async def stdio_session(
    gw: RunningGateway, env: dict[str, str], *extra: str, admin: bool = True
) -> AsyncIterator[ClientSession]:
    """An SDK client session with ``querywarden mcp`` launched over stdio."""
    args = _mcp_args(gw, *extra, admin=admin)
    params = StdioServerParameters(command=sys.executable, args=args, env=env)
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(params=["admin", "wire"])
def http_server(gw: RunningGateway, request: pytest.FixtureRequest) -> Iterator[str]:
    """``querywarden mcp --transport http`` as a subprocess; its URL.

    Bearers are verified by the gateway's admin API (``admin``), or, with no admin API
    (the operator's sidecar serves none), by a start-up on the gateway (``wire``).
    """
    port = _free_port()
    args = _mcp_args(gw, admin=request.param == "admin")
    process = subprocess.Popen(
        [
            sys.executable,
            *args,
            *(
                "--transport",
                "http",
                "--listen",
                f"127.0.0.1:{port}",
                "--authorization-server",
                "https://issuer.example.test",
            ),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    assert process.stderr is not None
    # Drained all along: a full pipe would block the server's logging.
    reader = threading.Thread(target=lambda: lines.extend(process.stderr or ()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while not any("streamable HTTP on" in line for line in lines):
            assert process.poll() is None and time.monotonic() < deadline, lines
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(10)
        reader.join(10)
        process.stderr.close()


@asynccontextmanager
async def http_session(url: str, token: str) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def _structured(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, _text(result)
    assert result.structured_content is not None
    return result.structured_content


def _text(result: CallToolResult) -> str:
    return "\n".join(getattr(c, "text", "") for c in result.content)


def _agent_env(user: str = "alice", **extra: str) -> dict[str, str]:
    return {"QUERYWARDEN_TOKEN": token_for(user), **extra}


def test_tools_are_listed_with_schemas(gw: RunningGateway) -> None:
    async def go() -> None:
        async with stdio_session(gw, _agent_env()) as session:
            tools = {t.name: t for t in (await session.list_tools()).tools}
            assert set(tools) == {
                "query",
                "explain",
                "describe",
                "review_status",
                "wait_for_review",
            }
            assert tools["query"].input_schema["required"] == ["sql"]
            assert tools["query"].output_schema is not None
            assert tools["describe"].annotations is not None
            assert tools["describe"].annotations.read_only_hint is True

    asyncio.run(go())


def test_query_over_stdio_returns_masked_rows_marked_and_long_values_cut(
    gw: RunningGateway,
) -> None:
    async def go() -> dict[str, Any]:
        async with stdio_session(gw, _agent_env(), "--value-chars", "100") as session:
            result = await session.call_tool(
                "query",
                {
                    "sql": "SELECT id, name, ssn, notes FROM qmcp_customers WHERE id <= $1 "
                    "ORDER BY id",
                    "parameters": [2],
                    "row_limit": 1,
                },
            )
            answer = _structured(result)
            assert not any(secret in _text(result) for secret in SECRETS)
            return answer

    answer = asyncio.run(go())
    assert answer["status"] == "done"
    # Two rows match; row_limit 1: the portal was suspended, never completed.
    assert answer["truncated"] is True and answer["command"] is None
    assert answer["row_count"] == 1
    columns = {c["name"]: c for c in answer["columns"]}
    assert columns["id"]["type"] == "integer" and columns["id"]["masked"] is None
    assert columns["ssn"]["masked"] == "partial"
    assert columns["ssn"]["source"] == "public.qmcp_customers.ssn"
    assert columns["notes"]["masked"] == "detectors"
    row = answer["rows"][0]
    assert row[:2] == ["1", "Ada"]
    assert row[2] != "123-45-6789" and row[2].endswith("6789")
    assert row[3].startswith("long: xxx") and "cut by querywarden mcp" in row[3]
    assert len(row[3]) < 200 and answer["values_cut"] == 1


def test_a_refusal_is_a_tool_error_with_rule_reason_and_hint(gw: RunningGateway) -> None:
    async def go() -> list[CallToolResult]:
        async with stdio_session(gw, _agent_env()) as session:
            return [
                await session.call_tool("query", {"sql": sql})
                for sql in (
                    "SELECT * FROM qmcp_secrets",
                    "UPDATE qmcp_customers SET name = 'x'",
                    "SELECT nosuch FROM qmcp_customers",
                )
            ]

    denied, unallowed, typo = asyncio.run(go())
    assert denied.is_error and unallowed.is_error and typo.is_error
    text = _text(denied)
    assert "refused by the gateway (SQLSTATE 42501, rule agents-read): querywarden:" in text
    assert "public.qmcp_secrets" in text and "\nhint: " in text
    text = _text(unallowed)
    assert "refused by the gateway (SQLSTATE 42501, rule agents-read): querywarden: UPDATE" in text
    assert "\nhint: allowed for you: SELECT" in text
    # PostgreSQL's own errors come through whole, and say they are PostgreSQL's.
    text = _text(typo)
    assert "failed in PostgreSQL (SQLSTATE 42703): column" in text, text
    assert "\nposition: character 8 of the statement" in text


def test_describe_marks_operations_and_masked_columns(gw: RunningGateway) -> None:
    async def go() -> dict[str, Any]:
        async with stdio_session(gw, _agent_env()) as session:
            return _structured(
                await session.call_tool("describe", {"schema": "public", "table": "qmcp_customers"})
            )

    answer = asyncio.run(go())
    [relation] = answer["relations"]
    assert relation["schema"] == "public" and relation["name"] == "qmcp_customers"
    columns = {c["name"]: c for c in relation["columns"]}
    assert columns["ssn"]["type"] == "text" and columns["id"]["not_null"] is True
    assert columns["ssn"]["masked"] == "partial" and columns["name"]["masked"] is None
    assert relation["operations"] == {
        "select": "allow",
        "insert": "deny",
        "update": "deny",
        "delete": "review",
    }
    assert answer["content_detectors"] == ["ssn"] and answer["policy_note"] is None


def test_describe_without_the_admin_api_says_what_it_cannot_show(gw: RunningGateway) -> None:
    async def go() -> dict[str, Any]:
        async with stdio_session(gw, _agent_env(), admin=False) as session:
            return _structured(
                await session.call_tool("describe", {"schema": "public", "table": "qmcp_items"})
            )

    answer = asyncio.run(go())
    [relation] = answer["relations"]
    assert relation["columns"] == [
        {"name": "id", "type": "integer", "not_null": False, "masked": None}
    ]
    assert relation["operations"] is None
    assert "started without --admin-url" in answer["policy_note"]


def test_explain_shows_a_plan_and_analyze_cannot_ride_along(
    gw: RunningGateway, pg: EphemeralCluster
) -> None:
    pg.psql("TRUNCATE qmcp_items; INSERT INTO qmcp_items VALUES (1)")

    async def go() -> tuple[dict[str, Any], CallToolResult]:
        async with stdio_session(gw, _agent_env()) as session:
            plan = _structured(
                await session.call_tool("explain", {"sql": "SELECT * FROM qmcp_items"})
            )
            sneaky = await session.call_tool("explain", {"sql": "ANALYZE DELETE FROM qmcp_items"})
            return plan, sneaky

    plan, sneaky = asyncio.run(go())
    assert any("Seq Scan on qmcp_items" in line for line in plan["plan"])
    assert sneaky.is_error
    assert pg.psql("SELECT count(*) FROM qmcp_items").strip() == "1"


def test_a_held_delete_is_released_by_an_approver_through_the_admin_api(
    gw: RunningGateway, pg: EphemeralCluster
) -> None:
    pg.psql("TRUNCATE qmcp_items; INSERT INTO qmcp_items VALUES (1), (2)")

    async def go() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with stdio_session(gw, _agent_env()) as session:
            held = _structured(
                await session.call_tool("query", {"sql": "DELETE FROM qmcp_items WHERE id = 1"})
            )
            review_id = held["review"]["id"]
            status = _structured(await session.call_tool("review_status", {"review_id": review_id}))
            await asyncio.to_thread(
                admin_call, gw, "POST", f"/reviews/{review_id}/approve", "bob", {"comment": "ok"}
            )
            outcome = _structured(
                await session.call_tool(
                    "wait_for_review", {"review_id": review_id, "timeout_seconds": 30}
                )
            )
            return held, status, outcome

    held, status, outcome = asyncio.run(go())
    assert held["status"] == "held" and held["review"]["id"]
    assert "wait_for_review" in held["review"]["message"]
    assert status["state"] == "pending" and status["rule"] == "agents-read"
    assert status["statement"] == "DELETE FROM qmcp_items WHERE id = 1"
    assert outcome["state"] == "approved"
    assert outcome["result"]["command"] == "DELETE 1"
    assert pg.psql("SELECT id FROM qmcp_items").strip() == "2"


def test_a_denied_statement_reports_the_approvers_comment(
    gw: RunningGateway, pg: EphemeralCluster
) -> None:
    pg.psql("TRUNCATE qmcp_items; INSERT INTO qmcp_items VALUES (1)")

    async def go() -> dict[str, Any]:
        async with stdio_session(gw, _agent_env()) as session:
            held = _structured(
                await session.call_tool("query", {"sql": "DELETE FROM qmcp_items WHERE id = 1"})
            )
            review_id = held["review"]["id"]
            await asyncio.to_thread(
                admin_call,
                gw,
                "POST",
                f"/reviews/{review_id}/deny",
                "bob",
                {"comment": "use a soft delete"},
            )
            return _structured(await session.call_tool("wait_for_review", {"review_id": review_id}))

    outcome = asyncio.run(go())
    assert outcome["state"] == "denied"
    assert "use a soft delete" in outcome["message"] and outcome["result"] is None
    assert pg.psql("SELECT count(*) FROM qmcp_items").strip() == "1"


def test_an_expired_token_is_refused(gw: RunningGateway) -> None:
    async def go() -> CallToolResult:
        expired = token_for("alice", ttl=-60)
        async with stdio_session(gw, {"QUERYWARDEN_TOKEN": expired}) as session:
            return await session.call_tool("query", {"sql": "SELECT 1"})

    result = asyncio.run(go())
    assert result.is_error
    text = _text(result)
    assert "SQLSTATE 28" in text and "expired" in text, text


def test_a_token_command_is_run_for_each_fresh_token(gw: RunningGateway, tmp_path: Path) -> None:
    script = tmp_path / "token.sh"
    counter = tmp_path / "runs"
    # A token that expires within the refresh margin: every call needs a new one.
    script.write_text(
        f"#!/bin/sh\necho run >> {counter}\nexec {sys.executable} -m querywarden token "
        f"--sub alice --groups ai-agents --ttl 30s --key-file {DEV_KEY}\n"
    )
    script.chmod(0o755)
    env: dict[str, str] = {}

    async def go() -> None:
        async with stdio_session(gw, env, "--token-command", str(script)) as session:
            for _ in range(2):
                _structured(await session.call_tool("query", {"sql": "SELECT 1"}))

    asyncio.run(go())
    assert counter.read_text().count("run") == 2


def test_every_tool_call_is_audited_under_the_agents_identity(gw: RunningGateway) -> None:
    async def go() -> None:
        async with stdio_session(gw, _agent_env("alice")) as session:
            _structured(await session.call_tool("query", {"sql": "SELECT 41 + 1"}))
            _structured(await session.call_tool("describe", {"table": "qmcp_items"}))

    asyncio.run(go())
    records = list(read_records(gw.extra["audit"]))
    sessions = [r for r in records if r["type"] == "session.connect"]
    requests = [r for r in records if r["type"] == "statement.request"]
    assert len(sessions) == 2  # one connection per tool call
    for record in sessions:
        assert record["principal"]["subject"] == "alice"
        assert record["application_name"] == "querywarden-mcp"
    assert any(r["text"] == "SELECT 41 + 1" for r in requests)


@pytest.mark.parametrize(
    "sql",
    [
        # Read-only MCP servers were bypassed by ending their read-only transaction.
        "COMMIT; DROP TABLE qmcp_items",
        "COMMIT; DELETE FROM qmcp_items",  # held for an approver, not run
        "SELECT 1; UPDATE qmcp_items SET id = 0",
        # A leading comment hid the verb from servers that looked at the first word.
        "/* SELECT */ UPDATE qmcp_items SET id = 0",
        "-- SELECT\nTRUNCATE qmcp_items",
        # And a function that writes, inside a SELECT.
        "SELECT pg_catalog.set_config('default_transaction_read_only', 'off', false)",
    ],
)
def test_bypass_shapes_reported_against_other_mcp_servers_are_refused(
    gw: RunningGateway, pg: EphemeralCluster, sql: str
) -> None:
    pg.psql("TRUNCATE qmcp_items; INSERT INTO qmcp_items VALUES (5)")

    async def go() -> CallToolResult:
        async with stdio_session(gw, _agent_env()) as session:
            return await session.call_tool("query", {"sql": sql})

    result = asyncio.run(go())
    if "DELETE" in sql:
        # The policy sends DELETEs to an approver: held, and withdrawn when the agent
        # goes away; nothing ran.
        assert _structured(result)["status"] == "held"
    else:
        assert result.is_error, _text(result)
        assert "refused by the gateway" in _text(result)
    assert pg.psql("SELECT id FROM qmcp_items").strip() == "5"


def test_the_simple_protocol_path_is_decided_the_same(
    gw: RunningGateway, pg: EphemeralCluster
) -> None:
    """An agent with a shell runs psql (the simple protocol) instead: the same gateway."""
    pg.psql("TRUNCATE qmcp_items; INSERT INTO qmcp_items VALUES (5)")
    env = {**os.environ, "PGPASSWORD": token_for("alice")}
    done = subprocess.run(
        [
            "psql",
            "-X",
            "-h",
            gw.host,
            "-p",
            str(gw.port),
            "-U",
            "alice",
            "-d",
            DATABASE,
            "-c",
            "COMMIT; UPDATE qmcp_items SET id = 0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "rule agents-read" in done.stderr, done.stderr
    assert pg.psql("SELECT id FROM qmcp_items").strip() == "5"


def test_over_http_each_request_runs_as_its_bearer(gw: RunningGateway, http_server: str) -> None:
    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        async with http_session(http_server, token_for("alice")) as agent:
            masked = _structured(
                await agent.call_tool(
                    "query", {"sql": "SELECT ssn FROM qmcp_customers WHERE id = 1"}
                )
            )
        async with http_session(http_server, token_for("bob")) as dba:
            exempt = _structured(
                await dba.call_tool("query", {"sql": "SELECT ssn FROM qmcp_customers WHERE id = 1"})
            )
        return masked, exempt

    masked, exempt = asyncio.run(go())
    assert masked["rows"][0][0] != "123-45-6789" and masked["columns"][0]["masked"] == "partial"
    assert exempt["rows"] == [["123-45-6789"]] and exempt["columns"][0]["masked"] is None
    subjects = [
        r["principal"]["subject"]
        for r in read_records(gw.extra["audit"])
        if r["type"] == "session.connect" and r["application_name"] == "querywarden-mcp"
    ]
    assert subjects == ["alice", "bob"]


def test_over_http_a_missing_or_expired_bearer_is_refused_before_any_tool(
    gw: RunningGateway, http_server: str
) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    headers = {"Accept": "application/json, text/event-stream"}
    for token in (None, token_for("alice", ttl=-60), "not-a-token"):
        sent = dict(headers)
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        reply = httpx2.post(http_server, json=body, headers=sent, timeout=30)
        assert reply.status_code == 401, (token, reply.status_code, reply.text)
        assert "Bearer" in reply.headers.get("www-authenticate", "")
    assert not [r for r in read_records(gw.extra["audit"]) if r["type"] == "session.connect"]


def test_held_statements_belong_to_their_caller_over_http(
    gw: RunningGateway, http_server: str, pg: EphemeralCluster
) -> None:
    pg.psql("TRUNCATE qmcp_items; INSERT INTO qmcp_items VALUES (1)")

    async def go() -> tuple[str, CallToolResult]:
        async with http_session(http_server, token_for("alice")) as agent:
            held = _structured(
                await agent.call_tool("query", {"sql": "DELETE FROM qmcp_items WHERE id = 1"})
            )
        review_id: str = held["review"]["id"]
        async with http_session(http_server, token_for("carol")) as other:
            peek = await other.call_tool("review_status", {"review_id": review_id})
        return review_id, peek

    review_id, peek = asyncio.run(go())
    assert peek.is_error and review_id in _text(peek)
    time.sleep(0.1)
    assert pg.psql("SELECT count(*) FROM qmcp_items").strip() == "1"
    assert json.dumps(admin_call(gw, "GET", f"/reviews/{review_id}", "bob"))


def test_over_http_no_mcp_session_is_kept_so_any_replica_answers(
    gw: RunningGateway, http_server: str
) -> None:
    """Stateless streamable HTTP: replicas behind one Service answer any request."""
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"},
        },
    }
    headers = {
        "Accept": "application/json, text/event-stream",
        "Authorization": f"Bearer {token_for('alice')}",
    }
    reply = httpx2.post(http_server, json=body, headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text
    assert "mcp-session-id" not in {k.lower() for k in reply.headers}
