"""QueryReview on the real API server: the CRD, the Kubernetes review store, the webhooks.

The chart is installed and the operator runs in-process (its review webhooks at a
loopback HTTPS address); the gateway sidecar is played by a ServiceAccount bound to the
chart's sidecar ClusterRole, approvers by users the admin impersonates (Impersonate-User
and Impersonate-Group), bound to the chart's ``querywarden-approver`` ClusterRole.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes.config
import pytest
import yaml

from k8sharness.cluster import Cluster, KubeError
from k8sharness.helm import Helm
from k8sharness.qwoperator import (
    CHART,
    InstalledOperator,
    apply_crd,
    bind_cluster_role,
    installed_operator,
    minimal_spec,
    policies,
    policy,
    service_account_kubeconfig,
    wait_until,
)
from k8sharness.tools import REPO, tool
from querywarden.approvals.kube_store import KubernetesReviewStore, review_key
from querywarden.approvals.model import (
    NotAnApprover,
    Party,
    Review,
    ReviewConflict,
    ReviewDecision,
    ReviewNotFound,
    SelfApproval,
    new_review_id,
    normalize_statement,
)
from querywarden_operator import schema
from querywarden_operator.review import (
    ANNOTATION_CREATED_BY,
    REVIEW_API_VERSION,
    REVIEW_CRD_NAME,
    REVIEW_PLURAL,
)

REVIEW_CRD_FILE = REPO / "crds" / "queryreviews.yaml"
PLUGIN = CHART / "files" / "kubectl-querywarden"
POLICY = "orders"
SIDECAR = "orders-db"
REQUESTER = Party(subject="carol", issuer="corp", groups=("dba",))


def apply_review_crd(k8s: Cluster) -> None:
    k8s.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REVIEW_CRD_FILE))
    k8s.wait_established(REVIEW_CRD_NAME)
    k8s.wait_for(
        lambda: any(r["name"] == REVIEW_PLURAL for r in k8s.get(f"/apis/{REVIEW_API_VERSION}")
                    ["resources"]) or None,
        what="queryreviews in discovery",
    )  # fmt: skip


def reviews(namespace: str) -> str:
    return f"/apis/{REVIEW_API_VERSION}/namespaces/{namespace}/{REVIEW_PLURAL}"


@dataclass
class Setup:
    k8s: Cluster
    operator: InstalledOperator
    namespace: str
    sidecar_kubeconfig: Path

    def store(self) -> KubernetesReviewStore:
        client = kubernetes.config.new_client_from_config(config_file=str(self.sidecar_kubeconfig))
        return KubernetesReviewStore(self.namespace, POLICY, api_client=client)

    def as_user(
        self, user: str, groups: tuple[str, ...], method: str, path: str, body: Any = None
    ) -> Any:
        """One API call as ``user`` in ``groups`` (impersonated by the admin)."""
        api = self.k8s.api
        headers = {
            "Accept": "application/json",
            "Content-Type": "application/merge-patch+json",
            "Impersonate-User": user,
        }
        if groups:
            headers["Impersonate-Group"] = groups[0]
        method, url, headers, data, post = api.param_serialize(
            method=method, resource_path=path, header_params=headers, body=body,
            auth_settings=["BearerToken"],
        )  # fmt: skip
        if len(groups) > 1:
            raise ValueError("one group per impersonated user in these tests")
        response = api.call_api(method, url, headers, data, post, _request_timeout=30)
        raw = response.read() or b""
        if response.status >= 400:
            raise KubeError(method, path, response.status, raw)
        return json.loads(raw) if raw else None

    def decide(self, user: str, groups: tuple[str, ...], name: str, **spec: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.as_user(
            user, groups, "PATCH", f"{reviews(self.namespace)}/{name}", {"spec": spec}
        )
        return result


@pytest.fixture(scope="module")
def setup(k8s: Cluster, helm: Helm, workdir: Path) -> Iterator[Setup]:
    apply_crd(k8s)
    apply_review_crd(k8s)
    # The CRD is applied above (kopf must see it when the operator starts), so the chart
    # does not install it.
    values = {"reviews.enabled": "true", "reviews.installCRD": "false"}
    with installed_operator(k8s, helm, workdir / "queryreview", extra_values=values) as installed:
        namespace = f"{installed.namespace}-db"
        k8s.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                          "metadata": {"name": namespace}})  # fmt: skip
        try:
            spec = minimal_spec()
            spec["policy"] = {
                "approvals": {"approvers": {"groups": ["dba"]}, "requireDistinctApprover": True}
            }
            k8s.create(policies(namespace), policy(POLICY, spec))
            k8s.create(f"/api/v1/namespaces/{namespace}/serviceaccounts",
                       {"apiVersion": "v1", "kind": "ServiceAccount",
                        "metadata": {"name": SIDECAR}})  # fmt: skip
            bind_cluster_role(k8s, namespace, "sidecar",
                              f"{installed.webhook_configuration}-sidecar",
                              service_accounts=[SIDECAR])  # fmt: skip
            # alice (dba), mallory (not a dba) and carol (the requester, a dba) may try;
            # bob has no binding at all.
            bind_cluster_role(k8s, namespace, "approvers", "querywarden-approver",
                              users=["alice", "mallory", "carol"])  # fmt: skip
            kubeconfig = service_account_kubeconfig(
                k8s, namespace, SIDECAR, workdir / "queryreview" / "sidecar-kubeconfig"
            )
            yield Setup(k8s, installed, namespace, kubeconfig)
        finally:
            k8s.delete(f"/api/v1/namespaces/{namespace}")


def new_review(statement: str = "DELETE FROM orders WHERE id = 5", **fields: Any) -> Review:
    return Review(
        id=new_review_id(),
        requester=REQUESTER,
        database="orders",
        statement=statement,
        normalized=normalize_statement(statement),
        rule="deletes-need-review",
        reason="a DELETE",
        created=datetime.now(UTC),
        **fields,
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _create(setup: Setup, review: Review) -> Review:
    store = setup.store()
    try:
        return (await store.create(review)).review
    finally:
        await store.close()


# --- the CRD --------------------------------------------------------------------------


def test_committed_review_crds_are_generated_from_the_models() -> None:
    generated = schema.render_review()
    for path in schema.REVIEW_CRD_FILES:
        assert path.read_text() == generated, f"{path} is stale: run {schema.REGENERATE}"
    assert schema.main(["--check"]) == 0


def _table(setup: Setup, *args: str) -> list[dict[str, str]]:
    """``kubectl get queryreviews`` as rows of {column: cell}, cut where the header's are."""
    lines = setup.k8s.kubectl("get", "queryreviews", "-n", setup.namespace, *args).stdout
    header, *rows = lines.splitlines()
    # Columns are at least three spaces apart; a header may have one inside (USES LEFT).
    starts = [(m.start(), m.group()) for m in re.finditer(r"\S+(?: \S+)*", header)]
    ends = [start for start, _ in starts[1:]] + [None]
    return [
        {name: row[start:end].strip() for (start, name), end in zip(starts, ends, strict=True)}
        for row in rows
    ]


