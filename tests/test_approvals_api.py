"""The admin API with real token verification, driven by the ``reviews`` CLI commands.

The API runs on its own event loop in a background thread, verifying bearer tokens with
the gateway's TokenAuthenticator and the development issuer of the test harness; the
tests run the CLI handlers in-process, as ``querywarden reviews ...`` would.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway_harness import DEV_KEY, POLICY, token_for
from querywarden.approvals import (
    ApprovalService,
    ApprovalSettings,
    Review,
    ReviewDecision,
    ReviewSummary,
    SqliteReviewStore,
)
from querywarden.approvals.api import AdminApi, bearer_authenticate
from querywarden.approvals.tools import add_review_commands
from querywarden.identity import Principal
from querywarden.identity.authenticator import TokenAuthenticator
from querywarden.identity.dev import mint_token
from querywarden.tlsutil import write_self_signed

T = TypeVar("T")

# The development issuer's Principals carry the issuer name "dev" (see POLICY).
ALICE = Principal("alice", frozenset({"ai-agents"}), issuer="dev")
BOB = Principal("bob", frozenset({"dba"}), issuer="dev")
SETTINGS = ApprovalSettings.model_validate({"approvers": {"groups": ["dba"]}, "grantTTL": "15m"})


@dataclass
class RunningApi:
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    service: ApprovalService
    api: AdminApi
    url: str
    events: list[tuple[str, str]]

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def hold(
        self, statement: str, who: Principal = ALICE, parameters: tuple[str | None, ...] = ()
    ) -> Review:
        """What the gateway does when the policy says review."""
        return self.call(
            self.service.request(
                who,
                "app",
                statement,
                summary=ReviewSummary(operations=("delete",), writes=("public.orders",)),
                rule="agents-write",
                reason="DELETE needs approval (rule agents-write)",
                parameters=parameters,
            )
        )


def start_api(tmp_path: Path, ssl_context: ssl.SSLContext | None = None) -> RunningApi:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="admin-api", daemon=True)
    thread.start()
    events: list[tuple[str, str]] = []

    async def build() -> tuple[ApprovalService, AdminApi, tuple[str, int]]:
        service = ApprovalService(
            SqliteReviewStore(tmp_path / "reviews.sqlite"),
            SETTINGS,
            on_event=lambda kind, review: events.append((kind, review.id)),
        )
        authenticate = bearer_authenticate(TokenAuthenticator(POLICY.identity))
        api = AdminApi(service, authenticate, host="127.0.0.1", port=0, ssl_context=ssl_context)
        return service, api, await api.start()

    service, api, (host, port) = asyncio.run_coroutine_threadsafe(build(), loop).result(30)
    scheme = "https" if ssl_context else "http"
    url = f"{scheme}://{'localhost' if ssl_context else host}:{port}"
    return RunningApi(loop, thread, service, api, url, events)


def stop_api(running: RunningApi) -> None:
    async def stop() -> None:
        await running.api.close()
        await running.service.store.close()

    try:
        running.call(stop())
    finally:
        running.loop.call_soon_threadsafe(running.loop.stop)
        running.thread.join(10)
        running.loop.close()


@pytest.fixture
def admin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningApi]:
    running = start_api(tmp_path)
    monkeypatch.setenv("QUERYWARDEN_ADMIN_URL", running.url)
    monkeypatch.delenv("QUERYWARDEN_TOKEN", raising=False)
    try:
        yield running
    finally:
        stop_api(running)


def reviews(*argv: str) -> int:
    """``querywarden reviews ARGV`` in-process (as cli.py will dispatch it)."""
    parser = argparse.ArgumentParser(prog="querywarden")
    add_review_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["reviews", *argv])
    code: int = args.handler(args)
    return code


def raw(
    running: RunningApi,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    host, port = running.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=sent)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), json.loads(data) if data else None


# --- approve and deny through the CLI -----------------------------------------------------


def test_a_dba_lists_and_approves_a_held_statement(
    admin: RunningApi, capsys: pytest.CaptureFixture[str]
) -> None:
    held = admin.hold("DELETE FROM orders WHERE id = 5")
    waiting = asyncio.run_coroutine_threadsafe(admin.service.wait(held.id, 20), admin.loop)

    assert reviews("list", "--token", token_for("bob")) == 0
    out = capsys.readouterr().out
    assert held.id in out and "alice" in out and "DELETE FROM orders WHERE id = 5" in out

    assert reviews("show", held.id, "--token", token_for("bob")) == 0
    out = capsys.readouterr().out
    assert "DELETE needs approval (rule agents-write)" in out and "public.orders" in out

    assert reviews("approve", held.id, "--comment", "ticket 42", "--token", token_for("bob")) == 0
    assert f"approved {held.id}: 1 run left" in capsys.readouterr().out

    # The session holding the statement wakes up with the approval.
    decided = waiting.result(5)
    assert decided.decision is ReviewDecision.APPROVED
    assert decided.approver is not None and decided.approver.subject == "bob"
    assert decided.approver.issuer == "dev" and decided.comment == "ticket 42"
    assert admin.events == [("created", held.id), ("approved", held.id)]
    grant = admin.call(admin.service.claim_grant(ALICE, "app", "delete from orders where id=5"))
    assert grant is not None and grant.uses_left == 0


def test_deny_reaches_the_waiting_session_with_the_reason(
    admin: RunningApi, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    held = admin.hold("DROP TABLE orders")
    waiting = asyncio.run_coroutine_threadsafe(admin.service.wait(held.id, 20), admin.loop)
    monkeypatch.setenv("QUERYWARDEN_TOKEN", token_for("bob"))  # the token from the environment
    assert reviews("deny", held.id, "--comment", "not in production") == 0
    assert f"denied {held.id}" in capsys.readouterr().out
    decided = waiting.result(5)
    assert decided.decision is ReviewDecision.DENIED and decided.comment == "not in production"


def test_json_output_and_a_widened_grant(
    admin: RunningApi, capsys: pytest.CaptureFixture[str]
) -> None:
    held = admin.hold("DELETE FROM orders WHERE id = 7")
    bob = token_for("bob")
    assert reviews("list", "--json", "--token", bob) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in listed] == [held.id]
    assert listed[0]["decision"] == "pending" and listed[0]["requester"]["subject"] == "alice"

    before = datetime.now(UTC)
    code = reviews(
        "approve", held.id, "--comment", "migration", "--uses", "3", "--ttl", "30m",
        "--json", "--token", bob,
    )  # fmt: skip
    assert code == 0
    approved = json.loads(capsys.readouterr().out)
    assert approved["usesLeft"] == 3
    expires = datetime.fromisoformat(approved["grantExpires"])
    assert before + timedelta(minutes=29) < expires < before + timedelta(minutes=31)

    assert reviews("list", "--token", bob) == 0
    assert "no pending reviews" in capsys.readouterr().out
    assert reviews("list", "--all", "--token", bob) == 0
    assert "approved" in capsys.readouterr().out


def test_show_lists_bound_parameters(admin: RunningApi, capsys: pytest.CaptureFixture[str]) -> None:
    held = admin.hold("DELETE FROM orders WHERE id = $1 OR note = $2", parameters=("5", None))
    assert reviews("show", held.id, "--token", token_for("bob")) == 0
    out = capsys.readouterr().out
    assert '$1 = "5"' in out and "$2 = NULL" in out


def test_unlimited_uses(admin: RunningApi, capsys: pytest.CaptureFixture[str]) -> None:
    held = admin.hold("DELETE FROM orders WHERE id = 8")
    code = reviews(
        "approve", held.id, "--comment", "ok", "--uses", "unlimited", "--token", token_for("bob")
    )
    assert code == 0
    assert "any number of runs" in capsys.readouterr().out


# --- refusals -----------------------------------------------------------------------------


def test_no_token_invalid_token_and_expired_token_are_refused(
    admin: RunningApi, capsys: pytest.CaptureFixture[str]
) -> None:
    held = admin.hold("DELETE FROM orders WHERE id = 9")
    assert reviews("approve", held.id, "--comment", "ok") == 2
    assert "no token" in capsys.readouterr().err

    assert reviews("approve", held.id, "--comment", "ok", "--token", "not-a-token") == 1
    err = capsys.readouterr().err
    assert "401" in err and "token refused" in err

    expired = mint_token("bob", groups=["dba"], ttl=60, key_file=DEV_KEY, now=time.time() - 3600)
    assert reviews("list", "--token", expired) == 1
    assert "401" in capsys.readouterr().err

    status, headers, body = raw(admin, "GET", "/reviews")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert "Bearer" in body["error"]
    status, _, _ = raw(admin, "GET", f"/reviews/{held.id}", token="garbage")
    assert status == 401
    assert (admin.call(admin.service.get(held.id))).pending


def test_a_non_approver_gets_403(admin: RunningApi, capsys: pytest.CaptureFixture[str]) -> None:
    held = admin.hold("DELETE FROM orders WHERE id = 10")
    for user in ("carol", "alice"):  # support, and the requester herself
        assert reviews("approve", held.id, "--comment", "ok", "--token", token_for(user)) == 1
        err = capsys.readouterr().err
        assert "403" in err and "may not decide reviews" in err and "members of dba" in err
        assert reviews("deny", held.id, "--comment", "no", "--token", token_for(user)) == 1
        assert "403" in capsys.readouterr().err
    assert admin.call(admin.service.get(held.id)).pending


def test_self_approval_gets_403(admin: RunningApi, capsys: pytest.CaptureFixture[str]) -> None:
    held = admin.hold("DROP TABLE audit_old", who=BOB)
    assert reviews("approve", held.id, "--comment", "mine", "--token", token_for("bob")) == 1
    err = capsys.readouterr().err
    assert "403" in err and "requireDistinctApprover" in err
    assert admin.call(admin.service.get(held.id)).pending


def test_reviews_are_visible_to_approvers_and_to_their_requester_only(
    admin: RunningApi, capsys: pytest.CaptureFixture[str]
) -> None:
    held = admin.hold("DELETE FROM orders WHERE id = 11")
    assert reviews("show", held.id, "--token", token_for("alice")) == 0
    assert held.id in capsys.readouterr().out
    assert reviews("show", held.id, "--token", token_for("carol")) == 1
    assert "403" in capsys.readouterr().err
    assert reviews("list", "--json", "--token", token_for("carol")) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_unknown_review_gets_404(admin: RunningApi, capsys: pytest.CaptureFixture[str]) -> None:
    bob = token_for("bob")
    assert reviews("show", "nosuchid42", "--token", bob) == 1
    assert "404" in capsys.readouterr().err
    assert reviews("approve", "nosuchid42", "--comment", "ok", "--token", bob) == 1
    assert "404" in capsys.readouterr().err


def test_a_decided_review_gets_409(admin: RunningApi, capsys: pytest.CaptureFixture[str]) -> None:
    held = admin.hold("DELETE FROM orders WHERE id = 12")
    bob = token_for("bob")
    assert reviews("deny", held.id, "--comment", "no", "--token", bob) == 0
    capsys.readouterr()
    assert reviews("approve", held.id, "--comment", "yes after all", "--token", bob) == 1
    err = capsys.readouterr().err
    assert "409" in err and "already denied" in err
    assert reviews("deny", held.id, "--comment", "again", "--token", bob) == 1
    assert "409" in capsys.readouterr().err


def test_bad_requests_get_400(admin: RunningApi, capsys: pytest.CaptureFixture[str]) -> None:
    held = admin.hold("DELETE FROM orders WHERE id = 13")
    bob = token_for("bob")
    assert reviews("approve", held.id, "--comment", "ok", "--ttl", "soon", "--token", bob) == 1
    assert "400" in capsys.readouterr().err
    path = f"/reviews/{held.id}/approve"
    for body in (b"{not json", b"[]", b'{"comment": ""}', b'{"comment": "ok", "uses": 0}',
                 b'{"comment": "ok", "uses": "2"}', b'{"comment": "ok", "extra": 1}'):  # fmt: skip
        status, _, answer = raw(admin, "POST", path, token=bob, body=body)
        assert status == 400, (body, answer)
    status, _, _ = raw(admin, "GET", "/reviews?state=maybe", token=bob)
    assert status == 400
    assert admin.call(admin.service.get(held.id)).pending


def test_http_edges(admin: RunningApi) -> None:
    bob = token_for("bob")
    assert raw(admin, "GET", "/healthz")[:3:2] == (200, {"ok": True})
    assert raw(admin, "GET", "/nothing", token=bob)[0] == 404
    assert raw(admin, "GET", "/reviews/x/approve", token=bob)[0] == 405
    assert raw(admin, "DELETE", "/reviews", token=bob)[0] == 405
    status, _, _ = raw(
        admin, "POST", "/reviews/x/deny", token=bob, headers={"Transfer-Encoding": "chunked"}
    )
    assert status == 501
    # Refused on the declared length, before any of the body is read.
    status, _, _ = raw(
        admin, "POST", "/reviews/x/deny", token=bob, headers={"Content-Length": "70000"}
    )
    assert status == 413


def test_access_without_a_lookup_is_404_after_the_token(admin: RunningApi) -> None:
    # An API built without the gateway's policy (no access lookup) has no /access; a
    # caller without a token learns only that it needs one.
    body = json.dumps({"database": "app", "relations": ["public.orders"]}).encode()
    assert raw(admin, "POST", "/access", body=body)[0] == 401
    status, _, answer = raw(admin, "POST", "/access", token=token_for("alice"), body=body)
    assert status == 404 and "does not describe access" in answer["error"]


# --- TLS ----------------------------------------------------------------------------------


def test_https_with_a_ca_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = write_self_signed(tmp_path / "tls", "admin")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    running = start_api(tmp_path, ssl_context=context)
    monkeypatch.delenv("QUERYWARDEN_TOKEN", raising=False)
    try:
        held = running.hold("DELETE FROM orders WHERE id = 14")
        bob = token_for("bob")
        assert reviews("list", "--url", running.url, "--token", bob, "--cacert", str(cert)) == 0
        assert held.id in capsys.readouterr().out
        # Without the CA the certificate is not trusted: the CLI cannot ask the API.
        assert reviews("list", "--url", running.url, "--token", bob) == 2
        assert "cannot reach the admin API" in capsys.readouterr().err
        code = reviews(
            "approve", held.id, "--comment", "ok", "--url", running.url, "--token", bob,
            "--cacert", str(cert),
        )  # fmt: skip
        assert code == 0
    finally:
        stop_api(running)


def test_unreachable_api(capsys: pytest.CaptureFixture[str]) -> None:
    code = reviews("list", "--url", "http://127.0.0.1:1", "--token", token_for("bob"))
    assert code == 2
    assert "cannot reach the admin API at http://127.0.0.1:1" in capsys.readouterr().err


def test_close_does_not_wait_for_a_client_that_sends_nothing(tmp_path: Path) -> None:
    running = start_api(tmp_path)
    host, port = running.url.removeprefix("http://").split(":")
    silent = socket.create_connection((host, int(port)))
    try:
        time.sleep(0.05)
        started = time.monotonic()
        stop_api(running)
        assert time.monotonic() - started < 5
        silent.settimeout(5)
        assert silent.recv(1) == b""  # the server closed the connection
    finally:
        silent.close()
