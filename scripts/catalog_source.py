"""One query against a running server's catalog, with the server's major version.

What scripts/catalog_functions.py and scripts/catalog_relations.py share.
"""

from __future__ import annotations

import asyncpg


async def fetch(dsn: str, query: str) -> tuple[str, list[asyncpg.Record]]:
    """(major version, the query's rows) from the server at ``dsn``."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(query)
        version = await connection.fetchval("SELECT current_setting('server_version_num')")
    finally:
        await connection.close()
    return str(int(version) // 10000), list(rows)
