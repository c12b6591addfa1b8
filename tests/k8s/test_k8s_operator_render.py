"""The operator's pure functions, without a cluster: rendering, admission, status.

What the operator writes (ConfigMap, NetworkPolicy, the sidecar it adds to a pod, the
webhook entry) is computed by typed functions from the policy; these tests check them
directly, and that the gateway's own loaders accept what is rendered.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from querywarden.config import GatewaySettings, load_settings
from querywarden.policy import PolicyDocument, load_policy
from querywarden_operator.admission import decide
from querywarden_operator.config import OperatorConfig
from querywarden_operator.reconcile import InvalidPolicy, parse_spec
from querywarden_operator.render import (
    POLICY_FILE,
    SETTINGS_FILE,
    InjectionError,
    PolicyRef,
    config_hash,
    effective_sidecar,
    gateway_settings,
    pod_patch,
    pod_service_account,
    policy_yaml,
    render_configmap,
    render_network_policy,
    render_sidecar_role_binding,
    sidecar_container,
    sidecar_volumes,
    webhook_entry,
)
from querywarden_operator.spec import (
    ANNOTATION_CONFIG_HASH,
    ANNOTATION_POLICY,
    ANNOTATION_STATUS,
    DatabaseAccessPolicySpec,
    LabelSelector,
    ResourcePolicy,
)
from querywarden_operator.status import (
    INJECTED_CONDITION,
    READY,
    RENDERED,
    census,
    condition,
    injected_condition,
    ready_condition,
    set_condition,
)

CONFIG = OperatorConfig(sidecar_image="registry.invalid/querywarden:test", namespace="qw-system")
REF = PolicyRef(name="orders-db", namespace="shop", uid="1234-uid", generation=3)
RAW_POLICY: dict[str, Any] = {
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
            "name": "agents-read",
            "subjects": {"groups": ["ai-agents"]},
            "allow": {"operations": ["select"], "tables": ["public.*"]},
            "limits": {"statementTimeout": "30s"},
            "upstreamRole": "readonly",
        }
    ],
    "masking": {"columns": [{"table": "customers", "column": "ssn", "strategy": "hash"}]},
}
RAW_SPEC: dict[str, Any] = {
    "target": {
        "podSelector": {
            "matchLabels": {"app": "orders-db"},
            "matchExpressions": [{"key": "role", "operator": "In", "values": ["primary"]}],
        },
        "databasePort": 5432,
        "database": "orders",
        "credentials": {"secretName": "orders-gateway"},
        "roles": [{"name": "readonly", "secretName": "orders-ro", "usernameKey": "user"}],
        "tlsSecretName": "orders-gateway-tls",
        "maskingKey": {"secretName": "orders-mask", "key": "key"},
        "clients": [{"namespaceSelector": {"matchLabels": {"team": "agents"}}}],
        "directAccess": [{"podSelector": {"matchLabels": {"app": "orders-db"}}}],
    },
    "sidecar": {
        "gatewayPort": 6432,
        "otlpEndpoint": "http://collector.observability:4318",
        "files": [{"name": "dev", "secretName": "dev-issuer"}],
    },
    "policy": RAW_POLICY,
}
POD: dict[str, Any] = {
    "metadata": {"name": "orders-db-0", "labels": {"app": "orders-db", "role": "primary"}},
    "spec": {
        "containers": [{"name": "postgres", "image": "postgres:17"}],
        "initContainers": [{"name": "init-db", "image": "postgres:17"}],
        "volumes": [{"name": "data", "emptyDir": {}}],
    },
}


def spec(**changes: Any) -> DatabaseAccessPolicySpec:
    raw = yaml.safe_load(yaml.safe_dump(RAW_SPEC))
    for path, value in changes.items():
        node = raw
        *parents, last = path.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return DatabaseAccessPolicySpec.model_validate(raw)


def sidecar(native: bool = True, **changes: Any) -> Any:
    parsed = spec(**changes)
    return effective_sidecar(parsed.sidecar, CONFIG, native_supported=native)


def as_file(policy: ResourcePolicy) -> PolicyDocument:
    """A resource's policy document as the gateway's (without issuerRefs)."""
    dumped = policy.model_dump(by_alias=True, exclude={"identity": {"issuer_refs"}})
    return PolicyDocument.model_validate(dumped)


# --- spec validation ---------------------------------------------------------------


def test_spec_policy_is_the_gateways_policy_document() -> None:
    parsed = spec()
    assert isinstance(parsed.policy, PolicyDocument)
    # The resource's document is the gateway's plus identity.issuerRefs (empty here).
    assert parsed.policy.identity.issuer_refs == []
    assert as_file(parsed.policy) == PolicyDocument.model_validate(RAW_POLICY)


def test_the_gateway_refuses_issuer_refs() -> None:
    # Only the operator resolves references: a policy file naming one is refused, so a
    # gateway never runs with fewer issuers than its policy names.
    with pytest.raises(ValidationError, match="issuerRefs"):
        PolicyDocument.model_validate({"identity": {"issuerRefs": ["corp"]}})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sidecar__gatewayPort": 5432}, "gatewayPort must differ"),
        ({"target__roles": []}, "upstreamRole 'readonly'"),
        ({"target__maskingKey": None}, "need target.maskingKey"),
        ({"target__podSelector": {"matchLabels": {"a": "b"}, "bogus": 1}}, "bogus"),
        ({"policy__rules": [{"name": "x", "subjects": {}}]}, "at least one group or user"),
    ],
)
def test_invalid_specs_are_refused_with_the_reason(changes: dict[str, Any], message: str) -> None:
    raw = yaml.safe_load(yaml.safe_dump(RAW_SPEC))
    for path, value in changes.items():
        node = raw
        *parents, last = path.split("__")
        for key in parents:
            node = node[key]
        if value is None:
            node.pop(last)
        else:
            node[last] = value
    with pytest.raises(InvalidPolicy) as refused:
        parse_spec(raw)
    assert message in str(refused.value)


def test_label_selector_matches_like_the_api_server() -> None:
    selector = LabelSelector.model_validate(
        {
            "matchLabels": {"app": "db"},
            "matchExpressions": [
                {"key": "tier", "operator": "NotIn", "values": ["replica"]},
                {"key": "skip", "operator": "DoesNotExist"},
                {"key": "zone", "operator": "Exists"},
            ],
        }
    )
    assert selector.matches({"app": "db", "zone": "a"})
    assert selector.matches({"app": "db", "zone": "a", "tier": "primary"})
    assert not selector.matches({"app": "db", "zone": "a", "tier": "replica"})
    assert not selector.matches({"app": "db", "zone": "a", "skip": "1"})
    assert not selector.matches({"app": "db"})
    assert not selector.matches({"app": "web", "zone": "a"})
    assert selector.as_query() == "app=db,tier notin (replica),!skip,zone"


# --- the ConfigMap -----------------------------------------------------------------


def test_configmap_holds_the_policy_and_the_settings(tmp_path: Path) -> None:
    parsed = spec()
    configmap = render_configmap(REF, parsed, RAW_POLICY, sidecar())
    meta = configmap["metadata"]
    assert meta["name"] == "orders-db-querywarden"
    assert meta["namespace"] == "shop"
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "querywarden.io/v1alpha1",
            "kind": "DatabaseAccessPolicy",
            "name": "orders-db",
            "uid": "1234-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert set(configmap["data"]) == {"policy.yaml", "gateway.yaml"}
    # Idempotent: the same policy renders the same bytes.
    assert render_configmap(REF, parsed, RAW_POLICY, sidecar()) == configmap

    # The gateway's own loader reads policy.yaml as the resource's spec.policy.
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(configmap["data"]["policy.yaml"])
    assert load_policy(policy_file) == as_file(parsed.policy)
    assert "30s" in configmap["data"]["policy.yaml"]  # as written, not re-serialized


def test_gateway_settings_are_valid_gateway_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_file = tmp_path / "gateway.yaml"
    data = render_configmap(REF, spec(), RAW_POLICY, sidecar())["data"]
    settings_file.write_text(data["gateway.yaml"])
    # The usernames come from the container's environment (secretKeyRef), as in the pod.
    container = sidecar_container(spec(), sidecar())
    for item in container["env"]:
        if "secretKeyRef" in item.get("valueFrom", {}):
            monkeypatch.setenv(item["name"], f"user-of-{item['valueFrom']['secretKeyRef']['name']}")
    settings = load_settings(settings_file)
    assert isinstance(settings, GatewaySettings)
    assert settings.listen.port == 6432
    assert settings.listen.plaintext == "never"
    assert str(settings.tls.cert_file) == "/etc/querywarden/tls/tls.crt"
    assert settings.upstream.host == "127.0.0.1"
    assert settings.upstream.port == 5432
    assert settings.upstream.database == "orders"
    assert settings.upstream.user == "user-of-orders-gateway"
    assert str(settings.upstream.password_file) == "/etc/querywarden/credentials/default/password"
    role = settings.upstream.roles["readonly"]
    assert role.user == "user-of-orders-ro"
    assert str(role.password_file) == "/etc/querywarden/credentials/roles/readonly/password"
    assert str(settings.masking.hash_key_file) == "/etc/querywarden/credentials/masking/hash-key"
    assert str(settings.audit.directory) == "/var/lib/querywarden/audit"
    assert settings.audit.otlp_endpoint == "http://collector.observability:4318"
    assert str(settings.policy_file) == POLICY_FILE
    assert settings.policy_reload_interval == datetime.timedelta(seconds=2)
    # Reviews off (the default): the sidecar's own SQLite store.
    assert settings.approvals.store == "sqlite"


def test_with_reviews_on_the_sidecar_keeps_reviews_as_queryreviews_of_its_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = spec()
    on = effective_sidecar(
        parsed.sidecar, OperatorConfig(reviews=True), native_supported=True, policy_name="orders"
    )
    for item in sidecar_container(parsed, on)["env"]:
        if "secretKeyRef" in item.get("valueFrom", {}):
            monkeypatch.setenv(item["name"], "someone")
    rendered = gateway_settings(parsed, on)
    token_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert rendered["approvals"] == {
        "store": "kubernetes",
        "policy": "orders",
        "serviceAccountDirectory": token_dir,
    }
    # A token of the pod's ServiceAccount for the sidecar alone, whatever the pod's
    # automountServiceAccountToken says.
    volumes = {v["name"]: v for v in sidecar_volumes("orders", parsed, on)}
    sources = volumes["querywarden-serviceaccount"]["projected"]["sources"]
    assert sources[0] == {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}}
    assert sources[1]["configMap"]["name"] == "kube-root-ca.crt"
    mounts = {m["name"]: m for m in sidecar_container(parsed, on)["volumeMounts"]}
    assert mounts["querywarden-serviceaccount"] == {
        "name": "querywarden-serviceaccount",
        "mountPath": token_dir,
        "readOnly": True,
    }
    off_volumes = sidecar_volumes(
        "orders", parsed, effective_sidecar(parsed.sidecar, OperatorConfig(), native_supported=True)
    )
    # Without reviews too: a policy's Kubernetes issuer reads the same files.
    assert "querywarden-serviceaccount" in {v["name"] for v in off_volumes}
    settings_file = tmp_path / "gateway.yaml"
    settings_file.write_text(yaml.safe_dump(rendered))
    loaded = load_settings(settings_file).approvals
    assert (loaded.store, loaded.policy, loaded.namespace) == ("kubernetes", "orders", None)
    assert str(loaded.service_account_directory) == token_dir
    # The namespace comes from the downward API.
    env = {e["name"]: e for e in sidecar_container(parsed, on)["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    # Turning reviews on changes what a running sidecar needs a restart for.
    off = effective_sidecar(parsed.sidecar, OperatorConfig(), native_supported=True)
    assert config_hash(parsed, on) != config_hash(parsed, off)


def test_operator_defaults_fill_what_the_policy_leaves_out() -> None:
    config = OperatorConfig(otlp_endpoint="http://default:4318", sidecar_image="img:1")
    without = spec().sidecar.model_copy(update={"otlp_endpoint": None})
    bare = effective_sidecar(without, config, native_supported=True)
    assert bare.otlp_endpoint == "http://default:4318"
    assert bare.image == "img:1"
    assert bare.resources == config.sidecar_resources
    # Nobody names a Collector: no export, the audit log stays in the pod.
    unnamed = effective_sidecar(
        spec().sidecar.model_copy(update={"otlp_endpoint": None}),
        OperatorConfig(),
        native_supported=True,
    )
    assert "otlpEndpoint" not in gateway_settings(spec(), unnamed)["audit"]


def test_config_hash_follows_settings_not_the_policy() -> None:
    base = config_hash(spec(), sidecar())
    assert config_hash(spec(), sidecar()) == base
    assert config_hash(spec(policy__rules=[]), sidecar()) == base  # reloaded live
    assert config_hash(spec(sidecar__gatewayPort=7000), sidecar(sidecar__gatewayPort=7000)) != base
    assert config_hash(spec(target__database="other"), sidecar()) != base


def test_policy_yaml_is_deterministic() -> None:
    reordered = dict(reversed(list(RAW_POLICY.items())))
    assert policy_yaml(reordered) == policy_yaml(RAW_POLICY)


# --- the NetworkPolicy -------------------------------------------------------------


def test_network_policy_opens_the_gateway_port_only() -> None:
    rendered = render_network_policy(REF, spec(), sidecar())
    assert rendered["metadata"]["ownerReferences"][0]["uid"] == "1234-uid"
    np = rendered["spec"]
    assert np["podSelector"] == RAW_SPEC["target"]["podSelector"]
    assert np["policyTypes"] == ["Ingress"]
    gateway, direct = np["ingress"]
    assert gateway == {
        "ports": [{"protocol": "TCP", "port": 6432}],
        "from": [{"namespaceSelector": {"matchLabels": {"team": "agents"}}}],
    }
    assert direct == {
        "ports": [{"protocol": "TCP", "port": 5432}],
        "from": [{"podSelector": {"matchLabels": {"app": "orders-db"}}}],
    }
    # No clients named: the gateway port is open; no direct access: no rule at all.
    open_spec = spec(target__clients=[], target__directAccess=[])
    assert render_network_policy(REF, open_spec, sidecar())["spec"]["ingress"] == [
        {"ports": [{"protocol": "TCP", "port": 6432}]}
    ]


# --- the sidecar -------------------------------------------------------------------


def test_native_sidecar_goes_first_among_init_containers() -> None:
    patch = pod_patch(POD, "orders-db", spec(), sidecar(native=True))
    assert patch is not None
    init = patch["spec"]["initContainers"]
    assert [c["name"] for c in init] == ["querywarden", "init-db"]
    assert init[0]["restartPolicy"] == "Always"
    assert "containers" not in patch["spec"]  # the database container is untouched
    assert patch["metadata"]["annotations"] == {
        ANNOTATION_STATUS: "injected",
        ANNOTATION_POLICY: "orders-db",
        ANNOTATION_CONFIG_HASH: config_hash(spec(), sidecar()),
    }


def test_the_sidecars_audit_drain_fits_in_the_pods_grace_period() -> None:
    # On a real node, a pod deleted under load lost the records its exporter had not sent
    # (the last pass sent one batch); the drain now runs until the pod's grace is nearly up.
    def drain(pod: dict[str, Any]) -> str:
        patch = pod_patch(pod, "orders-db", spec(), sidecar(native=True))
        assert patch is not None
        env = {e["name"]: e.get("value") for e in patch["spec"]["initContainers"][0]["env"]}
        return str(env["QUERYWARDEN_AUDIT__DRAIN_TIMEOUT"])

    assert drain(POD) == "25s"  # Kubernetes' default grace: 30 s
    longer = {**POD, "spec": {**POD["spec"], "terminationGracePeriodSeconds": 120}}
    assert drain(longer) == "115s"
    brief = {**POD, "spec": {**POD["spec"], "terminationGracePeriodSeconds": 2}}
    assert drain(brief) == "1s"


def test_without_native_sidecars_the_gateway_is_a_regular_container() -> None:
    # The cluster cannot: even a policy asking for a native sidecar gets a regular one
    # (an init container that never ends would keep the pod from starting).
    for requested in (None, True, False):
        effective = effective_sidecar(
            spec(sidecar__nativeSidecar=requested).sidecar, CONFIG, native_supported=False
        )
        patch = pod_patch(POD, "orders-db", spec(), effective)
        assert patch is not None
        assert [c["name"] for c in patch["spec"]["containers"]] == ["postgres", "querywarden"]
        assert "restartPolicy" not in patch["spec"]["containers"][1]
        assert "initContainers" not in patch["spec"]
    # The cluster can, the policy says no.
    off = effective_sidecar(
        spec(sidecar__nativeSidecar=False).sidecar, CONFIG, native_supported=True
    )
    assert not off.native


def test_sidecar_container_spec() -> None:
    container = sidecar_container(spec(), sidecar())
    assert container["image"] == "registry.invalid/querywarden:test"
    assert container["command"] == ["querywarden"]
    assert container["args"] == ["serve", "--config", SETTINGS_FILE]
    assert container["ports"] == [{"name": "qw-postgres", "containerPort": 6432, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["tcpSocket"] == {"port": 6432}
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    env = {e["name"]: e for e in container["env"]}
    assert env["QUERYWARDEN_UPSTREAM__USER"]["valueFrom"] == {
        "secretKeyRef": {"name": "orders-gateway", "key": "username"}
    }
    assert env["QUERYWARDEN_UPSTREAM__ROLES__READONLY__USER"]["valueFrom"] == {
        "secretKeyRef": {"name": "orders-ro", "key": "user"}
    }
    assert not any("PASSWORD" in name for name in env)  # passwords are files
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[SETTINGS_FILE]["subPath"] == "gateway.yaml"
    # The policy directory is mounted whole: only then do ConfigMap updates arrive.
    assert "subPath" not in mounts["/etc/querywarden/policy"]
    assert mounts["/etc/querywarden/files/dev"]["readOnly"] is True
    assert "readOnly" not in mounts["/var/lib/querywarden/audit"]


def test_sidecar_volumes() -> None:
    patch = pod_patch(POD, "orders-db", spec(), sidecar())
    assert patch is not None
    volumes = {v["name"]: v for v in patch["spec"]["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}  # the pod's own stays
    assert volumes["querywarden-policy"]["configMap"] == {
        "name": "orders-db-querywarden",
        "items": [{"key": "policy.yaml", "path": "policy.yaml"}],
    }
    assert volumes["querywarden-settings"]["configMap"]["items"] == [
        {"key": "gateway.yaml", "path": "gateway.yaml"}
    ]
    sources = volumes["querywarden-credentials"]["projected"]["sources"]
    assert [(s["secret"]["name"], s["secret"]["items"]) for s in sources] == [
        ("orders-gateway", [{"key": "password", "path": "default/password"}]),
        ("orders-ro", [{"key": "password", "path": "roles/readonly/password"}]),
        ("orders-mask", [{"key": "key", "path": "masking/hash-key"}]),
    ]
    assert volumes["querywarden-tls"]["secret"]["secretName"] == "orders-gateway-tls"
    assert volumes["querywarden-files-dev"] == {
        "name": "querywarden-files-dev",
        "secret": {"secretName": "dev-issuer"},
    }
    assert volumes["querywarden-audit"]["emptyDir"] == {"sizeLimit": "1Gi"}


def test_the_audit_log_can_outlive_the_pod() -> None:
    # An existing claim, named in the spec: the log is on it, and changing it is a
    # restart of the sidecar.
    claimed = sidecar(sidecar__auditClaimName="orders-audit")
    patch = pod_patch(POD, "orders-db", spec(), claimed)
    assert patch is not None
    volumes = {v["name"]: v for v in patch["spec"]["volumes"]}
    assert volumes["querywarden-audit"] == {
        "name": "querywarden-audit",
        "persistentVolumeClaim": {"claimName": "orders-audit"},
    }
    assert config_hash(spec(), claimed) != config_hash(spec(), sidecar())
    # A pod that brings its own querywarden-audit volume (a StatefulSet's claim
    # template) keeps it, and the sidecar mounts it.
    own = {"name": "querywarden-audit", "persistentVolumeClaim": {"claimName": "audit-db-0"}}
    pod = {**POD, "spec": {**POD["spec"], "volumes": [*POD["spec"]["volumes"], own]}}
    patch = pod_patch(pod, "orders-db", spec(), sidecar())
    assert patch is not None
    audit = [v for v in patch["spec"]["volumes"] if v["name"] == "querywarden-audit"]
    assert audit == [own]
    (container,) = patch["spec"]["initContainers"][:1]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["querywarden-audit"] == "/var/lib/querywarden/audit"


def test_never_injected_twice_and_name_clashes_refused() -> None:
    patch = pod_patch(POD, "orders-db", spec(), sidecar())
    assert patch is not None
    injected = {
        "metadata": POD["metadata"],
        "spec": {**POD["spec"], **patch["spec"]},
    }
    assert pod_patch(injected, "orders-db", spec(), sidecar()) is None
    clash = {
        **POD,
        "spec": {**POD["spec"], "volumes": [{"name": "querywarden-tls", "emptyDir": {}}]},
    }
    with pytest.raises(InjectionError, match="querywarden-tls"):
        pod_patch(clash, "orders-db", spec(), sidecar())


def test_webhook_entry_selects_the_policys_pods_in_its_namespace() -> None:
    client = {"service": {"name": "qw-webhook", "namespace": "qw-system", "path": "/inject"}}
    entry = webhook_entry(REF, spec(), client)
    assert entry["name"] == "orders-db.shop.policies.querywarden.io"
    assert entry["failurePolicy"] == "Fail"
    assert entry["reinvocationPolicy"] == "IfNeeded"
    assert entry["sideEffects"] == "NoneOnDryRun"
    assert entry["clientConfig"] == client
    assert entry["rules"][0]["operations"] == ["CREATE"]
    assert entry["namespaceSelector"] == {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["shop"]},
            # A namespace labelled querywarden.io/inject=disabled is never sent.
            {"key": "querywarden.io/inject", "operator": "NotIn", "values": ["disabled"]},
        ]
    }
    only_enabled = webhook_entry(REF, spec(), client, enabled_by_default=False)
    assert only_enabled["namespaceSelector"]["matchExpressions"][1] == {
        "key": "querywarden.io/inject",
        "operator": "In",
        "values": ["enabled"],
    }
    assert entry["objectSelector"] == RAW_SPEC["target"]["podSelector"]


# --- admission ---------------------------------------------------------------------


def policy_object(name: str, raw_spec: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "shop", **meta}, "spec": raw_spec}


def test_admission_injects_the_selecting_policys_gateway() -> None:
    other = {
        **RAW_SPEC,
        "target": {**RAW_SPEC["target"], "podSelector": {"matchLabels": {"app": "x"}}},
    }
    decision = decide(
        POD, "shop", [policy_object("orders-db", RAW_SPEC), policy_object("other", other)],
        CONFIG, native_supported=True,
    )  # fmt: skip
    assert decision.refusal is None
    assert decision.policy == "orders-db"
    assert decision.patch == pod_patch(POD, "orders-db", spec(), sidecar())


def test_admission_leaves_unselected_pods_alone() -> None:
    pod = {**POD, "metadata": {"name": "web", "labels": {"app": "web"}}}
    decision = decide(
        pod, "shop", [policy_object("orders-db", RAW_SPEC)], CONFIG, native_supported=True
    )
    assert decision.patch is None
    assert decision.refusal is None


def test_admission_refuses_what_would_run_without_a_gateway() -> None:
    asking = {**POD, "metadata": {"name": "x", "labels": {"querywarden.io/inject": "true"}}}
    refused = decide(asking, "shop", [], CONFIG, native_supported=True)
    assert refused.refusal is not None
    assert "no DatabaseAccessPolicy in namespace shop selects it" in refused.refusal

    both = decide(
        POD, "shop", [policy_object("a", RAW_SPEC), policy_object("b", RAW_SPEC)],
        CONFIG, native_supported=True,
    )  # fmt: skip
    assert both.refusal is not None
    assert "several DatabaseAccessPolicies (a, b)" in both.refusal

    broken_target = {**RAW_SPEC, "target": {**RAW_SPEC["target"], "databasePort": "x"}}
    broken = decide(POD, "shop", [policy_object("a", broken_target)], CONFIG, native_supported=True)
    assert broken.refusal is not None
    assert "its spec is invalid" in broken.refusal


def test_admission_injects_even_while_the_policy_document_is_invalid() -> None:
    # The sidecar keeps loading the last good policy from the ConfigMap: the pod must
    # still get it, rather than be admitted without a gateway or refused.
    bad = {**RAW_SPEC, "policy": {"rules": [{"name": "Not A Name"}]}}
    decision = decide(POD, "shop", [policy_object("orders-db", bad)], CONFIG, native_supported=True)
    assert decision.refusal is None
    assert decision.patch is not None


def test_admission_skips_excluded_namespaces_deleting_policies_and_injected_pods() -> None:
    policy_list = [policy_object("orders-db", RAW_SPEC)]
    assert decide(POD, "qw-system", policy_list, CONFIG, native_supported=True).patch is None
    assert decide(POD, "kube-system", policy_list, CONFIG, native_supported=True).patch is None
    deleting = [policy_object("orders-db", RAW_SPEC, deletionTimestamp="2026-01-01T00:00:00Z")]
    assert decide(POD, "shop", deleting, CONFIG, native_supported=True).patch is None
    patch = pod_patch(POD, "orders-db", spec(), sidecar())
    assert patch is not None
    injected = {"metadata": POD["metadata"], "spec": {**POD["spec"], **patch["spec"]}}
    again = decide(injected, "shop", policy_list, CONFIG, native_supported=True)
    assert again.patch is None
    assert again.refusal is None


# --- status ------------------------------------------------------------------------

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=5)


def test_set_condition_keeps_the_transition_time_while_the_status_holds() -> None:
    first = set_condition([], condition(RENDERED, True, "Rendered", "ok", generation=1, at=T0))
    again = set_condition(
        first, condition(RENDERED, True, "Rendered", "still", generation=2, at=T1)
    )
    assert again[0].last_transition_time == T0
    assert again[0].message == "still"
    assert again[0].observed_generation == 2
    flipped = set_condition(
        again, condition(RENDERED, False, "InvalidPolicy", "x", generation=3, at=T1)
    )
    assert flipped[0].last_transition_time == T1
    ordered = set_condition(
        flipped, condition(READY, False, "InvalidPolicy", "x", generation=3, at=T1)
    )
    assert [c.type for c in ordered] == [READY, RENDERED]


def injected_pod(name: str, policy: str = "orders-db", config: str = "h1") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "annotations": {ANNOTATION_POLICY: policy, ANNOTATION_CONFIG_HASH: config},
        },
        "spec": {"initContainers": [{"name": "querywarden"}], "containers": [{"name": "pg"}]},
        "status": {"phase": "Running"},
    }


def test_census_and_injected_condition() -> None:
    pods = [
        injected_pod("a"),
        injected_pod("b", config="old"),
        injected_pod("c", policy="another"),
        {"metadata": {"name": "d"}, "spec": {"containers": [{"name": "pg"}]}},
        {**injected_pod("e"), "status": {"phase": "Succeeded"}},
        {**injected_pod("f"), "metadata": {"name": "f", "deletionTimestamp": "x"}},
    ]
    found = census(pods, "orders-db", "h1")
    assert (found.current, found.outdated, found.foreign, found.missing) == (
        ["a"],
        ["b"],
        ["c"],
        ["d"],
    )
    assert (found.targets, found.injected) == (4, 2)
    result = injected_condition(found, restart_enabled=False, generation=1, at=T0)
    assert result.status == "False"
    assert result.reason == "PodsWithoutGateway"
    assert "1 of 4 pods have no gateway" in result.message
    assert "querywarden.io/restart-workloads" in result.message
    assert (
        injected_condition(census([], "p", "h"), restart_enabled=False, generation=1, at=T0).reason
        == "NoTargets"
    )
    ok = injected_condition(
        census([injected_pod("a")], "orders-db", "h1"), restart_enabled=False, generation=1, at=T0
    )
    assert (ok.status, ok.reason) == ("True", "AllInjected")


def test_ready_needs_rendered_and_injected() -> None:
    rendered = condition(RENDERED, True, "Rendered", "ok", generation=1, at=T0)
    injected = condition(
        INJECTED_CONDITION, False, "PodsWithoutGateway", "1 of 1", generation=1, at=T0
    )
    ready = ready_condition([rendered, injected], generation=1, at=T0)
    assert (ready.status, ready.reason, ready.message) == ("False", "PodsWithoutGateway", "1 of 1")
    all_in = condition(INJECTED_CONDITION, True, "AllInjected", "all", generation=1, at=T0)
    assert ready_condition([rendered, all_in], generation=1, at=T0).status == "True"
    assert ready_condition([all_in], generation=1, at=T0).reason == "Pending"


def test_operator_config_reads_the_charts_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUERYWARDEN_OPERATOR_EXCLUDED_NAMESPACES", '["qw-system","kube-system"]')
    monkeypatch.setenv("QUERYWARDEN_OPERATOR_SIDECAR_RESOURCES", '{"limits":{"memory":"256Mi"}}')
    monkeypatch.setenv("QUERYWARDEN_OPERATOR_RESYNC_INTERVAL", "30")
    config = OperatorConfig()
    assert config.excluded_namespaces == ("qw-system", "kube-system")
    assert config.sidecar_resources.limits == {"memory": "256Mi"}
    assert config.resync_interval == 30.0
    with pytest.raises(ValidationError):
        monkeypatch.setenv("QUERYWARDEN_OPERATOR_WEBHOOK_PORT", "0")
        OperatorConfig()


def test_the_sidecar_role_binding_names_the_policys_pods_accounts_only() -> None:
    binding = render_sidecar_role_binding(REF, "qw-sidecar", ["orders-db", "default", "orders-db"])
    assert binding["metadata"]["namespace"] == REF.namespace
    assert binding["metadata"]["ownerReferences"][0]["name"] == REF.name
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "qw-sidecar",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": name, "namespace": REF.namespace}
        for name in ("default", "orders-db")
    ]
    assert pod_service_account({"spec": {}}) == "default"
    assert pod_service_account({"spec": {"serviceAccountName": "pg"}}) == "pg"
