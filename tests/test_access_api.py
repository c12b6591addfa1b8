"""``POST /access`` on the admin port of a real gateway in front of the real PostgreSQL.

The answer comes from the gateway's own policy engine and masking, over the catalog it
reads from the database (a partition of a masked table has its parent's columns), for
the token's own identity, and follows policy reloads.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway_harness import DATABASE, POLICY, RunningGateway, token_for
from querywarden.devcluster import EphemeralCluster
from querywarden.policy import PolicyDocument

HASH_KEY = "test-masking-key-0123456789abcdef"

RULES: list[dict[str, Any]] = [
    {
        "name": "agents-read",
        "subjects": {"groups": ["ai-agents", "support"]},
        "allow": {"operations": ["select", "update"], "tables": ["public.*"]},
        "deny": {"tables": ["public.qa_secrets"]},
        "review": {"operations": ["delete"]},
    },
    {
        "name": "dba-all",
        "subjects": {"groups": ["dba"]},
        "allow": {"operations": ["*"], "tables": ["*"]},
    },
]
MASKING: dict[str, Any] = {
    "columns": [
        {"table": "public.qa_customers", "column": "ssn", "strategy": "partial", "keepLast": 4},
        {
            "table": "public.qa_customers",
            "column": "email",
            "strategy": "hash",
            "overrides": [{"groups": ["support"], "strategy": "none"}],
        },
        {"table": "qa_customers", "column": "name"},
    ],
    "detectors": ["ssn", "email"],
    "exempt": {"groups": ["dba"]},
}
OPERATIONS = ("select", "insert", "update", "delete")


@pytest.fixture(scope="module")
def tables(pg: EphemeralCluster) -> Iterator[None]:
    pg.psql(
        "CREATE TABLE IF NOT EXISTS qa_customers (id int, name text, ssn text, email text, "
        "region text) PARTITION BY LIST (region);"
        "CREATE TABLE IF NOT EXISTS qa_customers_eu PARTITION OF qa_customers FOR VALUES IN ('eu');"
        "CREATE TABLE IF NOT EXISTS qa_secrets (id int);"
        "CREATE TABLE IF NOT EXISTS qa_orders (id int, total int);"
    )
    yield
    pg.psql("DROP TABLE qa_customers, qa_secrets, qa_orders")


def _document(rules: list[dict[str, Any]], masking: dict[str, Any]) -> dict[str, Any]:
    return {
        "identity": POLICY.identity.model_dump(mode="json", by_alias=True),
        "rules": rules,
        "masking": masking,
    }


def _gateway(make_gateway: Callable[..., RunningGateway], **settings: Any) -> RunningGateway:
    if "policyFile" not in settings:
        settings["policy"] = PolicyDocument.model_validate(_document(RULES, MASKING))
    return make_gateway(admin={"port": 0}, masking={"hashKey": HASH_KEY}, **settings)


def _post(
    gw: RunningGateway,
    body: Any,
    user: str | None = "alice",
    *,
    path: str = "/access",
    method: str = "POST",
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any]]:
    address = gw.gateway.admin_address
    assert address is not None
    headers = {"Content-Type": "application/json"}
    if user is not None:
        headers["Authorization"] = f"Bearer {token_for(user)}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(
        f"http://{address[0]}:{address[1]}{path}", method=method, data=data, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def _ask(gw: RunningGateway, user: str, *relations: str) -> dict[str, Any]:
    status, answer = _post(gw, {"database": DATABASE, "relations": list(relations)}, user)
    assert status == 200, answer
    return answer


def _outcomes(relation: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    return {op: (found["outcome"], found["rule"]) for op, found in relation["operations"].items()}


def test_an_agent_sees_its_operations_and_masked_columns(
    make_gateway: Callable[..., RunningGateway], tables: None
) -> None:
    gw = _gateway(make_gateway)
    answer = _ask(
        gw,
        "alice",
        "public.qa_customers",
        "public.qa_customers_eu",
        "public.qa_secrets",
        "public.qa_orders",
    )
    assert answer["subject"] == "alice"
    assert answer["database"] == DATABASE
    assert answer["masked"] is True
    assert answer["detectors"] == ["ssn", "email"]
    customers, partition, secrets, orders = answer["relations"]
    assert customers["relation"] == "public.qa_customers"
    assert list(customers["operations"]) == list(OPERATIONS)
    assert _outcomes(customers) == {
        "select": ("allow", "agents-read"),
        "insert": ("deny", "agents-read"),
        "update": ("allow", "agents-read"),
        "delete": ("review", "agents-read"),
    }
    assert customers["operations"]["delete"]["reason"] == "DELETE needs approval (rule agents-read)"
    assert "INSERT is not allowed" in customers["operations"]["insert"]["reason"]
    assert customers["masked"] == {"email": "hash", "name": "redact", "ssn": "partial"}
    # The catalog knows the partition: its rows are the parent's, masked the same way.
    assert partition["masked"] == customers["masked"]
    assert {found["outcome"] for found in secrets["operations"].values()} == {"deny"}
    assert (
        secrets["operations"]["select"]["reason"]
        == "public.qa_secrets is denied by rule agents-read"
    )
    assert orders["masked"] == {}
    assert orders["operations"]["select"]["outcome"] == "allow"


def test_overrides_and_exemptions_are_per_identity(
    make_gateway: Callable[..., RunningGateway], tables: None
) -> None:
    gw = _gateway(make_gateway)
    support = _ask(gw, "carol", "public.qa_customers")
    assert support["subject"] == "carol" and support["masked"] is True
    assert support["relations"][0]["masked"] == {"name": "redact", "ssn": "partial"}  # email: none
    dba = _ask(gw, "bob", "public.qa_customers", "public.qa_secrets")
    assert dba["masked"] is False and dba["detectors"] == []
    assert [r["masked"] for r in dba["relations"]] == [{}, {}]
    assert {found["outcome"] for r in dba["relations"] for found in r["operations"].values()} == {
        "allow"
    }
    # Someone no rule names: every operation denied, with the reason, and still masked.
    stranger = _ask(gw, "mallory", "public.qa_orders")
    select = stranger["relations"][0]["operations"]["select"]
    assert select["outcome"] == "deny" and select["rule"] is None
    assert "no rule of the policy applies to mallory" in select["reason"]


def test_asked_columns_limit_the_masked_ones(
    make_gateway: Callable[..., RunningGateway], tables: None
) -> None:
    gw = _gateway(make_gateway)
    body = {
        "database": DATABASE,
        "relations": [{"relation": "public.qa_customers", "columns": ["id", "ssn"]}],
    }
    status, answer = _post(gw, body)
    assert status == 200, answer
    assert answer["relations"][0]["masked"] == {"ssn": "partial"}


def test_tokens_are_required_and_checked(
    make_gateway: Callable[..., RunningGateway], tables: None
) -> None:
    gw = _gateway(make_gateway)
    body = {"database": DATABASE, "relations": ["public.qa_customers"]}
    status, answer = _post(gw, body, None)
    assert status == 401 and "Bearer" in answer["error"]
    address = gw.gateway.admin_address
    assert address is not None
    request = urllib.request.Request(
        f"http://{address[0]}:{address[1]}/access",
        method="POST",
        data=json.dumps(body).encode(),
        headers={"Authorization": "Bearer not-a-token"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    refused.value.close()
    # Without a token even a bad body learns nothing but 401.
    assert _post(gw, {"nonsense": 1}, None)[0] == 401
    assert _post(gw, None, method="GET")[0] == 405


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (None, "database is required"),
        ({"relations": ["public.qa_customers"]}, "database is required"),
        ({"database": DATABASE}, "relations is required"),
        ({"database": DATABASE, "relations": "public.qa_customers"}, "relations is required"),
        ({"database": DATABASE, "relations": ["qa_customers"]}, "schema-qualified"),
        ({"database": DATABASE, "relations": ["public.*"]}, "one table"),
        ({"database": DATABASE, "relations": [7]}, "must be a string"),
        ({"database": DATABASE, "relations": ["public.t"] * 501}, "at most 500 relations"),
        ({"database": DATABASE, "relations": [], "subject": "bob"}, "unknown fields"),
        ({"database": DATABASE, "relations": [{"relation": "public.t", "x": 1}]}, "unknown fields"),
        ([], "must be a JSON object"),
    ],
)
def test_bad_bodies_get_400_with_the_reason(
    make_gateway: Callable[..., RunningGateway], tables: None, body: Any, message: str
) -> None:
    gw = _gateway(make_gateway)
    status, answer = _post(gw, body)
    assert status == 400, answer
    assert message in answer["error"]


def test_malformed_json_gets_400(make_gateway: Callable[..., RunningGateway], tables: None) -> None:
    gw = _gateway(make_gateway)
    status, answer = _post(gw, None, raw=b"{not json")
    assert status == 400 and "not JSON" in answer["error"]


def test_an_unreadable_catalog_is_503_not_a_guess(
    make_gateway: Callable[..., RunningGateway], tables: None
) -> None:
    gw = _gateway(make_gateway)
    body = {"database": "qa_no_such_database", "relations": ["public.qa_customers"]}
    status, answer = _post(gw, body, "alice")
    assert status == 503, answer
    assert "could not read the catalog" in answer["error"]
    # An exempt identity needs no catalog: nothing is masked for it anyway.
    status, answer = _post(gw, body, "bob")
    assert status == 200, answer
    assert answer["relations"][0]["masked"] == {}
    # The failed catalog connection closes its TLS (close_notify) after the answer; the
    # gateway's loop is closed at teardown only once that is done.
    time.sleep(0.5)


def test_the_answer_follows_policy_reloads(
    make_gateway: Callable[..., RunningGateway], tables: None, tmp_path: Path
) -> None:
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps(_document(RULES, MASKING)))
    gw = _gateway(make_gateway, policyFile=str(policy_file))
    before = _ask(gw, "alice", "public.qa_customers")["relations"][0]
    assert before["operations"]["delete"]["outcome"] == "review"
    assert before["masked"]["ssn"] == "partial"

    rules = json.loads(json.dumps(RULES))
    rules[0]["review"] = {}
    rules[0]["deny"]["operations"] = ["delete"]
    masking = json.loads(json.dumps(MASKING))
    masking["columns"][0]["strategy"] = "redact"
    masking["exempt"]["users"] = ["carol"]
    policy_file.write_text(json.dumps(_document(rules, masking)))
    assert gw.gateway.reload_policy()

    after = _ask(gw, "alice", "public.qa_customers")["relations"][0]
    assert after["operations"]["delete"]["outcome"] == "deny"
    assert after["operations"]["delete"]["reason"] == "DELETE is denied by rule agents-read"
    assert after["masked"] == {"email": "hash", "name": "redact", "ssn": "redact"}
    carol = _ask(gw, "carol", "public.qa_customers")
    assert carol["masked"] is False and carol["relations"][0]["masked"] == {}


def test_a_database_the_gateway_does_not_serve_is_400(
    make_gateway: Callable[..., RunningGateway], tables: None
) -> None:
    gw = _gateway(make_gateway, upstream={"database": DATABASE})
    status, answer = _post(gw, {"database": "postgres", "relations": ["public.qa_orders"]})
    assert status == 400, answer
    assert f'serves only database "{DATABASE}"' in answer["error"]
    assert _ask(gw, "alice", "public.qa_orders")["relations"][0]["masked"] == {}
