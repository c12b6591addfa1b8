"""A stand-in for the kubelet's part of starting one container: its files and environment.

The harness runs no kubelet, so a Pod the webhook injected is stored and never started.
To run the injected container anyway, this module does what the kubelet would do for it,
from the objects in the API server:

* every volume the container mounts is written under a root directory: ConfigMap,
  Secret and projected volumes from the real objects (``items`` honoured), emptyDirs as
  empty directories. A ConfigMap or Secret mounted as a directory is written the way the
  kubelet's atomic writer does it: the files are symlinks into ``..data``, itself a
  symlink to a timestamped directory that :meth:`ContainerFiles.sync` replaces in one
  rename, which is the change a gateway sees when a ConfigMap is updated;
* ``subPath`` mounts are copies taken once, as the kubelet's bind mounts are never
  updated;
* projected ServiceAccount tokens are requested from the TokenRequest API, bound to the
  pod, as the kubelet requests them;
* the environment is resolved: ``value`` with ``$(VAR)`` expansion, ``secretKeyRef``,
  ``configMapKeyRef``, ``fieldRef``, plus the kubelet's ``KUBERNETES_SERVICE_HOST`` and
  ``_PORT``.

What it cannot do is give the process a mount namespace. Container paths are therefore
relocated under the root: in the command line and in the text of mounted ConfigMap
files (the only place configuration names paths). That mapping is the one difference
between this and a pod: everything else the process reads is what the API server holds.
"""

from __future__ import annotations

import base64
import datetime
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from k8sharness.cluster import Cluster

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


