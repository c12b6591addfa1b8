"""Write the list of pg_catalog's relations from a running server's catalog.

    python scripts/catalog_relations.py "postgresql://postgres@localhost:5432/postgres"
    python scripts/catalog_relations.py DSN --output snapshot.json

writes proxy/querywarden/policy/catalog_relations_pgNN.json for the server's major
version (see querywarden.policy.relations), or a snapshot file for
`querywarden check --catalog`. tests/test_catalog_relations.py regenerates the shipped
file from the test cluster and fails while the committed one differs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from catalog_source import fetch

from querywarden.policy.relations import CATALOG_QUERY, data_file_name, render

PACKAGE = Path(__file__).resolve().parents[1] / "proxy" / "querywarden" / "policy"


async def _fetch(dsn: str) -> tuple[str, str]:
    major, rows = await fetch(dsn, CATALOG_QUERY)
    return major, render((r["relname"] for r in rows), major)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dsn")
    parser.add_argument("--output", type=Path, help="write a snapshot here instead")
    args = parser.parse_args(argv[1:])
    major, text = asyncio.run(_fetch(args.dsn))
    path = args.output or PACKAGE / data_file_name(major)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
