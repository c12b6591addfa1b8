"""Two gateway replicas sharing reviews in PostgreSQL (``approvals.store: postgres``).

A statement held on replica A is approved through replica B's admin API and released on A
at once (LISTEN/NOTIFY: the poll is turned off here, so only the notification can wake
it); two approvers deciding at once through A and B get one 200 and one 409; a
single-use grant is used once whichever replica the re-runs go to; and a store that
cannot be reached refuses the statement with 58030, as every store does.
"""

from __future__ import annotations

import secrets
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway_harness import RunningGateway
from held_statement import HeldStatement, admin_call, review_policy
from querywarden import server
from querywarden.approvals.pg_store import PostgresReviewStore
from querywarden.devcluster import DATABASE, EphemeralCluster, free_port

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def items(pg: EphemeralCluster) -> Iterator[None]:
    pg.psql("CREATE TABLE IF NOT EXISTS qpg_items (id int); GRANT ALL ON qpg_items TO PUBLIC;")
    yield
    pg.psql("DROP TABLE qpg_items")


#: The review store's own role: no client session of the gateways connects as it.
STORE_ROLE = "qw_reviews"
STORE_PASSWORD = "qw-reviews-pw"


@pytest.fixture(scope="module")
def store_role(pg: EphemeralCluster) -> Iterator[str]:
    """A role for the review store, allowed to create its schema in the database."""
    pg.psql(
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{STORE_ROLE}') "
        f"THEN CREATE ROLE {STORE_ROLE} LOGIN PASSWORD '{STORE_PASSWORD}'; END IF; END $$; "
        f"GRANT CREATE ON DATABASE {DATABASE} TO {STORE_ROLE}"
    )
    yield STORE_ROLE
    pg.psql(f"DROP OWNED BY {STORE_ROLE}; DROP ROLE {STORE_ROLE}")