def test_crd_applies_with_printer_columns(setup: Setup) -> None:
    crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    crd = setup.k8s.get(f"{crds}/{REVIEW_CRD_NAME}")
    columns = [
        c["name"]
        for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]
        if not c.get("priority")
    ]
    assert columns == ["State", "Requester", "Database", "Rule", "Approver", "Age", "Statement"]
    created = run(_create(setup, new_review("DELETE FROM orders WHERE id = 1")))
    (row,) = _table(setup, created.id)
    assert row["NAME"] == created.id and row["STATE"] == "Pending"
    assert row["REQUESTER"] == "carol" and row["DATABASE"] == "orders"
    assert row["RULE"] == "deletes-need-review"
    # The statement is the last column: the rest of the line, spaces and all.
    assert row["STATEMENT"] == "DELETE FROM orders WHERE id = 1"
    setup.decide("alice", ("dba",), created.id, decision="approved", comment="ok")
    (row,) = _table(setup, created.id, "-o", "wide")
    assert row["STATE"] == "Approved" and row["APPROVER"] == "alice"
    assert row["USES LEFT"] == "1" and row["REASON"] == "a DELETE"
    assert row["STATEMENT"] == "DELETE FROM orders WHERE id = 1"


# --- conditions -------------------------------------------------------------------------


