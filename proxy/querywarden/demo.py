"""``querywarden demo``: PostgreSQL with sensitive sample data, the gateway in front.

Everything runs on this machine and shows the four guarantees: every connection is
authenticated by a token, every statement is decided by a policy file (allowed, refused,
or held for an approver), personal data is masked, and everything is written to the audit
log (and exported to an OpenTelemetry Collector when ``make tools`` has built one).
Ctrl-C stops it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from querywarden.cli import run_event_loop
from querywarden.config import GatewaySettings
from querywarden.demo_receiver import DemoReceiver
from querywarden.devcluster import (
    DATABASE,
    ROLE_PASSWORD,
    EphemeralCluster,
    free_port,
    wait_for_port,
)
from querywarden.policy import PolicyDocument
from querywarden.server import Gateway
from querywarden.tlsutil import write_self_signed

#: The sample schema: customers with SSNs, card numbers and emails; an api_keys table.
SEED_SQL = """
CREATE TABLE customers (
    id          serial PRIMARY KEY,
    name        text NOT NULL,
    email       text NOT NULL UNIQUE,
    ssn         text NOT NULL UNIQUE,
    card_number text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE api_keys (
    id       serial PRIMARY KEY,
    owner_id int NOT NULL REFERENCES customers(id),
    label    text NOT NULL,
    secret   text NOT NULL
);
CREATE TABLE orders (
    id          serial PRIMARY KEY,
    customer_id int NOT NULL REFERENCES customers(id),
    amount      numeric(10, 2) NOT NULL,
    placed_at   timestamptz NOT NULL DEFAULT now()
);
INSERT INTO customers (name, email, ssn, card_number) VALUES
    ('Ada Lovelace',  'ada@example.com',   '123-45-6789', '4111 1111 1111 1111'),
    ('Alan Turing',   'alan@example.org',  '234-56-7890', '5500 0000 0000 0004'),
    ('Grace Hopper',  'grace@example.net', '345-67-8901', '3400 000000 00009'),
    ('Edsger Dijkstra','edsger@example.com','456-78-9012', '6011 0000 0000 0004');
INSERT INTO api_keys (owner_id, label, secret) VALUES
    (1, 'ci',      'qw_live_8f14e45fceea167a5a36dedd4bea2543'),
    (2, 'laptop',  'qw_live_c9f0f895fb98ab9159f51fd0297e236d');
INSERT INTO orders (customer_id, amount)
    SELECT 1 + (g % 4), (g * 7 % 500) + 0.99 FROM generate_series(1, 1000) g;
ALTER TABLE customers OWNER TO qw_scram;
ALTER TABLE api_keys OWNER TO qw_scram;
ALTER TABLE orders OWNER TO qw_scram;
"""

#: Statements to try, shown in the banner.
TRY_QUERIES = """\
  SELECT name, email, ssn, card_number FROM customers;   -- masked for the agent
  SELECT name FROM customers WHERE ssn LIKE '1%';        -- refused: a masked predicate
  SELECT * FROM api_keys;      -- the agent is refused (rule ai-agents-read)
  SELECT * FROM orders;        -- the agent is stopped after 100 rows (limits.maxRows)
  SELECT pg_sleep(10);         -- the agent is cancelled after 5 s (limits.statementTimeout)
  DELETE FROM orders;          -- held for an approver (see below)"""

#: The agent's limits, in the policy file and in the banner's examples above.
AGENT_MAX_ROWS = 100
AGENT_STATEMENT_TIMEOUT = "5s"

#: The demo's rules: the agent reads (not the API keys, and within limits), the DBA does
#: anything, and destructive statements need an approver.
DEMO_RULES: list[dict[str, Any]] = [
    {
        "name": "ai-agents-read",
        "subjects": {"groups": ["ai-agents"]},
        "allow": {
            "operations": ["select", "explain", "show", "transaction"],
            # The catalogs are for finding the schema (psql's \d); unqualified names
            # such as `customers` resolve with public.* alone.
            "tables": ["public.*", "pg_catalog.*", "information_schema.*"],
        },
        "deny": {"tables": ["public.api_keys"]},
        "review": {"operations": ["insert", "update", "delete", "ddl", "truncate"]},
        "limits": {"maxRows": AGENT_MAX_ROWS, "statementTimeout": AGENT_STATEMENT_TIMEOUT},
    },
    {
        "name": "dba-all",
        "subjects": {"groups": ["dba"]},
        "allow": {"operations": ["*"], "tables": ["*"]},
        "review": {"operations": ["ddl:drop", "truncate"], "unboundedWrite": True},
    },
]

#: The demo's masking: the agent sees masked personal data; the DBA is exempt.
DEMO_MASKING = {
    "columns": [
        {"table": "public.customers", "column": "ssn", "strategy": "partial", "keepLast": 4},
        {"table": "public.customers", "column": "card_number", "strategy": "digits"},
        {"table": "public.customers", "column": "email", "strategy": "email"},
    ],
    "detectors": ["ssn", "credit_card", "api_key", "jwt", "private_key", "email"],
    "exempt": {"groups": ["dba"]},
}

#: The demo's identities: an AI coding agent, a human DBA, and a second DBA on call, who
#: approves what the first one sends (nobody approves their own statement).
DEMO_IDENTITIES = {
    "agent": ["ai-agents"],
    "dba": ["dba", "dba-oncall"],
    "oncall": ["dba", "dba-oncall"],
}
#: Who approves in the banner's reviews lines: not the DBA, whose statements they approve.
APPROVER = "oncall"

_POLICY_HEADER = """\
# The querywarden demo's policy (docs/policy.md). The running demo watches this file:
# save an edit and it applies within seconds to every statement that runs after it, in
# open sessions too. An invalid edit is logged and the last good policy stays in force.
# The demo writes this file afresh at each start (the previous one is kept beside it as
# policy.yaml.previous when you had changed it).
"""


def demo_policy(
    key_file: Path,
    *,
    notify: list[dict[str, str]] | None = None,
    console_url: str | None = None,
) -> dict[str, Any]:
    """The demo's policy document, trusting the local development issuer's ``key_file``.

    ``notify`` and ``console_url``: where review events are posted, and the console
    their links point to.
    """
    approvals: dict[str, Any] = {
        "approvers": {"groups": ["dba-oncall"]},
        "hold": "120s",
        "requireDistinctApprover": True,
    }
    if notify:
        approvals["notify"] = notify
    if console_url:
        approvals["consoleUrl"] = console_url
    return {
        "identity": {"issuers": [{"name": "dev", "kind": "dev", "keyFile": str(key_file)}]},
        "rules": DEMO_RULES,
        "masking": DEMO_MASKING,
        "approvals": approvals,
    }


def write_policy(
    state_dir: Path,
    key_file: Path,
    *,
    notify: list[dict[str, str]] | None = None,
    console_url: str | None = None,
) -> Path:
    """Write the demo's policy file (checked first) and return its absolute path."""
    document = demo_policy(key_file, notify=notify, console_url=console_url)
    PolicyDocument.model_validate(document)  # a broken demo policy fails here, not later
    path = (state_dir / "policy.yaml").resolve()
    text = _POLICY_HEADER + yaml.safe_dump(document, sort_keys=False)
    if path.exists() and path.read_text() != text:
        path.replace(path.with_name("policy.yaml.previous"))
    path.write_text(text)
    return path


def admin_port_for(port: int, admin_port: int | None) -> int:
    """The reviews API's port: as given, else the gateway's + 1, else (``--port 0``) free.

    A free one is chosen here rather than by the listener: the console's address goes
    into the policy (the notifications link to it) before the API listens.
    """
    if admin_port is not None:
        return admin_port
    if port != 0:
        return port + 1
    with socket.create_server(("127.0.0.1", 0)) as probe:
        free: int = probe.getsockname()[1]
    return free


def find_collector() -> Path | None:
    """The OpenTelemetry Collector ``make tools`` built, if any.

    It lives in ``$QUERYWARDEN_TOOLS_DIR/bin`` (default ``~/.cache/querywarden/tools``),
    where scripts/build-tools.sh puts it.
    """
    configured = os.environ.get("QUERYWARDEN_TOOLS_DIR")
    tools = Path(configured) if configured else Path.home() / ".cache" / "querywarden" / "tools"
    for candidate in sorted((tools / "bin").glob("otelcol*")):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


class DemoCollector:
    """A Collector for the demo: OTLP/HTTP in on a free loopback port, JSON files out.

    The files (``traces.jsonl``, ``metrics.jsonl``, ``logs.jsonl``, one OTLP JSON batch a
    line) let the user see what the gateway exports without running a backend.
    """

    START_TIMEOUT = 30.0

    def __init__(self, binary: Path, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_file = directory / "otelcol.log"
        self._process: subprocess.Popen[bytes] | None = None

    def file_of(self, signal_name: str) -> Path:
        """Where the Collector writes what it receives of ``signal_name`` (``traces``, ...)."""
        return self.directory / f"{signal_name}.jsonl"

    def _config(self) -> dict[str, Any]:
        signals = ("traces", "metrics", "logs")
        exporters: dict[str, Any] = {
            f"file/{name}": {"path": str(self.file_of(name)), "flush_interval": "1s"}
            for name in signals
        }
        return {
            "receivers": {
                # HTTP only, on the port chosen free: the usual 4317/4318 may be taken.
                "otlp": {"protocols": {"http": {"endpoint": f"127.0.0.1:{self.port}"}}}
            },
            "exporters": exporters,
            "service": {
                # No internal metrics listener: it would open :8888, a port nobody chose.
                "telemetry": {"metrics": {"level": "none"}},
                "pipelines": {
                    name: {"receivers": ["otlp"], "exporters": [f"file/{name}"]} for name in signals
                },
            },
        }

    def start(self) -> None:
        """Start the process (it comes up while PostgreSQL starts: see :meth:`wait_ready`)."""
        # What the Collector writes holds statement text: private, as the audit log is.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        config = self.directory / "otelcol.yaml"
        config.write_text(yaml.safe_dump(self._config()))
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                [str(self.binary), "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Not in the terminal's process group: Ctrl-C stops the gateway first,
                # then the Collector, so the last spans still reach it.
                start_new_session=True,
            )

    def wait_ready(self) -> str | None:
        """None once the Collector accepts OTLP; else why not (it is then stopped)."""
        assert self._process is not None
        try:
            wait_for_port("127.0.0.1", self.port, timeout=self.START_TIMEOUT)
        except OSError:
            code = self._process.poll()
            self.stop()
            state = f"exited with {code}" if code is not None else "did not listen"
            return f"the Collector {state}: see {self.log_file}"
        return None

    def stop(self) -> None:
        """Stop the Collector (it flushes its files on SIGTERM)."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None


@dataclass(frozen=True)
class DemoExport:
    """Where the audit log goes besides its directory, for the banner."""

    collector: DemoCollector | None
    #: Why there is no Collector (None when there is one).
    missing: str | None


def run_demo(port: int, state_dir: Path, admin_port: int | None = None) -> int:
    """Run the demo until interrupted (the reviews API on ``admin_port``, else port + 1)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir = state_dir.resolve()  # absolute: the banner's lines work from anywhere
    binary = find_collector()
    collector = DemoCollector(binary, state_dir / "otel") if binary else None
    receiver = DemoReceiver(state_dir)
    cluster = EphemeralCluster.create()
    print("starting an ephemeral PostgreSQL ...", flush=True)
    try:
        if collector is not None:
            collector.start()
        cluster.start()
        cluster.psql(SEED_SQL)
        export = DemoExport(None, "no OpenTelemetry Collector is built (make tools builds one)")
        if collector is not None:
            problem = collector.wait_ready()
            export = DemoExport(collector if problem is None else None, problem)
        cert, key = write_self_signed(state_dir, "gateway")
        key_file = state_dir / "dev-issuer.pem"
        admin_listen = admin_port_for(port, admin_port)
        policy_file = write_policy(
            state_dir,
            key_file,
            notify=[receiver.destination()],
            console_url=f"http://127.0.0.1:{admin_listen}/console",
        )
        exporter = export.collector
        settings = GatewaySettings.model_validate(
            {
                "listen": {"host": "127.0.0.1", "port": port, "plaintext": "loopback"},
                "tls": {"certFile": cert, "keyFile": key},
                "upstream": {
                    "host": "127.0.0.1",
                    "port": cluster.port,
                    "database": DATABASE,
                    "user": "qw_scram",
                    "password": ROLE_PASSWORD,
                    "sslmode": "require",
                },
                "masking": {"hashKeyFile": _masking_key(state_dir)},
                "admin": {"host": "127.0.0.1", "port": admin_listen},
                "audit": {
                    "directory": str(state_dir / "audit"),
                    "otlpEndpoint": exporter.endpoint if exporter else None,
                    # Ctrl-C should not wait long for a Collector that is already there.
                    "drainTimeout": "5s",
                },
                "stateDirectory": str(state_dir),
                "policyFile": str(policy_file),
                "policyReloadInterval": "1s",
            }
        )
        run_event_loop(_serve_until_interrupted(settings, key_file, cluster, export, receiver))
    finally:
        print("\nstopping PostgreSQL ...", flush=True)
        cluster.stop()
        if collector is not None:
            collector.stop()
    return 0


def _masking_key(state_dir: Path) -> Path:
    """The demo's key for keyed masking (kept, so masked values stay the same)."""
    path = state_dir / "masking.key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


async def _serve_until_interrupted(
    settings: GatewaySettings,
    key_file: Path,
    cluster: EphemeralCluster,
    export: DemoExport,
    receiver: DemoReceiver,
) -> None:
    await receiver.start()
    gateway = Gateway(settings)  # the policy comes from settings.policy_file, reloaded
    host, port = await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    banner = _banner(
        settings,
        key_file=key_file,
        postgres_port=cluster.port,
        export=export,
        gateway=(host, port),
        admin=gateway.admin_address,
        receiver=receiver,
    )
    print(banner)
    print("Press Ctrl-C to stop.", flush=True)
    await stop.wait()
    with contextlib.suppress(Exception):
        await gateway.close()
    with contextlib.suppress(Exception):
        await receiver.close()


def _banner(
    settings: GatewaySettings,
    *,
    key_file: Path,
    postgres_port: int,
    export: DemoExport,
    gateway: tuple[str, int],
    admin: tuple[str, int] | None,
    receiver: DemoReceiver,
) -> str:
    """What the demo prints once everything is up: every address, and how to try it all."""
    host, port = gateway
    # Absolute paths, so the printed lines work from any directory.
    cli = Path(sys.executable).with_name("querywarden")

    def mint(who: str) -> str:
        groups = ",".join(DEMO_IDENTITIES[who])
        return f"{cli} token --key-file {key_file} --sub {who} --groups {groups}"

    connect = "\n\n".join(
        f"  # {who} ({', '.join(groups)})\n"
        f"  PGPASSWORD=$({mint(who)}) \\\n"
        f'    psql "host={host} port={port} dbname={DATABASE} user={who} sslmode=require"'
        for who, groups in DEMO_IDENTITIES.items()
    )
    if admin:
        url = f"http://{admin[0]}:{admin[1]}"
        reviews = (
            f"  export QUERYWARDEN_TOKEN=$({mint(APPROVER)})\n"
            f"  {cli} reviews list --url {url}\n"
            f"  {cli} reviews approve ID --comment 'why' --url {url}\n"
            f"or in the console, {url}/console: log in with the token this prints\n"
            f"  {mint(APPROVER)}\n"
            f"Approvers are told at once: each review event is posted, signed, to the demo's\n"
            f"notification receiver, which prints it here and keeps it in\n"
            f"  {receiver.log}"
        )
    else:
        reviews = "  (no admin API)"
    admin_args = f', "--admin-url", "http://{admin[0]}:{admin[1]}"' if admin else ""
    mcp = (
        f'  {{"mcpServers": {{"querywarden-demo": {{"command": "{cli}",\n'
        f'    "args": ["mcp", "--gateway", "{host}:{port}", "--database", "{DATABASE}", '
        f'"--sslmode", "require"{admin_args},\n'
        f'             "--token-command", "{mint("agent")}"]}}}}}}'
    )
    audit_dir = settings.audit.directory
    if export.collector is not None:
        collector = export.collector
        exported = (
            f"exported to an OpenTelemetry Collector at {collector.endpoint}, which writes\n"
            f"  what it receives to {collector.file_of('traces')} (and metrics.jsonl)"
        )
        collector_port = f"\n  OpenTelemetry Collector (OTLP/HTTP):  127.0.0.1:{collector.port}"
    else:
        exported = f"the log alone, no export: {export.missing}"
        collector_port = ""
    return f"""
querywarden demo is running.
  gateway:                             {host}:{port}  (TLS offered; plaintext on loopback)
  reviews API:                         {f"{admin[0]}:{admin[1]}" if admin else "off"}
  PostgreSQL (direct, for comparison): 127.0.0.1:{postgres_port}{collector_port}
  notification receiver:               127.0.0.1:{receiver.port}

1. Authenticate. Every connection presents a short-lived token from the local
development issuer ({key_file}); `querywarden token` mints one. Connect as the
AI agent, the DBA, or the second DBA on call:

{connect}

2. Authorize, hold, limit, and 3. mask. The policy is {settings.policy_file}
(edit it and save: it is reloaded within seconds). Try, as each of them:
{TRY_QUERIES}

A held statement waits for an approver. The DBA may not approve their own statement:
the second DBA on call lists the reviews and approves (or denies) one:
{reviews}

4. Audit. Every connection and statement is in the audit log {audit_dir},
{exported}
  {cli} audit tail {audit_dir} --follow
  {cli} audit replay {audit_dir} SESSION   # a session id from audit tail
  {cli} audit verify {audit_dir}

An AI agent that uses MCP tools reaches the same gateway, as itself, with this in its MCP
configuration (docs/mcp.md):
{mcp}
"""
