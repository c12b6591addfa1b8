"""Reviews as ``QueryReview`` custom resources: the Kubernetes :class:`ReviewStore`.

One ``QueryReview`` per review, named ``<key>-<n>``, in the sidecar's namespace,
labelled with the DatabaseAccessPolicy whose gateway held the statement (its approvers
decide; the review is also owned by it, so it goes when the policy goes) and with a hash
of requester, database, normalized text and parameters (a label selector finds a pending
twin or a grant without reading every review).

Approvers decide by changing ``spec.decision`` (``kubectl querywarden approve``); the
operator's admission webhooks check them and stamp ``status`` (approver, decided time,
grant expiry and uses, and the conditions). Every change the sidecar makes (a use, a
withdrawal, an expiry, a decision on behalf of an approver the gateway verified) is a
merge patch carrying the ``resourceVersion`` it read: the API server refuses it with 409
Conflict when the review changed in between, and the store reads again and re-checks. So
of two sidecars using a single-use grant at once exactly one succeeds. The store writes
the status conditions (:mod:`querywarden.approvals.review_conditions`) with every change
of its own, in the same patch: pending on create, withdrawn or expired, and refreshed on
each use.

Times set by the webhook (``decided``, ``grantExpires``) come from the operator's clock,
not the ``now`` the caller passes. A review's name is derived from its key (see
:meth:`KubernetesReviewStore.create`), so two sidecars opening the same review at the
same moment open one.

The store also *watches* this policy's reviews (:meth:`KubernetesReviewStore.watch`): a
decision made with kubectl reaches the statement held on the wire at once, without the
service polling for it.

The official client is synchronous: its calls run on a small private thread pool, and the
watch on a thread of its own.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import kubernetes.client
import kubernetes.config
import kubernetes.watch
from kubernetes.client.exceptions import ApiException

from querywarden.approvals.model import (
    UNLIMITED_USES,
    NotAnApprover,
    Party,
    Review,
    ReviewConflict,
    ReviewDecision,
    ReviewNotFound,
    ReviewSummary,
    SelfApproval,
)
from querywarden.approvals.review_conditions import next_generation, review_conditions
from querywarden.approvals.store import Opened, _unusable

__all__ = ["KubernetesReviewStore", "default_namespace", "review_key"]

T = TypeVar("T")

log = logging.getLogger(__name__)

GROUP = "querywarden.io"
VERSION = "v1alpha1"
PLURAL = "queryreviews"
KIND = "QueryReview"
POLICY_PLURAL = "databaseaccesspolicies"
POLICY_KIND = "DatabaseAccessPolicy"
LABEL_POLICY = f"{GROUP}/policy"
LABEL_KEY = f"{GROUP}/review-key"
ANNOTATION_APPROVER = f"{GROUP}/approver"
ANNOTATION_CREATED = f"{GROUP}/created"

#: How often a change is tried again after a 409 Conflict before giving up.
_ATTEMPTS = 20
#: Characters of the review key in a review's name (40 bits: a clash of two different
#: statements' keys only makes one of them take the next number).
_NAME_KEY = 10
#: Each watch request ends after this long (the API server's ``timeoutSeconds``) and is
#: started again from the last resourceVersion; it bounds how long a closed store's
#: watch thread lingers.
_WATCH_SECONDS = 15
#: Pause before watching again after an error (the API server restarting, a 403).
_WATCH_BACKOFF = 2.0
_MERGE_PATCH = "application/merge-patch+json"


def review_key(
    requester: Party, database: str, normalized: str, parameters: tuple[str | None, ...]
) -> str:
    """The label value that identifies "the same statement from the same requester"."""
    text = json.dumps(
        [requester.subject, requester.issuer, database, normalized, list(parameters)],
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def _time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _party(raw: Mapping[str, Any]) -> Party:
    return Party(
        subject=str(raw.get("subject") or ""),
        issuer=str(raw.get("issuer") or ""),
        groups=tuple(raw.get("groups") or ()),
    )


def _party_json(party: Party) -> dict[str, Any]:
    return {"subject": party.subject, "issuer": party.issuer, "groups": list(party.groups)}


def to_review(obj: Mapping[str, Any]) -> Review:
    """The :class:`Review` a QueryReview object holds."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    closed = status.get("closed")
    annotations = meta.get("annotations") or {}
    created = _parse_time(annotations.get(ANNOTATION_CREATED)) or _parse_time(
        meta.get("creationTimestamp")
    )
    approver = status.get("approver")
    return Review(
        id=str(meta["name"]),
        requester=_party(spec.get("requester") or {}),
        database=str(spec.get("database") or ""),
        statement=str(spec.get("statement") or ""),
        normalized=str(spec.get("normalized") or ""),
        parameters=tuple(spec.get("parameters") or ()),
        summary=ReviewSummary.model_validate(spec.get("summary") or {}),
        rule=str(spec.get("rule") or ""),
        reason=str(spec.get("reason") or ""),
        estimate=spec.get("estimate"),
        created=created or datetime.now(UTC),
        decided=_parse_time(status.get("decided")),
        approver=_party(approver) if approver else None,
        decision=ReviewDecision(closed or spec.get("decision") or "pending"),
        comment=str((status.get("closedReason") if closed else spec.get("comment")) or ""),
        grant_expires=_parse_time(status.get("grantExpires")),
        uses_left=int(status.get("usesLeft") or 0),
        used_at=tuple(t for t in map(_parse_time, status.get("usedAt") or ()) if t is not None),
    )


