"""Write the table of PostgreSQL's own functions from a running server's catalog.

    python scripts/catalog_functions.py "postgresql://postgres@localhost:5432/postgres"

writes proxy/querywarden/policy/catalog_functions_pgNN.json for the server's major
version (see querywarden.policy.functions). tests/test_catalog_functions.py regenerates
it from the test cluster and fails while the committed file differs.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from catalog_source import fetch

from querywarden.policy.functions import CATALOG_QUERY, data_file_name, render

PACKAGE = Path(__file__).resolve().parents[1] / "proxy" / "querywarden" / "policy"


async def _fetch(dsn: str) -> tuple[str, str]:
    major, rows = await fetch(dsn, CATALOG_QUERY)
    return major, render(((r["name"], r["volatile"]) for r in rows), major)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    major, text = asyncio.run(_fetch(argv[1]))
    path = PACKAGE / data_file_name(major)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
