"""Shared fixtures: one real PostgreSQL per test session, gateways in front of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gateway_harness import RunningGateway, gateway_settings, start_gateway
from querywarden.devcluster import EphemeralCluster


@pytest.fixture(scope="session")
def pg() -> Iterator[EphemeralCluster]:
    """An ephemeral PostgreSQL cluster (initdb + pg_ctl in a temp dir, free port)."""
    cluster = EphemeralCluster.create()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def gateway(pg: EphemeralCluster) -> Iterator[RunningGateway]:
    """A pass-through gateway (allow everything, forward untouched) shared by tests."""
    running = start_gateway(gateway_settings(pg))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def make_gateway(pg: EphemeralCluster) -> Iterator[Callable[..., RunningGateway]]:
    """Start gateways with custom settings or hooks; each is stopped after the test."""
    started: list[RunningGateway] = []

    def make(
        gate: Any = None, result_hook: Any = None, policy: Any = None, **overrides: Any
    ) -> RunningGateway:
        running = start_gateway(
            gateway_settings(pg, **overrides), gate=gate, result_hook=result_hook, policy=policy
        )
        started.append(running)
        return running

    try:
        yield make
    finally:
        for running in started:
            running.stop()


# --- a real OpenID Connect provider ------------------------------------------------------

from oidc_provider import OidcProvider  # noqa: E402

#: The provider's confidential clients and their groups.
OIDC_CLIENTS = {"agent-1": ["ai-agents"], "dba-1": ["dba", "dba-oncall"]}


@pytest.fixture(scope="session")
def oidc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    """A real OIDC provider on loopback (HTTPS, self-signed) with two confidential clients."""
    provider = OidcProvider().start(tmp_path_factory.mktemp("oidc"), OIDC_CLIENTS)
    try:
        yield provider
    finally:
        provider.stop()
