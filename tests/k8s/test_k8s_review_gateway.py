"""A statement held by the injected sidecar, approved or denied with kubectl.

The whole Kubernetes approval path, on the real API server and PostgreSQL: the chart is
installed with ``reviews.enabled``, so the operator renders ``approvals.store:
kubernetes`` into the sidecar's settings; the injected sidecar is run from the API
server's objects (``k8sharness.podfiles``, the kubelet's part, with the pod's
ServiceAccount token as a kubeconfig); an agent's DELETE is held on the wire as a
``QueryReview``; an approver approves it with ``kubectl patch`` (as the docs say), the
sidecar sees the decision through its watch and runs the statement. A denial reaches the
client with the approver's comment, and the sidecar's audit log records both.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg.conninfo import make_conninfo

from held_statement import HeldStatement
from k8sharness.cluster import Cluster, KubeError
from k8sharness.helm import Helm
from k8sharness.podfiles import ContainerFiles
from k8sharness.processes import ManagedProcess, free_port
from k8sharness.qwoperator import (
    bind_cluster_role,
    condition,
    create_namespace,
    create_secret,
    installed_operator,
    pod,
    policies,
    policy,
    wait_until,
)
from querywarden.audit.log import read_records
from querywarden.devcluster import DATABASE, ROLE_PASSWORD, EphemeralCluster
from querywarden.identity.dev import ensure_key, mint_token
from test_k8s_queryreview import apply_review_crd, reviews

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

LABELS = {"app": "pg-reviewed"}
POLICY = "pg"
SIDECAR_ACCOUNT = "pg-db"
TABLE = "qwrv_orders"


@dataclass
class Sidecar:
    k8s: Cluster
    namespace: str
    port: int
    key_file: Path
    files: ContainerFiles
    process: ManagedProcess
    #: The DatabaseAccessPolicy's spec as applied.
    spec: dict[str, Any]

    def connect(self, subject: str) -> psycopg.Connection[Any]:
        token = mint_token(subject, groups=["ai-agents"], ttl=600, key_file=self.key_file)
        return psycopg.connect(
            make_conninfo(
                host="127.0.0.1", port=self.port, dbname=DATABASE, user=subject,
                password=token, sslmode="disable", connect_timeout=10,
            ),
            autocommit=True,
        )  # fmt: skip

    def review(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.k8s.get(f"{reviews(self.namespace)}/{name}")
        return found

    def decide(self, name: str, user: str, group: str, **spec: Any) -> None:
        """What an approver runs (docs/operator.md): a merge patch of the review's spec."""
        self.k8s.kubectl(
            "patch", "queryreview", name, "-n", self.namespace, "--type", "merge",
            "-p", json.dumps({"spec": spec}),
            "--as", user, "--as-group", group,
        )  # fmt: skip

    def audit(self) -> list[dict[str, Any]]:
        return list(read_records(self.files.host_path("/var/lib/querywarden/audit")))


@pytest.fixture(scope="module")
def sidecar(
    k8s: Cluster, helm: Helm, workdir: Path, pg: EphemeralCluster, tmp_path_factory: Any
) -> Iterator[Sidecar]:
    apply_review_crd(k8s)
    values = {"reviews.enabled": "true", "reviews.installCRD": "false"}
    root = tmp_path_factory.mktemp("review-gateway")
    pg.psql(f"CREATE TABLE {TABLE} (id int); GRANT ALL ON {TABLE} TO PUBLIC;", user="qw_scram")
    # No resync in this module's time: what the operator does, it does on events (the
    # policy's create and update, the pod's admission).
    with installed_operator(
        k8s, helm, workdir / "review-gateway", extra_values=values, resync_interval=3600
    ) as installed:
        namespace = create_namespace(k8s, "qw-rv")
        try:
            running = _start_sidecar(k8s, installed.webhook_configuration, namespace, pg, root)
            try:
                yield running
            finally:
                running.process.stop()
        finally:
            k8s.delete(f"/api/v1/namespaces/{namespace}")
            pg.psql(f"DROP TABLE IF EXISTS {TABLE}", user="qw_scram")