def _conditions(setup: Setup, name: str) -> dict[str, dict[str, Any]]:
    obj = setup.k8s.get(f"{reviews(setup.namespace)}/{name}")
    conditions = {c["type"]: c for c in obj["status"]["conditions"]}
    assert list(conditions) == ["Decided", "Approved", "Expired"]
    for condition in conditions.values():
        # Current for the object as stored: kubectl wait trusts no older condition.
        assert condition["observedGeneration"] == obj["metadata"]["generation"], obj
        assert condition["lastTransitionTime"].endswith("Z")
    return conditions


def _states(conditions: dict[str, dict[str, Any]]) -> dict[str, tuple[str, str]]:
    return {t: (c["status"], c["reason"]) for t, c in conditions.items()}


def _wait(setup: Setup, name: str, condition: str, timeout: str) -> Any:
    return setup.k8s.kubectl(
        "wait", f"--for=condition={condition}", f"queryreview/{name}", "-n", setup.namespace,
        f"--timeout={timeout}", check=False,
    )  # fmt: skip


def test_conditions_follow_an_approval_and_kubectl_wait_sees_them(setup: Setup) -> None:
    review = run(_create(setup, new_review("DELETE FROM orders WHERE id = 700")))
    pending = _conditions(setup, review.id)
    assert _states(pending) == {
        "Decided": ("False", "Pending"),
        "Approved": ("False", "Pending"),
        "Expired": ("False", "Pending"),
    }
    # Nothing to wait for yet: kubectl wait times out (exit 1).
    assert _wait(setup, review.id, "Approved", "1s").returncode == 1

    async def wait_while_approving() -> Any:
        waiter = asyncio.create_task(asyncio.to_thread(_wait, setup, review.id, "Approved", "60s"))
        await asyncio.sleep(1)
        await asyncio.to_thread(setup.decide, "alice", ("dba",), review.id,
                                decision="approved", comment="ticket 4711", uses=2)  # fmt: skip
        return await waiter

    waited = run(wait_while_approving())
    assert waited.returncode == 0, waited.stderr
    assert f"queryreview.querywarden.io/{review.id} condition met" in waited.stdout
    approved = _conditions(setup, review.id)
    assert _states(approved) == {
        "Decided": ("True", "Approved"),
        "Approved": ("True", "Approved"),
        "Expired": ("False", "Approved"),
    }
    assert approved["Approved"]["message"] == "approved by alice: ticket 4711"
    # Expired did not change status: its transition time is the one it had.
    assert approved["Expired"]["lastTransitionTime"] == pending["Expired"]["lastTransitionTime"]

    # A use of the grant changes the generation; the sidecar keeps the conditions current,
    # so a script that starts waiting afterwards returns at once.
    async def use() -> Review:
        store = setup.store()
        try:
            return await store.use(review.id, now=datetime.now(UTC))
        finally:
            await store.close()

    assert run(use()).uses_left == 1
    used = _conditions(setup, review.id)
    assert _states(used) == _states(approved)
    assert used["Approved"]["observedGeneration"] > approved["Approved"]["observedGeneration"]
    for condition in ("Approved", "Decided"):
        assert _wait(setup, review.id, condition, "5s").returncode == 0


