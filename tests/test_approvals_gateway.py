"""Statements held on the wire until an approver decides, through the real gateway.

An agent's DELETE waits in the gateway (the client gets a NoticeResponse with the review
id); a DBA approves or denies it through the admin HTTP API with a token of their own;
the held statement then runs, or fails with the approver's reason. Hold expiry, grants
that are single use, CancelRequest during a hold and the audit trail are covered too.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway_harness import DATABASE, RunningGateway, token_for
from held_statement import HeldStatement, admin_call, review_policy
from querywarden import codec
from querywarden.audit.log import read_records
from querywarden.devcluster import EphemeralCluster
from querywarden.identity.dev import ensure_key
from querywarden.policy import PolicyDocument
from wire_client import WireClient

RULES = [
    {
        "name": "agents-write-reviewed",
        "subjects": {"groups": ["ai-agents"]},
        "allow": {"operations": ["select", "transaction"], "tables": ["public.*", "pg_catalog.*"]},
        "review": {"operations": ["delete"]},
    },
    {
        "name": "dba-all",
        "subjects": {"groups": ["dba"]},
        "allow": {"operations": ["*"], "tables": ["*"]},
    },
]


def _policy(hold: str) -> PolicyDocument:
    return review_policy(hold, RULES)


@pytest.fixture(scope="module")
def items(pg: EphemeralCluster) -> Iterator[None]:
    pg.psql("CREATE TABLE IF NOT EXISTS qh_items (id int); GRANT ALL ON qh_items TO PUBLIC;")
    yield
    pg.psql("DROP TABLE qh_items")


def _start(
    make_gateway: Callable[..., RunningGateway], tmp_path: Path, hold: str
) -> RunningGateway:
    gw = make_gateway(
        policy=_policy(hold),
        stateDirectory=str(tmp_path / "state"),
        admin={"port": 0},
        audit={"directory": str(tmp_path / "audit")},
    )
    gw.extra["audit"] = tmp_path / "audit"
    return gw


def _held(gw: RunningGateway, sql: str) -> HeldStatement:
    """``sql`` run as alice (an agent) in a thread."""
    return HeldStatement(psycopg.connect(gw.dsn("alice"), autocommit=True), sql)


def test_held_delete_runs_after_approval_and_fails_after_denial(
    make_gateway: Callable[..., RunningGateway], items: None, pg: EphemeralCluster, tmp_path: Path
) -> None:
    pg.psql("TRUNCATE qh_items; INSERT INTO qh_items VALUES (1), (2)")
    gw = _start(make_gateway, tmp_path, "20s")
    held = _held(gw, "DELETE FROM qh_items WHERE id = 1")
    review_id = held.review_id()
    assert not held.done.is_set()  # still waiting on the wire
    assert pg.psql("SELECT count(*) FROM qh_items").strip() == "2"
    pending = admin_call(gw, "GET", "/reviews?state=pending", "bob")
    assert any(r["id"] == review_id for r in pending["reviews"])
    # The requester is no approver.
    with pytest.raises(urllib.error.HTTPError) as forbidden:
        admin_call(gw, "POST", f"/reviews/{review_id}/approve", "alice", {"comment": "me"})
    assert forbidden.value.code == 403
    forbidden.value.close()  # an HTTPError holds the response open
    admin_call(gw, "POST", f"/reviews/{review_id}/approve", "bob", {"comment": "ok, one row"})
    held.finish()
    assert held.error is None
    assert pg.psql("SELECT id FROM qh_items").strip() == "2"

    denied = _held(gw, "DELETE FROM qh_items WHERE id = 2")
    admin_call(gw, "POST", f"/reviews/{denied.review_id()}/deny", "bob", {"comment": "not today"})
    denied.finish()
    assert isinstance(denied.error, psycopg.errors.InsufficientPrivilege)
    assert "not today" in str(denied.error)
    assert pg.psql("SELECT count(*) FROM qh_items").strip() == "1"

    # The audit log has the review events and the approval on the statement's record.
    types = [r["type"] for r in read_records(gw.extra["audit"])]
    for kind in ("review.created", "review.approved", "review.used", "review.denied"):
        assert kind in types
    approved = [
        r
        for r in read_records(gw.extra["audit"])
        if r["type"] == "statement.request" and r.get("approval")
    ]
    assert approved and approved[0]["approval"]["approver"] == "bob"


def test_hold_expiry_then_a_single_use_grant(
    make_gateway: Callable[..., RunningGateway], items: None, pg: EphemeralCluster, tmp_path: Path
) -> None:
    pg.psql("TRUNCATE qh_items; INSERT INTO qh_items VALUES (7), (8)")
    gw = _start(make_gateway, tmp_path, "1s")
    statement = "DELETE FROM qh_items WHERE id = 7"
    held = _held(gw, statement)
    review_id = held.review_id()
    held.finish()
    assert isinstance(held.error, psycopg.errors.InsufficientPrivilege)
    assert "still pending" in str(held.error) and review_id in str(held.error)
    admin_call(gw, "POST", f"/reviews/{review_id}/approve", "bob", {"comment": "go"})
    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        # Re-running the same statement (other spacing and a comment) uses the grant.
        conn.execute("DELETE  FROM qh_items /* again */ WHERE id = 7")
        assert pg.psql("SELECT id FROM qh_items").strip() == "8"
        # A different literal is a different statement: held again, and it runs out.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="still pending"):
            conn.execute("DELETE FROM qh_items WHERE id = 8")
        # The grant was single use.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="still pending"):
            conn.execute(statement)
        # With its values as parameters, an approval could not say which rows: refused.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="as literals"):
            conn.execute("DELETE FROM qh_items WHERE id = %s", (8,))
    assert pg.psql("SELECT id FROM qh_items").strip() == "8"


def _wire_held(gw: RunningGateway, sql: str) -> tuple[WireClient, str]:
    """A raw client whose statement is held; returns it and the review id."""
    client = WireClient(gw.host, gw.port, "alice", token_for("alice"), DATABASE)
    client.send(codec.query(sql))
    notice = client.recv()
    assert notice.type == "N", notice
    found = re.search(r"review (\w+)", notice.fields["M"])
    assert found, notice.fields
    return client, found[1]


def _wait_withdrawn(gw: RunningGateway, review_id: str) -> None:
    deadline = time.monotonic() + 10
    review: dict[str, Any] = {}
    while time.monotonic() < deadline:
        review = admin_call(gw, "GET", f"/reviews/{review_id}", "bob")
        if review["decision"] == "withdrawn":
            return
        time.sleep(0.05)
    raise AssertionError(f"review not withdrawn: {review}")


def test_cancel_request_or_disconnect_during_a_hold_withdraws_the_review(
    make_gateway: Callable[..., RunningGateway], items: None, tmp_path: Path
) -> None:
    gw = _start(make_gateway, tmp_path, "30s")
    client, review_id = _wire_held(gw, "DELETE FROM qh_items WHERE id = 99")
    key = next(m for m in client.startup if m.type == "K")
    pid, secret = codec.decode_backend_key_data(key.frame)
    with socket.create_connection((gw.host, gw.port), timeout=10) as cancel:
        cancel.sendall(codec.cancel_request(pid, secret))
        assert cancel.recv(1) == b""  # the gateway closes it, as PostgreSQL does
    reply = client.until_ready()
    assert [m.type for m in reply] == ["E", "Z"]
    assert reply[0].fields["C"] == "57014"
    _wait_withdrawn(gw, review_id)
    # The session goes on.
    client.send(codec.query("SELECT 1"))
    assert [m.type for m in client.until_ready()] == ["T", "D", "C", "Z"]
    client.close()

    gone, gone_id = _wire_held(gw, "DELETE FROM qh_items WHERE id = 98")
    gone.sock.close()
    _wait_withdrawn(gw, gone_id)


def test_a_review_store_that_fails_refuses_the_statement_and_the_session_goes_on(
    make_gateway: Callable[..., RunningGateway], items: None, pg: EphemeralCluster, tmp_path: Path
) -> None:
    pg.psql("TRUNCATE qh_items; INSERT INTO qh_items VALUES (1)")
    gw = _start(make_gateway, tmp_path, "20s")
    # The store opens its file at first use: a directory in its place makes it fail.
    (tmp_path / "state" / "reviews.sqlite3").mkdir(parents=True)
    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.IoError) as refused:
            conn.execute("DELETE FROM qh_items WHERE id = 1")
        diag = refused.value.diag
        assert diag.sqlstate == "58030"
        assert "could not open a review" in (diag.message_primary or "")
        assert "agents-write-reviewed" in (diag.message_primary or "")
        assert "review store" in (diag.message_hint or "")
        # Nothing ran, and the session serves what needs no approver.
        assert conn.execute("SELECT count(*) FROM qh_items").fetchone() == (1,)


def test_approvers_added_by_a_policy_reload_hold_statements_at_once(
    make_gateway: Callable[..., RunningGateway], items: None, pg: EphemeralCluster, tmp_path: Path
) -> None:
    pg.psql("TRUNCATE qh_items; INSERT INTO qh_items VALUES (1)")
    policy_file = tmp_path / "policy.yaml"
    without = _policy("20s").model_dump(mode="json", by_alias=True)
    without["approvals"] = {}
    policy_file.write_text(json.dumps(without))
    gw = make_gateway(
        policyFile=str(policy_file),
        stateDirectory=str(tmp_path / "state"),
        admin={"port": 0},
    )
    # No approvers: a statement that needs review is refused, saying why.
    with (
        psycopg.connect(gw.dsn("alice"), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="approv"),
    ):
        conn.execute("DELETE FROM qh_items WHERE id = 1")
    assert not (tmp_path / "state").exists()  # nothing opened while nothing is held

    # The DBAs become approvers: the next DELETE is held, and bob (a dba) approves it
    # through the admin API, which knew no approvers when the gateway started.
    policy_file.write_text(json.dumps(_policy("20s").model_dump(mode="json", by_alias=True)))
    assert gw.gateway.reload_policy()
    held = _held(gw, "DELETE FROM qh_items WHERE id = 1")
    admin_call(gw, "POST", f"/reviews/{held.review_id()}/approve", "bob", {"comment": "now"})
    held.finish()
    assert held.error is None
    assert pg.psql("SELECT count(*) FROM qh_items").strip() == "0"


def test_the_admin_api_trusts_the_issuers_of_the_policy_in_force(
    make_gateway: Callable[..., RunningGateway], tmp_path: Path
) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(json.dumps(_policy("20s").model_dump(mode="json", by_alias=True)))
    gw = make_gateway(policyFile=str(policy_file), admin={"port": 0})
    assert admin_call(gw, "GET", "/reviews", "bob") == {"reviews": []}
    # A reload that trusts another key: bob's token from the old one is refused.
    other_key = tmp_path / "other-issuer.pem"
    ensure_key(other_key)
    moved = _policy("20s").model_dump(mode="json", by_alias=True)
    moved["identity"]["issuers"][0]["keyFile"] = str(other_key)
    policy_file.write_text(json.dumps(moved))
    assert gw.gateway.reload_policy()
    with pytest.raises(urllib.error.HTTPError) as refused:
        admin_call(gw, "GET", "/reviews", "bob")
    assert refused.value.code == 401
    refused.value.close()
