"""The masker's per-identity cache of a catalog snapshot lives and dies with the snapshot."""

from __future__ import annotations

import pytest

from querywarden.analysis import Analyzer
from querywarden.identity import Principal
from querywarden.masking import plan as plan_module
from querywarden.masking.catalog import SensitiveCatalog
from querywarden.masking.plan import Masker, MaskPlan
from querywarden.policy.model import MaskedColumn, MaskingSection

AGENT = Principal(subject="agent", issuer="dev", groups=frozenset({"ai-agents"}))
SECTION = MaskingSection.model_validate(
    {"columns": [{"table": "public.people", "column": "ssn", "strategy": "redact"}]}
)
SSN = MaskedColumn(table="public.people", column="ssn", strategy="redact")


def snapshot(people_oid: int) -> SensitiveCatalog:
    """A catalog in which public.people (and its ssn, attnum 2) has ``people_oid``."""
    return SensitiveCatalog.build(
        SECTION.columns,
        attributes=[
            (people_oid, "public", "people", 1, "id"),
            (people_oid, "public", "people", 2, "ssn"),
        ],
        children=[],
        view_references=[],
        view_columns=[],
    )


def test_a_new_snapshot_at_a_reused_address_gets_its_own_columns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every object at one address: what CPython does when a freed snapshot's memory is
    # reused by the next one (rare, and then the cache handed out the old columns).
    monkeypatch.setattr(plan_module, "id", lambda _: 4242, raising=False)
    masker = Masker(SECTION, None)
    summaries = Analyzer().analyze("SELECT ssn FROM people")
    first = masker.plan(AGENT, snapshot(16384), summaries, ["public"])
    assert isinstance(first, MaskPlan)
    assert set(first.origins) == {(16384, 2)}
    # The table was dropped and created again (a migration): a new OID, a new snapshot.
    second = masker.plan(AGENT, snapshot(16500), summaries, ["public"])
    assert isinstance(second, MaskPlan)
    assert set(second.origins) == {(16500, 2)}


def test_the_cache_is_the_snapshots_own() -> None:
    masker = Masker(SECTION, None)
    catalog = snapshot(16384)
    summaries = Analyzer().analyze("SELECT ssn FROM people")
    masker.plan(AGENT, catalog, summaries, ["public"])
    assert owners(catalog) == {masker}
    # Another masker (a reloaded policy) does not reuse what this one derived.
    other = Masker(SECTION, None)
    other.plan(AGENT, catalog, summaries, ["public"])
    assert owners(catalog) == {masker, other}


def owners(catalog: SensitiveCatalog) -> set[object]:
    """The maskers that cached something on ``catalog`` (resolved columns or plans)."""
    return {key[1] if key[0] == "plan" else key[0] for key in catalog.derived}  # type: ignore[index]


def test_a_statement_shape_is_planned_once_per_identity_and_search_path() -> None:
    masker = Masker(SECTION, None)
    catalog = snapshot(16384)
    analyzer = Analyzer()
    # The same shape with other constants: equal summaries, the same plan object.
    first = masker.plan(
        AGENT, catalog, analyzer.analyze("SELECT ssn FROM people WHERE id = 1"), ["public"]
    )
    again = masker.plan(
        AGENT, catalog, analyzer.analyze("SELECT ssn FROM people WHERE id = 2"), ["public"]
    )
    assert isinstance(first, MaskPlan) and again is first
    # Anything the plan is made of differs: planned anew.
    elsewhere = masker.plan(
        AGENT, catalog, analyzer.analyze("SELECT ssn FROM people WHERE id = 1"), ["other"]
    )
    assert elsewhere is not first and isinstance(elsewhere, MaskPlan)
    assert set(elsewhere.origins) == {(16384, 2)}  # resolved the same, planned again
    dba = Principal(subject="dba", issuer="dev", groups=frozenset({"dba"}))
    assert (
        masker.plan(
            dba, catalog, analyzer.analyze("SELECT ssn FROM people WHERE id = 1"), ["public"]
        )
        is not first
    )
