"""The kubectl plugin's krew manifest and archive (plugins/krew, scripts/krew_plugin.py).

The manifest is checked the way krew validates a plugin before installing it (its
``ValidatePlugin``: apiVersion, kind, a safe name matching the file, a one-line short
description, a semantic version, and per platform an ``os``/``arch`` selector, a uri, a
sha256, ``bin`` and well-formed ``files``). The archive is built by the script, twice,
to the same bytes, whose sha256 is the manifest's; then installed the way krew installs
it (the ``files`` operations into a plugin directory, ``bin`` linked onto PATH as
``kubectl-querywarden``) and run by the real kubectl against the API server.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import os
import re
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from k8sharness.cluster import Cluster
from k8sharness.tools import REPO, tool
from querywarden import __version__
from querywarden_operator.review import REVIEW_CRD_NAME

SCRIPT = REPO / "scripts" / "krew_plugin.py"
MANIFEST = REPO / "plugins" / "krew" / "querywarden.yaml"
PLUGIN = REPO / "charts" / "querywarden" / "files" / "kubectl-querywarden"
DOCS = REPO / "docs" / "operator.md"


def krew_plugin() -> ModuleType:
    spec = importlib.util.spec_from_file_location("krew_plugin", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def manifest() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(MANIFEST.read_text())
    return loaded


def the_platform(plugin: dict[str, Any]) -> dict[str, Any]:
    (platform,) = plugin["spec"]["platforms"]
    result: dict[str, Any] = platform
    return result


def build(directory: Path) -> Path:
    """Run the script as the release step does; return the archive it wrote."""
    subprocess.run([sys.executable, str(SCRIPT), "--archive", str(directory)], check=True,
                   capture_output=True, text=True)  # fmt: skip
    (archive,) = directory.glob("*.zip")
    return archive


# --- the manifest -------------------------------------------------------------------------


def test_committed_manifest_is_generated_by_the_script() -> None:
    module = krew_plugin()
    assert MANIFEST.read_text() == module.render(), (
        "plugins/krew/querywarden.yaml is stale: run python scripts/krew_plugin.py --write"
    )
    assert module.main(["--check"]) == 0


def test_manifest_is_a_valid_krew_plugin() -> None:
    plugin = manifest()
    # What krew's ValidatePlugin refuses.
    assert plugin["apiVersion"] == "krew.googlecontainertools.github.com/v1alpha2"
    assert plugin["kind"] == "Plugin"
    name = plugin["metadata"]["name"]
    assert re.fullmatch(r"[\w-]+", name) and name == MANIFEST.stem == "querywarden"
    spec = plugin["spec"]
    assert spec["shortDescription"] and not set(spec["shortDescription"]) & {"\r", "\n"}
    # krew-index asks for short descriptions under about 50 characters.
    assert len(spec["shortDescription"]) <= 50
    assert re.fullmatch(r"v\d+\.\d+\.\d+", spec["version"])
    assert spec["version"] == f"v{__version__}"
    chart = yaml.safe_load((REPO / "charts" / "querywarden" / "Chart.yaml").read_text())
    assert spec["version"] == f"v{chart['appVersion']}"
    assert spec["homepage"].startswith("https://")
    assert spec["platforms"]
    for platform in spec["platforms"]:
        assert platform["uri"].startswith("https://")
        assert platform["uri"].endswith(f"/{spec['version']}/kubectl-querywarden-"
                                        f"{spec['version']}.zip")  # fmt: skip
        assert re.fullmatch(r"[a-f0-9]{64}", platform["sha256"])
        assert platform["bin"] == "kubectl-querywarden"
        assert ".." not in Path(platform["bin"]).parts and not Path(platform["bin"]).is_absolute()
        assert platform["files"], "files: unspecified or non-empty"
        for operation in platform["files"]:
            assert operation["from"] and operation["to"]
        selector = platform["selector"]
        keys = [*selector.get("matchLabels", {})] + [
            e["key"] for e in selector.get("matchExpressions", [])
        ]
        assert keys and set(keys) <= {"os", "arch"}
        # A Python script: every Unix-like platform, none that needs a .exe.
        (expression,) = selector["matchExpressions"]
        assert expression == {"key": "os", "operator": "In", "values": ["darwin", "linux"]}
    # The files the manifest ships come from the repository.
    sources = {name: source for name, source, _ in krew_plugin().MEMBERS}
    assert sources == {"kubectl-querywarden": PLUGIN, "LICENSE": REPO / "LICENSE"}
    assert all(source.is_file() for source in sources.values())


def test_docs_say_how_to_install_with_krew() -> None:
    docs = DOCS.read_text()
    assert "kubectl krew install --manifest=plugins/krew/querywarden.yaml" in docs
    assert "python scripts/krew_plugin.py --archive dist/" in docs


# --- the archive --------------------------------------------------------------------------


def test_archive_is_reproducible_and_matches_the_manifest(tmp_path: Path) -> None:
    first = build(tmp_path / "one")
    second = build(tmp_path / "two")
    assert first.read_bytes() == second.read_bytes()
    platform = the_platform(manifest())
    assert first.name == platform["uri"].rsplit("/", 1)[1]
    assert hashlib.sha256(first.read_bytes()).hexdigest() == platform["sha256"]
    with zipfile.ZipFile(first) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        assert sorted(infos) == sorted(op["from"] for op in platform["files"])
        assert archive.read(platform["bin"]) == PLUGIN.read_bytes()
        mode = infos[platform["bin"]].external_attr >> 16
        assert stat.S_ISREG(mode) and mode & 0o777 == 0o755


def krew_install(archive: Path, platform: dict[str, Any], root: Path) -> Path:
    """Install as krew does: the ``files`` operations into the plugin's directory, then
    ``bin`` linked into the bin directory as ``kubectl-<name>``; returns that directory.
    """
    store = root / "store" / "querywarden" / "v0"
    store.mkdir(parents=True)
    with zipfile.ZipFile(archive) as source:
        for operation in platform["files"]:
            matched = [n for n in source.namelist() if fnmatch.fnmatch(n, operation["from"])]
            assert matched, f"{operation['from']} matches nothing in the archive"
            for name in matched:
                target = store / operation["to"] / Path(name).name
                target.write_bytes(source.read(name))
                target.chmod(source.getinfo(name).external_attr >> 16 & 0o777)
    executable = store / platform["bin"]
    assert executable.is_file() and os.access(executable, os.X_OK)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl-querywarden").symlink_to(executable)
    return bin_dir


def test_installed_plugin_runs_under_kubectl(
    k8s: Cluster, tmp_path: Path, review_crd_as_found: None
) -> None:
    archive = build(tmp_path / "dist")
    bin_dir = krew_install(archive, the_platform(manifest()), tmp_path / "krew")
    kubectl = tool("kubectl")
    path = os.pathsep.join([str(bin_dir), str(kubectl.parent), os.environ.get("PATH", "")])
    env = {"PATH": path}
    listed = k8s.run(kubectl, "plugin", "list", "--name-only", env=env, check=False)
    assert "kubectl-querywarden" in listed.stdout, listed.stderr
    helped = k8s.run(kubectl, "querywarden", "--help", env=env)
    assert "kubectl querywarden approve NAME" in helped.stdout
    k8s.kubectl("apply", "--server-side", "--force-conflicts", "-f",
                str(REPO / "crds" / "queryreviews.yaml"))  # fmt: skip
    k8s.wait_established(REVIEW_CRD_NAME)
    # The plugin runs the kubectl on PATH against the cluster.
    result = k8s.run(kubectl, "querywarden", "list", "-A", env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert "No resources found" in result.stderr or "STATE" in result.stdout


@pytest.mark.parametrize("member", ["kubectl-querywarden", "LICENSE"])
def test_every_member_is_what_the_repository_holds(member: str, tmp_path: Path) -> None:
    archive = build(tmp_path)
    sources = {name: source for name, source, _ in krew_plugin().MEMBERS}
    with zipfile.ZipFile(archive) as opened:
        assert opened.read(member) == sources[member].read_bytes()