@pytest.fixture
def schema(pg: EphemeralCluster, store_role: str) -> Iterator[str]:
    """The replicas' schema, of this test's own; dropped afterwards."""
    name = f"qw_gw_{secrets.token_hex(4)}"
    yield name
    pg.psql(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def _replicas(
    make_gateway: Callable[..., RunningGateway],
    pg: EphemeralCluster,
    tmp_path: Path,
    schema: str,
    hold: str,
) -> tuple[RunningGateway, RunningGateway]:
    """Gateways A and B: own state directories, one review store (password in a file)."""
    password_file = tmp_path / "store-password"
    password_file.write_text(STORE_PASSWORD + "\n")
    store = {
        "store": "postgres",
        "postgres": {
            "dsn": f"postgresql://{STORE_ROLE}@127.0.0.1:{pg.port}/{DATABASE}",
            "passwordFile": str(password_file),
            "schema": schema,
        },
    }
    a, b = (
        make_gateway(
            policy=review_policy(hold),
            stateDirectory=str(tmp_path / name),
            admin={"port": 0},
            approvals=store,
        )
        for name in ("a", "b")
    )
    for gw in (a, b):
        store_of = gw.gateway.approvals.store
        assert isinstance(store_of, PostgresReviewStore)
        deadline = time.monotonic() + 10
        while not store_of.listening.is_set():
            assert time.monotonic() < deadline, "the replica does not listen for decisions"
            time.sleep(0.02)
    return a, b


def _held(gw: RunningGateway, sql: str) -> HeldStatement:
    """``sql`` run as alice (an agent) in a thread."""
    return HeldStatement(psycopg.connect(gw.dsn("alice"), autocommit=True), sql)


def _decide(gw: RunningGateway, review_id: str, verb: str, comment: str) -> int:
    """POST approve/deny through ``gw`` as bob; the HTTP status."""
    try:
        admin_call(gw, "POST", f"/reviews/{review_id}/{verb}", "bob", {"comment": comment})
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    return 200


def test_held_on_one_replica_released_at_once_by_an_approval_through_another(
    make_gateway: Callable[..., RunningGateway],
    items: None,
    pg: EphemeralCluster,
    tmp_path: Path,
    schema: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No poll within the hold: only the store's notification can release the statement.
    monkeypatch.setattr(server, "_SHARED_STORE_POLL", 60.0)
    pg.psql("TRUNCATE qpg_items; INSERT INTO qpg_items VALUES (1), (2), (3)")
    a, b = _replicas(make_gateway, pg, tmp_path, schema, "20s")

    held = _held(a, "DELETE FROM qpg_items WHERE id = 1")
    review_id = held.review_id()
    pending = admin_call(b, "GET", "/reviews?state=pending", "bob")
    assert [r["id"] for r in pending["reviews"]] == [review_id]  # B sees A's review
    started = time.monotonic()
    assert _decide(b, review_id, "approve", "ok, one row") == 200
    assert held.done.wait(5), "the approval through B did not release the statement on A"
    elapsed = time.monotonic() - started
    held.finish()
    assert held.error is None
    assert elapsed < 0.5, f"released after {elapsed:.3f}s"
    assert pg.psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM qpg_items").strip() == "2,3"
    used = admin_call(a, "GET", f"/reviews/{review_id}", "bob")
    assert used["decision"] == "approved" and len(used["usedAt"]) == 1

    # Two approvers at once, one through each replica: one decides, the other gets 409.
    held = _held(a, "DELETE FROM qpg_items WHERE id = 2")
    review_id = held.review_id()
    statuses: dict[str, int] = {}
    go = threading.Barrier(2)

    def decide(gw: RunningGateway, verb: str) -> None:
        go.wait()
        statuses[verb] = _decide(gw, review_id, verb, f"{verb} at once")

    threads = [
        threading.Thread(target=decide, args=(a, "approve")),
        threading.Thread(target=decide, args=(b, "deny")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(statuses.values()) == [200, 409], statuses
    held.finish()
    decided = admin_call(b, "GET", f"/reviews/{review_id}", "bob")
    if statuses["approve"] == 200:
        assert decided["decision"] == "approved" and held.error is None
        assert pg.psql("SELECT count(*) FROM qpg_items WHERE id = 2").strip() == "0"
    else:
        assert decided["decision"] == "denied"
        assert isinstance(held.error, psycopg.errors.InsufficientPrivilege)
        assert pg.psql("SELECT count(*) FROM qpg_items WHERE id = 2").strip() == "1"


def test_a_single_use_grant_is_used_once_across_replicas(
    make_gateway: Callable[..., RunningGateway],
    items: None,
    pg: EphemeralCluster,
    tmp_path: Path,
    schema: str,
) -> None:
    pg.psql("TRUNCATE qpg_items; INSERT INTO qpg_items VALUES (7), (8)")
    a, b = _replicas(make_gateway, pg, tmp_path, schema, "1s")
    statement = "DELETE FROM qpg_items WHERE id = 7"
    held = _held(a, statement)
    review_id = held.review_id()
    held.finish()
    assert isinstance(held.error, psycopg.errors.InsufficientPrivilege)
    assert "still pending" in str(held.error)
    assert _decide(b, review_id, "approve", "once") == 200

    # The same statement re-run through both replicas at once: one run uses the grant,
    # the other opens a new review and its hold runs out.
    outcomes: dict[str, Any] = {}
    go = threading.Barrier(2)

    def rerun(name: str, gw: RunningGateway) -> None:
        with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
            go.wait()
            try:
                conn.execute(statement)
                outcomes[name] = "ran"
            except psycopg.errors.InsufficientPrivilege as exc:
                outcomes[name] = str(exc)

    threads = [threading.Thread(target=rerun, args=(n, gw)) for n, gw in (("a", a), ("b", b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(o == "ran" for o in outcomes.values()) == [False, True], outcomes
    refused = next(o for o in outcomes.values() if o != "ran")
    assert "still pending" in refused and review_id not in refused
    grant = admin_call(a, "GET", f"/reviews/{review_id}", "bob")
    assert grant["usesLeft"] == 0 and len(grant["usedAt"]) == 1
    assert pg.psql("SELECT id FROM qpg_items").strip() == "8"


def test_an_unreachable_review_store_refuses_with_58030_and_the_session_goes_on(
    make_gateway: Callable[..., RunningGateway],
    items: None,
    pg: EphemeralCluster,
    tmp_path: Path,
) -> None:
    pg.psql("TRUNCATE qpg_items; INSERT INTO qpg_items VALUES (1)")
    gw = make_gateway(
        policy=review_policy("20s"),
        stateDirectory=str(tmp_path / "state"),
        admin={"port": 0},
        approvals={
            "store": "postgres",
            "postgres": {
                # Nothing listens there: the store's database is down.
                "dsn": f"postgresql://{STORE_ROLE}@127.0.0.1:{free_port()}/{DATABASE}",
                "password": STORE_PASSWORD,
                "connectTimeout": "2s",
            },
        },
    )
    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.IoError) as refused:
            conn.execute("DELETE FROM qpg_items WHERE id = 1")
        diag = refused.value.diag
        assert diag.sqlstate == "58030"
        assert "could not open a review" in (diag.message_primary or "")
        assert "agents-write-reviewed" in (diag.message_primary or "")
        assert "review store" in (diag.message_hint or "")
        # Nothing ran, and the session serves what needs no approver.
        assert conn.execute("SELECT count(*) FROM qpg_items").fetchone() == (1,)


def test_a_review_store_failing_during_a_hold(
    make_gateway: Callable[..., RunningGateway],
    items: None,
    pg: EphemeralCluster,
    tmp_path: Path,
    schema: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Held statements read their review every 0.2 s here, so that they do while it fails.
    monkeypatch.setattr(server, "_SHARED_STORE_POLL", 0.2)
    pg.psql("TRUNCATE qpg_items; INSERT INTO qpg_items VALUES (1), (2)")
    a, b = _replicas(make_gateway, pg, tmp_path, schema, "3s")
    # The gateway's role loses its reviews table (a real failure of every read of it).
    lose = f"ALTER TABLE {schema}.reviews OWNER TO postgres"
    regain = f"ALTER TABLE {schema}.reviews OWNER TO {STORE_ROLE}"

    # For a moment: the hold goes on, and an approval once the store is back releases it.
    held = _held(a, "DELETE FROM qpg_items WHERE id = 1")
    review_id = held.review_id()
    pg.psql(lose)
    time.sleep(0.6)
    assert not held.done.is_set()
    pg.psql(regain)
    assert _decide(b, review_id, "approve", "ok") == 200
    held.finish()
    assert held.error is None
    assert pg.psql("SELECT id FROM qpg_items").strip() == "2"

    # Until the hold ends: refused with 58030 (the decision is unknown), nothing runs.
    held = _held(a, "DELETE FROM qpg_items WHERE id = 2")
    review_id = held.review_id()
    pg.psql(lose)
    try:
        held.finish()
    finally:
        pg.psql(regain)
    assert isinstance(held.error, psycopg.errors.IoError), held.error
    diag = held.error.diag
    assert diag.sqlstate == "58030"
    assert f"review {review_id} was opened" in (diag.message_primary or "")
    assert "could not read it from its review store" in (diag.message_primary or "")
    assert "re-run the same statement once the review store is back" in (diag.message_hint or "")
    assert pg.psql("SELECT id FROM qpg_items").strip() == "2"
    with psycopg.connect(a.dsn("alice"), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM qpg_items").fetchone() == (1,)