def test_conditions_of_denied_withdrawn_and_expired_reviews(setup: Setup) -> None:
    denied = run(_create(setup, new_review("DELETE FROM orders WHERE id = 710")))
    setup.decide("alice", ("dba",), denied.id, decision="denied", comment="use the archive")
    conditions = _conditions(setup, denied.id)
    assert _states(conditions) == {
        "Decided": ("True", "Denied"),
        "Approved": ("False", "Denied"),
        "Expired": ("False", "Denied"),
    }
    assert conditions["Decided"]["message"] == "denied by alice: use the archive"
    assert _wait(setup, denied.id, "Decided", "5s").returncode == 0
    assert _wait(setup, denied.id, "Approved", "1s").returncode == 1

    async def close() -> tuple[Review, Review]:
        store = setup.store()
        try:
            now = datetime.now(UTC)
            first = (await store.create(new_review("DELETE FROM orders WHERE id = 711"))).review
            second = (await store.create(new_review("DELETE FROM orders WHERE id = 712"))).review
            return (
                await store.withdraw(first.id, "client went away", now=now),
                await store.expire(second.id, now=now),
            )
        finally:
            await store.close()

    withdrawn, expired = run(close())
    conditions = _conditions(setup, withdrawn.id)
    assert _states(conditions) == {
        "Decided": ("True", "Withdrawn"),
        "Approved": ("False", "Withdrawn"),
        "Expired": ("False", "Withdrawn"),
    }
    assert conditions["Decided"]["message"] == "withdrawn undecided: client went away"
    conditions = _conditions(setup, expired.id)
    assert _states(conditions) == {
        "Decided": ("True", "Expired"),
        "Approved": ("False", "Expired"),
        "Expired": ("True", "Expired"),
    }
    assert _wait(setup, expired.id, "Expired", "5s").returncode == 0
    states = {row["NAME"]: row["STATE"] for row in _table(setup)}
    assert states[denied.id] == "Denied" and states[withdrawn.id] == "Withdrawn"
    assert states[expired.id] == "Expired"


def test_conditions_cannot_be_forged(setup: Setup) -> None:
    review = run(_create(setup, new_review("DELETE FROM orders WHERE id = 720")))
    path = f"{reviews(setup.namespace)}/{review.id}"
    forged = [dict(c, status="True", reason="Approved") for c in
              setup.k8s.get(path)["status"]["conditions"]]  # fmt: skip
    with pytest.raises(KubeError) as refused:
        setup.as_user("alice", ("dba",), "PATCH", path, {"status": {"conditions": forged}})
    assert refused.value.status == 403
    # A sidecar cannot create a review that says it is approved either.
    store = setup.store()
    try:
        manifest = store._manifest("forged-1", "1" * 40, new_review("DELETE FROM orders"))
    finally:
        run(store.close())
    manifest["status"]["conditions"] = forged
    result = setup.k8s.kubectl(
        "--kubeconfig", str(setup.sidecar_kubeconfig), "create", "-f", "-",
        stdin=json.dumps(manifest), check=False,
    )  # fmt: skip
    assert result.returncode != 0 and "pending conditions" in result.stderr


def test_store_round_trip_and_single_use_grant(setup: Setup) -> None:
    async def scenario() -> None:
        store = setup.store()
        try:
            review = new_review("DELETE FROM orders WHERE id = 42", parameters=("x", None))
            created, new = await store.create(review)
            key = review_key(REQUESTER, "orders", review.normalized, ("x", None))
            # Named by the review key: the first review of this statement is number 1.
            assert new and created.id == f"{key[:10]}-1" and created.pending
            assert created.parameters == ("x", None)
            # A re-run while it waits shares the pending review.
            twin, new = await store.create(new_review("delete  from ORDERS where id = 42 ;",
                                                      parameters=("x", None)))  # fmt: skip
            assert twin.id == created.id and not new
            review = review.model_copy(update={"id": created.id})
            got = await store.get(review.id)
            assert got.statement == review.statement and got.created == review.created
            obj = setup.k8s.get(f"{reviews(setup.namespace)}/{review.id}")
            assert obj["metadata"]["labels"]["querywarden.io/review-key"] == key
            assert obj["metadata"]["ownerReferences"][0]["name"] == POLICY
            assert obj["metadata"]["annotations"][ANNOTATION_CREATED_BY] == (
                f"system:serviceaccount:{setup.namespace}:{SIDECAR}"
            )
            assert review.id in [r.id for r in await store.list(pending_only=True)]
            with pytest.raises(ReviewNotFound):
                await store.get("nosuchreview")
            now = datetime.now(UTC)
            assert await store.find_grant(REQUESTER, "orders", review.normalized,
                                          parameters=("x", None), now=now) is None  # fmt: skip
        finally:
            await store.close()
        # alice, a dba, approves with kubectl patch (impersonated); the webhook stamps her.
        decided = setup.decide("alice", ("dba",), review.id, decision="approved", comment="ok")
        assert decided["status"]["approver"]["subject"] == "alice"
        assert "dba" in decided["status"]["approver"]["groups"]
        assert decided["status"]["usesLeft"] == 1

        stores = [setup.store() for _ in range(2)]
        try:
            now = datetime.now(UTC)
            grant = await stores[0].find_grant(REQUESTER, "orders", review.normalized,
                                               parameters=("x", None), now=now)  # fmt: skip
            assert grant is not None and grant.id == review.id
            assert grant.decision is ReviewDecision.APPROVED and grant.approver is not None
            assert grant.approver.subject == "alice"
            # Two sidecars take the single use at once: exactly one wins.
            results = await asyncio.gather(
                *(s.use(review.id, now=now) for s in stores), return_exceptions=True
            )
            won = [r for r in results if isinstance(r, Review)]
            lost = [r for r in results if isinstance(r, ReviewConflict)]
            assert len(won) == 1 and len(lost) == 1, results
            assert won[0].uses_left == 0 and len(won[0].used_at) == 1
            assert await stores[1].find_grant(REQUESTER, "orders", review.normalized,
                                              parameters=("x", None), now=now) is None  # fmt: skip
            with pytest.raises(ReviewConflict):
                await stores[1].use(review.id, now=now)
        finally:
            for s in stores:
                await s.close()

    run(scenario())


