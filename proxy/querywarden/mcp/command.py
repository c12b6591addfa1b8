"""``querywarden mcp``: its command line, and starting the server on either transport."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

_LOOPBACK_NAMES = {"localhost"}


def add_mcp_command(commands: Any) -> None:
    """The ``mcp`` subcommand of ``querywarden``."""
    mcp = commands.add_parser(
        "mcp",
        help="an MCP server for AI agents: every tool call runs through the gateway as the agent",
        description="An MCP (Model Context Protocol) server whose tools run SQL through a "
        "querywarden gateway with the caller's own token: the gateway's policy, masking, "
        "approvals and audit apply unchanged. It holds no database credential. Over stdio "
        "the token comes from --token-env or --token-command; over HTTP each request's "
        "bearer token is used, verified by the gateway's admin API.",
    )
    env = os.environ.get
    mcp.add_argument("--transport", choices=("stdio", "http"), default="stdio")
    mcp.add_argument(
        "--gateway",
        default=env("QUERYWARDEN_GATEWAY", "127.0.0.1:6432"),
        help="the gateway's HOST:PORT (default $QUERYWARDEN_GATEWAY, else 127.0.0.1:6432)",
    )
    mcp.add_argument(
        "--database",
        default=env("QUERYWARDEN_DATABASE", "postgres"),
        help="database to connect to (default $QUERYWARDEN_DATABASE, else postgres)",
    )
    mcp.add_argument(
        "--user",
        default=env("QUERYWARDEN_USER", "mcp-agent"),
        help="the user start-up parameter (informational: the token says who you are)",
    )
    mcp.add_argument(
        "--sslmode",
        choices=("disable", "prefer", "require", "verify-ca", "verify-full"),
        default=None,
        help="TLS to the gateway, as libpq's (default verify-full; prefer for a loopback gateway)",
    )
    mcp.add_argument("--sslrootcert", type=Path, help="CA bundle that signed the gateway's cert")
    mcp.add_argument(
        "--admin-url",
        default=env("QUERYWARDEN_ADMIN_URL"),
        help="the gateway's admin API (default $QUERYWARDEN_ADMIN_URL): review status, "
        "describe's policy marks; over HTTP it verifies callers (else a start-up on the "
        "gateway does)",
    )
    mcp.add_argument("--admin-cacert", type=Path, help="CA bundle for an HTTPS admin API")
    mcp.add_argument(
        "--token-env",
        default="QUERYWARDEN_TOKEN",
        help="stdio: environment variable holding the token (default QUERYWARDEN_TOKEN)",
    )
    mcp.add_argument(
        "--token-command",
        default=env("QUERYWARDEN_TOKEN_COMMAND"),
        help="stdio: a command printing a fresh token, run again before the token expires",
    )
    mcp.add_argument(
        "--value-chars", type=int, default=2000, help="cut longer text values (default 2000)"
    )
    mcp.add_argument(
        "--held-wait",
        type=float,
        default=5.0,
        help="seconds query waits for an approver before returning the review (default 5)",
    )
    mcp.add_argument(
        "--listen", default="127.0.0.1:8765", help="http: HOST:PORT (default 127.0.0.1:8765)"
    )
    mcp.add_argument(
        "--public-url", help="http: this server's URL as clients reach it (default from --listen)"
    )
    mcp.add_argument(
        "--authorization-server",
        help="http: the OAuth/OIDC issuer URL clients get tokens from (in the protected "
        "resource metadata); required with --transport http",
    )
    mcp.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        help="http: a Host header to accept (repeatable; DNS rebinding protection)",
    )
    mcp.set_defaults(handler=run_mcp)


def _host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{what} must be HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def _loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_mcp(args: argparse.Namespace) -> int:
    from querywarden.mcp.admin import AdminClient
    from querywarden.mcp.client import GatewayAddress
    from querywarden.mcp.tokens import CommandToken, EnvironmentToken, TokenSource
    from querywarden.mcp.tools import GatewayTools

    try:
        host, port = _host_port(args.gateway, "--gateway")
        listen = _host_port(args.listen, "--listen")
    except ValueError as exc:
        print(f"querywarden mcp: {exc}", file=sys.stderr)
        return 2
    sslmode = args.sslmode or ("prefer" if _loopback(host) else "verify-full")
    address = GatewayAddress(host, port, args.database, sslmode, args.sslrootcert)
    admin = AdminClient(args.admin_url, args.admin_cacert) if args.admin_url else None
    tools = GatewayTools(address, admin, value_chars=args.value_chars, held_wait=args.held_wait)
    if args.transport == "http":
        from querywarden.mcp.server import run_http

        if not args.authorization_server:
            print(
                "querywarden mcp: --transport http needs --authorization-server (the issuer "
                "clients get their tokens from, announced in the protected resource metadata)",
                file=sys.stderr,
            )
            return 2
        public_url = args.public_url or f"http://{listen[0]}:{listen[1]}/mcp"
        run_http(
            tools,
            admin,
            host=listen[0],
            port=listen[1],
            public_url=public_url,
            authorization_server=args.authorization_server,
            allowed_hosts=args.allowed_host,
        )
        return 0
    from querywarden.mcp.server import build_server, stdio_caller

    tokens: TokenSource = (
        CommandToken(args.token_command) if args.token_command else EnvironmentToken(args.token_env)
    )
    server = build_server(tools, stdio_caller(args.user, tokens))

    async def serve() -> None:
        try:
            await server.run_stdio_async()
        finally:
            await tools.close()

    asyncio.run(serve())
    return 0
