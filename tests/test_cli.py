"""The console script: `querywarden serve` and `querywarden demo`, as a user runs them."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from querywarden.cli import _build_parser
from querywarden.devcluster import ROLE_PASSWORD, EphemeralCluster, free_port, wait_for_port

QUERYWARDEN = [sys.executable, "-m", "querywarden"]


def psql(dsn: str, sql: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    if password:
        env["PGPASSWORD"] = password
    return subprocess.run(
        ["psql", dsn, "-X", "-A", "-t", "-c", sql],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_serve_from_config_file(pg: EphemeralCluster, tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "upstream-password").write_text(ROLE_PASSWORD + "\n")
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"""
listen: {{host: 127.0.0.1, port: {port}}}
upstream:
  host: 127.0.0.1
  port: {pg.port}
  user: qw_scram
  passwordFile: upstream-password
  sslmode: require
policyFile: policy.yaml
"""
    )
    (tmp_path / "policy.yaml").write_text(
        "identity:\n  issuers:\n    - {name: dev, kind: dev, keyFile: dev-issuer.pem}\n"
        "rules:\n  - {name: all, subjects: {users: [carol]}, allow: {operations: ['*'], "
        "tables: ['*']}}\n"
    )
    minted = subprocess.run(
        [*QUERYWARDEN, "token", "--key-file", str(tmp_path / "dev-issuer.pem"), "--sub", "carol"],
        capture_output=True,
        text=True,
        check=True,
    )
    token = minted.stdout.strip()
    assert (tmp_path / "dev-issuer.pem").stat().st_mode & 0o777 == 0o600
    proc = subprocess.Popen(
        [*QUERYWARDEN, "--log-level", "WARNING", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port("127.0.0.1", port)
        result = psql(
            f"host=127.0.0.1 port={port} dbname=app user=carol", "SELECT current_user", token
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "qw_scram"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, errors = proc.communicate(timeout=15)
    assert proc.returncode == 0, errors


def test_serve_refuses_invalid_settings(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("upstream:\n  sslmode: sometimes\n")
    result = subprocess.run(
        [*QUERYWARDEN, "serve", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "invalid settings" in result.stderr
    assert "upstream.sslmode" in result.stderr


@pytest.mark.slow
def test_demo_prints_a_working_psql_line_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            *QUERYWARDEN,
            "--log-level",
            "WARNING",
            "demo",
            "--port",
            str(port),
            "--admin-port",
            str(free_port()),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        banner = "".join(lines)
        # The banner says how the DBA approves held statements, through the admin API.
        admin = re.search(r"reviews list --url (http://\S+)", banner)
        assert admin, banner
        logins = {}
        for who in ("agent", "dba"):
            match = re.search(
                rf"PGPASSWORD=\$\((.+?)\) \\\n\s+psql \"([^\"]+user={who}[^\"]*)\"", banner
            )
            assert match, banner
            token = subprocess.run(
                match[1].split(), capture_output=True, text=True, check=True, cwd=tmp_path
            ).stdout.strip()
            # The demo offers TLS, and the printed line asks for it.
            assert "sslmode=require" in match[2]
            logins[who] = (match[2], token)
        # Both identities read customers ...
        for dsn, token in logins.values():
            result = psql(dsn, "SELECT count(*) FROM customers", token)
            assert result.returncode == 0, result.stderr
            assert int(result.stdout) == 4
        # ... but only the DBA may read the API keys: two identities, two treatments.
        agent = psql(*logins["agent"][:1], "SELECT count(*) FROM api_keys", logins["agent"][1])
        assert agent.returncode != 0
        assert "public.api_keys is denied by rule ai-agents-read" in agent.stderr
        dba = psql(logins["dba"][0], "SELECT count(*) FROM api_keys", logins["dba"][1])
        assert dba.returncode == 0, dba.stderr
        assert int(dba.stdout) == 2
        # Personal data is masked for the agent, not for the DBA.
        ssn = "SELECT ssn FROM customers ORDER BY id LIMIT 1"
        masked = psql(logins["agent"][0], ssn, logins["agent"][1])
        real = psql(logins["dba"][0], ssn, logins["dba"][1])
        assert masked.returncode == 0 and real.returncode == 0, masked.stderr + real.stderr
        assert masked.stdout.strip() != real.stdout.strip()
        assert masked.stdout.strip()[-4:] == real.stdout.strip()[-4:]
        # The admin API answers the DBA (no reviews yet).
        token = subprocess.run(
            [*QUERYWARDEN, "token", "--key-file", ".querywarden/dev-issuer.pem", "--sub", "dba",
             "--groups", "dba,dba-oncall"],
            capture_output=True, text=True, check=True, cwd=tmp_path,
        ).stdout.strip()  # fmt: skip
        listed = subprocess.run(
            [*QUERYWARDEN, "reviews", "list", "--url", admin[1], "--token", token, "--json"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "stopping PostgreSQL" in rest


EXAMPLE_POLICY = Path(__file__).resolve().parents[1] / "examples" / "policy.yaml"


def test_check_evaluates_a_statement_offline() -> None:
    def check(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*QUERYWARDEN, "check", "--policy", str(EXAMPLE_POLICY), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    allowed = check("--sub", "agent-7", "--groups", "ai-agents", "SELECT * FROM orders")
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.startswith("ALLOW")
    denied = check("--sub", "agent-7", "--groups", "ai-agents", "--json", "TABLE api_keys")
    assert denied.returncode == 1
    verdict = json.loads(denied.stdout)
    assert verdict["outcome"] == "deny"
    assert verdict["rule"] == "ai-agents-read"
    assert "public.api_keys" in verdict["reason"]
    broken = check("--sub", "agent-7", "--groups", "ai-agents", "DELET FROM orders")
    assert broken.returncode == 1
    assert "syntax error" in broken.stdout
    # The table of PostgreSQL's functions is built in: offline decides as the gateway does.
    for sql, reason in (
        ("SELECT pg_stat_reset()", "pg_stat_reset(), a function with side effects"),
        ("SELECT * FROM pg_catalog.pg_stats", "pg_catalog.pg_stats is refused"),
    ):
        side = check("--sub", "agent-7", "--groups", "ai-agents", "--json", sql)
        assert side.returncode == 1
        assert reason in json.loads(side.stdout)["reason"]


def test_check_resolves_unqualified_names_as_the_server_would(tmp_path: Path) -> None:
    public_only = tmp_path / "policy.yaml"
    public_only.write_text(
        "rules:\n"
        "  - name: public-only\n"
        "    subjects: {groups: [ai-agents]}\n"
        "    allow: {operations: [select], tables: ['public.*']}\n"
    )
    base = [*QUERYWARDEN, "check", "--policy", str(public_only), "--sub", "a"]

    def check(*args: str) -> dict[str, str]:
        done = subprocess.run(
            [*base, "--groups", "ai-agents", "--json", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode in (0, 1), done.stderr
        verdict: dict[str, str] = json.loads(done.stdout)
        return verdict

    # The shipped list of pg_catalog's relations: orders is public.orders only.
    assert check("SELECT * FROM orders")["outcome"] == "allow"
    assert "(as pg_catalog.pg_class)" in check("SELECT * FROM pg_class")["reason"]
    # A snapshot of another server's catalog (scripts/catalog_relations.py --output).
    snapshot = tmp_path / "catalog.json"
    snapshot.write_text(json.dumps({"postgresql": "99", "relations": ["pg_class", "orders"]}))
    refused = check("--catalog", str(snapshot), "SELECT * FROM orders")
    assert refused["outcome"] == "deny"
    assert "orders (as pg_catalog.orders)" in refused["reason"]
    snapshot.write_text("{}")
    broken = subprocess.run(
        [*base, "--catalog", str(snapshot), "SELECT 1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert broken.returncode == 2
    assert "invalid catalog snapshot" in broken.stderr


def test_policy_validate(tmp_path: Path) -> None:
    ok = subprocess.run(
        [*QUERYWARDEN, "policy", "validate", str(EXAMPLE_POLICY)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "2 rules" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "rules:\n  - {name: r, subjects: {groups: [g]}, allow: {operations: [sellect]}}\n"
    )
    refused = subprocess.run(
        [*QUERYWARDEN, "policy", "validate", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2
    assert "unknown operation 'sellect'" in refused.stderr
    assert "rules.0.allow.operations" in refused.stderr


def _help_pages(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], str]]:
    """Every command's --help text, found by walking the parser (new commands included)."""
    yield path, parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _help_pages(sub, (*path, name))


def test_help_is_plain_text() -> None:
    top = subprocess.run([*QUERYWARDEN, "--help"], capture_output=True, text=True, timeout=60)
    assert top.returncode == 0, top.stderr
    assert "PostgreSQL security gateway" in top.stdout
    pages = dict(_help_pages(_build_parser()))
    pages[("(as printed)",)] = top.stdout
    # Every leaf command the docs name is among them, so the walk did reach the leaves.
    for command in (("audit", "verify"), ("audit", "tail"), ("reviews", "approve"), ("demo",)):
        assert command in pages
    markup = re.compile(r"``|`[^`]+`|:(?:func|class|meth|mod|attr|data):|\.\. [a-z]+::")
    for command, text in pages.items():
        assert not markup.search(text), (command, text)
