"""`querywarden demo` as a user runs it: the banner, and every guarantee it promises.

The demo is started for real (its own PostgreSQL, the gateway, the reviews API, and the
OpenTelemetry Collector that `make tools` built), and driven only through what its
banner prints: psql lines, the reviews commands, the policy file and the audit commands.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from browser_helpers import chromium, console_log_in
from querywarden.demo import find_collector

pytestmark = pytest.mark.slow

QUERYWARDEN = [sys.executable, "-m", "querywarden"]
START_TIMEOUT = 120.0


@dataclass
class Demo:
    """A running demo and what its banner says."""

    process: subprocess.Popen[str]
    banner: str
    cwd: Path
    #: Seconds from the command to the banner's last line.
    started_in: float
    tokens: dict[str, str] = field(default_factory=dict)

    def line(self, pattern: str) -> re.Match[str]:
        match = re.search(pattern, self.banner, re.MULTILINE)
        assert match, f"{pattern!r} not in the banner:\n{self.banner}"
        return match

    def port(self, label: str) -> int:
        return int(self.line(rf"^  {re.escape(label)}:\s+127\.0\.0\.1:(\d+)")[1])

    def run(self, command: str, **env: str) -> subprocess.CompletedProcess[str]:
        """A command line exactly as the banner prints it, through a shell."""
        return subprocess.run(
            command,
            shell=True,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.cwd,
            env={**os.environ, **env},
        )

    def _login(self, who: str) -> re.Match[str]:
        """The banner's lines for ``who``: [1] mints the token, [2] runs psql."""
        return self.line(rf"^  PGPASSWORD=\$\((.+--sub {who} .+)\) \\\n\s+(psql \"[^\"]+\")")

    def token(self, who: str) -> str:
        """A token for ``who``, minted with the banner's line (once)."""
        if who not in self.tokens:
            minted = self.run(self._login(who)[1])
            assert minted.returncode == 0, minted.stderr
            self.tokens[who] = minted.stdout.strip()
        return self.tokens[who]

    def psql(self, who: str, sql: str) -> subprocess.CompletedProcess[str]:
        """Run ``sql`` with the banner's psql line for ``who``."""
        command = f"{self._login(who)[2]} -X -A -t -c {_shell_quote(sql)}"
        return self.run(command, PGPASSWORD=self.token(who))

    def psql_held(self, who: str, sql: str) -> subprocess.Popen[str]:
        """Start ``sql`` as ``who`` and leave it running (a statement held for approval)."""
        return subprocess.Popen(
            f"{self._login(who)[2]} -X -A -t -c {_shell_quote(sql)}",
            shell=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.cwd,
            env={**os.environ, "PGPASSWORD": self.token(who)},
        )

    def audit_command(self, name: str) -> str:
        return self.line(rf"^  (\S+ audit {name} .+?)(?:\s+#.*)?$")[1]

    def stop(self) -> str:
        self.process.send_signal(signal.SIGINT)
        rest, _ = self.process.communicate(timeout=60)
        return rest


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def start_demo(cwd: Path, *args: str, env: dict[str, str] | None = None) -> Demo:
    process = subprocess.Popen(
        [*QUERYWARDEN, "--log-level", "WARNING", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None
    lines: list[str] = []
    started = time.monotonic()
    while time.monotonic() - started < START_TIMEOUT:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Press Ctrl-C" in line:
            break
    banner = "".join(lines)
    if "Press Ctrl-C" not in banner:
        process.kill()
        pytest.fail(f"the demo did not start:\n{banner}")
    return Demo(process, banner, cwd, time.monotonic() - started)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """The demo on ``--port 0``, with the Collector `make tools` built."""
    if find_collector() is None:
        pytest.fail("no OpenTelemetry Collector in the tools cache: run `make tools`")
    running = start_demo(tmp_path_factory.mktemp("demo"), "--port", "0")
    yield running
    rest = running.stop()
    assert running.process.returncode == 0, rest


def _listeners() -> dict[int, set[int]]:
    """Listening TCP ports on this machine and the pids that hold them (those we can see)."""
    inodes: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A":  # LISTEN
                inodes[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    holders: dict[int, set[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue  # the process is gone, or not ours to read
        links = []
        for fd in fds:
            # One fd closing during the scan must not hide the process's other sockets.
            with contextlib.suppress(OSError):
                links.append(os.readlink(fd))
        for link in links:
            inode = link[len("socket:[") : -1] if link.startswith("socket:[") else None
            if inode in inodes:
                holders.setdefault(inodes[inode], set()).add(int(proc.name))
    return holders


def _process_tree(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            parents[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree = {root}
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return tree


def _eventually(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.25)


def test_port_zero_opens_only_free_ports_and_prints_each(demo: Demo) -> None:
    gateway = demo.port("gateway")
    reviews = demo.port("reviews API")
    postgres = demo.port("PostgreSQL (direct, for comparison)")
    collector = demo.port("OpenTelemetry Collector (OTLP/HTTP)")
    receiver = demo.port("notification receiver")
    printed = {gateway, reviews, postgres, collector, receiver}
    assert len(printed) == 5 and min(printed) > 1024, demo.banner
    listeners = _listeners()
    tree = _process_tree(demo.process.pid)
    # The gateway, the reviews API, the Collector and the notification receiver: the
    # demo's own processes listen on the printed ports and on nothing else.
    assert {port for port, pids in listeners.items() if pids & tree} == {
        gateway,
        reviews,
        collector,
        receiver,
    }
    # PostgreSQL (started detached by pg_ctl) listens on its printed port alone.
    postmaster = listeners[postgres]
    assert {port for port, pids in listeners.items() if pids & postmaster} == {postgres}
    # The reviews API answers on its printed address.
    with socket.create_connection(("127.0.0.1", reviews), timeout=5):
        pass


def test_banner_shows_every_guarantee_with_its_paths(demo: Demo) -> None:
    # From a directory with no state (a fresh clone), up in well under the minute promised.
    assert demo.started_in < 60, demo.started_in
    state = demo.cwd / ".querywarden"
    audit = state / "audit"
    assert f"The policy is {state / 'policy.yaml'}" in demo.banner
    assert "reloaded within seconds" in demo.banner
    assert "limits.maxRows" in demo.banner and "limits.statementTimeout" in demo.banner
    assert "may not approve their own statement" in demo.banner
    assert f"in the audit log {audit}," in demo.banner
    collector = demo.port("OpenTelemetry Collector (OTLP/HTTP)")
    assert f"OpenTelemetry Collector at http://127.0.0.1:{collector}" in demo.banner
    assert demo.audit_command("tail").endswith(f"audit tail {audit} --follow")
    assert demo.audit_command("replay").endswith(f"audit replay {audit} SESSION")
    assert demo.audit_command("verify").endswith(f"audit verify {audit}")
    policy = yaml.safe_load((state / "policy.yaml").read_text())
    agent = next(rule for rule in policy["rules"] if rule["name"] == "ai-agents-read")
    assert agent["limits"] == {"maxRows": 100, "statementTimeout": "5s"}


def test_authenticate_authorize_and_mask(demo: Demo) -> None:
    agent = demo.psql("agent", "SELECT ssn FROM customers ORDER BY id LIMIT 1")
    dba = demo.psql("dba", "SELECT ssn FROM customers ORDER BY id LIMIT 1")
    assert agent.returncode == 0 and dba.returncode == 0, agent.stderr + dba.stderr
    assert dba.stdout.strip() == "123-45-6789"
    assert agent.stdout.strip() != dba.stdout.strip()
    assert agent.stdout.strip().endswith("6789")
    refused = demo.psql("agent", "SELECT * FROM api_keys")
    assert refused.returncode != 0
    assert "public.api_keys is denied by rule ai-agents-read" in refused.stderr
    stranger = demo.run(
        re.sub(r"user=agent", "user=nobody", demo.line(r"^\s+(psql \"[^\"]+user=agent[^\"]*\")")[1])
        + " -X -c 'SELECT 1'",
        PGPASSWORD="not-a-token",
    )
    assert stranger.returncode != 0
    assert "token" in stranger.stderr.lower(), stranger.stderr


def test_limits_show(demo: Demo) -> None:
    rows = demo.psql("agent", "SELECT * FROM orders")
    assert rows.returncode != 0
    assert "more than 100 rows, the limit of rule ai-agents-read (maxRows)" in rows.stderr
    started = time.monotonic()
    slow = demo.psql("agent", "SELECT pg_sleep(30)")
    assert slow.returncode != 0
    assert "statement timeout" in slow.stderr
    assert time.monotonic() - started < 20
    # The DBA has no limits.
    assert demo.psql("dba", "SELECT count(*) FROM (SELECT * FROM orders) o").stdout.strip() == (
        "1000"
    )


def test_a_second_approver_releases_the_dba_statement(demo: Demo) -> None:
    url = demo.line(r"reviews list --url (http://\S+)")[1]
    approver = demo.line(r"^  export QUERYWARDEN_TOKEN=\$\((.+)\)$")[1]
    assert "--sub oncall " in approver
    assert demo.line(r"^\s+psql \"[^\"]+user=oncall[^\"]*\"")
    tokens = {}
    for who, mint in (("oncall", approver), ("dba", approver.replace("--sub oncall", "--sub dba"))):
        minted = demo.run(mint)
        assert minted.returncode == 0, minted.stderr
        tokens[who] = minted.stdout.strip()
    held = demo.psql_held("dba", "UPDATE customers SET name = name")
    try:

        def pending() -> list[dict[str, Any]]:
            listed = demo.run(
                f"{QUERYWARDEN[0]} -m querywarden reviews list --url {url} --json",
                QUERYWARDEN_TOKEN=tokens["oncall"],
            )
            assert listed.returncode == 0, listed.stderr
            pending: list[dict[str, Any]] = json.loads(listed.stdout)  # pending ones only
            return pending

        reviews = _eventually(pending)
        assert [r["statement"] for r in reviews] == ["UPDATE customers SET name = name"]
        approve = demo.line(r"^  (\S+ reviews approve) ID ")[1]
        review = reviews[0]["id"]
        own = demo.run(
            f"{approve} {review} --comment mine --url {url}", QUERYWARDEN_TOKEN=tokens["dba"]
        )
        assert own.returncode != 0
        assert "may not approve it" in own.stdout + own.stderr
        other = demo.run(
            f"{approve} {review} --comment ok --url {url}", QUERYWARDEN_TOKEN=tokens["oncall"]
        )
        assert other.returncode == 0, other.stdout + other.stderr
        out, errors = held.communicate(timeout=60)
    finally:
        if held.poll() is None:
            held.kill()
            held.communicate()
    assert held.returncode == 0, errors
    assert out.strip() == "UPDATE 4"
    assert f"held for approval as review {review}" in errors


def test_a_held_statement_reaches_the_receiver_and_the_console_releases_it(demo: Demo) -> None:
    console = demo.line(r"or in the console, (http://\S+/console):")[1]
    notifications = Path(demo.line(r"keeps it in\n\s+(\S+notifications\.jsonl)$")[1])
    approver_mint = demo.line(r"log in with the token this prints\n\s+(.+)$")[1]
    minted = demo.run(approver_mint)
    assert minted.returncode == 0, minted.stderr
    before = len(notifications.read_text().splitlines()) if notifications.exists() else 0
    held = demo.psql_held("dba", "UPDATE customers SET email = email")
    try:
        with chromium() as browser:
            console_log_in(browser, console, minted.stdout.strip(), "oncall")

            def created() -> dict[str, Any] | None:
                if not notifications.exists():
                    return None
                for line in notifications.read_text().splitlines()[before:]:
                    kept = json.loads(line)
                    if kept["event"]["type"] == "review.created":
                        return dict(kept)
                return None

            kept = _eventually(created)
            assert kept is not None, "no review.created reached the demo's receiver"
            review = kept["event"]["review"]
            assert kept["signed"] is True
            assert review["statement"] == "UPDATE customers SET email = email"
            assert review["requester"]["subject"] == "dba"
            # Posted as the review opens (about 0.1 s on a quiet machine), not by a poll:
            # the bound leaves room for a loaded CI machine, and still fails a poll of
            # several seconds.
            opened = datetime.fromisoformat(review["created"])
            received = datetime.fromisoformat(kept["received"])
            assert (received - opened).total_seconds() < 3.0, (opened, received)
            assert kept["event"]["links"]["decide"] == f"{console}/reviews/{review['id']}"
            card = WebDriverWait(browser, 5, poll_frequency=0.05).until(
                ec.visibility_of_element_located(
                    (By.CSS_SELECTOR, f'article[data-review="{review["id"]}"]')
                )
            )
            shown = datetime.now(UTC)
            # The list refreshes twice a second (under a second on a quiet machine).
            assert (shown - opened).total_seconds() < 5.0, (opened, shown)
            card.find_element(By.CSS_SELECTOR, "input.comment").send_keys("fine, no change")
            card.find_element(By.CSS_SELECTOR, "button.approve").click()
            out, errors = held.communicate(timeout=60)
    finally:
        if held.poll() is None:
            held.kill()
            held.communicate()
    assert held.returncode == 0, errors
    assert out.strip() == "UPDATE 4"
    approved = [
        json.loads(line)["event"]
        for line in notifications.read_text().splitlines()[before:]
        if json.loads(line)["event"]["type"] == "review.approved"
    ]
    assert approved and approved[0]["review"]["approver"]["subject"] == "oncall"


def test_policy_file_edits_apply_to_the_running_demo(demo: Demo) -> None:
    policy_file = Path(demo.line(r"The policy is (\S+)")[1])
    original = policy_file.read_text()
    assert demo.psql("agent", "SELECT * FROM orders").returncode != 0
    document = yaml.safe_load(original)
    agent = next(rule for rule in document["rules"] if rule["name"] == "ai-agents-read")
    agent["limits"]["maxRows"] = 5000
    policy_file.write_text(yaml.safe_dump(document))
    try:
        reloaded = _eventually(lambda: demo.psql("agent", "SELECT * FROM orders").returncode == 0)
        assert reloaded, "the edited policy file was not applied"
        assert len(demo.psql("agent", "SELECT * FROM orders").stdout.splitlines()) == 1000
        # A broken edit keeps the last good policy (the one allowing 5000 rows).
        policy_file.write_text("rules: [this is not a policy\n")
        time.sleep(3)  # the demo checks the file every second
        assert demo.psql("agent", "SELECT * FROM orders").returncode == 0
        assert demo.psql("agent", "SELECT * FROM api_keys").returncode != 0
    finally:
        policy_file.write_text(original)
    restored = _eventually(lambda: demo.psql("agent", "SELECT * FROM orders").returncode != 0)
    assert restored, "restoring the policy file was not applied"


def test_audit_commands_on_the_demo_log(demo: Demo) -> None:
    marker = "SELECT 'audit-me' AS marker FROM orders LIMIT 1"
    assert demo.psql("agent", marker).returncode == 0
    tail = demo.run(demo.audit_command("tail").replace(" --follow", ""))
    assert tail.returncode == 0, tail.stderr
    request = next(line for line in tail.stdout.splitlines() if "audit-me" in line)
    assert " allow " in request
    session = request.split()[3].rsplit("-", 1)[0]
    replay = demo.run(demo.audit_command("replay").replace("SESSION", session))
    assert replay.returncode == 0, replay.stdout
    assert "identity: agent (issuer dev; groups ai-agents)" in replay.stdout
    assert marker in replay.stdout
    verify = demo.run(demo.audit_command("verify"))
    assert verify.returncode == 0, verify.stdout
    assert verify.stdout.startswith("ok: ")
    # The same statement reaches the Collector, which writes it where the banner says.
    traces = Path(demo.line(r"what it receives to (\S+)")[1])

    def exported() -> bool:
        return traces.exists() and session in traces.read_text()

    assert _eventually(exported, timeout=30), "no span of the session reached the Collector"


def test_without_a_collector_the_log_alone_and_the_reviews_api_on_port_plus_one(
    tmp_path: Path,
) -> None:
    port = _free_pair()
    # A policy file the user edited in an earlier run is kept beside the fresh one.
    (tmp_path / ".querywarden").mkdir()
    (tmp_path / ".querywarden" / "policy.yaml").write_text("# my edit\n")
    demo = start_demo(tmp_path, "--port", str(port), env={"QUERYWARDEN_TOOLS_DIR": str(tmp_path)})
    try:
        assert demo.port("gateway") == port
        assert demo.port("reviews API") == port + 1
        assert "OpenTelemetry Collector (OTLP/HTTP)" not in demo.banner
        assert "the log alone, no export: no OpenTelemetry Collector is built" in demo.banner
        state = tmp_path / ".querywarden"
        assert (state / "policy.yaml.previous").read_text() == "# my edit\n"
        assert "ai-agents-read" in (state / "policy.yaml").read_text()
        # Before anyone connects, verify says there is nothing to verify yet ...
        verify = demo.audit_command("verify")
        empty = demo.run(verify)
        assert empty.returncode == 2
        assert "no audit records" in empty.stdout
        # ... and the log is there for the first connection.
        assert demo.psql("dba", "SELECT 1").stdout.strip() == "1"
        assert demo.run(verify).returncode == 0
    finally:
        rest = demo.stop()
    assert demo.process.returncode == 0, rest


def _free_pair() -> int:
    """A port P with P + 1 free too (the reviews API's default)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise AssertionError("no two adjacent free ports")


def test_the_banners_mcp_configuration_runs_an_agent_through_the_gateway(demo: Demo) -> None:
    """The MCP configuration the banner prints, launched by the MCP SDK's own client."""
    import asyncio

    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    start = demo.banner.index('{"mcpServers"')
    config = json.loads(demo.banner[start : demo.banner.index("\n\n", start)].strip())
    server = config["mcpServers"]["querywarden-demo"]
    params = StdioServerParameters(command=server["command"], args=server["args"])

    async def go() -> tuple[Any, Any]:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            masked = await session.call_tool(
                "query", {"sql": "SELECT name, ssn FROM customers ORDER BY id LIMIT 1"}
            )
            refused = await session.call_tool("query", {"sql": "SELECT * FROM api_keys"})
            return masked, refused

    masked, refused = asyncio.run(go())
    assert not masked.is_error and masked.structured_content is not None
    answer = masked.structured_content
    assert answer["columns"][1]["masked"] is not None
    assert answer["rows"][0][1] != "123-45-6789" and answer["rows"][0][1].endswith("6789")
    assert refused.is_error
    assert "rule ai-agents-read" in refused.content[0].text  # type: ignore[union-attr]
