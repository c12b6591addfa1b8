"""Reviews, their settings, the statement normalizer and the approval errors.

A :class:`Review` is the record of one held statement: who sent it, what it touches, why
the policy wanted a human to look at it, and what the approver decided. The same model is
the JSON of the admin API and (later) the spec and status of a ``QueryReview`` resource,
so its field names are camelCase on the wire, as in Kubernetes.

::

    ApprovalError
    ├── ReviewNotFound     no review with that id (LookupError; API 404)
    ├── ReviewConflict     the review is not in a state that allows this (API 409)
    └── NotAnApprover      the caller may not decide this review (PermissionError; API 403)
        └── SelfApproval   requireDistinctApprover: nobody approves their own request
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

from pglast import parser as _pg_parser
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from querywarden.approvals.notify import NotifyDestination
from querywarden.config import Duration

if TYPE_CHECKING:
    from querywarden.analysis import StatementSummary
    from querywarden.identity.principal import Principal

__all__ = [
    "UNLIMITED_USES",
    "ApprovalError",
    "ApprovalSettings",
    "Approvers",
    "NotAnApprover",
    "Party",
    "Review",
    "ReviewConflict",
    "ReviewDecision",
    "ReviewNotFound",
    "ReviewSummary",
    "SelfApproval",
    "new_review_id",
    "normalize_statement",
]

#: ``usesLeft`` of a grant that any number of re-runs may use until it expires.
UNLIMITED_USES = -1


# --- errors -------------------------------------------------------------------------------


#: One statement's (operations, reads, writes, functions), as the analyzer found them.
SummaryParts = tuple[Iterable[str], Iterable[object], Iterable[object], Iterable[object]]


class ApprovalError(Exception):
    """Base class of the approval errors; the message is meant for the person acting."""


class ReviewNotFound(ApprovalError, LookupError):
    """No review has that id."""


class ReviewConflict(ApprovalError):
    """The review's state does not allow the action (already decided, grant used up ...)."""


class NotAnApprover(ApprovalError, PermissionError):
    """The caller is not allowed to decide (or see) this review."""


class SelfApproval(NotAnApprover):
    """``requireDistinctApprover``: the requester tried to approve their own statement."""


# --- settings -----------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class Approvers(_Model):
    """Who may decide reviews: members of any of these groups, or these subjects."""

    groups: list[str] = []
    users: list[str] = []


class ApprovalSettings(_Model):
    """The ``approvals`` section of the policy document."""

    approvers: Approvers = Approvers()
    #: How long a held statement waits on the wire for a decision.
    hold: Duration = timedelta(seconds=60)
    #: How long an approved statement may be re-run by its requester.
    grant_ttl: Duration = Field(timedelta(minutes=15), alias="grantTTL")
    #: Nobody approves their own request (same subject from the same issuer).
    require_distinct_approver: bool = True
    #: How long an undecided review stays open. It outlives the hold on purpose: after the
    #: hold the client is told to re-run the statement once it is approved, so an approver
    #: may still decide; after this it is ``expired`` and a re-run opens a new review.
    pending_ttl: Duration = Field(timedelta(hours=1), alias="pendingTTL")
    #: How long a review is kept once it has ended (denied, expired, withdrawn, or an
    #: approval whose grant has expired); then it is deleted from the store. Its events
    #: stay in the audit log.
    retention: Duration = timedelta(days=7)
    #: Where review events are posted as they happen (approvals/notify.py).
    notify: list[NotifyDestination] = []
    #: The base URL of the console approvers decide in; notifications link to
    #: ``<consoleUrl>/reviews/<id>``. Without it they name the CLI command instead.
    console_url: str | None = None

    @model_validator(mode="after")
    def _pending_outlives_hold(self) -> ApprovalSettings:
        if self.pending_ttl < self.hold:
            raise ValueError("pendingTTL must be at least as long as hold")
        return self


# --- the review ---------------------------------------------------------------------------


class ReviewDecision(StrEnum):
    """Where a review stands. Only ``pending`` can change, and only once."""

    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    WITHDRAWN = "withdrawn"


class Party(_Model):
    """A requester or approver as the review records it: who, vouched for by whom."""

    subject: str
    #: The name of the trusted issuer (from the policy) that verified the token.
    issuer: str = ""
    groups: tuple[str, ...] = ()

    @classmethod
    def from_principal(cls, principal: Principal) -> Party:
        """Snapshot a Principal (its groups as they were when it acted)."""
        return cls(
            subject=principal.subject,
            issuer=principal.issuer,
            groups=tuple(sorted(principal.groups)),
        )

    def same_identity(self, other: Party) -> bool:
        """Same subject from the same issuer (groups may have changed in between)."""
        return self.subject == other.subject and self.issuer == other.issuer

    def __str__(self) -> str:
        return f"{self.subject} ({self.issuer})" if self.issuer else self.subject


