"""The QueryReview conditions (Decided, Approved, Expired) as pure functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from querywarden.approvals.review_conditions import (
    next_generation,
    review_conditions,
    review_state,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def review(decision: str = "pending", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "abc-1", "generation": 3},
        "spec": {"decision": decision, "comment": "ticket 1"},
        "status": status,
    }


def states(conditions: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(c["type"], c["status"], c["reason"]) for c in conditions]


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (review(), [("Decided", "False", "Pending"), ("Approved", "False", "Pending"),
                    ("Expired", "False", "Pending")]),
        (review("approved", approver={"subject": "alice"}),
         [("Decided", "True", "Approved"), ("Approved", "True", "Approved"),
          ("Expired", "False", "Approved")]),
        (review("denied", approver={"subject": "alice"}),
         [("Decided", "True", "Denied"), ("Approved", "False", "Denied"),
          ("Expired", "False", "Denied")]),
        (review(closed="withdrawn", closedReason="gone"),
         [("Decided", "True", "Withdrawn"), ("Approved", "False", "Withdrawn"),
          ("Expired", "False", "Withdrawn")]),
        (review(closed="expired", closedReason="nobody decided in time"),
         [("Decided", "True", "Expired"), ("Approved", "False", "Expired"),
          ("Expired", "True", "Expired")]),
    ],
)  # fmt: skip
def test_each_state_has_its_conditions(obj: dict[str, Any], expected: list[Any]) -> None:
    conditions = review_conditions(obj, generation=next_generation(obj), now=T0)
    assert states(conditions) == expected
    assert {c["observedGeneration"] for c in conditions} == {4}
    assert {c["lastTransitionTime"] for c in conditions} == {"2026-01-02T03:04:05Z"}


def test_messages_say_who_and_why() -> None:
    approved = review_conditions(
        review("approved", approver={"subject": "alice"}), generation=2, now=T0
    )
    assert approved[1]["message"] == "approved by alice: ticket 1"
    expired = review_conditions(
        review(closed="expired", closedReason="nobody decided in time"), generation=2, now=T0
    )
    assert expired[2]["message"] == "expired undecided: nobody decided in time"
    long = review("denied", approver={"subject": "alice"})
    long["spec"]["comment"] = "x" * 100_000
    assert len(review_conditions(long, generation=2, now=T0)[0]["message"]) < 2048


def test_transition_times_change_only_with_the_status() -> None:
    pending = review_conditions(review(), generation=1, now=T0)
    later = T0 + timedelta(minutes=5)
    obj = review("approved", approver={"subject": "alice"}, conditions=pending)
    approved = {c["type"]: c for c in review_conditions(obj, generation=2, now=later)}
    assert approved["Decided"]["lastTransitionTime"] == "2026-01-02T03:09:05Z"
    assert approved["Approved"]["lastTransitionTime"] == "2026-01-02T03:09:05Z"
    # Expired stays False: its time is the pending one, though its reason changed.
    assert approved["Expired"]["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    assert approved["Expired"]["reason"] == "Approved"


def test_state_and_generation_of_an_object() -> None:
    assert review_state(review()) == "pending"
    assert review_state(review("approved")) == "approved"
    assert review_state(review("pending", closed="expired")) == "expired"
    assert next_generation({"metadata": {}}) == 1
    with pytest.raises(ValueError, match="not a QueryReview state"):
        review_conditions(review("maybe"), generation=1, now=T0)
