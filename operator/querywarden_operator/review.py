"""The QueryReview resource and its admission rules.

A ``QueryReview`` is one held statement (:class:`querywarden.approvals.model.Review`) as a
namespaced custom resource, created by the gateway sidecar that held it. Approvers decide
by changing its ``spec`` (``kubectl querywarden approve NAME``, or ``kubectl patch``);
Kubernetes RBAC decides who may *try*, and the operator's admission webhooks decide
whether the change stands:

* a **mutating** webhook (``/review-stamp``) writes the creator's username into the
  annotation ``querywarden.io/created-by`` on CREATE, and on the UPDATE that decides a
  pending review stamps ``status``: the approver (the admission request's ``userInfo``),
  the decision time, for an approval the grant's expiry and uses, and the status
  conditions (``Decided``, ``Approved``, ``Expired``:
  :mod:`querywarden.approvals.review_conditions`);
* a **validating** webhook (``/review-check``) then refuses what must not happen: a review
  created by anything but a ServiceAccount, or created already decided (or with a status
  other than the pending conditions); a decision by someone outside the policy's
  approvers; self-approval under ``requireDistinctApprover``; any change to a decided (or
  withdrawn/expired) review's spec; a requester field changed; a status forged by anyone
  but the creating sidecar.

The CRD has no status subresource on purpose: the API server resets ``status`` on an
update of the main resource when there is one, *after* mutating admission, so a webhook
could not stamp it. Instead the validating webhook guards ``status``: only the sidecar
that created the review writes it (uses, withdrawal, expiry), and an approver's update
may change it only to exactly the stamp.

The sidecar may also decide on behalf of an approver that the gateway itself verified
(the admin API, ``querywarden review approve``): it sets the annotation
``querywarden.io/approver`` to that party's JSON in the same update, and the stamp and
the checks use that party instead of the sidecar's own identity.

:func:`stamp` and :func:`check` are pure (objects, ``userInfo`` and the policy's approval
settings in; a patch or a refusal out); :mod:`handlers` reads the policy and calls them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic.alias_generators import to_camel

from querywarden.approvals.model import ApprovalSettings
from querywarden.approvals.review_conditions import (
    next_generation,
    review_conditions,
    review_state,
)
from querywarden.config import Duration
from querywarden_operator.spec import GROUP, VERSION
from querywarden_operator.status import Condition

REVIEW_KIND = "QueryReview"
REVIEW_PLURAL = "queryreviews"
REVIEW_SINGULAR = "queryreview"
REVIEW_CRD_NAME = f"{REVIEW_PLURAL}.{GROUP}"
REVIEW_API_VERSION = f"{GROUP}/{VERSION}"

#: Label: the DatabaseAccessPolicy whose gateway held the statement (its approvers decide).
LABEL_REVIEW_POLICY = f"{GROUP}/policy"
#: Label: hash of requester, database, normalized text and parameters (finds a twin).
LABEL_REVIEW_KEY = f"{GROUP}/review-key"
#: Annotation, stamped on CREATE: the username that created the review (its sidecar).
ANNOTATION_CREATED_BY = f"{GROUP}/created-by"
#: Annotation, set by the sidecar when it decides for an approver the gateway verified.
ANNOTATION_APPROVER = f"{GROUP}/approver"
#: Annotation: the exact creation time (metadata.creationTimestamp has whole seconds).
ANNOTATION_CREATED = f"{GROUP}/created"

#: The kopf handler ids, and so the URL paths of the two webhooks.
STAMP_WEBHOOK_ID = "review-stamp"
CHECK_WEBHOOK_ID = "review-check"

#: The issuer recorded for an approver that Kubernetes authenticated.
KUBERNETES_ISSUER = "kubernetes"

#: The spec fields an approver sets; every other spec field is the sidecar's, fixed.
APPROVER_FIELDS = frozenset({"decision", "comment", "uses", "ttl"})


_DURATION: TypeAdapter[timedelta] = TypeAdapter(Duration)


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ReviewParty(_Model):
    """A requester or approver: who, vouched for by which issuer, in which groups."""

    subject: str
    #: The trusted issuer (a name from the policy, or ``kubernetes``) that verified it.
    issuer: str = ""
    groups: list[str] = []


class ReviewSummarySpec(_Model):
    """What the statement touches, as the gateway's analyzer saw it."""

    operations: list[str] = []
    reads: list[str] = []
    writes: list[str] = []
    functions: list[str] = []


class QueryReviewSpec(_Model):
    """The held statement as the sidecar recorded it, and the approver's decision."""

    requester: ReviewParty
    database: str
    #: The exact text the client sent.
    statement: str
    #: The text a grant is matched by (whitespace, comments and case normalized).
    normalized: str
    #: Bound parameter values of an extended-protocol statement, as text (null for NULL).
    parameters: list[str | None] = []
    summary: ReviewSummarySpec = ReviewSummarySpec()
    #: The rule that required review, and why.
    rule: str = ""
    reason: str = ""
    #: The planner's row estimate behind a full-table-scan review.
    estimate: int | None = None
    #: The approver's decision: set approved or denied, once.
    decision: Literal["pending", "approved", "denied"] = "pending"
    #: The approver's comment.
    comment: str = ""
    #: How many runs an approval grants (-1: any number until it expires).
    uses: int = Field(1, ge=-1)
    #: How long an approval lasts (default: the policy's approvals.grantTTL).
    ttl: Duration | None = None


