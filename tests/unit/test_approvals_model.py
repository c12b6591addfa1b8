"""The statement normalizer, the approvals settings and the Review's JSON form."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from querywarden.approvals.model import (
    ApprovalSettings,
    Party,
    Review,
    ReviewDecision,
    ReviewSummary,
    new_review_id,
    normalize_statement,
)
from querywarden.identity import Principal

# --- the normalizer -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("DELETE FROM orders WHERE id = 5", "DELETE  FROM\n\torders WHERE id=5"),
        ("DELETE FROM orders WHERE id = 5", "delete from ORDERS where ID = 5"),
        ("DELETE FROM orders WHERE id = 5", "DELETE /* why */ FROM orders -- note\nWHERE id = 5"),
        ("DELETE FROM orders WHERE id = 5", "DELETE FROM orders WHERE id = 5;"),
        ("DELETE FROM orders WHERE id = 5", "  DELETE FROM orders WHERE id = 5 ;  ; "),
        ("DROP TABLE t", "/* outer /* nested */ still comment */ DROP TABLE t"),
        ("SELECT a.b::int FROM s.t", "SELECT a . b :: int FROM s . t"),
        ("UPDATE t SET x = x + 1", "UPDATE t SET x=x+1"),
        ("DELETE FROM t; DROP TABLE t", "DELETE FROM t ;\nDROP TABLE t"),
    ],
)
def test_whitespace_comments_and_keyword_case_do_not_matter(a: str, b: str) -> None:
    assert normalize_statement(a) == normalize_statement(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # Literals are the statement: approving id = 5 never approves id = 6.
        ("DELETE FROM orders WHERE id = 5", "DELETE FROM orders WHERE id = 6"),
        ("DELETE FROM t WHERE s = 'a'", "DELETE FROM t WHERE s = 'b'"),
        ("DELETE FROM t WHERE s = 'a  b'", "DELETE FROM t WHERE s = 'a b'"),
        ("DELETE FROM t WHERE s = 'A'", "DELETE FROM t WHERE s = 'a'"),
        ("DELETE FROM t WHERE n = 1.5", "DELETE FROM t WHERE n = 1.50"),
        # What looks like a comment inside a literal is text, not a comment.
        ("SELECT '-- x'", "SELECT ''"),
        ("SELECT '/* x */'", "SELECT '/**/'"),
        # Dollar-quoted bodies keep their whitespace and case.
        ("DO $$ BEGIN  NULL; END $$", "DO $$ BEGIN NULL; END $$"),
        ("DO $f$ begin null; end $f$", "DO $f$ BEGIN NULL; END $f$"),
        # Quoted identifiers keep their case and spaces; a quoted name is not the bare one.
        ('DROP TABLE "Orders"', "DROP TABLE orders"),
        ('DROP TABLE "my  table"', 'DROP TABLE "my table"'),
        # Different schema, different table.
        ("DROP TABLE a.t", "DROP TABLE b.t"),
        ("DROP TABLE t", "DROP TABLE t CASCADE"),
        # $1 and $2 are different parameters.
        ("DELETE FROM t WHERE id = $1", "DELETE FROM t WHERE id = $2"),
        # A national-character literal is not a cast to a type named n.
        ("SELECT n'x'", "SELECT n 'x'"),
    ],
)
def test_literals_and_quoted_text_matter(a: str, b: str) -> None:
    assert normalize_statement(a) != normalize_statement(b)


def test_the_normalized_text_keeps_literals_verbatim() -> None:
    text = "DELETE FROM t WHERE note = 'It''s  DONE' AND body = $b$ x  -- y $b$ AND \"Col\" = 1"
    assert normalize_statement(text) == (
        "delete from t where note = 'It''s  DONE' and body = $b$ x  -- y $b$ and \"Col\" = 1"
    )


def test_unscannable_text_only_matches_itself() -> None:
    text = "DELETE FROM t WHERE s = 'unterminated"
    assert normalize_statement(text) == text
    assert normalize_statement(text + " ") != normalize_statement(text)


def test_string_continuation_across_a_newline_is_kept() -> None:
    # 'a'<newline>'b' is the one literal 'ab'; a space instead of the newline would be a
    # syntax error. The literal keeps its text, so the two are never confused.
    joined = normalize_statement("SELECT 'a'\n'b'")
    assert joined == "select 'a'\n'b'"
    assert normalize_statement("SELECT 'a' 'b'") != joined


#: Statements as their tokens, so gaps can be put between any two of them.
_TOKENIZED = [
    ["DELETE", "FROM", "public.orders", "WHERE", "id", "=", "5", "AND", "note", "=", "'a  b'"],
    [
        "UPDATE",
        '"Accounts"',
        "SET",
        "balance",
        "=",
        "balance",
        "-",
        "10",
        "WHERE",
        "id",
        "IN",
        "(",
        "1",
        ",",
        "2",
        ")",
    ],
    ["DROP", "TABLE", "IF", "EXISTS", "s", ".", "t", "CASCADE"],
    ["DO", "$body$ BEGIN PERFORM 1; END $body$"],
]


@given(
    st.sampled_from(_TOKENIZED),
    st.lists(st.sampled_from([" ", "\n", "\t ", " /* c */ ", " -- c\n", "\r\n  "]), min_size=20),
)
def test_any_whitespace_and_comments_between_tokens_normalize_alike(
    tokens: list[str], gaps: list[str]
) -> None:
    plain = " ".join(tokens)
    text = "".join(token + gaps[i] for i, token in enumerate(tokens))
    assert normalize_statement(text) == normalize_statement(plain)
    assert normalize_statement(normalize_statement(text)) == normalize_statement(plain)


# --- settings -----------------------------------------------------------------------------


def test_settings_read_the_policy_section_in_camel_case() -> None:
    settings = ApprovalSettings.model_validate(
        {
            "approvers": {"groups": ["dba-oncall"], "users": ["carol"]},
            "hold": "90s",
            "grantTTL": "30m",
            "requireDistinctApprover": False,
            "pendingTTL": "2h",
        }
    )
    assert settings.approvers.groups == ["dba-oncall"]
    assert settings.approvers.users == ["carol"]
    assert settings.hold == timedelta(seconds=90)
    assert settings.grant_ttl == timedelta(minutes=30)
    assert settings.require_distinct_approver is False
    assert settings.pending_ttl == timedelta(hours=2)


def test_settings_defaults() -> None:
    settings = ApprovalSettings.model_validate({})
    assert settings.hold == timedelta(seconds=60)
    assert settings.grant_ttl == timedelta(minutes=15)
    assert settings.require_distinct_approver is True
    assert settings.approvers.groups == [] and settings.approvers.users == []


@pytest.mark.parametrize(
    "data",
    [
        {"hold": "0s"},
        {"grantTTL": "-1m"},
        {"hold": "soon"},
        {"grantTtl": "5m"},  # the documented spelling is grantTTL
        {"approvers": {"roles": ["x"]}},
        {"hold": "2h", "pendingTTL": "1h"},  # a review must outlive its hold
    ],
)
def test_settings_refuse_bad_values(data: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ApprovalSettings.model_validate(data)


# --- the review ---------------------------------------------------------------------------


def test_review_json_round_trip() -> None:
    now = datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    review = Review(
        id=new_review_id(),
        requester=Party.from_principal(Principal("agent-7", frozenset({"b", "a"}), issuer="corp")),
        database="app",
        statement="DELETE FROM t WHERE id = 5",
        normalized=normalize_statement("DELETE FROM t WHERE id = 5"),
        summary=ReviewSummary(operations=("delete",), writes=("public.t",)),
        rule="agents",
        reason="DELETE needs approval",
        estimate=120_000,
        created=now,
        decided=now + timedelta(seconds=5),
        approver=Party(subject="dba-1", issuer="corp", groups=("dba",)),
        decision=ReviewDecision.APPROVED,
        comment="ok",
        grant_expires=now + timedelta(minutes=15),
        uses_left=1,
    )
    data = review.to_json()
    assert data["requester"] == {"subject": "agent-7", "issuer": "corp", "groups": ["a", "b"]}
    assert data["grantExpires"] == "2026-05-01T12:15:00.123456Z"
    assert data["usesLeft"] == 1 and data["usedAt"] == []
    assert Review.model_validate(data) == review


def test_review_ids_are_short_url_safe_and_never_look_like_options() -> None:
    ids = {new_review_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[a-z2-9]{10}", i) for i in ids)


def test_grant_usable() -> None:
    now = datetime(2026, 5, 1, tzinfo=UTC)
    base = Review(
        id="r",
        requester=Party(subject="a"),
        database="app",
        statement="x",
        normalized="x",
        created=now,
        decision=ReviewDecision.APPROVED,
        grant_expires=now + timedelta(minutes=1),
        uses_left=1,
    )
    assert base.grant_usable(now)
    assert not base.grant_usable(now + timedelta(minutes=1))
    assert not base.model_copy(update={"uses_left": 0}).grant_usable(now)
    assert base.model_copy(update={"uses_left": -1}).grant_usable(now)
    assert not base.model_copy(update={"decision": ReviewDecision.DENIED}).grant_usable(now)


def test_a_review_ends_when_nothing_more_can_happen_to_it() -> None:
    from datetime import UTC, datetime, timedelta

    from querywarden.approvals.model import Party, Review, ReviewDecision

    created = datetime(2026, 5, 1, 12, tzinfo=UTC)
    base = Review(
        id="r1", requester=Party(subject="a"), database="d", statement="s", normalized="s",
        created=created,
    )  # fmt: skip
    decided = created + timedelta(minutes=5)
    assert base.ended_at() is None  # pending
    denied = base.model_copy(update={"decision": ReviewDecision.DENIED, "decided": decided})
    assert denied.ended_at() == decided
    approved = denied.model_copy(
        update={"decision": ReviewDecision.APPROVED, "grant_expires": decided + timedelta(hours=1)}
    )
    assert approved.ended_at() == decided + timedelta(hours=1)
