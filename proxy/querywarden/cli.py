"""The ``querywarden`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from querywarden import __version__
from querywarden.config import GatewaySettings, load_settings


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="querywarden", description=__doc__)
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
    demo = commands.add_parser("demo", help="run PostgreSQL and the gateway on this machine")
    demo.add_argument("--port", type=int, default=6432, help="gateway port (default 6432)")
    demo.add_argument(
        "--state-dir", type=Path, default=Path(".querywarden"), help="where demo keys live"
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
        groups = [g.strip() for g in args.groups.split(",") if g.strip()]
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
    if args.command == "demo":
        from querywarden.demo import run_demo

        return run_demo(args.port, args.state_dir)
    return 2


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
