"""The shipped list of pg_catalog's relations is what the server's catalog says."""

from __future__ import annotations

from importlib import resources

import pytest

from querywarden.devcluster import EphemeralCluster
from querywarden.policy import relations

pytestmark = pytest.mark.postgres


def test_shipped_list_matches_the_catalog_of_the_test_cluster(pg: EphemeralCluster) -> None:
    major = str(int(pg.psql("SHOW server_version_num")) // 10000)
    expected = relations.render(pg.psql(relations.CATALOG_QUERY).splitlines(), major)
    shipped = resources.files(relations.__package__) / relations.data_file_name(major)
    assert shipped.is_file(), (
        f"no list for PostgreSQL {major}: run scripts/catalog_relations.py against it"
    )
    assert shipped.read_text(encoding="utf-8") == expected, (
        "the list of pg_catalog's relations drifted: run scripts/catalog_relations.py"
    )


def test_the_list_has_the_catalog_and_its_exposing_views_and_no_user_names() -> None:
    names = relations.builtin_catalog_relations()
    for name in ("pg_class", "pg_stats", "pg_stat_activity", "pg_largeobject", "pg_tables"):
        assert name in names
    for name in ("orders", "customers", "secrets", "pg_stat_statements"):
        assert name not in names
