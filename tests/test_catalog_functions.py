"""The shipped table of PostgreSQL's functions is what the server's catalog says."""

from __future__ import annotations

from importlib import resources

import pytest

from querywarden.devcluster import EphemeralCluster
from querywarden.policy import functions

pytestmark = pytest.mark.postgres


def test_shipped_table_matches_the_catalog_of_the_test_cluster(pg: EphemeralCluster) -> None:
    major = str(int(pg.psql("SHOW server_version_num")) // 10000)
    rows = []
    for line in pg.psql(functions.CATALOG_QUERY).splitlines():
        name, _, volatile = line.rpartition("|")
        rows.append((name, volatile == "t"))
    expected = functions.render(rows, major)
    shipped = resources.files(functions.__package__) / functions.data_file_name(major)
    assert shipped.is_file(), (
        f"no table for PostgreSQL {major}: run scripts/catalog_functions.py against it"
    )
    assert shipped.read_text(encoding="utf-8") == expected, (
        "the table of PostgreSQL's functions drifted: run scripts/catalog_functions.py"
    )


def test_the_table_knows_the_side_effects_the_issue_found() -> None:
    known, volatile = functions.builtin_functions()
    for name in ("pg_stat_reset", "pg_logical_emit_message", "pg_advisory_lock", "setval"):
        assert f"pg_catalog.{name}" in volatile
    assert "pg_catalog.lower" in known and "pg_catalog.lower" not in volatile
    # Every harmless exception is a volatile function of the table (no stale entries).
    assert {f"pg_catalog.{name}" for name in functions.HARMLESS_VOLATILE} <= volatile
    # ... and every known side effect is a function PostgreSQL does not mark volatile.
    for name in functions.KNOWN_SIDE_EFFECTS:
        assert f"pg_catalog.{name}" in known and f"pg_catalog.{name}" not in volatile
