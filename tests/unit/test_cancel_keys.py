"""The cancel-key registry: keys by (pid, secret), pids shared across upstream servers."""

from __future__ import annotations

import itertools

import pytest

from querywarden import cancel
from querywarden.cancel import SECRET_BYTES, CancelKeys
from querywarden.upstream import UpstreamTarget

PRIMARY = UpstreamTarget(host="db-a.internal", port=5432, user="qw")
REPLICA = UpstreamTarget(host="db-b.internal", port=5432, user="qw")


def test_the_client_gets_the_backends_pid_and_a_secret_of_the_gateways() -> None:
    keys: CancelKeys[str] = CancelKeys()
    key = keys.issue(PRIMARY, 4242, b"upst", "session-1")
    assert key.pid == 4242
    assert len(key.secret) == SECRET_BYTES
    assert key.secret != b"upst"
    assert keys.find(4242, key.secret) is key
    assert keys.find(4242, b"upst") is None  # the upstream's secret opens nothing here
    assert keys.find(4243, key.secret) is None


def test_one_pid_on_two_servers_routes_each_cancel_to_its_own_session() -> None:
    keys: CancelKeys[str] = CancelKeys()
    a = keys.issue(PRIMARY, 77, b"aaaa", "on-primary")
    b = keys.issue(REPLICA, 77, b"bbbb", "on-replica")
    assert a.secret != b.secret
    found_a, found_b = keys.find(77, a.secret), keys.find(77, b.secret)
    assert found_a is not None and found_b is not None
    assert (found_a.owner, found_a.target, found_a.upstream_secret) == (
        "on-primary",
        PRIMARY,
        b"aaaa",
    )
    assert (found_b.owner, found_b.target, found_b.upstream_secret) == (
        "on-replica",
        REPLICA,
        b"bbbb",
    )
    keys.forget(a)
    assert keys.find(77, a.secret) is None
    assert keys.find(77, b.secret) is b
    keys.forget(b)
    assert len(keys) == 0


def test_a_secret_is_never_handed_out_twice_for_one_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    # The random source repeats itself: the registry draws again.
    draws = itertools.chain([b"same", b"same", b"same", b"next"])
    monkeypatch.setattr(cancel.secrets, "token_bytes", lambda n: next(draws))
    keys: CancelKeys[str] = CancelKeys()
    first = keys.issue(PRIMARY, 9, b"x", "one")
    second = keys.issue(REPLICA, 9, b"y", "two")
    assert (first.secret, second.secret) == (b"same", b"next")
    assert keys.find(9, b"same") is first


def test_forgetting_twice_or_an_unknown_key_is_harmless() -> None:
    keys: CancelKeys[str] = CancelKeys()
    key = keys.issue(PRIMARY, 5, b"s", "one")
    keys.forget(key)
    keys.forget(key)
    assert len(keys) == 0
