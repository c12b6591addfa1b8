"""The ``querywarden`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from querywarden import __version__
from querywarden.config import GatewaySettings, load_settings
from querywarden.policy import PolicyDocument


def _build_parser() -> argparse.ArgumentParser:
    # Plain text: --help prints this as is (the module docstring is reStructuredText).
    parser = argparse.ArgumentParser(
        prog="querywarden",
        description="querywarden, a PostgreSQL security gateway: it authenticates every "
        "connection, decides every statement by policy (allow, refuse, or hold for an "
        "approver), masks sensitive values and keeps a tamper-evident audit log.",
    )
    parser.add_argument("--version", action="version", version=f"querywarden {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, help="settings file (YAML)")
    token = commands.add_parser(
        "token", help="mint a short-lived token from the local development issuer"
    )
    token.add_argument("--sub", required=True, help="the subject (user or agent name)")
    token.add_argument("--groups", default="", help="comma-separated groups")
    token.add_argument("--ttl", default="10m", help="lifetime, e.g. 10m (default 10m)")
    token.add_argument(
        "--key-file", type=Path, default=Path(".querywarden/dev-issuer.pem"), help="signing key"
    )
    token.add_argument("--issuer", default="querywarden-dev", help="the iss claim")
    token.add_argument("--audience", default="querywarden", help="the aud claim")
    check = commands.add_parser("check", help="evaluate a statement against a policy, offline")
    check.add_argument("--policy", type=Path, required=True, help="policy file (YAML)")
    check.add_argument("--sub", required=True, help="the subject")
    check.add_argument("--groups", default="", help="comma-separated groups")
    check.add_argument("--database", default="app", help="database name (default app)")
    check.add_argument("--search-path", default="public", help="comma-separated search_path")
    check.add_argument(
        "--catalog",
        type=Path,
        help="pg_catalog relation list written by scripts/catalog_relations.py --output "
        "(default: the lists shipped for PostgreSQL's versions)",
    )
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument("sql", help="the SQL text")
    policy = commands.add_parser("policy", help="policy file tools")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    validate = policy_commands.add_parser("validate", help="check a policy file")
    validate.add_argument("file", type=Path)
    from querywarden.approvals.tools import add_review_commands
    from querywarden.audit.tools import add_audit_commands
    from querywarden.mcp.command import add_mcp_command

    add_audit_commands(commands)
    add_review_commands(commands)
    add_mcp_command(commands)
    commands.add_parser("operator", help="run the Kubernetes operator and its admission webhook")
    demo = commands.add_parser("demo", help="run PostgreSQL and the gateway on this machine")
    demo.add_argument(
        "--port", type=int, default=6432, help="gateway port (default 6432; 0: any free port)"
    )
    demo.add_argument(
        "--admin-port",
        type=int,
        default=None,
        help="reviews API port (default: --port + 1; any free port with --port 0)",
    )
    demo.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".querywarden"),
        help="where the demo keeps its keys, policy file and audit log (default .querywarden)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``querywarden`` console script."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "serve":
        try:
            settings = load_settings(args.config)
        except (ValidationError, ValueError, OSError) as exc:
            print(f"querywarden: invalid settings: {exc}", file=sys.stderr)
            return 2
        return serve(settings)
    if args.command == "token":
        from querywarden.config import parse_duration
        from querywarden.identity.dev import mint_token

        try:
            ttl = parse_duration(args.ttl).total_seconds()
        except ValueError as exc:
            print(f"querywarden: {exc}", file=sys.stderr)
            return 2
        groups = _comma_list(args.groups)
        print(
            mint_token(
                args.sub,
                groups=groups,
                ttl=ttl,
                key_file=args.key_file,
                issuer=args.issuer,
                audience=args.audience,
            )
        )
        return 0
    if args.command == "check":
        return _check(args)
    if args.command == "operator":
        from querywarden_operator import run_operator

        return run_operator()
    if args.command in ("audit", "reviews", "mcp"):
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    if args.command == "policy":
        document = _load_policy_or_report(args.file)
        if document is None:
            return 2
        print(
            f"{args.file}: valid ({len(document.identity.issuers)} issuers, "
            f"{len(document.rules)} rules)"
        )
        return 0
    if args.command == "demo":
        from querywarden.demo import run_demo

        return run_demo(args.port, args.state_dir, args.admin_port)
    return 2


def _comma_list(text: str) -> list[str]:
    """``a, b,,c`` -> ``["a", "b", "c"]``."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _load_policy_or_report(path: Path) -> PolicyDocument | None:
    """The policy at ``path``, or None after printing why it is invalid."""
    from querywarden.policy import load_policy

    try:
        return load_policy(path)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"querywarden: invalid policy {path}: {exc}", file=sys.stderr)
        return None


def _check(args: argparse.Namespace) -> int:
    import json

    from querywarden.analysis import AnalysisError, Analyzer
    from querywarden.identity import Principal
    from querywarden.policy.engine import PolicyEngine
    from querywarden.policy.relations import builtin_catalog_relations, load_snapshot

    document = _load_policy_or_report(args.policy)
    if document is None:
        return 2
    try:
        # Added to the shipped lists, as the gateway adds its upstream's list to them.
        catalog = (
            load_snapshot(args.catalog) | builtin_catalog_relations() if args.catalog else None
        )
    except (ValueError, OSError) as exc:
        print(f"querywarden: invalid catalog snapshot {args.catalog}: {exc}", file=sys.stderr)
        return 2
    principal = Principal(args.sub, frozenset(_comma_list(args.groups)))
    search_path = tuple(_comma_list(args.search_path))
    outcome: str
    rule: str | None
    reason: str
    hint: str | None
    try:
        summaries = Analyzer().analyze(args.sql)
    except AnalysisError as exc:
        outcome, rule, reason, hint = "deny", "analysis", exc.message, None
    else:
        verdict = PolicyEngine(document, catalog_relations=catalog).evaluate(
            principal, args.database, summaries, search_path=search_path
        )
        outcome, rule, reason, hint = verdict.outcome, verdict.rule, verdict.reason, verdict.hint
    if args.json:
        print(json.dumps({"outcome": outcome, "rule": rule, "reason": reason, "hint": hint}))
    else:
        print(f"{outcome.upper()}  rule: {rule or '-'}\n  {reason}")
        if hint:
            print(f"  hint: {hint}")
    return 0 if outcome == "allow" else 1


def serve(settings: GatewaySettings) -> int:
    """Run the gateway until SIGINT or SIGTERM."""
    from querywarden.server import Gateway

    async def _main() -> None:
        gateway = Gateway(settings)
        await gateway.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        with contextlib.suppress(Exception):
            await gateway.close()

    run_event_loop(_main())
    return 0


def run_event_loop(coro: object) -> None:
    """Run a coroutine on uvloop (the standard loop if uvloop is unavailable)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        asyncio.run(coro)  # type: ignore[arg-type]
        return
    uvloop.run(coro)  # type: ignore[arg-type]
