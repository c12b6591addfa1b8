"""Approvers are told at once: review events reach real webhook receivers.

An agent's DELETE is held through the real gateway; the policy's ``approvals.notify``
names a generic webhook (signed), a Slack- and a Teams-style receiver, each a real HTTP
server. The review's opening reaches each within a second, with the statement's shape,
the requester, the rule, the reason, the expiry and how to decide; the approval follows.
A destination that is down delays nothing, and every delivery is in the audit log.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway_harness import POLICY, RunningGateway, token_for
from held_statement import REVIEW_RULES, HeldStatement
from notify_receiver import Receiver
from querywarden.approvals.notify import SIGNATURE_HEADER, verify
from querywarden.audit.log import read_records
from querywarden.devcluster import EphemeralCluster
from querywarden.policy import PolicyDocument

SECRET = "notify-test-secret-0123456789"
CONSOLE = "https://querywarden.example/console"

RULES = REVIEW_RULES


@pytest.fixture(scope="module")
def items(pg: EphemeralCluster) -> Iterator[None]:
    pg.psql("CREATE TABLE IF NOT EXISTS qn_items (id int); GRANT ALL ON qn_items TO PUBLIC;")
    yield
    pg.psql("DROP TABLE qn_items")


def _gateway(
    make_gateway: Callable[..., RunningGateway], tmp_path: Path, notify: list[dict[str, Any]]
) -> RunningGateway:
    policy = PolicyDocument.model_validate(
        {
            "identity": POLICY.identity.model_dump(by_alias=True),
            "rules": RULES,
            "approvals": {
                "approvers": {"groups": ["dba"]},
                "hold": "20s",
                "pendingTTL": "30m",
                "notify": notify,
                "consoleUrl": CONSOLE,
            },
        }
    )
    gw = make_gateway(
        policy=policy,
        stateDirectory=str(tmp_path / "state"),
        admin={"port": 0},
        audit={"directory": str(tmp_path / "audit")},
    )
    gw.extra["audit"] = tmp_path / "audit"
    return gw


def _approve(gw: RunningGateway, review_id: str, comment: str) -> None:
    address = gw.gateway.admin_address
    assert address is not None
    request = urllib.request.Request(
        f"http://{address[0]}:{address[1]}/reviews/{review_id}/approve",
        method="POST",
        data=json.dumps({"comment": comment}).encode(),
        headers={"Authorization": f"Bearer {token_for('bob')}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def _records(gw: RunningGateway, kind: str) -> list[dict[str, Any]]:
    return [r for r in read_records(gw.extra["audit"]) if r["type"] == kind]


def test_a_held_statement_reaches_every_destination_and_so_does_its_approval(
    make_gateway: Callable[..., RunningGateway], items: None, pg: EphemeralCluster, tmp_path: Path
) -> None:
    pg.psql("TRUNCATE qn_items; INSERT INTO qn_items VALUES (7), (8)")
    secret_file = tmp_path / "webhook-secret"
    secret_file.write_text(SECRET + "\n")
    with Receiver() as hook, Receiver() as slack, Receiver() as teams:
        (tmp_path / "slack-url").write_text(slack.url)
        gw = _gateway(
            make_gateway,
            tmp_path,
            [
                {"name": "ops-hook", "url": hook.url, "secretFile": str(secret_file)},
                {"name": "ops-slack", "kind": "slack", "urlFile": str(tmp_path / "slack-url")},
                {"name": "ops-teams", "kind": "teams", "url": teams.url},
            ],
        )
        held = HeldStatement(
            psycopg.connect(gw.dsn("alice"), autocommit=True), "DELETE FROM qn_items WHERE id = 7"
        )
        review_id = held.review_id()
        created = hook.wait_for("review.created")
        # The approvers know within a second of the review's opening.
        opened = datetime.fromisoformat(created.json["review"]["created"]).timestamp()
        assert created.wall - opened < 1.0
        # The generic webhook: signed, and it says everything an approver needs.
        assert verify(
            SECRET.encode(), created.body, created.headers[SIGNATURE_HEADER], now=time.time()
        )
        assert not verify(
            b"another secret", created.body, created.headers[SIGNATURE_HEADER], now=time.time()
        )
        body = created.json
        review = body["review"]
        assert body["type"] == "review.created" and review["id"] == review_id
        assert review["state"] == "pending"
        assert review["statement"] == "DELETE FROM qn_items WHERE id = $1"  # no constants
        assert review["requester"]["subject"] == "alice"
        assert review["rule"] == "agents-write-reviewed"
        assert review["reason"] == "DELETE needs approval (rule agents-write-reviewed)"
        assert review["expires"] is not None
        assert [t.rsplit(".", 1)[-1] for t in review["tables"]] == ["qn_items"]
        assert body["links"]["decide"] == f"{CONSOLE}/reviews/{review_id}"
        assert review_id in body["links"]["approveCommand"]
        # Slack and Teams get their own bodies with the same facts.
        slack_text = json.dumps(slack.wait_for("review.created").json)
        assert "alice" in slack_text and review_id in slack_text and "$1" in slack_text
        assert f"{CONSOLE}/reviews/{review_id}" in slack_text
        teams_body = teams.wait_for("review.created").json
        card = teams_body["attachments"][0]["content"]
        assert card["type"] == "AdaptiveCard"
        assert card["actions"][0]["url"] == f"{CONSOLE}/reviews/{review_id}"
        assert not held.done.is_set()

        _approve(gw, review_id, "one row, fine")
        held.finish()
        assert held.error is None
        approved = hook.wait_for("review.approved").json
        assert approved["review"]["id"] == review_id
        assert approved["review"]["approver"]["subject"] == "bob"
        assert approved["review"]["comment"] == "one row, fine"
        assert approved["sequence"] > body["sequence"]  # a receiver keeps the newest
        assert "approved by bob" in json.dumps(slack.wait_for("review.approved").json)
        teams.wait_for("review.approved")
    # Each delivery is in the audit log, by destination name (never its URL or secret).
    deadline = time.monotonic() + 5
    while len(_records(gw, "notification.delivered")) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    delivered = _records(gw, "notification.delivered")
    assert sorted((r["destination"], r["event"]) for r in delivered) == sorted(
        (d, e)
        for d in ("ops-hook", "ops-slack", "ops-teams")
        for e in ("review.created", "review.approved")
    )
    log_text = "".join(json.dumps(r) for r in read_records(gw.extra["audit"]))
    assert SECRET not in log_text and hook.url not in log_text


def test_a_destination_that_is_down_delays_neither_the_hold_nor_the_decision(
    make_gateway: Callable[..., RunningGateway], items: None, pg: EphemeralCluster, tmp_path: Path
) -> None:
    pg.psql("TRUNCATE qn_items; INSERT INTO qn_items VALUES (7)")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}/hook"  # nothing listens
    with Receiver(status=400) as refusing, Receiver() as working:
        gw = _gateway(
            make_gateway,
            tmp_path,
            [
                {"name": "down", "url": down},
                {"name": "refusing", "url": refusing.url},
                {"name": "working", "url": working.url},
            ],
        )
        held = HeldStatement(
            psycopg.connect(gw.dsn("alice"), autocommit=True), "DELETE FROM qn_items WHERE id = 7"
        )
        review_id = held.review_id()
        working.wait_for("review.created", timeout=1.0)
        started = time.monotonic()
        _approve(gw, review_id, "ok")
        held.finish()
        assert held.error is None and time.monotonic() - started < 2.0
        working.wait_for("review.approved", timeout=1.0)
        # A receiver that refuses a post (4xx) is not asked again; it is recorded at once.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(_records(gw, "notification.failed")) < 2:
            time.sleep(0.05)
        failed = [r for r in _records(gw, "notification.failed") if r["destination"] == "refusing"]
        assert {r["event"] for r in failed} == {"review.created", "review.approved"}
        assert all(r["attempts"] == 1 and r["error"] == "HTTP 400" for r in failed)
        assert len(refusing.posts) == 2
    assert pg.psql("SELECT count(*) FROM qn_items").strip() == "0"