class ReviewSummary(_Model):
    """What the statement touches, as the analyzer saw it (names as ``schema.table``)."""

    operations: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()

    @classmethod
    def from_analysis(cls, summaries: Iterable[StatementSummary]) -> ReviewSummary:
        """Merge the analyzer's summaries of the statements of one request."""
        return cls.merge((s.operations, s.reads, s.writes, s.functions) for s in summaries)

    @classmethod
    def merge(cls, parts: Iterable[SummaryParts]) -> ReviewSummary:
        """Merge (operations, reads, writes, functions) of each statement of one request."""
        operations: set[str] = set()
        reads: set[str] = set()
        writes: set[str] = set()
        functions: set[str] = set()
        for ops, read, written, called in parts:
            operations |= set(ops)
            reads |= {str(r) for r in read}
            writes |= {str(w) for w in written}
            functions |= {str(f) for f in called}
        return cls(
            operations=tuple(sorted(operations)),
            reads=tuple(sorted(reads)),
            writes=tuple(sorted(writes)),
            functions=tuple(sorted(functions)),
        )


class Review(_Model):
    """One held statement and what was decided about it.

    ``usesLeft`` is 0 until the review is approved; then 1 for a single-use grant, N when
    the approver widened it, or :data:`UNLIMITED_USES` (-1) for any number of re-runs
    until ``grantExpires``. Times are timezone-aware (UTC).
    """

    id: str
    requester: Party
    database: str
    #: The exact text the client sent.
    statement: str
    #: The text a grant is matched by (see :func:`normalize_statement`).
    normalized: str
    #: Bound parameter values of an extended-protocol statement, as text (None for NULL):
    #: part of what is approved, so ``id = $1`` approved with 5 never runs with 6.
    parameters: tuple[str | None, ...] = ()
    summary: ReviewSummary = ReviewSummary()
    #: The rule that required review, and why.
    rule: str = ""
    reason: str = ""
    #: The planner's row estimate behind a full-table-scan review, when there is one.
    estimate: int | None = None
    created: datetime
    decided: datetime | None = None
    approver: Party | None = None
    decision: ReviewDecision = ReviewDecision.PENDING
    #: The approver's comment; for a withdrawn or expired review, why it ended.
    comment: str = ""
    grant_expires: datetime | None = None
    uses_left: int = 0
    used_at: tuple[datetime, ...] = ()

    @property
    def pending(self) -> bool:
        """Not decided yet."""
        return self.decision is ReviewDecision.PENDING

    def ended_at(self) -> datetime | None:
        """When nothing more can happen to the review (None while it is pending).

        An approval ends when its grant expires, a refusal, expiry or withdrawal when it
        was decided.
        """
        if self.pending:
            return None
        if self.decision is ReviewDecision.APPROVED and self.grant_expires is not None:
            return max(self.grant_expires, self.decided or self.grant_expires)
        return self.decided or self.created

    def grant_usable(self, now: datetime) -> bool:
        """Whether the requester may run the statement under this review at ``now``."""
        return (
            self.decision is ReviewDecision.APPROVED
            and self.grant_expires is not None
            and now < self.grant_expires
            and self.uses_left != 0
        )

    def to_json(self) -> dict[str, object]:
        """The JSON form (camelCase keys, ISO 8601 times) used by the API and the CLI."""
        return self.model_dump(mode="json", by_alias=True)


# Lower-case letters and digits without look-alikes: the id is typed from chat messages,
# is safe in URLs and Kubernetes names, and never starts with "-" (argparse would take it
# for an option).
_ID_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"


def new_review_id() -> str:
    """A short random id (10 characters, about 49 bits)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))


# --- the normalizer -----------------------------------------------------------------------

_COMMENTS = frozenset({"C_COMMENT", "SQL_COMMENT"})
_FOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _tokens(text: str) -> list[tuple[str, str]]:
    """``(name, text)`` of each token that matters: no comments, no trailing semicolons.

    Keywords and unquoted identifiers are case-folded as PostgreSQL folds them (ASCII
    letters only, as in a UTF-8 database), so ``DROP TABLE T`` and ``drop table t`` are the
    same statement. Literals, quoted identifiers and dollar-quoted bodies keep their text.
    """
    out: list[tuple[str, str]] = []
    for token in _pg_parser.scan(text):
        if token.name in _COMMENTS:
            continue
        word = text[token.start : token.end + 1]
        if token.kind != "NO_KEYWORD" or (token.name == "IDENT" and not word.startswith('"')):
            word = word.translate(_FOLD)
        out.append((token.name, word))
    while out and out[-1][0] == "ASCII_59":  # ";"
        out.pop()
    return out


def normalize_statement(text: str) -> str:
    """The text a grant is matched by: the same statement up to whitespace and comments.

    The statement's tokens (PostgreSQL's own scanner, through pglast) are joined with
    single spaces, without comments and trailing semicolons, keywords and unquoted names
    case-folded. Literals are kept: approving ``DELETE ... WHERE id = 5`` never approves
    ``id = 6`` (``pglast``'s ``normalize`` would replace them, so it is not used).

    Joining with spaces must not make two different statements equal, so the result is
    scanned again and must give the same tokens; where it would not (``n'x'`` is one
    national-character literal, ``n 'x'`` a cast to a type ``n``) and for text the scanner
    refuses, the exact text is the key and only an identical statement matches.
    """
    try:
        tokens = _tokens(text)
        normalized = " ".join(word for _, word in tokens)
        if _tokens(normalized) == tokens:
            return normalized
    except _pg_parser.ParseError:
        pass
    return text
