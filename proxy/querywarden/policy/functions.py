"""What PostgreSQL's own functions do: the built-in table of their volatility. Sans-I/O.

A function PostgreSQL marks volatile (``pg_proc.provolatile = 'v'``) may change state:
``pg_stat_reset()``, ``pg_logical_emit_message(...)``, ``pg_advisory_lock(...)``. The
engine counts calling one as the operation ``side_effects``. Which functions those are
is read from a real server's catalog, not written by hand: ``catalog_functions_pgNN.json``
beside this module lists, for one major version, every function of ``pg_catalog`` and
``information_schema`` that the server itself defines (OID below 16384, so nothing an
extension or a user added), split into volatile names and the others. A name counts as
volatile if any of its overloads is. ``scripts/catalog_functions.py`` writes the file from
a running server with :data:`CATALOG_QUERY` and :func:`render`, and a test regenerates it
from the test cluster and compares, so it cannot drift.

A function that is not in the table (in another schema, or a name the server does not
define) is the user's or an extension's: what it does cannot be known without reading
its body, so it counts as having side effects too, unless a rule lists it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from importlib import resources
from typing import Final

#: The server's own functions, by qualified name, and whether any overload is volatile.
#: ``16384`` is PostgreSQL's FirstNormalObjectId: everything below was made by initdb.
CATALOG_QUERY: Final = """
SELECT n.nspname || '.' || p.proname AS name, bool_or(p.provolatile = 'v') AS volatile
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname IN ('pg_catalog', 'information_schema') AND p.oid < 16384
GROUP BY 1
"""

#: Volatile functions of pg_catalog that change nothing, and why each is harmless.
#: Everything else volatile has side effects, or its effect is already described by the
#: analyzer (see :data:`querywarden.analysis.MODELED_FUNCTIONS`).
HARMLESS_VOLATILE: Final[dict[str, str]] = {
    "random": "a new value per call",
    "setseed": "seeds this session's random()",
    "gen_random_uuid": "a new value per call",
    "clock_timestamp": "the current time",
    "timeofday": "the current time",
    "pg_sleep": "waits; bounded by the statement timeout",
    "pg_sleep_for": "waits; bounded by the statement timeout",
    "pg_sleep_until": "waits; bounded by the statement timeout",
    "currval": "this session's last value of a sequence",
    "lastval": "this session's last value of a sequence",
    "current_query": "this session's own statement",
    "pg_is_in_recovery": "whether the server is a standby (drivers ask)",
    "pg_relation_size": "a size on disk (psql's \\d+)",
    "pg_table_size": "a size on disk (psql's \\d+)",
    "pg_indexes_size": "a size on disk (psql's \\d+)",
    "pg_total_relation_size": "a size on disk (psql's \\d+)",
    "pg_database_size": "a size on disk (psql's \\l+)",
    "pg_tablespace_size": "a size on disk (psql's \\db+)",
    "pg_partition_tree": "the partitions of a table (psql's \\dP+)",
    "pg_partition_ancestors": "the parents of a partition",
    "bernoulli": "a TABLESAMPLE method",
    "system": "a TABLESAMPLE method",
}

#: Functions PostgreSQL does not mark volatile that change state all the same. Checked
#: against the table by a test, like :data:`HARMLESS_VOLATILE`.
KNOWN_SIDE_EFFECTS: Final[dict[str, str]] = {
    # Stable (the same value within a transaction), but the first call assigns the
    # transaction an ID: repeated, it burns IDs towards wraparound.
    "txid_current": "assigns a transaction ID",
    "pg_current_xact_id": "assigns a transaction ID",
}


def render(rows: Iterable[tuple[str, bool]], server_version: str) -> str:
    """The data file's text for the rows of :data:`CATALOG_QUERY` (``(name, volatile)``)."""
    volatile: list[str] = []
    other: list[str] = []
    for name, is_volatile in rows:
        (volatile if is_volatile else other).append(name)
    document = {
        "postgresql": server_version,
        "query": " ".join(CATALOG_QUERY.split()),
        "volatile": sorted(volatile),
        "other": sorted(other),
    }
    return json.dumps(document, indent=1) + "\n"


def data_file_name(server_version: str) -> str:
    """The file name of the table of one major version (``catalog_functions_pg15.json``)."""
    return f"catalog_functions_pg{server_version}.json"


@functools.cache
def builtin_functions() -> tuple[frozenset[str], frozenset[str]]:
    """(every function PostgreSQL defines, the volatile ones), by qualified name.

    Read once from the files of every shipped major version (``pg_catalog.lower``).
    A name known to any version is PostgreSQL's; a name volatile in any version counts
    as volatile (the stricter reading).
    """
    known: set[str] = set()
    volatile: set[str] = set()
    for entry in resources.files(__package__).iterdir():
        if entry.name.startswith("catalog_functions_pg") and entry.name.endswith(".json"):
            document = json.loads(entry.read_text(encoding="utf-8"))
            volatile.update(document["volatile"])
            known.update(document["volatile"], document["other"])
    if not known:  # without it every function would look like a user's: say why instead
        raise RuntimeError("querywarden: the table of PostgreSQL's functions is missing")
    return frozenset(known), frozenset(volatile)