class QueryReviewStatus(_Model):
    """Stamped by the admission webhook (approver, times) and kept by the sidecar (uses)."""

    #: Who decided: the Kubernetes user of the deciding request (from userInfo).
    approver: ReviewParty | None = None
    #: When it was decided (or withdrawn, or expired).
    decided: datetime | None = None
    #: Until when an approval may be used.
    grant_expires: datetime | None = None
    #: Runs left (-1: unlimited until grantExpires).
    uses_left: int = 0
    #: When the grant was used.
    used_at: list[datetime] = []
    #: Set when the review ended undecided: its requester gave up, or nobody decided.
    closed: Literal["withdrawn", "expired"] | None = None
    #: Why it was withdrawn or expired.
    closed_reason: str = ""
    #: Decided, Approved and Expired, kept in step with the review's state by whoever
    #: changes it (`kubectl wait --for=condition=Approved queryreview/NAME`).
    conditions: list[Condition] = Field(
        [],
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )


# --- admission ----------------------------------------------------------------------------


class ReviewRefused(Exception):
    """The admission request must be refused; the message is for the person acting."""


def _meta(obj: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return (obj or {}).get("metadata") or {}


def _annotations(obj: Mapping[str, Any] | None) -> Mapping[str, str]:
    return _meta(obj).get("annotations") or {}


def _spec(obj: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict((obj or {}).get("spec") or {})


def _status(obj: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict((obj or {}).get("status") or {})


def _decision(obj: Mapping[str, Any] | None) -> str:
    return str(_spec(obj).get("decision") or "pending")


def _username(userinfo: Mapping[str, Any]) -> str:
    return str(userinfo.get("username") or "")


def is_service_account(username: str, namespace: str) -> bool:
    """Whether ``username`` is a ServiceAccount of ``namespace``."""
    return username.startswith(f"system:serviceaccount:{namespace}:")


def acting_party(obj: Mapping[str, Any], userinfo: Mapping[str, Any]) -> ReviewParty:
    """Who decides in this request: the delegated approver, or the Kubernetes user."""
    username = _username(userinfo)
    delegated = _annotations(obj).get(ANNOTATION_APPROVER)
    if delegated and username == _annotations(obj).get(ANNOTATION_CREATED_BY):
        try:
            return ReviewParty.model_validate(json.loads(delegated))
        except ValueError as exc:
            raise ReviewRefused(f"annotation {ANNOTATION_APPROVER} is not a party: {exc}") from exc
    return ReviewParty(
        subject=username,
        issuer=KUBERNETES_ISSUER,
        groups=sorted(str(g) for g in userinfo.get("groups") or []),
    )


def is_decision(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether this update decides a pending review."""
    return old is not None and _decision(old) == "pending" and _decision(new) != "pending"


def _time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def stamp(
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    userinfo: Mapping[str, Any],
    settings: ApprovalSettings | None,
    *,
    now: datetime,
) -> dict[str, Any]:
    """The merge patch the mutating webhook adds (empty: nothing to stamp)."""
    if old is None:
        return {"metadata": {"annotations": {ANNOTATION_CREATED_BY: _username(userinfo)}}}
    if not is_decision(old, new) or _status(old).get("closed"):
        return {}
    party = acting_party(new, userinfo)
    spec = _spec(new)
    status: dict[str, Any] = {
        "approver": party.model_dump(mode="json", by_alias=True),
        "decided": _time(now),
        "usedAt": [],
    }
    if spec.get("decision") == "approved":
        raw_ttl = spec.get("ttl")
        ttl: timedelta
        if raw_ttl is not None:
            ttl = _DURATION.validate_python(raw_ttl)
        else:
            ttl = settings.grant_ttl if settings is not None else ApprovalSettings().grant_ttl
        status["grantExpires"] = _time(now + ttl)
        status["usesLeft"] = int(spec.get("uses", 1))
    else:
        status["usesLeft"] = 0
    # The update's generation: the API server adds one after mutating admission, as the
    # spec changes (no status subresource).
    decided = {**new, "status": {**_status(old), **status}}
    status["conditions"] = review_conditions(decided, generation=next_generation(old), now=now)
    return {"status": status}


def _pending_conditions_only(status: Mapping[str, Any]) -> bool:
    """Whether a new review's status holds nothing but the pending conditions.

    Other fields may be there with their defaults only (the API server applies the CRD's
    defaults, ``usesLeft: 0`` and ``closedReason: ""``, before validating admission).
    """
    defaults = QueryReviewStatus().model_dump(mode="json", by_alias=True)
    if any(k != "conditions" and defaults.get(k, object()) != v for k, v in status.items()):
        return False
    conditions = status.get("conditions") or []
    return all(
        isinstance(c, Mapping) and c.get("reason") == "Pending" and c.get("status") == "False"
        for c in conditions
    )


def check(
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    userinfo: Mapping[str, Any],
    settings: ApprovalSettings | None,
) -> None:
    """Refuse (:class:`ReviewRefused`) what the validating webhook must not admit."""
    username = _username(userinfo)
    namespace = str(_meta(new).get("namespace") or "")
    if old is None:
        if not is_service_account(username, namespace):
            raise ReviewRefused(
                f"{username} may not create QueryReviews: only the gateway sidecar's "
                f"ServiceAccount (system:serviceaccount:{namespace}:...) creates them"
            )
        if review_state(new) != "pending" or not _pending_conditions_only(_status(new)):
            raise ReviewRefused(
                "a QueryReview is created pending, with no status but the pending conditions"
            )
        if _annotations(new).get(ANNOTATION_CREATED_BY) != username:
            raise ReviewRefused(f"annotation {ANNOTATION_CREATED_BY} must name the creator")
        return
    creator = _annotations(old).get(ANNOTATION_CREATED_BY, "")
    if _annotations(new).get(ANNOTATION_CREATED_BY, "") != creator:
        raise ReviewRefused(f"annotation {ANNOTATION_CREATED_BY} is immutable")
    for label in (LABEL_REVIEW_POLICY, LABEL_REVIEW_KEY):
        # The policy label says whose approvers decide: relabelling would pick others.
        if (_meta(old).get("labels") or {}).get(label) != (_meta(new).get("labels") or {}).get(
            label
        ):
            raise ReviewRefused(f"label {label} is immutable")
    old_spec, new_spec = _spec(old), _spec(new)
    old_status, new_status = _status(old), _status(new)
    ended = _decision(old) != "pending" or bool(old_status.get("closed"))
    if ended and old_spec != new_spec:
        state = old_status.get("closed") or _decision(old)
        raise ReviewRefused(f"QueryReview {_meta(old).get('name')} is {state}: it cannot change")
    fixed = {k for k in set(old_spec) | set(new_spec) if k not in APPROVER_FIELDS}
    changed = sorted(k for k in fixed if old_spec.get(k) != new_spec.get(k))
    if changed:
        raise ReviewRefused(f"only the approver's fields may change, not {', '.join(changed)}")
    if is_decision(old, new):
        party = acting_party(new, userinfo)
        requester = ReviewParty.model_validate(new_spec.get("requester") or {})
        _may_decide(party, requester, settings, approving=_decision(new) == "approved")
        approver = new_status.get("approver") or {}
        if approver.get("subject") != party.subject or approver.get("issuer") != party.issuer:
            raise ReviewRefused("status.approver must be the deciding user (stamped on update)")
        return
    if username != creator and old_status != new_status:
        raise ReviewRefused(f"only the gateway that created the review ({creator}) writes status")
    if username != creator and old_spec != new_spec:
        raise ReviewRefused("a pending review changes only by deciding it (spec.decision)")


def _may_decide(
    party: ReviewParty,
    requester: ReviewParty,
    settings: ApprovalSettings | None,
    *,
    approving: bool,
) -> None:
    if settings is None:
        raise ReviewRefused(
            "the review's DatabaseAccessPolicy cannot be read: nobody may decide it"
        )
    approvers = settings.approvers
    if party.subject not in approvers.users and not set(party.groups) & set(approvers.groups):
        raise ReviewRefused(
            f"{party.subject} is not an approver of this policy (approver groups: "
            f"{', '.join(approvers.groups) or 'none'}; users: "
            f"{', '.join(approvers.users) or 'none'})"
        )
    if approving and settings.require_distinct_approver and party.subject == requester.subject:
        raise ReviewRefused(
            f"{party.subject} requested this statement and may not approve it "
            "(requireDistinctApprover)"
        )


def approval_settings(policy: Mapping[str, Any] | None) -> ApprovalSettings | None:
    """The approvals section of a DatabaseAccessPolicy (None: no policy, or unreadable)."""
    if policy is None:
        return None
    raw = (((policy.get("spec") or {}).get("policy")) or {}).get("approvals") or {}
    try:
        return ApprovalSettings.model_validate(raw)
    except ValueError:
        return None


__all__ = [
    "ANNOTATION_APPROVER",
    "ANNOTATION_CREATED",
    "ANNOTATION_CREATED_BY",
    "CHECK_WEBHOOK_ID",
    "LABEL_REVIEW_KEY",
    "LABEL_REVIEW_POLICY",
    "REVIEW_API_VERSION",
    "REVIEW_CRD_NAME",
    "REVIEW_KIND",
    "REVIEW_PLURAL",
    "STAMP_WEBHOOK_ID",
    "QueryReviewSpec",
    "QueryReviewStatus",
    "ReviewParty",
    "ReviewRefused",
    "approval_settings",
    "check",
    "stamp",
]
