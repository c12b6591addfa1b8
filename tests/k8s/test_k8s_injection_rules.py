"""The injection controls without a cluster: the namespace label, the pod annotations.

docs/operator.md ("Injection") states the precedence these tests pin: the namespace
label first, then the pod's opt-out, then the policy, whose sidecar the pod's annotations
tune (image only from the allowed ones). Invalid values refuse the pod.
"""

from __future__ import annotations

from typing import Any

import pytest

from querywarden_operator.admission import decide
from querywarden_operator.config import OperatorConfig
from querywarden_operator.injection import (
    InjectionRefused,
    image_allowed,
    image_repository,
    namespace_injects,
    pod_overrides,
)
from querywarden_operator.render import sidecar_container
from querywarden_operator.spec import ANNOTATION_CONFIG_HASH, DatabaseAccessPolicySpec

IMAGE = "registry.invalid/querywarden/querywarden:1.0"
CONFIG = OperatorConfig(sidecar_image=IMAGE, namespace="qw-system")
RAW_SPEC: dict[str, Any] = {
    "target": {
        "podSelector": {"matchLabels": {"app": "db"}},
        "credentials": {"secretName": "db-gateway"},
    },
    "sidecar": {"plaintext": "always", "resources": {"requests": {"cpu": "50m"}}},
}
POLICIES = [{"metadata": {"name": "db", "namespace": "shop"}, "spec": RAW_SPEC}]
ENABLED = {"querywarden.io/inject": "enabled"}
DISABLED = {"querywarden.io/inject": "disabled"}


def pod(labels: dict[str, str] | None = None, **annotations: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "db-0",
            "labels": {"app": "db"} if labels is None else labels,
            "annotations": annotations,
        },
        "spec": {"containers": [{"name": "postgres", "image": "postgres:17"}]},
    }


def admit(
    the_pod: dict[str, Any], namespace_labels: dict[str, str], config: OperatorConfig = CONFIG
) -> Any:
    return decide(
        the_pod,
        "shop",
        POLICIES,
        config,
        native_supported=True,
        namespace_labels=namespace_labels,
    )


def sidecar_of(patch: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in patch["spec"]["initContainers"] if c["name"] == "querywarden"]
    return container


# --- the namespace label -----------------------------------------------------------


def test_namespaces_are_in_by_default_and_disabled_opts_one_out() -> None:
    assert namespace_injects({}, enabled_by_default=True)
    assert namespace_injects(ENABLED, enabled_by_default=True)
    assert not namespace_injects(DISABLED, enabled_by_default=True)
    assert admit(pod(), {}).patch is not None
    assert admit(pod(), ENABLED).patch is not None
    disabled = admit(pod(), DISABLED)
    assert (disabled.patch, disabled.refusal) == (None, None)


def test_with_namespaces_off_by_default_only_enabled_ones_are_injected() -> None:
    config = OperatorConfig(
        sidecar_image=IMAGE, namespace="qw-system", enable_namespaces_by_default=False
    )
    assert admit(pod(), ENABLED, config).patch is not None
    for labels in ({}, DISABLED):
        skipped = admit(pod(), labels, config)
        assert (skipped.patch, skipped.refusal) == (None, None)


def test_a_namespace_label_with_another_value_refuses_selected_pods() -> None:
    refused = admit(pod(), {"querywarden.io/inject": "true"})
    assert refused.refusal is not None
    assert "label querywarden.io/inject='true' is neither 'enabled' nor 'disabled'" in (
        refused.refusal
    )
    # Pods no policy selects are none of the webhook's business.
    assert admit(pod({"app": "web"}), {"querywarden.io/inject": "true"}).refusal is None
    with pytest.raises(InjectionRefused):
        namespace_injects({"querywarden.io/inject": "yes"}, enabled_by_default=True)


def test_a_pod_asking_for_the_gateway_in_a_namespace_that_is_off_is_refused() -> None:
    asking = pod({"app": "db", "querywarden.io/inject": "true"})
    refused = admit(asking, DISABLED)
    assert refused.refusal is not None
    assert "namespace shop is labelled querywarden.io/inject=disabled" in refused.refusal
    off = OperatorConfig(
        sidecar_image=IMAGE, namespace="qw-system", enable_namespaces_by_default=False
    )
    refused = admit(asking, {}, off)
    assert refused.refusal is not None
    assert "is not labelled querywarden.io/inject=enabled" in refused.refusal


# --- the pod's opt-out ---------------------------------------------------------------


def test_a_pod_opts_out_with_its_annotation() -> None:
    opted_out = admit(pod(**{"querywarden.io/inject": "false"}), {})
    assert (opted_out.patch, opted_out.refusal) == (None, None)
    assert admit(pod(**{"querywarden.io/inject": "true"}), {}).patch is not None
    invalid = admit(pod(**{"querywarden.io/inject": "no"}), {})
    assert invalid.refusal is not None
    assert 'annotation querywarden.io/inject=\'no\' is neither "true" nor "false"' in (
        invalid.refusal
    )


def test_opting_out_can_be_forbidden_and_contradicting_the_label_is_refused() -> None:
    strict = OperatorConfig(sidecar_image=IMAGE, namespace="qw-system", allow_pod_opt_out=False)
    refused = admit(pod(**{"querywarden.io/inject": "false"}), {}, strict)
    assert refused.refusal is not None
    assert "may not opt out" in refused.refusal
    assert "DatabaseAccessPolicy db selects it" in refused.refusal
    contradicting = pod({"app": "db", "querywarden.io/inject": "true"})
    contradicting["metadata"]["annotations"] = {"querywarden.io/inject": "false"}
    both = admit(contradicting, {})
    assert both.refusal is not None
    assert 'labelled querywarden.io/inject=true but annotated querywarden.io/inject="false"' in (
        both.refusal
    )


