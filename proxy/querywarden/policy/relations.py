"""Which relations PostgreSQL defines in ``pg_catalog``: the built-in list. Sans-I/O.

PostgreSQL resolves an unqualified relation name by searching ``pg_catalog`` first, then
the ``search_path``. ``pg_catalog`` can only win for a name it holds, and the names it
holds are fixed for a server version: nobody but initdb creates relations there (even a
superuser needs ``allow_system_table_mods``). So the engine checks an unqualified name as
``pg_catalog.<name>`` only when that relation exists, and ``SELECT * FROM orders`` is
decided as ``public.orders`` alone.

The list is read from a real server's catalog, not written by hand:
``catalog_relations_pgNN.json`` beside this module lists every relation (any kind) of
``pg_catalog`` in one major version. ``scripts/catalog_relations.py`` writes it with
:data:`CATALOG_QUERY` and :func:`render`, and a test regenerates it from the test cluster
and compares. The gateway also reads the list from its upstream at start (a server
version with no shipped list is covered that way); ``querywarden check`` uses the
shipped lists, or a snapshot file written by the same script (``--catalog``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Final

#: Every relation of pg_catalog, by name: tables, views, indexes, sequences, all kinds,
#: since a name in FROM resolves to any of them (and then fails if it cannot be read).
CATALOG_QUERY: Final = (
    "SELECT c.relname FROM pg_catalog.pg_class c "
    "WHERE c.relnamespace = 'pg_catalog'::pg_catalog.regnamespace ORDER BY 1"
)


def render(names: Iterable[str], server_version: str) -> str:
    """The data file's text for the rows of :data:`CATALOG_QUERY`."""
    document = {
        "postgresql": server_version,
        "query": CATALOG_QUERY,
        "relations": sorted(set(names)),
    }
    return json.dumps(document, indent=1) + "\n"


def data_file_name(server_version: str) -> str:
    """The file name of the list of one major version (``catalog_relations_pg15.json``)."""
    return f"catalog_relations_pg{server_version}.json"


def _names(text: str, source: str) -> frozenset[str]:
    document = json.loads(text)
    names = document.get("relations") if isinstance(document, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{source} is not a list of pg_catalog relations (see {__name__})")
    return frozenset(names)


@functools.cache
def builtin_catalog_relations() -> frozenset[str]:
    """The names of pg_catalog's relations in every shipped major version.

    A name any version defines counts (the stricter reading: one more candidate to check).
    """
    found: set[str] = set()
    for entry in resources.files(__package__).iterdir():
        if entry.name.startswith("catalog_relations_pg") and entry.name.endswith(".json"):
            found |= _names(entry.read_text(encoding="utf-8"), entry.name)
    if not found:  # without it no unqualified name would be checked as pg_catalog's
        raise RuntimeError("querywarden: the list of pg_catalog's relations is missing")
    return frozenset(found)


def load_snapshot(path: Path) -> frozenset[str]:
    """The names in a snapshot file written by ``scripts/catalog_relations.py``."""
    return _names(path.read_text(encoding="utf-8"), str(path))
