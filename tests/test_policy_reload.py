"""A policy reload reaches every request that runs after it, in open sessions too.

Statements prepared with the protocol's Parse, portals bound before the reload, masking
and row limits: all follow the policy in force when the request runs, through the real
gateway and real clients.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from gateway_harness import DATABASE, POLICY, RunningGateway, token_for
from querywarden import codec
from querywarden.devcluster import EphemeralCluster
from raw_client import Message, RawClient
from wire_client import SYNC, bind, execute

HASH_KEY = "test-reload-masking-key-0123456789"
SSN = "123-45-6789"


@pytest.fixture(scope="module")
def tables(pg: EphemeralCluster) -> Iterator[None]:
    pg.psql(
        "DROP TABLE IF EXISTS qr_notes, qr_people CASCADE;"
        "CREATE TABLE qr_notes (id int PRIMARY KEY, body text);"
        "INSERT INTO qr_notes VALUES (1, 'a'), (2, 'b'), (3, 'c');"
        "CREATE TABLE qr_people (id int PRIMARY KEY, ssn text);"
        f"INSERT INTO qr_people VALUES (1, '{SSN}');"
        "GRANT ALL ON qr_notes, qr_people TO PUBLIC;"
    )
    yield
    pg.psql("DROP TABLE qr_notes, qr_people CASCADE")


def policy(
    *, denied: list[str] | None = None, masked: bool = False, max_rows: int | None = None
) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "name": "agents",
        "subjects": {"groups": ["ai-agents"]},
        "allow": {"operations": ["select", "transaction"], "tables": ["public.*", "pg_catalog.*"]},
        "deny": {"tables": denied or []},
    }
    if max_rows is not None:
        rule["limits"] = {"maxRows": max_rows}
    document: dict[str, Any] = {
        "identity": POLICY.identity.model_dump(mode="json", by_alias=True),
        "rules": [rule],
    }
    if masked:
        document["masking"] = {
            "columns": [{"table": "public.qr_people", "column": "ssn", "strategy": "redact"}]
        }
    return document


@pytest.fixture
def reloading(
    make_gateway: Callable[..., RunningGateway], tables: None, tmp_path: Path
) -> Callable[..., RunningGateway]:
    """A gateway on a policy file; ``reload(gw, **policy)`` rewrites it and reloads."""
    policy_file = tmp_path / "policy.json"

    def start(**kwargs: Any) -> RunningGateway:
        policy_file.write_text(json.dumps(policy(**kwargs)))
        return make_gateway(policyFile=str(policy_file), masking={"hashKey": HASH_KEY})

    return start


def reload(gw: RunningGateway, **kwargs: Any) -> None:
    assert gw.gateway.settings.policy_file is not None
    Path(gw.gateway.settings.policy_file).write_text(json.dumps(policy(**kwargs)))

    async def run() -> bool:
        return gw.gateway.reload_policy()

    assert gw.call(run())


def test_a_statement_prepared_before_a_reload_runs_under_the_new_policy(
    reloading: Callable[..., RunningGateway],
) -> None:
    gw = reloading()
    query = "SELECT body FROM qr_notes WHERE id = %s"
    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        assert conn.execute(query, (1,), prepare=True).fetchone() == ("a",)
        reload(gw, denied=["public.qr_notes"])
        # psycopg runs its prepared statement: Bind and Execute, no Parse.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="qr_notes is denied"):
            conn.execute(query, (2,), prepare=True)
        # Refused again the next time, and the session serves what is allowed.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="qr_notes is denied"):
            conn.execute(query, (3,), prepare=True)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # Allowed again by the next reload: the same prepared statement runs.
        reload(gw)
        assert conn.execute(query, (2,), prepare=True).fetchone() == ("b",)


def test_a_portal_bound_before_a_reload_runs_under_the_new_policy(
    reloading: Callable[..., RunningGateway],
) -> None:
    gw = reloading()

    async def run() -> tuple[list[Any], BaseException | None]:
        conn = await asyncpg.connect(
            host=gw.host,
            port=gw.port,
            user="alice",
            password=token_for("alice"),
            database=DATABASE,
            ssl=False,
        )
        try:
            async with conn.transaction():
                statement = await conn.prepare("SELECT id FROM qr_notes ORDER BY id")
                cursor = await statement.cursor()
                first = await cursor.fetch(1)  # Bind a named portal, Execute 1 row
                # The gateway reloads while the client waits (this loop is blocked).
                reload(gw, denied=["public.qr_notes"])
                try:
                    await cursor.fetch(1)  # Execute the same portal again
                except asyncpg.PostgresError as exc:
                    return [r[0] for r in first], exc
            return [r[0] for r in first], None
        finally:
            await conn.close()

    first, error = asyncio.run(run())
    assert first == [1]
    assert isinstance(error, asyncpg.exceptions.InsufficientPrivilegeError), error
    assert "qr_notes is denied" in str(error)


def test_masking_added_by_a_reload_reaches_open_sessions(
    reloading: Callable[..., RunningGateway],
) -> None:
    gw = reloading()
    query = "SELECT ssn FROM qr_people WHERE id = %s"
    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        assert conn.execute(query, (1,), prepare=True).fetchone() == (SSN,)
        assert conn.execute("SELECT id, ssn FROM qr_people").fetchall() == [(1, SSN)]
        reload(gw, masked=True)
        # A simple query, a new extended-protocol statement and the statement prepared
        # before the reload: every one is masked now.
        for row in (
            conn.execute("SELECT id, ssn FROM qr_people").fetchone(),
            conn.execute("SELECT id, ssn FROM qr_people WHERE id = %s", (1,)).fetchone(),
            conn.execute(query, (1,), prepare=True).fetchone(),
        ):
            assert row is not None
            assert SSN not in str(row)
            assert "6789" not in str(row)
        # Lifted again: the session reads the values as the policy now allows.
        reload(gw)
        assert conn.execute(query, (1,), prepare=True).fetchone() == (SSN,)


def test_a_row_limit_added_by_a_reload_reaches_open_sessions(
    reloading: Callable[..., RunningGateway],
) -> None:
    gw = reloading()
    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        assert len(conn.execute("SELECT id FROM qr_notes").fetchall()) == 3
        reload(gw, max_rows=2)
        with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="more than 2 rows"):
            conn.execute("SELECT id FROM qr_notes").fetchall()
        assert len(conn.execute("SELECT id FROM qr_notes LIMIT 2").fetchall()) == 2


def test_a_statement_held_for_approval_across_a_reload_that_denies_it_does_not_run(
    make_gateway: Callable[..., RunningGateway],
    tables: None,
    pg: EphemeralCluster,
    tmp_path: Path,
) -> None:
    import urllib.request

    from held_statement import HeldStatement

    def approvals_policy(denied: list[str]) -> dict[str, Any]:
        document = policy(denied=denied)
        document["rules"][0]["allow"]["operations"] = ["select", "delete"]
        document["rules"][0]["review"] = {"operations": ["delete"]}
        document["rules"].append(
            {"name": "dba", "subjects": {"groups": ["dba"]}, "allow": {"operations": ["*"]}}
        )
        document["approvals"] = {"approvers": {"groups": ["dba"]}, "hold": "20s"}
        return document

    pg.psql("INSERT INTO qr_notes VALUES (4, 'd') ON CONFLICT DO NOTHING")
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps(approvals_policy([])))
    gw = make_gateway(
        policyFile=str(policy_file), stateDirectory=str(tmp_path / "state"), admin={"port": 0}
    )
    held = HeldStatement(
        psycopg.connect(gw.dsn("alice"), autocommit=True), "DELETE FROM qr_notes WHERE id = 4"
    )
    review_id = held.review_id()
    # While it waits, the table is denied; then an approver (who may not know) approves.
    policy_file.write_text(json.dumps(approvals_policy(["public.qr_notes"])))

    async def run() -> bool:
        return gw.gateway.reload_policy()

    assert gw.call(run())
    address = gw.gateway.admin_address
    assert address is not None
    request = urllib.request.Request(
        f"http://{address[0]}:{address[1]}/reviews/{review_id}/approve",
        method="POST",
        data=json.dumps({"comment": "ok"}).encode(),
        headers={"Authorization": f"Bearer {token_for('bob')}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10):
        pass
    held.finish()
    assert isinstance(held.error, psycopg.errors.InsufficientPrivilege), held.error
    assert "qr_notes is denied" in str(held.error)
    assert pg.psql("SELECT count(*) FROM qr_notes WHERE id = 4").strip() == "1"
    pg.psql("DELETE FROM qr_notes WHERE id = 4")  # the other tests count three rows


@pytest.fixture
def detecting(
    make_gateway: Callable[..., RunningGateway], tables: None, pg: EphemeralCluster, tmp_path: Path
) -> Iterator[tuple[RunningGateway, Callable[[], None]]]:
    """A masking gateway whose SSN detector sees ``qr_free.note``, and how to reload it."""
    pg.psql(
        "DROP TABLE IF EXISTS qr_free; CREATE TABLE qr_free (id int, note text);"
        f"INSERT INTO qr_free VALUES (1, 'call me, ssn {SSN}'); GRANT ALL ON qr_free TO PUBLIC;"
    )
    document = policy(masked=True)
    document["rules"][0]["allow"]["operations"] = ["select", "copy_out"]
    document["masking"]["detectors"] = ["ssn"]
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps(document))
    gw = make_gateway(policyFile=str(policy_file), masking={"hashKey": HASH_KEY})

    def change() -> None:
        document["rules"][0]["deny"]["tables"].append("public.qr_notes")  # any change will do
        policy_file.write_text(json.dumps(document))
        assert gw.call(_reload(gw))

    yield gw, change
    pg.psql("DROP TABLE qr_free")


def _run_ambiguous(
    gw: RunningGateway, change: Callable[[], None], confirmed: str, other: str
) -> list[Message]:
    """Prepare ``confirmed`` as s1, reload, then pipeline a Parse of ``other`` under the
    same name (the server rejects the duplicate) with an Execute of s1. After the reload
    both texts are decided, each with its own masking plan: which applies is not known.
    """
    with RawClient.to(gw) as client:
        client.login("alice")
        client.send(codec.parse("s1", confirmed) + SYNC)
        assert [m.mtype for m in client.read_until(b"Z")] == [b"1", b"Z"]
        change()
        client.send(codec.parse("s1", other) + SYNC + bind("", "s1") + execute() + SYNC)
        messages: list[Message] = []
        while sum(m.mtype == b"Z" for m in messages) < 2:
            message = client.read_message()
            assert message is not None, [m.mtype for m in messages]
            messages.append(message)
    return messages


def test_copy_rows_of_a_statement_whose_masking_is_ambiguous_after_a_reload_are_withheld(
    detecting: tuple[RunningGateway, Callable[[], None]],
) -> None:
    # DataRows of such a statement are masked whole; COPY rows, one line of text each,
    # cannot be: none may pass, or the content detectors would be skipped for them.
    gw, change = detecting
    copy = "COPY (SELECT note FROM qr_free) TO STDOUT"
    with RawClient.to(gw) as client:
        client.login("alice")
        plain = b"".join(m.frame for m in client.simple_query(copy))
    assert SSN.encode() not in plain and b"call me" in plain  # the detector at work
    messages = _run_ambiguous(gw, change, copy, "COPY (SELECT note || '' FROM qr_free) TO STDOUT")
    assert SSN.encode() not in b"".join(m.frame for m in messages)
    errors = [m.fields for m in messages if m.mtype == b"E"]
    assert [e["C"] for e in errors] == ["42P05", "42501"], errors
    assert "cannot tell which masking applies" in errors[1]["M"]


def test_an_error_of_a_statement_whose_masking_is_ambiguous_after_a_reload_is_scrubbed(
    detecting: tuple[RunningGateway, Callable[[], None]],
) -> None:
    # The server's error quotes the value it could not convert: with no plan to say what
    # is safe, it is scrubbed as a masked column's error would be.
    gw, change = detecting
    messages = _run_ambiguous(
        gw, change, "SELECT note::int FROM qr_free", "SELECT note::bigint FROM qr_free"
    )
    assert SSN.encode() not in b"".join(m.frame for m in messages)
    errors = [m.fields for m in messages if m.mtype == b"E"]
    assert [e["C"] for e in errors] == ["42P05", "22P02"], errors
    assert "invalid input syntax" in errors[1]["M"]


async def _reload(gw: RunningGateway) -> bool:
    return gw.gateway.reload_policy()
