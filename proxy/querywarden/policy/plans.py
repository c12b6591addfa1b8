"""Full-table-scan estimates: EXPLAIN (never ANALYZE) on a side connection.

A rule may send statements that scan a large table sequentially to review. The gateway
asks the upstream for the statement's plan with ``EXPLAIN (FORMAT JSON, VERBOSE)`` (which
plans but does not run it), finds every sequential scan, and looks up the scanned
tables' estimated sizes (``pg_class.reltuples``). Estimates are cached per statement text
for a short time (not per shape: a plan depends on the constants). This is the catalog
side channel: the only policy code that does I/O.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import asyncpg

from querywarden.upstream import UpstreamTarget, side_connection

#: How long an estimate stays valid for a statement shape.
ESTIMATE_TTL = 60.0


def sequential_scans(plan: Any) -> Iterator[tuple[str, str]]:
    """``(schema, relation)`` of every Seq Scan in an EXPLAIN (FORMAT JSON, VERBOSE) plan."""
    stack = [plan]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if node.get("Node Type") == "Seq Scan" and "Relation Name" in node:
                yield str(node.get("Schema", "public")), str(node["Relation Name"])
            stack.extend(v for k, v in node.items() if k in ("Plan", "Plans"))


class PlanEstimator:
    """Largest sequential scan of a statement, in estimated rows, via the upstream."""

    def __init__(self, *, ttl: float = ESTIMATE_TTL) -> None:
        self._ttl = ttl
        self._cache: dict[tuple[str, str, str], tuple[float, int]] = {}
        self._connections: dict[tuple[str, int, str, str], asyncpg.Connection] = {}
        self._locks: dict[tuple[str, int, str, str], asyncio.Lock] = {}

    async def largest_scan(self, target: UpstreamTarget, database: str, sql: str) -> int:
        """Rows of the largest table the statement scans sequentially (0 if none)."""
        key = (target.user, database, sql)
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self._ttl:
            return cached[1]
        conn_key = (target.host, target.port, target.user, database)
        lock = self._locks.setdefault(conn_key, asyncio.Lock())
        async with lock:
            conn = await self._connection(conn_key, target, database)
            try:
                rows = await self._estimate(conn, sql)
            except (asyncpg.PostgresConnectionError, ConnectionError, OSError):
                self._connections.pop(conn_key, None)
                raise
        self._cache[key] = (now, rows)
        return rows

    async def _connection(
        self, key: tuple[str, int, str, str], target: UpstreamTarget, database: str
    ) -> asyncpg.Connection:
        conn = self._connections.get(key)
        if conn is None or conn.is_closed():
            conn = await side_connection(target, database, "querywarden-plans")
            self._connections[key] = conn
        return conn

    async def _estimate(self, conn: asyncpg.Connection, sql: str) -> int:
        # EXPLAIN plans the statement and does not run it; the transaction is rolled back
        # anyway, so nothing the planner might touch (none expected) survives.
        async with conn.transaction(readonly=True):
            options = "FORMAT JSON, VERBOSE"
            if "$" in sql and conn.get_server_version().major >= 16:
                # A statement with parameters ($1) has a plan only as a generic one.
                options += ", GENERIC_PLAN"
            text = await conn.fetchval(f"EXPLAIN ({options}) " + sql)
            scans = set(sequential_scans(json.loads(text)))
            largest = 0
            for schema, relation in scans:
                rows = await conn.fetchval(
                    "SELECT reltuples::bigint FROM pg_class c JOIN pg_namespace n "
                    "ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
                    schema,
                    relation,
                )
                largest = max(largest, int(rows or 0))
        return largest

    async def close(self) -> None:
        """Close the side connections."""
        for conn in list(self._connections.values()):
            await conn.close()
        self._connections.clear()
