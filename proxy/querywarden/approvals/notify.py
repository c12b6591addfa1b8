"""Approvers are told at once: review events posted to webhooks, Slack and Teams.

When a review opens, is decided, expires or is withdrawn, the gateway posts it to every
destination of the policy's ``approvals.notify`` that subscribes to the event. Two halves:

* what is sent (:func:`message`): the body and headers for one event and destination, a
  pure function of the review. A generic ``webhook`` gets a documented JSON body signed
  with HMAC-SHA256 (:func:`signature`, checked by :func:`verify`); ``slack`` and
  ``teams`` get the bodies their incoming webhooks accept. Each carries the statement (as
  its shape, constants replaced by ``$n``: a chat channel is a wider audience than the
  approvers, and the exact text is in the console and ``querywarden reviews show``), the
  requester, the rule and reason, when the review expires, and how to decide it;
* how it is sent (:class:`Notifier`): one queue and one worker task per destination, so
  a destination's events arrive in order and one that is down delays only its own. Each
  post is retried with backoff; every delivery, and every one given up, is recorded in
  the audit log. Nothing here ever blocks a hold or a decision: an event is queued and
  the caller goes on.

Incoming webhooks cannot edit a message they posted, so a decision is a message of its
own that names the review (the generic webhook's ``review.id`` and ``sequence`` let a
receiver replace what it shows).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel

from querywarden.analysis import sanitized_text

if TYPE_CHECKING:  # the model imports this module for its settings
    from querywarden.approvals.model import Review

__all__ = [
    "SIGNATURE_HEADER",
    "Delivery",
    "Notifier",
    "NotifyDestination",
    "message",
    "signature",
    "verify",
]

log = logging.getLogger(__name__)

#: The header that carries a generic webhook's signature: ``t=<unix seconds>,v1=<hex>``.
SIGNATURE_HEADER: Final = "X-Querywarden-Signature"
#: The events a destination may subscribe to (``used`` is not one: it is no news to act on).
NotifyEvent = Literal["created", "approved", "denied", "expired", "withdrawn"]
_ALL_EVENTS: Final[tuple[NotifyEvent, ...]] = (
    "created",
    "approved",
    "denied",
    "expired",
    "withdrawn",
)
#: Seconds to wait before each retry of a failed post (then the delivery is given up).
RETRY_DELAYS: Final = (0.5, 1.0, 2.0, 4.0, 8.0)
#: Events waiting per destination; past this the oldest is dropped (and recorded).
QUEUE_LIMIT: Final = 1000
_TIMEOUT: Final = 5.0
#: The order of a review's events, for receivers that keep only the newest.
_SEQUENCE: Final = {"created": 1, "approved": 2, "denied": 2, "expired": 2, "withdrawn": 2}


class NotifyDestination(BaseModel):
    """One place review events are posted (the policy's ``approvals.notify[]``).

    The URL of an incoming webhook is itself a credential, so it may come from a file (a
    mounted Secret) or an environment variable instead of the policy; so may the webhook
    signing secret.
    """

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    name: str
    kind: Literal["webhook", "slack", "teams"] = "webhook"
    url: str | None = None
    url_file: Path | None = None
    url_env: str | None = None
    #: The HMAC-SHA256 key of the ``webhook`` signature (a file or an environment variable).
    secret_file: Path | None = None
    secret_env: str | None = None
    events: tuple[NotifyEvent, ...] = _ALL_EVENTS

    @model_validator(mode="after")
    def _one_url(self) -> NotifyDestination:
        given = [x for x in (self.url, self.url_file, self.url_env) if x]
        if len(given) != 1:
            raise ValueError(
                f"notify destination {self.name!r}: give exactly one of url, urlFile, urlEnv"
            )
        if self.url is not None and not self.url.startswith(("https://", "http://")):
            raise ValueError(f"notify destination {self.name!r}: url must be http(s)://")
        if self.secret_file is not None and self.secret_env is not None:
            raise ValueError(
                f"notify destination {self.name!r}: give at most one of secretFile, secretEnv"
            )
        return self

    def resolved_url(self) -> str:
        """The URL, read now (a rotated Secret is picked up at the next post)."""
        url = _read(self.url, self.url_file, self.url_env, "URL")
        if not url.startswith(("https://", "http://")):
            raise ValueError(f"the URL of notify destination {self.name!r} is not http(s)://")
        return url

    def resolved_secret(self) -> bytes | None:
        if self.secret_file is None and self.secret_env is None:
            return None
        return _read(None, self.secret_file, self.secret_env, "secret").encode()


def _read(value: str | None, file: Path | None, env: str | None, what: str) -> str:
    if value:
        return value
    if file is not None:
        return file.read_text().strip()
    assert env is not None
    found = os.environ.get(env, "").strip()
    if not found:
        raise LookupError(f"the environment variable {env} (the {what}) is not set")
    return found


# --- what is sent -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """One post: where, what, and the event it carries (for the audit record)."""

    destination: str
    event: str
    review_id: str
    body: bytes
    headers: dict[str, str]


def statement_shape(statement: str) -> str:
    """The statement as a notification shows it: constants as ``$n``, no comments."""
    shape = sanitized_text(statement)
    return shape if shape is not None else "(the statement does not parse; see the console)"


def message(
    destination: NotifyDestination,
    kind: str,
    review: Review,
    *,
    expires: datetime | None,
    link: str | None,
    approve_command: str,
    now: float,
    secret: bytes | None = None,
) -> Delivery:
    """The post for one review event to one destination (pure: no I/O)."""
    facts = _facts(kind, review, expires=expires, link=link, approve_command=approve_command)
    if destination.kind == "slack":
        payload: dict[str, Any] = _slack(facts)
    elif destination.kind == "teams":
        payload = _teams(facts)
    else:
        payload = {
            "type": f"review.{kind}",
            "sequence": _SEQUENCE.get(kind, 3),
            "occurred": _iso_from(now),
            "review": facts["review"],
            "links": {"decide": link, "approveCommand": approve_command},
        }
    body = orjson.dumps(payload)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "querywarden-notify",
        "X-Querywarden-Event": f"review.{kind}",
        "X-Querywarden-Delivery": str(uuid.uuid4()),
    }
    if secret is not None:
        headers[SIGNATURE_HEADER] = signature(secret, body, int(now))
    return Delivery(destination.name, f"review.{kind}", review.id, body, headers)


def signature(secret: bytes, body: bytes, timestamp: int) -> str:
    """``t=<timestamp>,v1=<hex HMAC-SHA256 of "<timestamp>." + body>``.

    The timestamp is signed with the body, so a receiver can refuse a replay of an old
    post (compare it with its clock) as well as a forged one.
    """
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, body: bytes, header: str, *, now: float, tolerance: float = 300) -> bool:
    """What a receiver does with :data:`SIGNATURE_HEADER` (a reference for the docs)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = signature(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def _facts(
    kind: str, review: Review, *, expires: datetime | None, link: str | None, approve_command: str
) -> dict[str, Any]:
    requester = review.requester
    approver = review.approver
    return {
        "kind": kind,
        "link": link,
        "approveCommand": approve_command,
        "review": {
            "id": review.id,
            "state": review.decision.value,
            "database": review.database,
            "statement": statement_shape(review.statement),
            "operations": list(review.summary.operations),
            "tables": sorted({*review.summary.reads, *review.summary.writes}),
            "requester": {"subject": requester.subject, "issuer": requester.issuer},
            "rule": review.rule,
            "reason": review.reason,
            "created": review.created.isoformat(),
            "expires": expires.isoformat() if expires is not None else None,
            "decided": review.decided.isoformat() if review.decided else None,
            "approver": (
                {"subject": approver.subject, "issuer": approver.issuer} if approver else None
            ),
            "comment": review.comment,
            "grantExpires": review.grant_expires.isoformat() if review.grant_expires else None,
        },
    }


def _headline(facts: dict[str, Any]) -> str:
    review = facts["review"]
    who = review["requester"]["subject"]
    by = review["approver"]["subject"] if review["approver"] else None
    return {
        "created": f"Review {review['id']}: {who} waits for approval",
        "approved": f"Review {review['id']} approved by {by}",
        "denied": f"Review {review['id']} denied by {by}",
        "expired": f"Review {review['id']} expired undecided",
        "withdrawn": f"Review {review['id']} withdrawn ({review['comment'] or 'the client left'})",
    }.get(facts["kind"], f"Review {review['id']}: {facts['kind']}")


def _lines(facts: dict[str, Any]) -> list[tuple[str, str]]:
    review = facts["review"]
    lines = [
        ("Requester", review["requester"]["subject"]),
        ("Database", review["database"]),
        ("Rule", f"{review['rule']}: {review['reason']}"),
    ]
    if facts["kind"] == "created":
        lines.append(("Expires", review["expires"] or "-"))
        decide = facts["link"] or facts["approveCommand"]
        lines.append(("Decide", decide))
    elif review["comment"]:
        lines.append(("Comment", review["comment"]))
    return lines


def _slack(facts: dict[str, Any]) -> dict[str, Any]:
    headline = _headline(facts)
    statement = facts["review"]["statement"].replace("```", "'''")
    fields = "\n".join(f"*{name}:* {value}" for name, value in _lines(facts))
    return {
        "text": headline,  # what notifications and old clients show
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*{headline}*"}},
            {"type": "section", "text": {"type": "mrkdwn", "text": f"```{statement}```"}},
            {"type": "section", "text": {"type": "mrkdwn", "text": fields}},
        ],
    }


def _teams(facts: dict[str, Any]) -> dict[str, Any]:
    card: dict[str, Any] = {
        "type": "AdaptiveCard",
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "version": "1.4",
        "body": [
            {"type": "TextBlock", "text": _headline(facts), "weight": "Bolder", "wrap": True},
            {
                "type": "TextBlock",
                "text": facts["review"]["statement"],
                "fontType": "Monospace",
                "wrap": True,
            },
            {
                "type": "FactSet",
                "facts": [{"title": name, "value": value} for name, value in _lines(facts)],
            },
        ],
    }
    if facts["link"] and facts["kind"] == "created":
        card["actions"] = [{"type": "Action.OpenUrl", "title": "Decide", "url": facts["link"]}]
    return {
        "type": "message",
        "attachments": [
            {"contentType": "application/vnd.microsoft.card.adaptive", "content": card}
        ],
    }


def _iso_from(now: float) -> str:
    return datetime.fromtimestamp(now).astimezone().isoformat()


# --- how it is sent -----------------------------------------------------------------------

#: ``post(url, body, headers, timeout)`` -> the HTTP status; raises OSError when unreachable.
Poster = Callable[[str, bytes, dict[str, str], float], int]
#: ``record(type, fields)``: an audit record of a delivery (must not raise).
Recorder = Callable[[str, dict[str, Any]], None]


def http_post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    """POST with the standard library (run in a worker thread)."""
    # http(s) only: NotifyDestination.resolved_url refuses any other scheme.
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


class Notifier:
    """Queues review events and posts them, one worker per destination (see module doc)."""

    def __init__(
        self,
        destinations: Sequence[NotifyDestination],
        *,
        pending_ttl: float,
        console_url: str | None,
        approve_command: Callable[[str], str],
        record: Recorder,
        post: Poster = http_post,
        clock: Callable[[], float] = time.time,
        delays: Sequence[float] = RETRY_DELAYS,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.destinations = tuple(destinations)
        self._pending_ttl = pending_ttl
        self._console_url = console_url.rstrip("/") if console_url else None
        self._approve_command = approve_command
        self._record = record
        self._post = post
        self._clock = clock
        self._delays = tuple(delays)
        self._sleep = sleep
        self._queues: dict[str, asyncio.Queue[tuple[str, Review]]] = {}
        self._workers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start the workers (on the running loop)."""
        for destination in self.destinations:
            queue: asyncio.Queue[tuple[str, Review]] = asyncio.Queue(QUEUE_LIMIT)
            self._queues[destination.name] = queue
            self._workers.append(
                asyncio.get_running_loop().create_task(self._work(destination, queue))
            )

    def on_event(self, kind: str, review: Review) -> None:
        """A review event: queued for every destination that wants it; never blocks."""
        for destination in self.destinations:
            if kind not in destination.events:
                continue
            queue = self._queues.get(destination.name)
            if queue is None:
                continue  # not started (or closed): nothing to post with
            if queue.full():
                dropped_kind, dropped = queue.get_nowait()
                self._record_failure(
                    destination, dropped_kind, dropped, "dropped: the queue was full", 0
                )
            queue.put_nowait((kind, review))

    def link(self, review_id: str) -> str | None:
        """Where an approver decides the review (the console), when one is configured."""
        return f"{self._console_url}/reviews/{review_id}" if self._console_url else None

    async def close(self, grace: float = 2.0) -> None:
        """Let queued events go out for at most ``grace`` seconds, then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(q.join() for q in self._queues.values())), grace
            )
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        self._queues.clear()

    async def _work(
        self, destination: NotifyDestination, queue: asyncio.Queue[tuple[str, Review]]
    ) -> None:
        while True:
            kind, review = await queue.get()
            try:
                await self._deliver(destination, kind, review)
            except Exception:  # a bug here must not stop the destination's worker
                log.exception(
                    "notify: delivering %s of %s to %s failed", kind, review.id, destination.name
                )
            finally:
                queue.task_done()

    async def _deliver(self, destination: NotifyDestination, kind: str, review: Review) -> None:
        expires = review.created + timedelta(seconds=self._pending_ttl)
        attempts = 0
        error = ""
        for delay in (0.0, *self._delays):
            if delay:
                await self._sleep(delay)
            attempts += 1
            try:
                url = destination.resolved_url()
                delivery = message(
                    destination,
                    kind,
                    review,
                    expires=expires if review.pending else None,
                    link=self.link(review.id),
                    approve_command=self._approve_command(review.id),
                    now=self._clock(),
                    secret=destination.resolved_secret(),
                )
                status = await asyncio.to_thread(
                    self._post, url, delivery.body, delivery.headers, _TIMEOUT
                )
            except (OSError, LookupError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                continue
            if 200 <= status < 300:
                self._record(
                    "notification.delivered",
                    {
                        "destination": destination.name,
                        "event": f"review.{kind}",
                        "review_id": review.id,
                        "attempts": attempts,
                        "status": status,
                    },
                )
                return
            error = f"HTTP {status}"
            if 400 <= status < 500 and status not in (408, 429):
                break  # the receiver refuses this post: sending it again will not help
        self._record_failure(destination, kind, review, error, attempts)

    def _record_failure(
        self, destination: NotifyDestination, kind: str, review: Review, error: str, attempts: int
    ) -> None:
        log.warning(
            "notify: %s of review %s not delivered to %s (%s)",
            kind,
            review.id,
            destination.name,
            error,
        )
        self._record(
            "notification.failed",
            {
                "destination": destination.name,
                "event": f"review.{kind}",
                "review_id": review.id,
                "attempts": attempts,
                "error": error,
            },
        )