def _start_sidecar(
    k8s: Cluster, cluster_name: str, namespace: str, pg: EphemeralCluster, root: Path
) -> Sidecar:
    create_secret(k8s, namespace, "pg-gateway", {"username": "qw_scram", "password": ROLE_PASSWORD})
    key_file = root / "dev-issuer.pem"
    ensure_key(key_file)
    create_secret(k8s, namespace, "dev-issuer", {"dev-issuer.pem": key_file.read_bytes()})
    # The database pods' ServiceAccount; the operator binds it to the chart's sidecar
    # ClusterRole when it admits a pod of the policy that runs as it.
    k8s.create(f"/api/v1/namespaces/{namespace}/serviceaccounts",
               {"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": SIDECAR_ACCOUNT}})  # fmt: skip
    bind_cluster_role(k8s, namespace, "approvers", "querywarden-approver", users=["dana"])
    # (kube-root-ca.crt, which the sidecar's projected volume includes, comes with the
    # namespace: Cluster.create_namespace.)
    port = free_port()
    spec = {
        "target": {
            "podSelector": {"matchLabels": LABELS},
            "databasePort": pg.port,
            "database": DATABASE,
            "sslmode": "require",
            "credentials": {"secretName": "pg-gateway"},
        },
        "sidecar": {
            "gatewayPort": port,
            "plaintext": "always",
            "files": [{"name": "dev", "secretName": "dev-issuer"}],
        },
        "policy": {
            "identity": {
                "issuers": [
                    {
                        "name": "dev",
                        "kind": "dev",
                        "keyFile": "/etc/querywarden/files/dev/dev-issuer.pem",
                    }
                ]
            },
            "rules": [
                {
                    "name": "agents-delete-reviewed",
                    "subjects": {"groups": ["ai-agents"]},
                    "allow": {"operations": ["select"], "tables": [f"public.{TABLE}"]},
                    "review": {"operations": ["delete"], "tables": [f"public.{TABLE}"]},
                }
            ],
            "approvals": {"approvers": {"groups": ["dba"]}, "hold": "60s"},
        },
    }
    k8s.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(policy(POLICY, spec)))
    wait_until(
        lambda: (
            (condition(k8s.get(f"{policies(namespace)}/{POLICY}"), "Rendered") or {}).get("status")
            == "True"
        ),
        what="the policy rendered",
    )
    stored = k8s.create(
        f"/api/v1/namespaces/{namespace}/pods",
        pod("pg-0", LABELS, serviceAccountName=SIDECAR_ACCOUNT),
    )
    account = {"kind": "ServiceAccount", "name": SIDECAR_ACCOUNT, "namespace": namespace}
    binding = wait_until(
        lambda: (
            b
            if account
            in (
                b := k8s.get(
                    f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings/"
                    f"{POLICY}-querywarden-sidecar"
                )
            ).get("subjects", [])
            else None
        ),
        what="the operator binding the pod's ServiceAccount for the sidecar",
    )
    assert binding["roleRef"]["name"] == f"{cluster_name}-sidecar"
    assert binding["subjects"] == [account]  # the policy's pods' accounts, nobody else
    assert binding["metadata"]["ownerReferences"][0]["name"] == POLICY
    files = ContainerFiles(k8s, stored, "querywarden", root / "root")
    files.sync()
    argv = files.argv()
    argv[0] = str(Path(sys.executable).parent / "querywarden")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUERYWARDEN_")}
    env.update(files.env())
    process = ManagedProcess("reviewed-sidecar", argv, root / "sidecar.log", env=env)
    process.wait_until(
        lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() is None,
        timeout=30,
        what="listening",
    )
    return Sidecar(k8s, namespace, port, key_file, files, process, spec)


def test_the_operator_renders_the_kubernetes_review_store(sidecar: Sidecar) -> None:
    settings = yaml.safe_load(sidecar.files.host_path("/etc/querywarden/gateway.yaml").read_text())
    assert settings["approvals"] == {
        "store": "kubernetes",
        "policy": POLICY,
        # As mounted (the stand-in moves container paths under its root).
        "serviceAccountDirectory": sidecar.files.relocate(
            "/var/run/secrets/kubernetes.io/serviceaccount"
        ),
    }
    assert sidecar.files.env()["POD_NAMESPACE"] == sidecar.namespace
    # The pod switched the kubelet's automount off (database pods often do): the sidecar
    # has a token of its own, for the pod's ServiceAccount, bound to the pod.
    assert sidecar.files.pod["spec"]["automountServiceAccountToken"] is False
    token_dir = sidecar.files.host_path("/var/run/secrets/kubernetes.io/serviceaccount")
    assert {p.name for p in token_dir.iterdir() if not p.name.startswith("..")} == {
        "token", "ca.crt", "namespace",
    }  # fmt: skip
    assert (token_dir / "namespace").read_text() == sidecar.namespace


