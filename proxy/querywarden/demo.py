"""``querywarden demo``: PostgreSQL with sensitive sample data, the gateway in front.

Both run on this machine; Ctrl-C stops both.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
from pathlib import Path

from querywarden.cli import run_event_loop
from querywarden.config import GatewaySettings
from querywarden.devcluster import DATABASE, ROLE_PASSWORD, EphemeralCluster
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
  DELETE FROM orders;          -- held for the DBA's approval (querywarden reviews ...)"""

#: The demo's rules: the agent reads (not the API keys), the DBA does anything, and
#: destructive statements need an approver.
DEMO_RULES = [
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

#: The two demo identities: an AI coding agent and a human DBA.
DEMO_IDENTITIES = {"agent": ["ai-agents"], "dba": ["dba", "dba-oncall"]}


def run_demo(port: int, state_dir: Path, admin_port: int | None = None) -> int:
    """Run the demo until interrupted (the reviews API on ``admin_port``, else port + 1)."""
    cluster = EphemeralCluster.create()
    print("starting an ephemeral PostgreSQL ...", flush=True)
    try:
        cluster.start()
        cluster.psql(SEED_SQL)
        cert, key = write_self_signed(state_dir, "gateway")
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
                "admin": {
                    "host": "127.0.0.1",
                    "port": port + 1 if admin_port is None else admin_port,
                },
                "stateDirectory": str(state_dir),
            }
        )
        key_file = (state_dir / "dev-issuer.pem").resolve()
        policy = PolicyDocument.model_validate(
            {
                "identity": {"issuers": [{"name": "dev", "kind": "dev", "keyFile": key_file}]},
                "rules": DEMO_RULES,
                "masking": DEMO_MASKING,
                "approvals": {"approvers": {"groups": ["dba-oncall"]}, "hold": "120s"},
            }
        )
        run_event_loop(_serve_until_interrupted(settings, policy, key_file, cluster))
    finally:
        print("\nstopping PostgreSQL ...", flush=True)
        cluster.stop()
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
    settings: GatewaySettings, policy: PolicyDocument, key_file: Path, cluster: EphemeralCluster
) -> None:
    gateway = Gateway(settings, policy=policy)
    host, port = await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Absolute paths, so the printed lines work from any directory.
    cli = Path(sys.executable).with_name("querywarden")
    lines = []
    for who, groups in DEMO_IDENTITIES.items():
        mint = f"{cli} token --key-file {key_file} --sub {who} --groups {','.join(groups)}"
        lines.append(
            f"  PGPASSWORD=$({mint}) \\\n"
            f'    psql "host={host} port={port} dbname={DATABASE} user={who} sslmode=require"'
        )
    connect = "\n\n".join(lines)
    dba_token = f"{cli} token --key-file {key_file} --sub dba --groups dba,dba-oncall"
    admin = gateway.admin_address
    reviews = (
        f"  QUERYWARDEN_TOKEN=$({dba_token}) \\\n"
        f"    {cli} reviews list --url http://{admin[0]}:{admin[1]}"
        if admin
        else "  (no admin API)"
    )
    print(
        f"""
querywarden demo is running.
  PostgreSQL (direct, for comparison): 127.0.0.1:{cluster.port}
  gateway:                             {host}:{port}  (TLS offered; plaintext on loopback)

Every connection presents a short-lived token from the local development issuer
({key_file}); `querywarden token` mints one. Connect as the AI agent or as the DBA:

{connect}

then try, as each of them:
{TRY_QUERIES}

A held statement waits for the DBA: list the reviews, then approve or deny one
(reviews approve ID --comment ...):
{reviews}

Press Ctrl-C to stop.""",
        flush=True,
    )
    await stop.wait()
    with contextlib.suppress(Exception):
        await gateway.close()
