"""Settings: the example loads, the environment overrides the file, errors name the field."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from querywarden.config import load_settings
from querywarden.policy import load_policy

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gateway.yaml"


def test_example_settings_load() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.listen.port == 6432
    assert settings.upstream.sslmode == "prefer"
    assert settings.limits.max_client_message == 64 * 1024 * 1024
    assert settings.limits.startup_timeout == timedelta(seconds=15)
    # Relative paths are anchored at the settings file.
    assert settings.tls.cert_file == EXAMPLE.parent / "tls" / "gateway.crt"
    assert settings.policy_file == EXAMPLE.parent / "policy.yaml"
    assert settings.masking.hash_key_file == EXAMPLE.parent / "secrets" / "masking-key"
    assert settings.audit.fsync == "batch"
    assert settings.admin.port == 6433


def test_example_policy_loads() -> None:
    policy = load_policy(EXAMPLE.parent / "policy.yaml")
    kinds = {issuer.name: issuer.kind for issuer in policy.identity.issuers}
    assert kinds == {"corp": "oidc", "cluster": "kubernetes", "corp-saml": "saml", "dev": "dev"}
    assert {c.column for c in policy.masking.columns} == {"ssn", "card_number", "email", "secret"}
    assert policy.masking.uses_key
    assert policy.approvals.approvers.groups == ["dba-oncall"]


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("upstream:\n  host: db.internal\n  password: from-file\n")
    monkeypatch.setenv("QUERYWARDEN_UPSTREAM__PASSWORD", "from-env")
    monkeypatch.setenv("QUERYWARDEN_LIMITS__STARTUPTIMEOUT", "250ms")
    settings = load_settings(path)
    assert settings.upstream.host == "db.internal"
    assert settings.upstream.resolved_password() == "from-env"
    assert settings.limits.startup_timeout == timedelta(milliseconds=250)


def test_password_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    path = tmp_path / "gw.yaml"
    path.write_text("upstream:\n  passwordFile: pw\n")
    assert load_settings(path).upstream.resolved_password() == "s3cret"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("listen:\n  port: 70000\n", "listen.port"),
        ("upstream:\n  sslmode: sometimes\n", "upstream.sslmode"),
        ("limits:\n  startupTimeout: soon\n", "limits.startupTimeout"),
        ("limits:\n  startupTimeout: 0s\n", "limits.startupTimeout"),
        ("listen:\n  prot: 1\n", "listen.prot"),
    ],
)
def test_invalid_settings_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    with pytest.raises(ValidationError) as info:
        load_settings(path)
    assert field in str(info.value)


def test_settings_file_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_settings(path)


def test_the_kubernetes_review_store_needs_its_policy(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("approvals:\n  store: kubernetes\n")
    with pytest.raises(ValidationError, match=r"approvals\.policy"):
        load_settings(path)
    path.write_text("approvals:\n  store: kubernetes\n  policy: orders\n  kubeconfig: kc.yaml\n")
    approvals = load_settings(path).approvals
    assert approvals.policy == "orders"
    assert approvals.kubeconfig == tmp_path / "kc.yaml"  # relative to the settings file
    assert load_settings(None).approvals.store == "sqlite"


def test_the_kubernetes_review_store_needs_a_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from querywarden.approvals import kube_store
    from querywarden.server import Gateway

    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    monkeypatch.setattr(kube_store, "_SA_NAMESPACE", tmp_path / "no-such-file")
    path = tmp_path / "gateway.yaml"
    path.write_text("approvals:\n  store: kubernetes\n  policy: orders\n")
    policy = load_policy_text(tmp_path, "approvals:\n  approvers:\n    groups: [dba]\n")
    with pytest.raises(ValueError, match="no namespace is known"):
        Gateway(load_settings(path), policy=policy)


def test_the_postgres_review_store_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("approvals:\n  store: postgres\n")
    with pytest.raises(ValidationError, match=r"approvals\.postgres\.dsn"):
        load_settings(path)
    path.write_text("approvals:\n  store: postgres\n  postgres:\n    dsn: host=db user=qw\n")
    with pytest.raises(ValidationError, match="must be a URL, postgresql://"):
        load_settings(path)
    path.write_text(
        "approvals:\n  store: postgres\n  postgres:\n"
        "    dsn: postgresql://qw@db:5432/ops?sslmode=verify-full\n"
        "    passwordFile: secrets/store-password\n"
    )
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "store-password").write_text("s3cret\n")
    store = load_settings(path).approvals.postgres
    assert store is not None
    assert store.schema_name == "querywarden" and store.pool_size == 4
    assert store.password_file == tmp_path / "secrets" / "store-password"
    assert store.resolved_password() == "s3cret"
    # The environment overrides the file, as for every setting.
    monkeypatch.setenv("QUERYWARDEN_APPROVALS__POSTGRES__SCHEMA", "qw_eu")
    monkeypatch.setenv("QUERYWARDEN_APPROVALS__POSTGRES__PASSWORD", "from-env")
    store = load_settings(path).approvals.postgres
    assert store is not None and store.schema_name == "qw_eu"
    assert store.password == "from-env"  # and the file, when both are set, wins
    monkeypatch.setenv("QUERYWARDEN_APPROVALS__POSTGRES__SCHEMA", "Bad-Name")
    with pytest.raises(ValidationError, match="invalid schema name 'Bad-Name'"):
        load_settings(path)


def test_a_review_store_sharing_a_role_with_client_sessions_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from querywarden.server import Gateway

    policy = load_policy_text(tmp_path, "approvals:\n  approvers:\n    groups: [dba]\n")
    path = tmp_path / "gateway.yaml"
    for store_role, warned in (("querywarden", True), ("qw_reviews", False)):
        path.write_text(
            "upstream:\n  user: querywarden\n"
            "approvals:\n  store: postgres\n  postgres:\n"
            f"    dsn: postgresql://{store_role}@db:5432/ops\n"
        )
        caplog.clear()
        Gateway(load_settings(path), policy=policy)
        assert ("a role of its own in approvals.postgres.dsn" in caplog.text) is warned


def load_policy_text(directory: Path, text: str) -> Any:
    path = directory / "policy.yaml"
    path.write_text(text)
    return load_policy(path)


def test_a_policy_dumped_by_the_models_loads_again(tmp_path: Path) -> None:
    import json

    example = load_policy(EXAMPLE.parent / "policy.yaml")
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(example.model_dump(mode="json", by_alias=True)))
    assert "PT" in path.read_text()  # pydantic writes durations as ISO 8601
    assert load_policy(path) == example
    with pytest.raises(ValidationError, match="invalid duration"):
        load_policy_text(tmp_path, "approvals:\n  hold: soon\n")


def test_durations_may_be_written_in_days() -> None:
    from querywarden.config import parse_duration

    assert parse_duration("7d") == timedelta(days=7)
    assert parse_duration("1.5d") == timedelta(hours=36)
    with pytest.raises(ValueError, match="ms, s, m, h or d"):
        parse_duration("1w")
