"""Review notifications: the bodies, the signature, and the delivery schedule.

The posting itself is a fake here (a unit test of the code that talks to it); the real
receivers are in tests/test_approvals_notify.py.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from querywarden.approvals.model import Party, Review, ReviewDecision, ReviewSummary
from querywarden.approvals.notify import (
    SIGNATURE_HEADER,
    Notifier,
    NotifyDestination,
    message,
    signature,
    verify,
)

CREATED = datetime(2026, 12, 6, 8, 0, tzinfo=UTC)


def review(decision: ReviewDecision = ReviewDecision.PENDING, **changes: Any) -> Review:
    fields: dict[str, Any] = {
        "id": "abcdefghjk",
        "requester": Party(subject="agent-7", issuer="dev"),
        "database": "app",
        "statement": "DELETE FROM orders WHERE customer_email = 'a@b.example'",
        "normalized": "delete from orders where customer_email = 'a@b.example'",
        "summary": ReviewSummary(operations=("delete",), writes=("public.orders",)),
        "rule": "agents-write-reviewed",
        "reason": "DELETE needs approval",
        "created": CREATED,
        "decision": decision,
    }
    fields.update(changes)
    return Review(**fields)


def destination(**fields: Any) -> NotifyDestination:
    return NotifyDestination.model_validate(
        {"name": "d", "url": "https://hooks.example/x", **fields}
    )


def test_a_destination_takes_exactly_one_http_url() -> None:
    with pytest.raises(ValidationError, match="exactly one of url, urlFile, urlEnv"):
        NotifyDestination.model_validate({"name": "d"})
    with pytest.raises(ValidationError, match="exactly one"):
        NotifyDestination.model_validate({"name": "d", "url": "https://x", "urlEnv": "HOOK"})
    with pytest.raises(ValidationError, match="http"):
        NotifyDestination.model_validate({"name": "d", "url": "file:///etc/passwd"})


def test_a_url_from_a_file_must_be_http_too(tmp_path: Any) -> None:
    path = tmp_path / "url"
    path.write_text("file:///etc/passwd\n")
    with pytest.raises(ValueError, match="not http"):
        NotifyDestination(name="d", url_file=path).resolved_url()
    path.write_text("https://hooks.example/rotated\n")
    assert (
        NotifyDestination(name="d", url_file=path).resolved_url() == "https://hooks.example/rotated"
    )


def test_the_webhook_body_carries_the_shape_not_the_constants() -> None:
    delivery = message(
        destination(),
        "created",
        review(),
        expires=CREATED + timedelta(hours=1),
        link="https://console.example/reviews/abcdefghjk",
        approve_command="querywarden reviews approve abcdefghjk --comment ...",
        now=1_800_000_000,
    )
    assert b"a@b.example" not in delivery.body
    body = json.loads(delivery.body)
    assert body["type"] == "review.created" and body["sequence"] == 1
    assert body["review"]["statement"] == "DELETE FROM orders WHERE customer_email = $1"
    assert body["review"]["expires"] == "2026-12-06T09:00:00+00:00"
    assert body["links"]["decide"] == "https://console.example/reviews/abcdefghjk"
    assert SIGNATURE_HEADER not in delivery.headers  # no secret: not signed
    assert delivery.headers["X-Querywarden-Event"] == "review.created"


def test_the_signature_covers_the_body_and_the_time() -> None:
    body = b'{"type":"review.created"}'
    header = signature(b"k", body, 1_800_000_000)
    assert verify(b"k", body, header, now=1_800_000_010)
    assert not verify(b"k", body + b" ", header, now=1_800_000_010)  # altered
    assert not verify(b"other", body, header, now=1_800_000_010)  # forged
    assert not verify(b"k", body, header, now=1_800_000_000 + 3600)  # replayed later
    assert not verify(b"k", body, "v1=abc", now=1_800_000_000)  # no time


def test_slack_and_teams_bodies_say_who_decided() -> None:
    decided = review(
        ReviewDecision.DENIED,
        approver=Party(subject="dba-1", issuer="dev"),
        decided=CREATED + timedelta(minutes=2),
        comment="not on Fridays",
    )
    kwargs: dict[str, Any] = {
        "expires": None,
        "link": None,
        "approve_command": "querywarden reviews approve abcdefghjk",
        "now": 1_800_000_000,
    }
    slack = message(destination(kind="slack"), "denied", decided, **kwargs)
    assert b"denied by dba-1" in slack.body and b"not on Fridays" in slack.body
    teams = message(destination(kind="teams"), "denied", decided, **kwargs)
    assert b"AdaptiveCard" in teams.body and b"denied by dba-1" in teams.body
    assert b"Action.OpenUrl" not in teams.body  # nothing left to decide


class FakePoster:
    """Answers each post with the next status (or raises OSError for None)."""

    def __init__(self, *statuses: int | None) -> None:
        self.statuses = list(statuses)
        self.posts: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
        self.posts.append((headers["X-Querywarden-Event"], json.loads(body)))
        status = self.statuses.pop(0) if self.statuses else 200
        if status is None:
            raise OSError("connection refused")
        return status


def run_notifier(
    poster: FakePoster, events: list[tuple[str, Review]]
) -> list[tuple[str, dict[str, Any]]]:
    records: list[tuple[str, dict[str, Any]]] = []
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def main() -> None:
        notifier = Notifier(
            [destination()],
            pending_ttl=3600,
            console_url=None,
            approve_command=lambda rid: f"querywarden reviews approve {rid}",
            record=lambda kind, fields: records.append((kind, fields)),
            post=poster,
            sleep=sleep,
        )
        notifier.start()
        for kind, r in events:
            notifier.on_event(kind, r)
        await notifier.close(grace=5)

    asyncio.run(main())
    records.append(("slept", {"delays": slept}))
    return records


def test_a_failed_post_is_retried_with_backoff_then_recorded() -> None:
    poster = FakePoster(None, 503, 200)
    records = run_notifier(poster, [("created", review())])
    assert [r[0] for r in records] == ["notification.delivered", "slept"]
    assert records[0][1]["attempts"] == 3 and records[0][1]["status"] == 200
    assert records[1][1]["delays"] == [0.5, 1.0]


def test_a_destination_that_never_answers_is_given_up_after_every_retry() -> None:
    poster = FakePoster(*([None] * 10))
    records = run_notifier(poster, [("created", review())])
    assert records[0][0] == "notification.failed"
    assert records[0][1]["attempts"] == 6 and "connection refused" in records[0][1]["error"]
    assert records[1][1]["delays"] == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_a_refused_post_is_not_retried_and_events_keep_their_order() -> None:
    poster = FakePoster(400, 200)
    approved = review(ReviewDecision.APPROVED, approver=Party(subject="dba-1"), decided=CREATED)
    records = run_notifier(
        poster, [("created", review()), ("approved", approved), ("used", approved)]
    )
    assert [r[0] for r in records] == ["notification.failed", "notification.delivered", "slept"]
    assert records[0][1]["error"] == "HTTP 400" and records[0][1]["attempts"] == 1
    # "used" is no event a destination subscribes to; the rest arrive in order.
    assert [p[0] for p in poster.posts] == ["review.created", "review.approved"]
