"""Run a real Gateway on its own uvloop event loop in a background thread.

Tests drive it with real clients (psql, psycopg, asyncpg, pgbench) over real sockets,
exactly as a user would; the thread only saves a process start per test.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from querywarden.config import GatewaySettings
from querywarden.devcluster import DATABASE, ROLE_PASSWORD, EphemeralCluster
from querywarden.hooks import AllowAll, ResultHook, StatementGate
from querywarden.identity.dev import mint_token
from querywarden.policy import PolicyDocument
from querywarden.server import Gateway

T = TypeVar("T")

#: Test identities and their groups. Each connects with a fresh token of the development
#: issuer (a local key in a temporary directory), as a real client would with its IdP's.
USERS = {"alice": ["ai-agents"], "bob": ["dba"], "carol": ["support"]}
DEV_KEY = Path(tempfile.mkdtemp(prefix="querywarden-dev-key-")) / "dev-issuer.pem"
POLICY = PolicyDocument.model_validate(
    {"identity": {"issuers": [{"name": "dev", "kind": "dev", "keyFile": DEV_KEY}]}}
)


def token_for(user: str, *, ttl: float = 600, **kwargs: Any) -> str:
    """A development-issuer token for a test identity (unknown users get no groups)."""
    return mint_token(user, groups=USERS.get(user, []), ttl=ttl, key_file=DEV_KEY, **kwargs)


def gateway_settings(cluster: EphemeralCluster, **overrides: Any) -> GatewaySettings:
    """Settings for a gateway in front of the test cluster, on a free port."""
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0, "plaintext": "loopback"},
        "upstream": {
            "host": "127.0.0.1",
            "port": cluster.port,
            "user": "qw_scram",
            "password": ROLE_PASSWORD,
            "sslmode": "require",
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return GatewaySettings(**data)


@dataclass
class RunningGateway:
    """A gateway serving in a background thread."""

    gateway: Gateway
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    host: str = "127.0.0.1"
    port: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def dsn(self, user: str = "alice", *, database: str = DATABASE, **params: Any) -> str:
        """A libpq DSN for connecting through the gateway."""
        password = token_for(user) if user in USERS else "not-a-token"
        parts = {
            "host": self.host,
            "port": self.port,
            "dbname": database,
            "user": user,
            "password": password,
            **params,
        }
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def url(self, user: str = "alice", *, scheme: str = "postgresql") -> str:
        """A URL form of the DSN (for asyncpg and SQLAlchemy)."""
        password = token_for(user)
        return f"{scheme}://{user}:{password}@{self.host}:{self.port}/{DATABASE}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the gateway's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def connection_count(self) -> int:
        """Client connections the gateway currently holds."""

        async def count() -> int:
            return len(self.gateway.connections)

        return self.call(count())

    def stop(self) -> None:
        """Close the gateway and its loop."""
        try:
            self.call(self.gateway.close(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def start_gateway(
    settings: GatewaySettings,
    *,
    gate: StatementGate | None = None,
    result_hook: ResultHook | None = None,
    policy: PolicyDocument | None = None,
) -> RunningGateway:
    """Start a gateway with the given hooks on a fresh uvloop loop in a thread."""
    loop = uvloop.new_event_loop()
    # Tests of the relay allow everything unless they bring a gate; a test that brings a
    # policy (with rules) gets the gateway's own policy gate.
    if gate is None and policy is None and settings.policy_file is None:
        gate = AllowAll()
    if policy is None and settings.policy_file is None:
        policy = POLICY
    gateway = Gateway(settings, policy=policy, gate=gate, result_hook=result_hook)
    thread = threading.Thread(target=loop.run_forever, name="querywarden-gateway", daemon=True)
    thread.start()
    running = RunningGateway(gateway=gateway, loop=loop, thread=thread)
    running.host, running.port = running.call(gateway.start())
    return running
