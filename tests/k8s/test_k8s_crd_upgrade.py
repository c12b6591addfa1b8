"""Upgrading the CRDs the way docs/operator.md says, against the real API server.

Helm installs a chart's ``crds/`` once and never upgrades them; the QueryReview CRD is a
template of the chart and upgrades with it. The documented step applies the newer CRDs
with server-side apply before ``helm upgrade``. Here older CRDs (the committed ones with
a printer column and a schema field taken out, as an earlier release had them, owned by
the ``helm`` field manager as ``helm install`` leaves them) are upgraded by exactly the
commands the docs give, and the API server then serves the new columns and schema.
"""

from __future__ import annotations

import copy
import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8sharness.cluster import Cluster
from k8sharness.helm import Helm
from k8sharness.tools import REPO, tool
from querywarden_operator import schema
from querywarden_operator.review import REVIEW_CRD_NAME, REVIEW_PLURAL
from querywarden_operator.spec import CRD_NAME, GROUP, PLURAL, VERSION

DOCS = REPO / "docs" / "operator.md"
#: The upgrade commands of docs/operator.md, run from the repository's top directory.
APPLY_FROM_CHECKOUT = "kubectl apply --server-side --force-conflicts -f crds/"
APPLY_FROM_CHART = (
    "helm show crds charts/querywarden | kubectl apply --server-side --force-conflicts -f -"
)
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"


def older_policy_crd() -> dict[str, Any]:
    """The DatabaseAccessPolicy CRD without its Port column and status.configMap."""
    crd = copy.deepcopy(schema.crd())
    version = crd["spec"]["versions"][0]
    version["additionalPrinterColumns"] = [
        c for c in version["additionalPrinterColumns"] if c["name"] != "Port"
    ]
    del version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["configMap"]
    return crd


def older_review_crd() -> dict[str, Any]:
    """The QueryReview CRD as it was before its conditions and State/Rule columns."""
    crd = copy.deepcopy(schema.review_crd())
    version = crd["spec"]["versions"][0]
    version["additionalPrinterColumns"] = [
        {"name": "Requester", "type": "string", "jsonPath": ".spec.requester.subject"},
        {"name": "Database", "type": "string", "jsonPath": ".spec.database"},
        {"name": "Decision", "type": "string", "jsonPath": ".spec.decision"},
        {"name": "Approver", "type": "string", "jsonPath": ".status.approver.subject"},
        {"name": "Closed", "type": "string", "jsonPath": ".status.closed"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    del version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"]
    return crd


def install_older(k8s: Cluster, *crds: dict[str, Any]) -> None:
    """Put the older CRDs in place, owned by the ``helm`` field manager."""
    k8s.kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=helm", "-f", "-",
        stdin="---\n".join(yaml.safe_dump(c) for c in crds),
    )  # fmt: skip
    for crd in crds:
        k8s.wait_for(lambda crd=crd: served_columns(k8s, crd) or None, what="the older CRD")


def served_columns(k8s: Cluster, crd: dict[str, Any]) -> bool:
    """Whether the API server serves ``crd``'s printer columns (the Table kubectl reads)."""
    name = crd["metadata"]["name"]
    k8s.wait_established(name)
    plural = crd["spec"]["names"]["plural"]
    table = k8s.request("GET", f"/apis/{GROUP}/{VERSION}/{plural}", accept=TABLE)
    served = [c["name"] for c in table["columnDefinitions"]]
    wanted = ["Name", *(c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"])]
    return served == wanted


def explains(k8s: Cluster, field: str) -> bool:
    """Whether ``kubectl explain FIELD`` finds it in the published schema."""
    return k8s.kubectl("explain", field, check=False).returncode == 0


def run_documented(k8s: Cluster, helm: Helm, command: str) -> None:
    assert command in DOCS.read_text(), f"docs/operator.md no longer says {command!r}"
    path = f"{tool('kubectl').parent}{os.pathsep}{os.environ.get('PATH', '')}"
    k8s.run(Path("/bin/bash"), "-c", f"cd {shlex.quote(str(REPO))} && {command}",
            env={**helm.env, "PATH": path})  # fmt: skip


@pytest.fixture
def current_crds_afterwards(k8s: Cluster) -> Iterator[None]:
    """Whatever happens, leave the committed CRDs in place for the other tests."""
    try:
        yield
    finally:
        k8s.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
        for crd in (schema.crd(), schema.review_crd()):
            k8s.wait_for(lambda crd=crd: served_columns(k8s, crd) or None, what="current CRD")


def test_apply_of_crds_upgrades_both(
    k8s: Cluster, helm: Helm, review_crd_as_found: None, current_crds_afterwards: None
) -> None:
    install_older(k8s, older_policy_crd(), older_review_crd())
    assert not served_columns(k8s, schema.crd())
    assert not served_columns(k8s, schema.review_crd())
    k8s.wait_for(lambda: not explains(k8s, f"{REVIEW_PLURAL}.status.conditions") or None,
                 what="the older QueryReview schema published")  # fmt: skip

    run_documented(k8s, helm, APPLY_FROM_CHECKOUT)

    for crd in (schema.crd(), schema.review_crd()):
        k8s.wait_for(lambda crd=crd: served_columns(k8s, crd) or None, what="the new columns")
        stored = k8s.get(f"{CRDS}/{crd['metadata']['name']}")
        (version,) = stored["spec"]["versions"]
        (wanted,) = crd["spec"]["versions"]
        assert version["schema"] == wanted["schema"]
    k8s.wait_for(lambda: explains(k8s, f"{REVIEW_PLURAL}.status.conditions") or None,
                 what="QueryReview status.conditions in the published schema")  # fmt: skip
    k8s.wait_for(lambda: explains(k8s, f"{PLURAL}.status.configMap") or None,
                 what="DatabaseAccessPolicy status.configMap in the published schema")  # fmt: skip


def test_helm_show_crds_upgrades_the_chart_crds(
    k8s: Cluster, helm: Helm, review_crd_as_found: None, current_crds_afterwards: None
) -> None:
    install_older(k8s, older_policy_crd())
    assert not served_columns(k8s, schema.crd())

    run_documented(k8s, helm, APPLY_FROM_CHART)

    k8s.wait_for(lambda: served_columns(k8s, schema.crd()) or None, what="the new columns")
    # kopf's peering CRDs come along (unchanged).
    assert k8s.get(f"{CRDS}/clusterkopfpeerings.kopf.dev")["spec"]["group"] == "kopf.dev"


def test_the_chart_carries_the_same_crds_as_crds_dir(helm: Helm) -> None:
    """What ``helm show crds`` prints is the committed DatabaseAccessPolicy CRD."""
    shown = helm("show", "crds", str(REPO / "charts" / "querywarden")).stdout
    documents = {d["metadata"]["name"]: d for d in yaml.safe_load_all(shown) if d}
    assert documents[CRD_NAME] == schema.crd()
    # The QueryReview CRD is a template (upgraded by helm upgrade), not in the chart's crds/.
    assert REVIEW_CRD_NAME not in documents
