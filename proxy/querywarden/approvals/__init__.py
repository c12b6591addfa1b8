"""Approvals: high-risk statements held until a human approves or denies them.

When the policy decides ``review``, the session opens a :class:`Review` through the
:class:`ApprovalService` and holds the statement while an approver decides, through the
admin HTTP API (:mod:`querywarden.approvals.api`) or the ``querywarden reviews`` commands
built on it (:mod:`querywarden.approvals.tools`). An approval is a grant for that exact
statement (up to whitespace and comments), that requester and that database, for a
limited time and number of runs. Reviews live in a :class:`ReviewStore`
(:class:`SqliteReviewStore` standalone; ``pg_store`` for replicas sharing a PostgreSQL
database, ``kube_store`` for sidecars).

The API and CLI modules are not imported here, so that the policy model can import
:class:`ApprovalSettings` without pulling in the server.
"""

from querywarden.approvals.model import (
    UNLIMITED_USES,
    ApprovalError,
    ApprovalSettings,
    Approvers,
    NotAnApprover,
    Party,
    Review,
    ReviewConflict,
    ReviewDecision,
    ReviewNotFound,
    ReviewSummary,
    SelfApproval,
    normalize_statement,
)
from querywarden.approvals.service import EVENTS, ApprovalService, EventHook
from querywarden.approvals.store import ReviewStore, SqliteReviewStore

__all__ = [
    "EVENTS",
    "UNLIMITED_USES",
    "ApprovalError",
    "ApprovalService",
    "ApprovalSettings",
    "Approvers",
    "EventHook",
    "NotAnApprover",
    "Party",
    "Review",
    "ReviewConflict",
    "ReviewDecision",
    "ReviewNotFound",
    "ReviewStore",
    "ReviewSummary",
    "SelfApproval",
    "SqliteReviewStore",
    "normalize_statement",
]