def test_withdraw_expire_and_delegated_decision(setup: Setup) -> None:
    async def scenario() -> None:
        store = setup.store()
        try:
            now = datetime.now(UTC)
            withdrawn = (await store.create(new_review("DELETE FROM orders WHERE id = 7"))).review
            ended = await store.withdraw(withdrawn.id, "client went away", now=now)
            assert ended.decision is ReviewDecision.WITHDRAWN
            assert ended.comment == "client went away"
            with pytest.raises(ReviewConflict):
                await store.expire(withdrawn.id, now=now)
            expired = await store.expire(
                (await store.create(new_review("DELETE FROM orders WHERE id = 8"))).review.id,
                now=now,
            )
            assert expired.decision is ReviewDecision.EXPIRED
            # A withdrawn review cannot be approved afterwards.
            with pytest.raises(KubeError) as refused:
                setup.decide("alice", ("dba",), withdrawn.id, decision="approved")
            assert refused.value.status in (400, 403)

            # The gateway decides for an approver it verified (the admin API): the
            # webhook checks that party and stamps it.
            review = (await store.create(new_review("DELETE FROM orders WHERE id = 9"))).review
            dave = Party(subject="dave", issuer="corp", groups=("dba",))
            approved = await store.decide(review.id, dave, True, "fine", uses=3,
                                          ttl=timedelta(minutes=5), now=now)  # fmt: skip
            assert approved.decision is ReviewDecision.APPROVED
            assert approved.approver == dave and approved.uses_left == 3
            assert approved.grant_expires is not None
            with pytest.raises(ReviewConflict):
                await store.decide(review.id, dave, False, "", uses=1,
                                   ttl=timedelta(minutes=5), now=now)  # fmt: skip
            # ... and refuses the requester approving through the gateway.
            other = (await store.create(new_review("DELETE FROM orders WHERE id = 10"))).review
            with pytest.raises(SelfApproval):
                await store.decide(other.id, REQUESTER, True, "", uses=1,
                                   ttl=timedelta(minutes=5), now=now)  # fmt: skip
            outsider = Party(subject="eve", issuer="corp", groups=("devs",))
            with pytest.raises(NotAnApprover):
                await store.decide(other.id, outsider, True, "", uses=1,
                                   ttl=timedelta(minutes=5), now=now)  # fmt: skip
        finally:
            await store.close()

    run(scenario())


# --- who may decide ---------------------------------------------------------------------


def _refusal(setup: Setup, user: str, groups: tuple[str, ...], name: str, **spec: Any) -> str:
    with pytest.raises(KubeError) as refused:
        setup.decide(user, groups, name, **spec)
    assert refused.value.status == 403, refused.value
    return str(refused.value)