def test_a_held_delete_runs_once_approved_with_kubectl(
    sidecar: Sidecar, pg: EphemeralCluster
) -> None:
    pg.psql(f"TRUNCATE {TABLE}; INSERT INTO {TABLE} VALUES (1), (2)", user="qw_scram")
    held = HeldStatement(sidecar.connect("agent-7"), f"DELETE FROM public.{TABLE} WHERE id = 1")
    name, hint = held.hold_notice()
    # The notice tells the agent what its approver runs.
    command = f"kubectl querywarden approve {name} -n {sidecar.namespace} --comment ..."
    assert hint == f"an approver runs: {command}"
    review = sidecar.review(name)
    assert review["spec"]["statement"] == f"DELETE FROM public.{TABLE} WHERE id = 1"
    assert review["spec"]["requester"]["subject"] == "agent-7"
    assert review["spec"]["decision"] == "pending"
    assert review["metadata"]["labels"]["querywarden.io/policy"] == POLICY
    assert [o["name"] for o in review["metadata"]["ownerReferences"]] == [POLICY]
    assert not held.done.is_set()
    assert pg.psql(f"SELECT count(*) FROM {TABLE}", user="qw_scram").strip() == "2"

    sidecar.decide(name, "dana", "dba", decision="approved", comment="ticket 4711")
    held.finish()
    assert held.error is None, held.error
    assert pg.psql(f"SELECT id FROM {TABLE}", user="qw_scram").split() == ["2"]
    used = sidecar.review(name)
    assert used["status"]["approver"]["subject"] == "dana"
    assert used["status"]["usesLeft"] == 0 and len(used["status"]["usedAt"]) == 1

    # The sidecar's audit log: the review's life and the statement it approved.
    def audited() -> list[dict[str, Any]] | None:
        records = [r for r in sidecar.audit() if r.get("review_id") == name]
        kinds = [r["type"] for r in records]
        return (
            records if {"review.created", "review.approved", "review.used"} <= set(kinds) else None
        )

    records = wait_until(audited, timeout=30, what="the review events in the audit log")
    approved = next(r for r in records if r["type"] == "review.approved")
    assert approved["approver"] == "dana" and approved["comment"] == "ticket 4711"


def test_a_denial_with_kubectl_reaches_the_client_with_the_comment(
    sidecar: Sidecar, pg: EphemeralCluster
) -> None:
    pg.psql(f"TRUNCATE {TABLE}; INSERT INTO {TABLE} VALUES (3)", user="qw_scram")
    held = HeldStatement(sidecar.connect("agent-8"), f"DELETE FROM public.{TABLE}")
    name = held.review_id()
    sidecar.decide(name, "dana", "dba", decision="denied", comment="use the archive table")
    held.finish()
    assert isinstance(held.error, psycopg.errors.InsufficientPrivilege), held.error
    message = held.error.diag.message_primary or ""
    assert f"review {name} was denied by dana: use the archive table" in message
    assert pg.psql(f"SELECT id FROM {TABLE}", user="qw_scram").split() == ["3"]


def test_a_cancelled_hold_withdraws_the_queryreview(sidecar: Sidecar) -> None:
    held = HeldStatement(sidecar.connect("agent-9"), f"DELETE FROM public.{TABLE} WHERE id = 3")
    name = held.review_id()
    held.conn.cancel_safe()
    held.finish()
    assert isinstance(held.error, psycopg.errors.QueryCanceled), held.error
    withdrawn = wait_until(
        lambda: (r := sidecar.review(name)).get("status", {}).get("closed") == "withdrawn" and r,
        timeout=30,
        what="the review withdrawn",
    )
    assert withdrawn["spec"]["decision"] == "pending"


def test_the_operator_deletes_ended_reviews_after_the_policys_retention(
    sidecar: Sidecar, pg: EphemeralCluster
) -> None:
    pg.psql(f"TRUNCATE {TABLE}; INSERT INTO {TABLE} VALUES (10), (11)", user="qw_scram")
    outcomes = {}
    for row, decision in ((10, "denied"), (11, "approved")):
        held = HeldStatement(
            sidecar.connect("agent-10"), f"DELETE FROM public.{TABLE} WHERE id = {row}"
        )
        name = held.review_id()
        sidecar.decide(name, "dana", "dba", decision=decision, comment=decision)
        held.finish()
        outcomes[decision] = name

    # Retention one second: the denial goes; the approval's grant (grantTTL 15 min)
    # keeps it until the grant has expired too. The policy's update is what makes the
    # operator look (no resync here), so the denial must be over a second old by then.
    time.sleep(1.5)
    spec = copy.deepcopy(sidecar.spec)
    spec["policy"]["approvals"]["retention"] = "1s"
    sidecar.k8s.kubectl(
        "apply", "-n", sidecar.namespace, "-f", "-", stdin=yaml.safe_dump(policy(POLICY, spec))
    )

    def gone(name: str) -> bool:
        try:
            sidecar.review(name)
        except KubeError as exc:
            return exc.status == 404
        return False

    # The update reconciles the whole policy first (its certificate, its Services): on a
    # loaded machine, with a retried step, that takes more than the default 30 s.
    wait_until(lambda: gone(outcomes["denied"]), timeout=120, what="the denied review deleted")
    assert not gone(outcomes["approved"])
    # What happened stays in the sidecar's audit log.
    kinds = {r["type"] for r in sidecar.audit() if r.get("review_id") == outcomes["denied"]}
    assert {"review.created", "review.denied"} <= kinds
