"""Fixtures shared by the bad-input and robustness tests.

Imported by those modules (not put in conftest.py) because they tighten conftest's own
``make_gateway`` and add checks that only these tests want.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from gateway_harness import RunningGateway
from raw_client import assert_alive, connect, gateway_errors, wait_for_released_sessions

MakeGateway = Callable[..., RunningGateway]


@pytest.fixture(autouse=True)
def no_gateway_crash(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    """Bad input and failures must be handled, never crash the gateway (no ERROR logs).

    Sessions the test ended on the shared gateway must also have released their sockets.
    """
    caplog.set_level(logging.INFO, logger="querywarden")
    yield
    assert not gateway_errors(caplog.get_records("call"))
    if "gateway" in request.fixturenames:
        wait_for_released_sessions([request.getfixturevalue("gateway")])


@pytest.fixture
def make_gateway(make_gateway: MakeGateway) -> Iterator[MakeGateway]:
    """conftest's make_gateway; the sessions a test ended must really be released.

    Before the gateway is stopped, every session whose client has gone must have closed
    both its client and its upstream socket (no leaked upstream connection).
    """
    started: list[RunningGateway] = []

    def make(**overrides: Any) -> RunningGateway:
        running = make_gateway(**overrides)
        started.append(running)
        return running

    yield make
    wait_for_released_sessions(started)


@pytest.fixture
def bystander(gateway: RunningGateway) -> Iterator[psycopg.Connection]:
    """A session held open on the shared gateway while a test misbehaves next to it."""
    with connect(gateway, application_name="bystander") as conn:
        assert_alive(conn)
        yield conn
        assert_alive(conn)
