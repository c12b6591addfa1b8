"""The gateway's ``GET /metrics`` on the admin port, scraped like Prometheus scrapes it.

A real gateway in front of the real PostgreSQL, real clients (psycopg), and a plain HTTP
GET without a token; the text is read by Prometheus's own parser and by a strict reader.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway_harness import DATABASE, POLICY, RunningGateway, token_for
from prometheus_text import parse, promtext
from querywarden.devcluster import EphemeralCluster
from querywarden.policy import PolicyDocument

RULES = [
    {
        "name": "agents-read",
        "subjects": {"groups": ["ai-agents"]},
        "allow": {"operations": ["select"], "tables": ["public.*", "pg_catalog.*"]},
        "deny": {"tables": ["public.qm_secrets"]},
    }
]
MASKING = {"columns": [{"table": "public.qm_people", "column": "ssn", "strategy": "redact"}]}
SECRET_VALUE = "123-45-6789"


@pytest.fixture(scope="module")
def tables(pg: EphemeralCluster) -> Iterator[None]:
    pg.psql(
        "CREATE TABLE IF NOT EXISTS qm_people (id int, ssn text);"
        "CREATE TABLE IF NOT EXISTS qm_secrets (id int);"
        "GRANT ALL ON qm_people, qm_secrets TO PUBLIC;"
        f"TRUNCATE qm_people; INSERT INTO qm_people VALUES (1, '{SECRET_VALUE}'), (2, NULL);"
    )
    yield
    pg.psql("DROP TABLE qm_people, qm_secrets")


def _policy() -> PolicyDocument:
    return PolicyDocument.model_validate(
        {"identity": POLICY.identity.model_dump(by_alias=True), "rules": RULES, "masking": MASKING}
    )


def _get(gw: RunningGateway, path: str, method: str = "GET") -> tuple[int, str, str]:
    address = gw.gateway.admin_address
    assert address is not None
    request = urllib.request.Request(f"http://{address[0]}:{address[1]}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()


def _scrape(gw: RunningGateway) -> tuple[str, dict[str, Any]]:
    status, content_type, text = _get(gw, "/metrics")
    assert status == 200, text
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    parse(text)  # strict: raises on anything the format does not allow
    return text, promtext(text)


def _samples(families: dict[str, Any], name: str) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = families[name]["samples"]
    return samples


def test_a_scrape_shows_statements_connections_and_refusals(
    make_gateway: Callable[..., RunningGateway],
    tables: None,
    pg: EphemeralCluster,
    tmp_path: Path,
) -> None:
    gw = make_gateway(
        policy=_policy(), audit={"directory": str(tmp_path / "audit")}, admin={"port": 0}
    )
    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        rows = conn.execute("SELECT id, ssn FROM qm_people ORDER BY id").fetchall()
        assert rows[0][1] != SECRET_VALUE  # masked
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM qm_secrets")
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM qm_missing")
        text, families = _scrape(gw)

        # One upstream connection, held by the open session.
        (connections,) = _samples(families, "db_client_connection_count")
        assert connections["value"] == 1
        assert connections["labels"] == {
            "db_client_connection_state": "used",
            "db_client_connection_pool_name": f"127.0.0.1:{pg.port}/{DATABASE}",
        }

    decisions = {
        (s["labels"]["outcome"], s["labels"].get("rule")): s["value"]
        for s in _samples(families, "querywarden_decisions_total")
    }
    # Every decision names its rule: the one that allowed, the one that refused.
    assert decisions[("allow", "agents-read")] == 2
    assert decisions[("refuse", "agents-read")] == 1
    (masked,) = _samples(families, "querywarden_masked_values_total")
    assert masked["value"] == 1  # one ssn; the NULL stays NULL

    durations = {
        s["labels"].get("error_type"): s
        for s in _samples(families, "db_client_operation_duration_seconds")
    }
    ok = durations[None]
    assert ok["labels"] == {
        "db_system_name": "postgresql",
        "db_namespace": DATABASE,
        "server_address": "127.0.0.1",
        "server_port": str(pg.port),
        "querywarden_decision": "allow",
    }
    assert ok["count"] == 1
    # Seconds, not milliseconds: a local SELECT is well under a second.
    assert 0 < ok["sum"] < 1
    assert durations["42P01"]["labels"]["db_response_status_code"] == "42P01"
    assert durations["42501"]["labels"]["querywarden_decision"] == "refuse"

    # Counts and labels only: no identity, statement, table or value, no token.
    for secret in ("alice", "qm_people", "qm_secrets", "SELECT", SECRET_VALUE, token_for("alice")):
        assert secret not in text

    # The connection's end is counted too.
    deadline = time.monotonic() + 10
    while True:
        (connections,) = _samples(_scrape(gw)[1], "db_client_connection_count")
        if connections["value"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert connections["value"] == 0


def test_a_refused_connection_is_counted_by_its_sqlstate(
    make_gateway: Callable[..., RunningGateway], tables: None, tmp_path: Path
) -> None:
    gw = make_gateway(
        policy=_policy(), audit={"directory": str(tmp_path / "audit")}, admin={"port": 0}
    )
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(gw.dsn("mallory"))
    _, families = _scrape(gw)
    reasons = {
        s["labels"]["reason"]: s["value"]
        for s in _samples(families, "querywarden_auth_refused_total")
    }
    # An SQLSTATE (invalid_password: not a token), never the reason's text.
    assert reasons == {"28P01": 1}
    # Nothing was connected upstream for it (a family without samples is left out).
    connections = families.get("db_client_connection_count", {"samples": []})["samples"]
    assert all(s["value"] == 0 for s in connections)


def test_only_get_and_without_an_audit_log_a_clear_404(
    make_gateway: Callable[..., RunningGateway], tables: None, tmp_path: Path
) -> None:
    audited = make_gateway(
        policy=_policy(), audit={"directory": str(tmp_path / "audit")}, admin={"port": 0}
    )
    status, _, body = _get(audited, "/metrics", method="POST")
    assert status == 405
    assert "GET" in body

    unaudited = make_gateway(policy=_policy(), admin={"port": 0})
    status, content_type, body = _get(unaudited, "/metrics")
    assert status == 404
    assert content_type.startswith("application/json")
    assert "audit.directory" in body


DASHBOARD = Path(__file__).resolve().parents[1] / "examples" / "dashboards" / "querywarden.json"
#: What Prometheus adds to every scraped series itself (the scrape config's job, the target).
SCRAPE_LABELS = {"job", "instance"}
# A metric is followed by its selector; a label (querywarden_decision) is not.
_METRIC = re.compile(r"\b((?:querywarden|db_client)_[a-z_]+)\{")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def test_the_dashboard_reads_a_direct_scrape_without_kubernetes(
    make_gateway: Callable[..., RunningGateway], tables: None, tmp_path: Path
) -> None:
    """Every metric and label the example dashboard queries is in ``GET /metrics``.

    Labels only a Kubernetes deployment has (the Collector's k8sattributes) may appear
    only as a ``=~"$var"`` filter whose variable's All is ``.*``, which also matches
    series without the label: the dashboard falls back instead of showing nothing.
    """
    gw = make_gateway(
        policy=_policy(), audit={"directory": str(tmp_path / "audit")}, admin={"port": 0}
    )
    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        conn.execute("SELECT id FROM qm_people").fetchall()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM qm_secrets")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(gw.dsn("mallory"))
        _, families = _scrape(gw)
    series: dict[str, set[str]] = {}
    for name, family in families.items():
        suffixes = ("_bucket", "_sum", "_count") if family["type"] == "HISTOGRAM" else ("",)
        labels = {label for s in family["samples"] for label in s["labels"]} | SCRAPE_LABELS
        for suffix in suffixes:
            series[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())

    dashboard = json.loads(DASHBOARD.read_text())
    fallbacks = {v["name"] for v in dashboard["templating"]["list"] if v.get("allValue") == ".*"}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"] if "expr" in t]
    assert exprs
    for variable in dashboard["templating"]["list"]:
        metric, _, label = variable["definition"].removeprefix("label_values(").partition(",")
        exprs.append(f'{metric}{{{label.strip(" )")}=~"${variable["name"]}"}}')
    for expr in exprs:
        used = set(_METRIC.findall(expr))
        assert used, expr
        assert used <= set(series), (expr, used - set(series))
        available = set().union(*(series[name] for name in used))
        grouped = {
            label.strip()
            for group in re.findall(r"by \(([^)]*)\)", expr)
            for label in group.split(",")
        }
        assert grouped <= available, (expr, grouped - available)
        for label, operator, value in _MATCHER.findall(expr):
            if label in available:
                continue
            # Not in a direct scrape: only a filter that its All turns into "match all".
            assert operator == "=~" and value.startswith("$"), (expr, label)
            assert value[1:] in fallbacks, (expr, label)


def test_a_name_utf8_cannot_carry_does_not_break_the_scrape(
    make_gateway: Callable[..., RunningGateway], tables: None, tmp_path: Path
) -> None:
    # A rule named in a JSON policy may hold a lone surrogate ("\ud800" is valid JSON).
    gw = make_gateway(
        policy=_policy(), audit={"directory": str(tmp_path / "audit")}, admin={"port": 0}
    )
    assert gw.gateway.auditor is not None and gw.gateway.auditor.metrics is not None
    gw.gateway.auditor.metrics.decision("refuse", "odd \ud800 rule")
    _, families = _scrape(gw)
    rules = {s["labels"].get("rule") for s in _samples(families, "querywarden_decisions_total")}
    assert "odd ? rule" in rules
