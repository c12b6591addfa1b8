"""A ``QueryReview``'s status conditions: ``Decided``, ``Approved``, ``Expired``.

Standard ``metav1.Condition`` entries (type, status, reason, message, lastTransitionTime,
observedGeneration) that say where a review stands, so that scripts can wait on it::

    kubectl wait --for=condition=Approved queryreview/3f9a1c0b7d-1 -n shop --timeout=10m
    kubectl wait --for=condition=Decided queryreview/3f9a1c0b7d-1 -n shop   # any outcome

========== =============================== =====================================
condition  True                            False
========== =============================== =====================================
Decided    the review has its outcome:     ``Pending``
           ``Approved``, ``Denied``,
           ``Withdrawn``, ``Expired``
Approved   ``Approved``                    ``Pending``, ``Denied``, ``Withdrawn``,
                                           ``Expired``
Expired    ``Expired`` (nobody decided)    ``Pending``, ``Approved``, ``Denied``,
                                           ``Withdrawn``
========== =============================== =====================================

The reason is the review's state, capitalized, in every condition. Whoever changes the
state writes the conditions in the same write: the gateway's Kubernetes store when it
creates a review (pending), withdraws or expires it, and on every use of a grant; the
operator's mutating webhook when an approver decides. ``Approved`` says that the
statement was approved; whether the grant still has runs and time left is
``status.usesLeft`` and ``status.grantExpires``.

The CRD has no status subresource, so the API server increments ``metadata.generation``
on every change of spec or status. A write therefore records the generation it will
produce (the one read, plus one) as ``observedGeneration``: ``kubectl wait`` ignores a
condition whose ``observedGeneration`` is older than the object's generation.

Pure functions over plain JSON (no Kubernetes client): the gateway and the operator's
webhook both use them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "APPROVED",
    "CONDITION_TYPES",
    "DECIDED",
    "EXPIRED",
    "next_generation",
    "review_conditions",
    "review_state",
]

DECIDED = "Decided"
APPROVED = "Approved"
EXPIRED = "Expired"
#: In the order the conditions are written.
CONDITION_TYPES = (DECIDED, APPROVED, EXPIRED)

_STATES = ("pending", "approved", "denied", "withdrawn", "expired")


def review_state(obj: Mapping[str, Any]) -> str:
    """``pending``, ``approved``, ``denied``, ``withdrawn`` or ``expired``."""
    status = obj.get("status") or {}
    closed = status.get("closed")
    if closed:
        return str(closed)
    return str((obj.get("spec") or {}).get("decision") or "pending")


def next_generation(obj: Mapping[str, Any]) -> int:
    """The ``metadata.generation`` that a write changing ``obj``'s spec or status yields."""
    return int((obj.get("metadata") or {}).get("generation") or 0) + 1


def _time(value: datetime) -> str:
    return value.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


#: Characters of a comment or closing reason a message quotes (a condition's message may
#: be at most 32768).
_QUOTED = 1024


def _quote(text: object) -> str:
    text = str(text or "")
    return text if len(text) <= _QUOTED else text[: _QUOTED - 3] + "..."


def _messages(state: str, obj: Mapping[str, Any]) -> dict[str, str]:
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    approver = _quote((status.get("approver") or {}).get("subject") or "an approver")
    comment = _quote(spec.get("comment"))
    why = _quote(status.get("closedReason"))
    if state == "pending":
        waiting = "waiting for an approver's decision"
        return {DECIDED: waiting, APPROVED: waiting, EXPIRED: waiting}
    if state in ("approved", "denied"):
        said = f"{state} by {approver}" + (f": {comment}" if comment else "")
        return {DECIDED: said, APPROVED: said, EXPIRED: f"{said} (the review did not expire)"}
    said = f"{state} undecided" + (f": {why}" if why else "")
    return {DECIDED: said, APPROVED: said, EXPIRED: said}


def review_conditions(
    obj: Mapping[str, Any], *, generation: int, now: datetime
) -> list[dict[str, Any]]:
    """The conditions of the QueryReview ``obj`` (as it will be once written).

    ``obj`` is the review with the write's changes applied (its spec and status say the
    state, the approver, the comment, why it closed); its current ``status.conditions``
    keep their ``lastTransitionTime`` where a condition's status does not change.
    ``generation``: the generation the write yields (:func:`next_generation` of the
    object read).
    """
    state = review_state(obj)
    if state not in _STATES:
        raise ValueError(f"not a QueryReview state: {state!r}")
    truth = {
        DECIDED: state != "pending",
        APPROVED: state == "approved",
        EXPIRED: state == "expired",
    }
    messages = _messages(state, obj)
    previous: Sequence[Mapping[str, Any]] = (obj.get("status") or {}).get("conditions") or ()
    since = {
        str(c.get("type")): (str(c.get("status")), c.get("lastTransitionTime"))
        for c in previous
        if isinstance(c, Mapping)
    }
    out: list[dict[str, Any]] = []
    for type_ in CONDITION_TYPES:
        status = "True" if truth[type_] else "False"
        old_status, old_time = since.get(type_, (None, None))
        out.append(
            {
                "type": type_,
                "status": status,
                "observedGeneration": generation,
                "lastTransitionTime": old_time if old_status == status and old_time else _time(now),
                "reason": state.capitalize(),
                "message": messages[type_],
            }
        )
    return out