class ContainerFiles:
    """The files and environment of one container of a stored Pod, under ``root``."""

    def __init__(self, k8s: Cluster, pod: Mapping[str, Any], container: str, root: Path) -> None:
        self.k8s = k8s
        self.pod = pod
        self.namespace = str(pod["metadata"]["namespace"])
        spec = pod["spec"]
        found = [
            c
            for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
            if c["name"] == container
        ]
        if not found:
            raise LookupError(f"the pod has no container {container!r}")
        self.container: dict[str, Any] = found[0]
        self.volumes = {v["name"]: v for v in spec.get("volumes") or []}
        self.root = root
        self.mounts: list[dict[str, Any]] = list(self.container.get("volumeMounts") or [])
        # One pass, longest first (/etc/querywarden/policy before /etc/querywarden), and
        # only whole path components, so relocated text is never relocated again.
        prefixes = sorted({m["mountPath"] for m in self.mounts}, key=len, reverse=True)
        self._pattern = re.compile(
            r"(?<![\w./-])(" + "|".join(re.escape(p) for p in prefixes) + r")(?![\w.-])"
        )

    # paths ---------------------------------------------------------------------------

    def host_path(self, container_path: str) -> Path:
        """Where a container path lives under the root."""
        relative = PurePosixPath(container_path).relative_to("/")
        return self.root / relative

    def relocate(self, text: str) -> str:
        """``text`` with every mount path of the container moved under the root."""
        return self._pattern.sub(lambda m: str(self.host_path(m.group(1))), text)

    # volumes -------------------------------------------------------------------------

    def _secret(self, name: str) -> dict[str, bytes]:
        secret = self.k8s.get(f"/api/v1/namespaces/{self.namespace}/secrets/{name}")
        return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}

    def _configmap(self, name: str) -> dict[str, bytes]:
        configmap = self.k8s.get(f"/api/v1/namespaces/{self.namespace}/configmaps/{name}")
        # Only ConfigMaps carry paths in their text: those are relocated.
        return {k: self.relocate(v).encode() for k, v in (configmap.get("data") or {}).items()}

    @staticmethod
    def _pick(data: Mapping[str, bytes], items: list[dict[str, Any]] | None) -> dict[str, bytes]:
        if not items:
            return dict(data)
        return {item["path"]: data[item["key"]] for item in items}

    def volume_files(self, name: str) -> dict[str, bytes] | None:
        """The files of a volume by relative path; None for an emptyDir."""
        volume = self.volumes[name]
        if "emptyDir" in volume:
            return None
        if "configMap" in volume:
            source = volume["configMap"]
            return self._pick(self._configmap(source["name"]), source.get("items"))
        if "secret" in volume:
            source = volume["secret"]
            return self._pick(self._secret(source["secretName"]), source.get("items"))
        if "projected" in volume:
            files: dict[str, bytes] = {}
            for source in volume["projected"]["sources"]:
                if "secret" in source:
                    data = self._secret(source["secret"]["name"])
                    files.update(self._pick(data, source["secret"].get("items")))
                elif "configMap" in source:
                    data = self._configmap(source["configMap"]["name"])
                    files.update(self._pick(data, source["configMap"].get("items")))
                elif "serviceAccountToken" in source:
                    token = source["serviceAccountToken"]
                    files[token["path"]] = self._token(token).encode()
                elif "downwardAPI" in source:
                    fields = self._fields()
                    for item in source["downwardAPI"]["items"]:
                        files[item["path"]] = fields[item["fieldRef"]["fieldPath"]].encode()
                else:
                    raise NotImplementedError(f"projected source {sorted(source)}")
            return files
        raise NotImplementedError(f"volume {name}: {sorted(volume)}")

    def sync(self) -> None:
        """Write (or update) every mounted volume, as the kubelet does on each sync."""
        for mount in self.mounts:
            target = self.host_path(mount["mountPath"])
            files = self.volume_files(mount["name"])
            if files is None:
                target.mkdir(parents=True, exist_ok=True)
                continue
            if "subPath" in mount:
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(files[mount["subPath"]])
                continue
            _atomic_write(target, files)

    # environment and command ---------------------------------------------------------

    def _fields(self) -> dict[str, str]:
        """What ``fieldRef`` can name (the fields the gateway uses)."""
        meta = self.pod["metadata"]
        return {"metadata.name": str(meta.get("name", "")), "metadata.namespace": self.namespace}

    def _token(self, source: Mapping[str, Any]) -> str:
        """A ServiceAccount token bound to the pod, requested as the kubelet does."""
        account = self.pod["spec"].get("serviceAccountName") or "default"
        spec: dict[str, Any] = {
            "expirationSeconds": source.get("expirationSeconds", 3600),
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": self.pod["metadata"]["name"],
                "uid": self.pod["metadata"]["uid"],
            },
        }
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        answer = self.k8s.create(
            f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        return str(answer["status"]["token"])

    def env(self) -> dict[str, str]:
        """The container's environment, resolved, with the kubelet's own variables.

        ``KUBERNETES_SERVICE_HOST``/``_PORT`` name the API server, as the kubelet's do
        (there the ``kubernetes`` Service; here the harness's API server itself).
        """
        server = urlsplit(self.k8s.server)
        resolved: dict[str, str] = {
            "KUBERNETES_SERVICE_HOST": server.hostname or "",
            "KUBERNETES_SERVICE_PORT": str(server.port or 443),
        }
        fields = self._fields()
        for item in self.container.get("env") or []:
            name = item["name"]
            if "value" in item:
                resolved[name] = _VAR.sub(
                    lambda m: resolved.get(m.group(1), m.group(0)), str(item["value"])
                )
                continue
            source = item["valueFrom"]
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                resolved[name] = self._secret(ref["name"])[ref["key"]].decode()
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                resolved[name] = self._configmap(ref["name"])[ref["key"]].decode()
            elif "fieldRef" in source:
                resolved[name] = fields[source["fieldRef"]["fieldPath"]]
            else:
                raise NotImplementedError(f"env {name}: {sorted(source)}")
        return resolved

    def argv(self) -> list[str]:
        """The command line, with container paths relocated."""
        return [
            self.relocate(arg)
            for arg in [*(self.container.get("command") or []), *(self.container.get("args") or [])]
        ]


def _atomic_write(directory: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` into ``directory`` as the kubelet's atomic writer does."""
    directory.mkdir(parents=True, exist_ok=True)
    data_link = directory / "..data"
    if data_link.is_symlink():
        current = directory / os.readlink(data_link)
        if all(
            (current / path).is_file() and (current / path).read_bytes() == content
            for path, content in files.items()
        ):
            return  # unchanged: the kubelet does not touch it either
    else:
        current = None
    stamp = datetime.datetime.now(datetime.UTC).strftime("..%Y_%m_%d_%H_%M_%S.%f")
    fresh = directory / stamp
    for path, content in files.items():
        target = fresh / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    staging = directory / "..data_tmp"
    staging.unlink(missing_ok=True)
    staging.symlink_to(stamp)
    staging.rename(data_link)  # the one atomic step
    for path in {PurePosixPath(p).parts[0] for p in files}:
        link = directory / path
        if not link.is_symlink():
            link.symlink_to(f"..data/{path}")
    if current is not None and current.exists():
        shutil.rmtree(current)