def test_approval_needs_rbac_and_an_approver_group_and_not_the_requester(setup: Setup) -> None:
    review = run(_create(setup, new_review("DELETE FROM orders WHERE id = 100")))
    # bob has no RoleBinding: RBAC refuses before any webhook.
    assert "forbidden" in _refusal(setup, "bob", ("dba",), review.id, decision="approved")
    # mallory may patch QueryReviews but is no approver of the policy.
    message = _refusal(setup, "mallory", ("devs",), review.id, decision="approved")
    assert "not an approver" in message
    # carol is a dba but requested the statement.
    message = _refusal(setup, "carol", ("dba",), review.id, decision="approved")
    assert "requireDistinctApprover" in message
    # Nobody but the creating sidecar may speak for another approver through the
    # annotation, nor move the review to another policy's approvers.
    path = f"{reviews(setup.namespace)}/{review.id}"
    claim = json.dumps({"subject": "alice", "issuer": "corp", "groups": ["dba"]})
    with pytest.raises(KubeError) as claimed:
        setup.as_user("mallory", ("devs",), "PATCH", path, {
            "metadata": {"annotations": {"querywarden.io/approver": claim}},
            "spec": {"decision": "approved"},
        })  # fmt: skip
    assert claimed.value.status == 403 and "mallory is not an approver" in str(claimed.value)
    with pytest.raises(KubeError) as relabelled:
        setup.as_user("mallory", ("devs",), "PATCH", path, {
            "metadata": {"labels": {"querywarden.io/policy": "lax"}},
            "spec": {"decision": "approved"},
        })  # fmt: skip
    assert relabelled.value.status == 403 and "immutable" in str(relabelled.value)
    still = setup.k8s.get(path)
    assert still["spec"]["decision"] == "pending" and "approver" not in still.get("status", {})

    denied = setup.decide("alice", ("dba",), review.id, decision="denied", comment="no")
    assert denied["status"]["approver"]["subject"] == "alice"
    assert denied["status"]["usesLeft"] == 0


def test_decided_reviews_are_immutable_and_status_is_not_forgeable(setup: Setup) -> None:
    review = run(_create(setup, new_review("DELETE FROM orders WHERE id = 200")))
    path = f"{reviews(setup.namespace)}/{review.id}"
    # A forged status (an approver stamped by hand) is refused while pending ...
    with pytest.raises(KubeError) as forged:
        setup.as_user("alice", ("dba",), "PATCH", path,
                      {"status": {"usesLeft": 5, "approver": {"subject": "alice"}}})  # fmt: skip
    assert forged.value.status == 403
    # ... and overwritten by the stamp when deciding.
    decided = setup.as_user("alice", ("dba",), "PATCH", path, {
        "spec": {"decision": "approved", "uses": 2, "ttl": "10m"},
        "status": {"usesLeft": 99, "approver": {"subject": "carol"}},
    })  # fmt: skip
    assert decided["status"]["approver"]["subject"] == "alice"
    assert decided["status"]["usesLeft"] == 2
    expires = datetime.fromisoformat(decided["status"]["grantExpires"])
    assert timedelta(minutes=9) < expires - datetime.now(UTC) <= timedelta(minutes=10)
    for change in ({"decision": "denied"}, {"comment": "changed my mind"}, {"uses": 5},
                   {"decision": "pending"}):  # fmt: skip
        message = _refusal(setup, "alice", ("dba",), review.id, **change)
        assert "cannot change" in message
    # The requester's fields never change, nor can a user create a review.
    other = run(_create(setup, new_review("DELETE FROM orders WHERE id = 201")))
    message = _refusal(setup, "alice", ("dba",), other.id, statement="DROP TABLE orders")
    assert "only the approver's fields" in message
    manifest = setup.k8s.get(f"{reviews(setup.namespace)}/{other.id}")
    manifest["metadata"] = {"name": "byhand", "labels": manifest["metadata"]["labels"]}
    manifest.pop("status", None)
    with pytest.raises(KubeError) as by_admin:
        setup.k8s.create(reviews(setup.namespace), manifest)
    assert by_admin.value.status == 403 and "ServiceAccount" in str(by_admin.value)


# --- the kubectl plugin -----------------------------------------------------------------