# --- the pod's overrides ---------------------------------------------------------------


def test_annotations_override_resources_log_level_and_image() -> None:
    plain = admit(pod(), {})
    tuned = admit(
        pod(
            **{
                "querywarden.io/sidecar-cpu": "200m",
                "querywarden.io/sidecar-memory": "128Mi",
                "querywarden.io/sidecar-cpu-limit": "1",
                "querywarden.io/sidecar-memory-limit": "512Mi",
                "querywarden.io/log-level": "debug",
                "querywarden.io/sidecar-image": "registry.invalid/querywarden/querywarden:1.1",
            }
        ),
        {},
    )
    assert plain.patch is not None and tuned.patch is not None
    before, after = sidecar_of(plain.patch), sidecar_of(tuned.patch)
    # The policy's requests, no limits (its resources replace the chart's whole).
    assert before["resources"] == {"requests": {"cpu": "50m"}}
    assert before["args"] == ["serve", "--config", "/etc/querywarden/gateway.yaml"]
    assert before["image"] == IMAGE
    assert after["resources"] == {
        "requests": {"cpu": "200m", "memory": "128Mi"},
        "limits": {"cpu": "1", "memory": "512Mi"},
    }
    assert after["args"] == [
        "--log-level", "DEBUG", "serve", "--config", "/etc/querywarden/gateway.yaml"
    ]  # fmt: skip
    assert after["image"] == "registry.invalid/querywarden/querywarden:1.1"
    # The pod runs what it asked for: not reported as outdated settings.
    hashes = {
        p["metadata"]["annotations"][ANNOTATION_CONFIG_HASH] for p in (plain.patch, tuned.patch)
    }
    assert len(hashes) == 1


def test_one_annotation_overrides_one_key_of_the_policys_resources() -> None:
    tuned = admit(pod(**{"querywarden.io/sidecar-memory-limit": "1Gi"}), {})
    assert tuned.patch is not None
    assert sidecar_of(tuned.patch)["resources"] == {
        "requests": {"cpu": "50m"},
        "limits": {"memory": "1Gi"},
    }


def test_the_charts_log_level_is_the_default() -> None:
    config = OperatorConfig(sidecar_image=IMAGE, namespace="qw-system", sidecar_log_level="WARNING")
    admitted = admit(pod(), {}, config)
    assert admitted.patch is not None
    assert sidecar_of(admitted.patch)["args"][:2] == ["--log-level", "WARNING"]
    spec = DatabaseAccessPolicySpec.model_validate(RAW_SPEC)
    assert "--log-level" not in str(sidecar_container(spec, _default_sidecar(spec))["args"])


def _default_sidecar(spec: DatabaseAccessPolicySpec) -> Any:
    from querywarden_operator.render import effective_sidecar

    return effective_sidecar(spec.sidecar, CONFIG, native_supported=True)


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        (
            {"querywarden.io/sidecar-cpu": "lots"},
            "annotation querywarden.io/sidecar-cpu='lots' is not a Kubernetes quantity",
        ),
        (
            {"querywarden.io/sidecar-memory-limit": "-64Mi"},
            "querywarden.io/sidecar-memory-limit='-64Mi' is not a Kubernetes quantity",
        ),
        (
            {"querywarden.io/log-level": "chatty"},
            "querywarden.io/log-level='chatty' is not a log level (one of DEBUG, INFO",
        ),
        (
            {"querywarden.io/sidecar-cpus": "1"},
            "unknown annotation querywarden.io/sidecar-cpus",
        ),
        (
            {"querywarden.io/sidecar-image": "evil.example/gateway:1"},
            "names an image the operator does not allow for the querywarden sidecar "
            "(allowed: registry.invalid/querywarden/querywarden;",
        ),
        (
            # A look-alike repository is another repository.
            {"querywarden.io/sidecar-image": "registry.invalid/querywarden/querywarden-x:1"},
            "does not allow",
        ),
        (
            {"querywarden.io/sidecar-image": "registry.invalid/q w:1"},
            "is not an image reference",
        ),
    ],
)
def test_invalid_annotations_refuse_the_pod(annotations: dict[str, str], message: str) -> None:
    refused = admit(pod(**annotations), {})
    assert refused.patch is None
    assert refused.refusal is not None
    assert message in refused.refusal
    assert refused.policy == "db"


def test_the_allowed_images() -> None:
    assert image_repository("ghcr.io/q/q:1.0") == "ghcr.io/q/q"
    assert image_repository("localhost:5000/q/q@sha256:" + "a" * 64) == "localhost:5000/q/q"
    assert image_repository("localhost:5000/q") == "localhost:5000/q"
    assert CONFIG.sidecar_image_allow_list() == ("registry.invalid/querywarden/querywarden",)
    allowed = ("registry.corp/qw/", "ghcr.io/q/q", "docker.io/x/y:2.0")
    assert image_allowed("registry.corp/qw/gateway:1", allowed)
    assert image_allowed("ghcr.io/q/q:2", allowed)
    assert image_allowed("ghcr.io/q/q@sha256:" + "b" * 64, allowed)
    assert image_allowed("docker.io/x/y:2.0", allowed)
    assert not image_allowed("docker.io/x/y:2.1", allowed)
    assert not image_allowed("ghcr.io/q/qq:1", allowed)
    assert not image_allowed("registry.corp/qwx/gateway:1", allowed)
    none = OperatorConfig(sidecar_image=IMAGE, allowed_sidecar_images=())
    with pytest.raises(InjectionRefused, match="allowed: none: image overrides are off"):
        pod_overrides(
            {"querywarden.io/sidecar-image": IMAGE}, allowed_images=none.sidecar_image_allow_list()
        )
