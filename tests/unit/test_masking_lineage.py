"""View lineage from pg_get_viewdef text, and the catalog that uses it (no database)."""

from __future__ import annotations

import pytest

from querywarden.masking.catalog import SensitiveCatalog
from querywarden.masking.lineage import OutputColumn, view_lineage
from querywarden.policy.model import MaskedColumn


def test_a_plain_select_gives_each_output_its_source() -> None:
    lineage = view_lineage(
        " SELECT c.id,\n    c.email AS contact,\n    upper(c.name) AS shout\n   FROM customers c;"
    )
    assert lineage is not None
    assert lineage.outputs == (
        OutputColumn(frozenset({("customers", "id")}), ("customers", "id")),
        OutputColumn(frozenset({("customers", "email")}), ("customers", "email")),
        OutputColumn(frozenset({("customers", "name")}), None),
    )
    assert lineage.elsewhere == frozenset()


def test_references_outside_the_output_list_are_collected() -> None:
    lineage = view_lineage(
        "SELECT c.id FROM customers c JOIN orders o ON o.customer_id = c.id "
        "WHERE c.ssn LIKE '1%' GROUP BY c.id HAVING count(o.total) > 1 ORDER BY c.card"
    )
    assert lineage is not None
    assert lineage.elsewhere == {
        ("orders", "customer_id"),
        ("customers", "id"),
        ("customers", "ssn"),
        ("orders", "total"),
        ("customers", "card"),
    }


@pytest.mark.parametrize(
    "definition",
    [
        "SELECT id FROM customers UNION SELECT id FROM orders",
        "WITH x AS (SELECT id FROM customers) SELECT x.id FROM x",
        "SELECT c.id, (SELECT max(o.total) FROM orders o) FROM customers c",
        "SELECT s.id FROM (SELECT id FROM customers) s",
        "SELECT * FROM customers",
        "SELECT c.* FROM customers c",
        "SELECT f.x FROM generate_series(1, 3) f(x)",
        "VALUES (1)",
        "SELECT c.id FROM customers c, customers c",
        "not sql at all",
    ],
)
def test_shapes_it_does_not_follow_give_none(definition: str) -> None:
    assert view_lineage(definition) is None


# The catalog: customers (OID 100) has ssn (attnum 3) configured; views are 200 and 300.
SSN = MaskedColumn(table="public.customers", column="ssn", strategy="partial")
ATTRIBUTES = [(100, "public", "customers", n, c) for n, c in enumerate(["id", "name", "ssn"], 1)]


def catalog(definition: str, view_columns: list[str], used: list[int]) -> SensitiveCatalog:
    return SensitiveCatalog.build(
        [SSN],
        attributes=ATTRIBUTES,
        children=[],
        view_references=[(200, 100, attnum) for attnum in used],
        view_columns=[(200, "public", "v", n, c) for n, c in enumerate(view_columns, 1)],
        view_definitions=[(200, definition)],
    )


def test_only_the_view_columns_that_carry_a_sensitive_column_are_masked() -> None:
    built = catalog(
        "SELECT customers.id, customers.name, customers.ssn AS tax_id, "
        "'x-' || customers.ssn AS tagged FROM customers",
        ["id", "name", "tax_id", "tagged"],
        used=[1, 2, 3],
    )
    assert (200, 1) not in built.by_origin and (200, 2) not in built.by_origin
    assert built.by_origin[(200, 3)] == SSN  # passed through: the column's strategy
    assert built.by_origin[(200, 4)].strategy == "redact"  # computed from it
    assert set(built.by_name) == {
        ("public.customers", "ssn"),
        ("public.v", "tax_id"),
        ("public.v", "tagged"),
    }


def test_a_view_whose_rows_depend_on_a_sensitive_column_is_masked_whole() -> None:
    built = catalog(
        "SELECT customers.id, customers.name FROM customers WHERE customers.ssn LIKE '1%'",
        ["id", "name"],
        used=[1, 2, 3],
    )
    assert built.by_origin[(200, 1)].strategy == "redact"
    assert built.by_origin[(200, 2)].strategy == "redact"


def test_without_a_definition_every_column_is_sensitive() -> None:
    built = SensitiveCatalog.build(
        [SSN],
        attributes=ATTRIBUTES,
        children=[],
        view_references=[(200, 100, 1), (200, 100, 3)],
        view_columns=[(200, "public", "v", 1, "id"), (200, "public", "v", 2, "ssn")],
    )
    assert built.by_origin[(200, 1)].strategy == "redact"
    assert built.by_origin[(200, 2)] == SSN  # named like the column it references


def test_a_view_over_a_view_follows_the_lineage_through_both() -> None:
    built = SensitiveCatalog.build(
        [SSN],
        attributes=ATTRIBUTES,
        children=[],
        view_references=[(200, 100, 1), (200, 100, 3), (300, 200, 1), (300, 200, 2)],
        view_columns=[
            (200, "public", "v", 1, "id"),
            (200, "public", "v", 2, "secret"),
            (300, "public", "w", 1, "id"),
            (300, "public", "w", 2, "again"),
        ],
        view_definitions=[
            (200, "SELECT customers.id, customers.ssn AS secret FROM customers"),
            (300, "SELECT v.id, v.secret AS again FROM v"),
        ],
    )
    assert (300, 1) not in built.by_origin
    assert built.by_origin[(300, 2)] == SSN


def test_a_view_calling_a_function_of_a_user_is_redacted_whole() -> None:
    built = SensitiveCatalog.build(
        [SSN],
        attributes=ATTRIBUTES,
        children=[],
        view_references=[(200, 100, 1)],  # only customers.id, as far as pg_depend knows
        view_columns=[(200, "public", "v", 1, "id"), (200, "public", "v", 2, "leaked")],
        view_definitions=[
            (200, "SELECT customers.id, leak(customers.id) AS leaked FROM customers")
        ],
        function_views=[200],
    )
    assert built.by_origin[(200, 1)].strategy == "redact"
    assert built.by_origin[(200, 2)].strategy == "redact"