def _next_number(key: str, items: builtins.list[dict[str, Any]]) -> int:
    """One more than the highest ``n`` among the ``<key>-<n>`` names of this key's reviews."""
    prefix = f"{key[:_NAME_KEY]}-"
    numbers = [0]
    for obj in items:
        name = str(obj["metadata"]["name"])
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            numbers.append(int(name[len(prefix) :]))
    return max(numbers) + 1


def _same_statement(review: Review, other: Review) -> bool:
    return (
        review.requester.same_identity(other.requester)
        and review.database == other.database
        and review.normalized == other.normalized
        and review.parameters == other.parameters
    )


def _ttl(ttl: timedelta) -> str:
    return f"{max(1, int(ttl.total_seconds()))}s"


class KubernetesReviewStore:
    """Reviews as QueryReviews in ``namespace``, for the gateway of policy ``policy``.

    ``api_client``: a configured client (tests); default: the pod's ServiceAccount, else
    ``$KUBECONFIG``. The sidecar's ServiceAccount needs create/get/list/watch/patch on
    queryreviews in its namespace, and get on its databaseaccesspolicy (for the owner
    reference; without it the review carries only the label). The chart's
    ``<release>-querywarden-<namespace>-sidecar`` ClusterRole grants that.
    """

    def __init__(
        self,
        namespace: str,
        policy: str,
        *,
        api_client: kubernetes.client.ApiClient | None = None,
        kubeconfig: Path | None = None,
        service_account_directory: Path | None = None,
    ) -> None:
        self._namespace = namespace
        self._policy = policy
        self._api_client = (
            api_client
            if api_client is not None
            else _default_client(kubeconfig, service_account_directory)
        )
        # Typed as returning ``object``: the answers are plain JSON dicts.
        self._api: Any = kubernetes.client.CustomObjectsApi(self._api_client)
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="qw-kube-reviews")
        self._owner: dict[str, Any] | None = None
        self._owner_read = False
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def namespace(self) -> str:
        """Where the reviews live."""
        return self._namespace

    def approve_command(self, review_id: str) -> str:
        """What an approver runs to approve the review (for the requester's notice)."""
        return f"kubectl querywarden approve {review_id} -n {self._namespace} --comment ..."

    # -- plumbing (on the store's threads) -----------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def _read(self, name: str) -> dict[str, Any]:
        try:
            obj: dict[str, Any] = self._api.get_namespaced_custom_object(
                GROUP, VERSION, self._namespace, PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                raise ReviewNotFound(f"no review {name!r}") from exc
            raise
        return obj

    def _items(self, selector: str) -> builtins.list[dict[str, Any]]:
        answer = self._api.list_namespaced_custom_object(
            GROUP, VERSION, self._namespace, PLURAL, label_selector=selector
        )
        items: builtins.list[dict[str, Any]] = answer.get("items") or []
        return items

    def _patch(self, obj: Mapping[str, Any], changes: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch ``changes`` if ``obj`` is unchanged; None on a conflict."""
        meta = obj["metadata"]
        body = dict(changes)
        body["metadata"] = {
            **(changes.get("metadata") or {}),
            "resourceVersion": meta["resourceVersion"],
        }
        try:
            patched: dict[str, Any] = self._api.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                self._namespace,
                PLURAL,
                meta["name"],
                body,
                _content_type=_MERGE_PATCH,
            )
        except ApiException as exc:
            if exc.status == 409:
                return None
            if exc.status == 404:
                raise ReviewNotFound(f"no review {meta['name']!r}") from exc
            if exc.status == 403:
                message = _message(exc)
                if "requireDistinctApprover" in message:
                    raise SelfApproval(message) from exc
                raise NotAnApprover(message) from exc
            raise
        return patched

    def _owner_reference(self) -> dict[str, Any] | None:
        if not self._owner_read:
            self._owner_read = True
            try:
                policy = self._api.get_namespaced_custom_object(
                    GROUP, VERSION, self._namespace, POLICY_PLURAL, self._policy
                )
            except ApiException:
                return None
            self._owner = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": POLICY_KIND,
                "name": self._policy,
                "uid": policy["metadata"]["uid"],
            }
        return self._owner

    # -- the protocol ---------------------------------------------------------------------

    async def create(self, review: Review) -> Opened:
        """See :meth:`ReviewStore.create`.

        The review is named ``<key>-<n>``: the first 10 characters of its review key and
        one more than the highest ``n`` of that key so far. Two sidecars opening the same
        review at once pick the same name; the API server lets one create it and answers
        409 AlreadyExists to the other, which looks again and finds the pending twin. So
        one held statement is one review, however many replicas hold it.
        """
        return await self._run(self._create, review)

    def _create(self, review: Review) -> Opened:
        key = review_key(review.requester, review.database, review.normalized, review.parameters)
        number = 1
        for _ in range(_ATTEMPTS):
            items = self._items(f"{LABEL_KEY}={key}")
            twins = [r for r in map(to_review, items) if r.pending and _same_statement(r, review)]
            if twins:
                return Opened(min(twins, key=lambda r: (r.created, r.id)), created=False)
            number = max(number, _next_number(key, items))
            name = f"{key[:_NAME_KEY]}-{number}"
            try:
                created = self._api.create_namespaced_custom_object(
                    GROUP, VERSION, self._namespace, PLURAL, self._manifest(name, key, review)
                )
            except ApiException as exc:
                if exc.status == 409:
                    # Another sidecar took the name (look for its review), or a review of
                    # another key that shares the name's prefix has it (take the next).
                    number += 1
                    continue
                raise
            return Opened(to_review(created), created=True)
        raise ReviewConflict("reviews of this statement keep being created; try again")

    def _manifest(self, name: str, key: str, review: Review) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "name": name,
            "namespace": self._namespace,
            "labels": {LABEL_POLICY: self._policy, LABEL_KEY: key},
            "annotations": {ANNOTATION_CREATED: _time(review.created)},
        }
        owner = self._owner_reference()
        if owner is not None:
            metadata["ownerReferences"] = [owner]
        spec: dict[str, Any] = {
            "requester": _party_json(review.requester),
            "database": review.database,
            "statement": review.statement,
            "normalized": review.normalized,
            "parameters": list(review.parameters),
            "summary": review.summary.model_dump(mode="json"),
            "rule": review.rule,
            "reason": review.reason,
        }
        if review.estimate is not None:
            spec["estimate"] = review.estimate
        manifest: dict[str, Any] = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": metadata,
            "spec": spec,
        }
        # A new object's generation is 1.
        conditions = review_conditions(manifest, generation=1, now=datetime.now(UTC))
        manifest["status"] = {"conditions": conditions}
        return manifest

    async def get(self, review_id: str) -> Review:
        """See :meth:`ReviewStore.get`."""
        return await self._run(lambda: to_review(self._read(review_id)))

    async def list(self, *, pending_only: bool = False) -> builtins.list[Review]:
        """See :meth:`ReviewStore.list` (this policy's reviews)."""
        return await self._run(self._list, pending_only)

    def _list(self, pending_only: bool) -> builtins.list[Review]:
        reviews = [to_review(o) for o in self._items(f"{LABEL_POLICY}={self._policy}")]
        if pending_only:
            reviews = [r for r in reviews if r.pending]
        return sorted(reviews, key=lambda r: (r.created, r.id))

    async def decide(
        self,
        review_id: str,
        approver: Party,
        approve: bool,
        comment: str,
        *,
        uses: int,
        ttl: timedelta,
        now: datetime,
    ) -> Review:
        """See :meth:`ReviewStore.decide`.

        The gateway decides for an approver it verified: the approver goes into the
        ``querywarden.io/approver`` annotation, and the webhook checks and stamps it.
        """
        changes: dict[str, Any] = {
            "metadata": {"annotations": {ANNOTATION_APPROVER: json.dumps(_party_json(approver))}},
            "spec": {
                "decision": "approved" if approve else "denied",
                "comment": comment,
                "uses": uses,
                "ttl": _ttl(ttl),
            },
        }
        return await self._run(self._end_pending, review_id, changes)

    async def withdraw(self, review_id: str, why: str, *, now: datetime) -> Review:
        """See :meth:`ReviewStore.withdraw`."""
        status = {"closed": "withdrawn", "closedReason": why, "decided": _time(now)}
        return await self._run(self._end_pending, review_id, _closing(status, now))

    async def expire(self, review_id: str, *, now: datetime) -> Review:
        """See :meth:`ReviewStore.expire`."""
        status = {
            "closed": "expired",
            "closedReason": "nobody decided in time",
            "decided": _time(now),
        }
        return await self._run(self._end_pending, review_id, _closing(status, now))

    def _end_pending(
        self, review_id: str, changes: dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]]
    ) -> Review:
        for _ in range(_ATTEMPTS):
            obj = self._read(review_id)
            review = to_review(obj)
            if not review.pending:
                raise ReviewConflict(f"review {review_id} is already {review.decision.value}")
            patched = self._patch(obj, changes(obj) if callable(changes) else changes)
            if patched is not None:
                return to_review(patched)
        raise ReviewConflict(f"review {review_id} keeps changing; try again")

    async def find_grant(
        self,
        requester: Party,
        database: str,
        normalized: str,
        *,
        parameters: tuple[str | None, ...] = (),
        now: datetime,
    ) -> Review | None:
        """See :meth:`ReviewStore.find_grant`."""
        key = review_key(requester, database, normalized, parameters)
        items = await self._run(self._items, f"{LABEL_KEY}={key}")
        grants = [
            r
            for r in map(to_review, items)
            if r.requester.same_identity(requester)
            and r.database == database
            and r.normalized == normalized
            and r.parameters == parameters
            and r.grant_usable(now)
        ]
        if not grants:
            return None
        return min(grants, key=lambda r: (r.grant_expires or now, r.id))

    async def prune(self, ended_before: datetime) -> int:
        """Nothing: the operator deletes ended QueryReviews.

        It holds the delete right (the sidecars do not) and applies the policy's
        ``approvals.retention``.
        """
        return 0

    async def use(self, review_id: str, *, now: datetime) -> Review:
        """See :meth:`ReviewStore.use`."""
        return await self._run(self._use, review_id, now)

    def _use(self, review_id: str, now: datetime) -> Review:
        for _ in range(_ATTEMPTS):
            obj = self._read(review_id)
            review = to_review(obj)
            if not review.grant_usable(now):
                raise ReviewConflict(_unusable(review, now))
            left = review.uses_left if review.uses_left == UNLIMITED_USES else review.uses_left - 1
            used = [*((obj.get("status") or {}).get("usedAt") or []), _time(now)]
            status: dict[str, Any] = {"usesLeft": left, "usedAt": used}
            # Same state, next generation: the conditions stay current for kubectl wait.
            status["conditions"] = review_conditions(
                _merged(obj, status), generation=next_generation(obj), now=now
            )
            patched = self._patch(obj, {"status": status})
            if patched is not None:
                return to_review(patched)
        raise ReviewConflict(f"the grant of review {review_id} is contended; try again")

    # -- the watch -------------------------------------------------------------------------

    def watch(self, on_change: Callable[[Review], None]) -> None:
        """Call ``on_change`` (on the running event loop) with each review as it changes.

        The watch runs on its own thread until :meth:`close`: it lists this policy's
        reviews, then follows their changes from that resourceVersion, listing again when
        the API server has compacted past it (410 Gone) and after errors. Every review it
        lists counts as a change, so nothing decided while the watch was down is missed.
        """
        if self._watcher is not None:
            raise RuntimeError("the store is watched already")
        loop = asyncio.get_running_loop()

        def deliver(obj: Mapping[str, Any]) -> None:
            try:
                review = to_review(obj)
            except Exception:  # a hand-made object the CRD schema let through
                log.warning("approvals: ignoring malformed QueryReview %s", _name(obj))
                return
            if not loop.is_closed():
                loop.call_soon_threadsafe(on_change, review)

        self._watcher = threading.Thread(
            target=self._follow, args=(deliver,), name="qw-kube-review-watch", daemon=True
        )
        self._watcher.start()

    def _follow(self, deliver: Callable[[Mapping[str, Any]], None]) -> None:
        selector = f"{LABEL_POLICY}={self._policy}"
        version: str | None = None
        while not self._watch_stop.is_set():
            try:
                if version is None:
                    answer = self._api.list_namespaced_custom_object(
                        GROUP, VERSION, self._namespace, PLURAL, label_selector=selector
                    )
                    version = answer["metadata"]["resourceVersion"]
                    for obj in answer.get("items") or []:
                        deliver(obj)
                stream = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
                for event in stream.stream(  # type: ignore[no-untyped-call]
                    self._api.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self._namespace,
                    PLURAL,
                    label_selector=selector,
                    resource_version=version,
                    timeout_seconds=_WATCH_SECONDS,
                    _request_timeout=_WATCH_SECONDS + 10,
                ):
                    if self._watch_stop.is_set():
                        stream.stop()  # type: ignore[no-untyped-call]
                        break
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        version = None  # 410 Gone (compacted): list again
                        break
                    version = obj["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "MODIFIED"):
                        deliver(obj)
            except ApiException as exc:
                version = None
                if exc.status != 410 and not self._watch_stop.is_set():
                    log.warning("approvals: watching QueryReviews failed: %s", _message(exc))
                    self._watch_stop.wait(_WATCH_BACKOFF)
            except Exception as exc:
                version = None
                if not self._watch_stop.is_set():
                    log.warning("approvals: watching QueryReviews failed: %s", exc)
                    self._watch_stop.wait(_WATCH_BACKOFF)

    async def close(self) -> None:
        """Stop the watch, close the client's connections and stop the store's threads."""
        self._watch_stop.set()
        await self._run(self._api_client.close)
        self._executor.shutdown(wait=True)


def _merged(obj: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` with ``status`` merged into its status (as the merge patch will leave it)."""
    return {**obj, "status": {**(obj.get("status") or {}), **status}}


def _closing(status: dict[str, Any], now: datetime) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The patch that closes the review it is given with ``status``, conditions included."""

    def changes(obj: dict[str, Any]) -> dict[str, Any]:
        conditions = review_conditions(
            _merged(obj, status), generation=next_generation(obj), now=now
        )
        return {"status": {**status, "conditions": conditions}}

    return changes


def _message(exc: ApiException) -> str:
    try:
        decoded = json.loads(exc.body or "")
    except (TypeError, ValueError):
        return str(exc.reason or exc)
    if isinstance(decoded, dict):
        return str(decoded.get("message") or exc.reason)
    return str(exc.reason or exc)


def _name(obj: Mapping[str, Any]) -> str:
    metadata = obj.get("metadata")
    return str(metadata.get("name")) if isinstance(metadata, Mapping) else "?"


def default_namespace(service_account_directory: Path | None = None) -> str | None:
    """The pod's namespace: ``$POD_NAMESPACE``, else its ServiceAccount's; None outside a pod."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    for directory in (service_account_directory, _SA_NAMESPACE.parent):
        if directory is None:
            continue
        try:
            return (directory / _SA_NAMESPACE.name).read_text().strip() or None
        except OSError:
            continue
    return None


_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _default_client(
    kubeconfig: Path | None = None, service_account_directory: Path | None = None
) -> kubernetes.client.ApiClient:
    configuration = kubernetes.client.Configuration()
    if service_account_directory is not None:
        from kubernetes.config.incluster_config import InClusterConfigLoader

        # try_refresh_token: the projected token is rotated by the kubelet; the loader
        # reads the file again before the one it holds gets old.
        InClusterConfigLoader(  # type: ignore[no-untyped-call]
            token_filename=str(service_account_directory / "token"),
            cert_filename=str(service_account_directory / "ca.crt"),
            try_refresh_token=True,
        ).load_and_set(configuration)
        return kubernetes.client.ApiClient(configuration)
    if kubeconfig is not None:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig), client_configuration=configuration
        )
        return kubernetes.client.ApiClient(configuration)
    try:
        kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    return kubernetes.client.ApiClient(configuration)
