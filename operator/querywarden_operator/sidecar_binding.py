"""The policy's sidecar RoleBinding: which ServiceAccounts may open QueryReviews.

Two writers change it, often in different operator replicas and at the same moment: the
pod webhook adds a pod's account as the pod is admitted, and the recount sets the
accounts of the pods the policy selects. Each write is a read-modify-write guarded by
the binding's resourceVersion (a 409 re-reads and decides again), so neither overwrites
what the other wrote after it read.

That is not enough on its own: the webhook runs before the pod is stored, so a recount
can list the pods, see no pod with the new account, and remove it moments after the
webhook added it (seen on a real node: the first statements of a fresh database pod
could not open reviews until the next recount). The webhook therefore stamps the
account with the time it was admitted (annotation ``querywarden.io/admitted-accounts``)
and a recount keeps an account admitted within :data:`ADMISSION_GRACE` even when no pod
shows it yet. After that, an account that no selected pod runs as is unbound.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from querywarden_operator.kube import KubeApiError, KubeClient, object_path
from querywarden_operator.render import (
    PolicyRef,
    render_sidecar_role_binding,
    sidecar_role_binding_name,
)
from querywarden_operator.spec import GROUP

ANNOTATION_ADMITTED = f"{GROUP}/admitted-accounts"
#: How long an account admitted by the webhook stays bound with no stored pod to show for
#: it: far longer than the API server takes to store an admitted pod.
ADMISSION_GRACE = datetime.timedelta(minutes=5)
#: Read-modify-write rounds before giving up (each lost round means another writer won).
ATTEMPTS = 5


@dataclass(frozen=True)
class BoundAccounts:
    """The binding as read: its accounts, their admission stamps, its resourceVersion."""

    accounts: frozenset[str]
    admitted: Mapping[str, datetime.datetime]
    resource_version: str | None  # None: there is no binding yet

    @classmethod
    def read(cls, binding: Mapping[str, Any] | None, namespace: str) -> BoundAccounts:
        if binding is None:
            return cls(frozenset(), {}, None)
        metadata = binding.get("metadata") or {}
        accounts = frozenset(
            str(s.get("name"))
            for s in binding.get("subjects") or []
            if s.get("kind") == "ServiceAccount" and s.get("namespace") == namespace
        )
        return cls(
            accounts,
            _parse_stamps((metadata.get("annotations") or {}).get(ANNOTATION_ADMITTED)),
            str(metadata.get("resourceVersion") or "") or None,
        )


#: What a writer wants, given what it read: (accounts, admission stamps).
Decision = tuple[set[str], dict[str, datetime.datetime]]


def admit(account: str, at: datetime.datetime) -> Callable[[BoundAccounts], Decision]:
    """The webhook's change: add ``account`` (stamped ``at``), remove nothing."""

    def decide(read: BoundAccounts) -> Decision:
        return set(read.accounts) | {account}, {**read.admitted, account: at}

    return decide


def recount(
    in_use: Callable[[], Iterable[str]], at: datetime.datetime
) -> Callable[[BoundAccounts], Decision]:
    """The recount's change: the accounts pods run as, plus those admitted recently.

    ``in_use`` lists the pods again on every attempt, after the binding was read, so what
    it sees is at least as new as the binding's stamps.
    """

    def decide(read: BoundAccounts) -> Decision:
        recent = {a: t for a, t in read.admitted.items() if at - t < ADMISSION_GRACE}
        return set(in_use()) | set(recent), recent

    return decide


def write(
    kube: KubeClient,
    policy: PolicyRef,
    cluster_role: str,
    decide: Callable[[BoundAccounts], Decision],
) -> None:
    """Apply ``decide`` to the binding as it is now; retried when another writer won."""
    path = object_path(
        "rbac.authorization.k8s.io/v1", "rolebindings", policy.namespace,
        sidecar_role_binding_name(policy.name),
    )  # fmt: skip
    for _ in range(ATTEMPTS):
        current = kube.get(path)
        read = BoundAccounts.read(current, policy.namespace)
        accounts, stamps = decide(read)
        manifest = render_sidecar_role_binding(policy, cluster_role, accounts)
        manifest["metadata"]["annotations"] = {ANNOTATION_ADMITTED: _format_stamps(stamps)}
        if current is not None and _unchanged(current, manifest):
            return
        try:
            if read.resource_version is None:
                kube.request("POST", path.rsplit("/", 1)[0], manifest)
            else:
                # A merge patch carrying the resourceVersion read fails (409) if the
                # binding changed since; it replaces the subjects list whole. (patch is
                # the verb the chart grants on RoleBindings; no update.)
                kube.merge_patch(
                    path,
                    {
                        "metadata": {
                            "resourceVersion": read.resource_version,
                            "annotations": manifest["metadata"]["annotations"],
                        },
                        "roleRef": manifest["roleRef"],
                        "subjects": manifest["subjects"],
                    },
                )
            return
        except KubeApiError as exc:
            if exc.status != 409:  # 409: changed (or created) since we read it
                raise
    raise KubeApiError("PATCH", path, 409, b'{"message": "kept changing while we wrote it"}')


def _unchanged(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    annotations = (current.get("metadata") or {}).get("annotations") or {}
    stamps = wanted["metadata"]["annotations"][ANNOTATION_ADMITTED]
    return bool(
        (current.get("subjects") or []) == wanted["subjects"]
        and current.get("roleRef") == wanted["roleRef"]
        and annotations.get(ANNOTATION_ADMITTED) == stamps
    )


def _parse_stamps(raw: str | None) -> dict[str, datetime.datetime]:
    """The annotation's ``{account: ISO time}``; anything unreadable counts as no stamp."""
    try:
        loaded = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    stamps: dict[str, datetime.datetime] = {}
    if isinstance(loaded, dict):
        for account, text in loaded.items():
            try:
                stamps[str(account)] = datetime.datetime.fromisoformat(str(text))
            except ValueError:
                continue
    return stamps


def _format_stamps(stamps: Mapping[str, datetime.datetime]) -> str:
    return json.dumps(
        {a: t.isoformat(timespec="seconds") for a, t in sorted(stamps.items())},
        separators=(",", ":"),
    )