def test_kubectl_plugin_approves_and_denies(setup: Setup, workdir: Path) -> None:
    first = run(_create(setup, new_review("DELETE FROM orders WHERE id = 300")))
    second = run(_create(setup, new_review("DELETE FROM orders WHERE id = 301")))
    env = {"KUBECTL": str(tool("kubectl"))}
    common = ["-n", setup.namespace, "--as", "alice", "--as-group", "dba"]
    setup.k8s.run(Path(sys.executable), str(PLUGIN), "approve", first.id,
                  "--comment", "looks right", "--uses", "2", *common, env=env)  # fmt: skip
    setup.k8s.run(Path(sys.executable), str(PLUGIN), "deny", second.id, "--comment=no",
                  *common, env=env)  # fmt: skip
    approved = setup.k8s.get(f"{reviews(setup.namespace)}/{first.id}")
    assert approved["spec"]["decision"] == "approved"
    assert approved["spec"]["comment"] == "looks right"
    assert approved["status"]["approver"]["subject"] == "alice"
    assert approved["status"]["usesLeft"] == 2
    denied = setup.k8s.get(f"{reviews(setup.namespace)}/{second.id}")
    assert denied["spec"]["decision"] == "denied" and denied["status"]["usesLeft"] == 0
    # The requester's own approval fails through the plugin too.
    third = run(_create(setup, new_review("DELETE FROM orders WHERE id = 302")))
    result = setup.k8s.run(Path(sys.executable), str(PLUGIN), "approve", third.id,
                           "-n", setup.namespace, "--as", "carol", "--as-group", "dba",
                           env=env, check=False)  # fmt: skip
    assert result.returncode != 0 and "requireDistinctApprover" in result.stderr
    listed = setup.k8s.run(Path(sys.executable), str(PLUGIN), "list", "-n", setup.namespace,
                           env=env).stdout  # fmt: skip
    assert first.id in listed


def _template(helm: Helm, *args: str) -> list[dict[str, Any]]:
    result = helm("template", "qw", str(CHART), "--namespace", "qw-system", *args)
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_chart_review_parts_are_on_by_default_and_come_off_whole(helm: Helm) -> None:
    def names(documents: list[dict[str, Any]]) -> set[tuple[str, str]]:
        return {(d["kind"], d["metadata"]["name"]) for d in documents}

    account = (
        "--set", "reviews.sidecarServiceAccounts[0].namespace=shop",
        "--set", "reviews.sidecarServiceAccounts[0].name=orders-db",
    )  # fmt: skip
    off = names(_template(helm, "--set", "reviews.enabled=false", *account))
    enabled_documents = _template(helm, *account)  # the chart's default: on
    assert names(enabled_documents) == names(
        _template(helm, "--set", "reviews.enabled=true", *account)
    )
    added = names(enabled_documents) - off
    assert added == {
        ("CustomResourceDefinition", REVIEW_CRD_NAME),
        ("ClusterRole", "querywarden-approver"),
        ("ClusterRole", "qw-querywarden-qw-system-sidecar"),
        ("RoleBinding", "qw-querywarden-qw-system-sidecar-orders-db"),
        ("MutatingWebhookConfiguration", "qw-querywarden-qw-system-reviews"),
        ("ValidatingWebhookConfiguration", "qw-querywarden-qw-system-reviews"),
    }
    (crd,) = [d for d in enabled_documents if d["kind"] == "CustomResourceDefinition"]
    generated = schema.review_crd()
    assert crd["spec"] == generated["spec"]
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    for kind in ("Mutating", "Validating"):
        (configuration,) = [
            d for d in enabled_documents if d["kind"] == f"{kind}WebhookConfiguration"
            and d["metadata"]["name"].endswith("-reviews")
        ]  # fmt: skip
        (webhook,) = configuration["webhooks"]
        assert webhook["failurePolicy"] == "Fail"
        assert webhook["rules"][0]["resources"] == ["queryreviews"]
        path = "/review-stamp" if kind == "Mutating" else "/review-check"
        assert webhook["clientConfig"]["service"]["path"] == path


def test_chart_rbac_for_reviews(setup: Setup) -> None:
    role = setup.k8s.get("/apis/rbac.authorization.k8s.io/v1/clusterroles/querywarden-approver")
    assert {"update", "patch"} <= set(role["rules"][0]["verbs"])
    operator_role = setup.k8s.get(
        f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{setup.operator.webhook_configuration}"
    )
    review_rules = [r for r in operator_role["rules"] if "queryreviews" in r["resources"]]
    assert review_rules and set(review_rules[0]["verbs"]) == {"get", "list"}
    docs = (REPO / "docs" / "operator.md").read_text()
    assert "kubectl querywarden approve" in docs and "kubectl patch queryreview" in docs
    assert yaml.safe_load(REVIEW_CRD_FILE.read_text())["spec"]["scope"] == "Namespaced"
    wait_until(lambda: setup.operator.operator.alive, what="the operator still running")


def test_the_store_watch_reports_a_decision_made_with_kubectl(setup: Setup) -> None:
    async def body() -> tuple[list[Review], Review]:
        store = setup.store()
        seen: list[Review] = []
        changed = asyncio.Event()

        def on_change(review: Review) -> None:
            seen.append(review)
            changed.set()

        try:
            created = (await store.create(new_review("DELETE FROM orders WHERE id = 400"))).review
            store.watch(on_change)
            # The watch starts with a list: the new review is reported as it stands.
            while not any(r.id == created.id for r in seen):
                changed.clear()
                await asyncio.wait_for(changed.wait(), 30)
            await asyncio.to_thread(
                setup.k8s.kubectl, "patch", "queryreview", created.id, "-n", setup.namespace,
                "--type", "merge", "-p", '{"spec":{"decision":"approved","comment":"ok"}}',
                "--as", "alice", "--as-group", "dba",
            )  # fmt: skip
            while not any(r.id == created.id and not r.pending for r in seen):
                changed.clear()
                await asyncio.wait_for(changed.wait(), 30)
            with pytest.raises(RuntimeError, match="watched already"):
                store.watch(on_change)
            return seen, created
        finally:
            await store.close()

    seen, created = run(body())
    decided = [r for r in seen if r.id == created.id and not r.pending]
    assert decided[-1].decision is ReviewDecision.APPROVED
    assert decided[-1].approver is not None and decided[-1].approver.subject == "alice"
    assert decided[-1].comment == "ok"


def test_sidecars_opening_the_same_review_at_once_open_one(setup: Setup) -> None:
    statement = "DELETE FROM orders WHERE id = 500"

    async def scenario() -> list[tuple[Review, bool]]:
        stores = [setup.store() for _ in range(4)]
        try:
            opened = await asyncio.gather(*(s.create(new_review(statement)) for s in stores))
            return [(o.review, o.created) for o in opened]
        finally:
            for s in stores:
                await s.close()

    opened = run(scenario())
    assert len({review.id for review, _ in opened}) == 1, opened
    assert [created for _, created in opened].count(True) == 1
    (name,) = {review.id for review, _ in opened}
    key = review_key(REQUESTER, "orders", normalize_statement(statement), ())
    listed = setup.k8s.get(
        f"{reviews(setup.namespace)}?labelSelector=querywarden.io/review-key={key}"
    )
    assert [item["metadata"]["name"] for item in listed["items"]] == [name]

    # Once decided, the same statement opens the next review of that key.
    setup.decide("alice", ("dba",), name, decision="denied", comment="no")
    again = run(_create(setup, new_review(statement)))
    assert again.id == f"{key[:10]}-2"


def test_a_name_taken_by_another_key_makes_the_review_take_the_next(setup: Setup) -> None:
    statement = "DELETE FROM orders WHERE id = 600"
    key = review_key(REQUESTER, "orders", normalize_statement(statement), ())
    squatter = setup.store()
    try:
        # A review of another statement that happens to have this key's name.
        other = new_review("DELETE FROM orders WHERE id = 601")
        manifest = squatter._manifest(f"{key[:10]}-1", "0" * 40, other)
    finally:
        run(squatter.close())
    setup.k8s.kubectl(
        "--kubeconfig", str(setup.sidecar_kubeconfig), "create", "-f", "-",
        stdin=json.dumps(manifest),
    )  # fmt: skip
    opened = run(_create(setup, new_review(statement)))
    assert opened.id == f"{key[:10]}-2"
    assert opened.statement == statement
