"""A small typed client for the Kubernetes REST API (JSON in, plain dicts out).

The operator writes the objects it owns with server-side apply (one PATCH that creates or
updates, and the API server keeps track of which fields are the operator's), so every
reconciliation is the same call whatever exists already. The official client library
does the connection work (kubeconfig, in-cluster service account, token refresh); this
module only gives it a narrow, typed surface.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import kubernetes.client
import kubernetes.config

#: The field manager of everything the operator applies.
FIELD_MANAGER = "querywarden-operator"
_TIMEOUT = 15.0


class KubeApiError(RuntimeError):
    """The API server answered with an error status."""

    def __init__(self, method: str, path: str, status: int, body: bytes) -> None:
        try:
            decoded: Any = json.loads(body)
        except ValueError:
            decoded = body.decode(errors="replace")
        message = decoded.get("message") if isinstance(decoded, dict) else decoded
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status
        self.message = str(message)
        self.reason = str(decoded.get("reason", "")) if isinstance(decoded, dict) else ""


def load_configuration(kubeconfig: Path | None = None) -> Any:
    """A client configuration: ``kubeconfig`` if given, else in-cluster, else ``$KUBECONFIG``."""
    configuration = kubernetes.client.Configuration()
    if kubeconfig is not None:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig), client_configuration=configuration, persist_config=False
        )
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    else:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration, persist_config=False
        )
    return configuration


def object_path(
    api_version: str, plural: str, namespace: str | None, name: str | None = None
) -> str:
    """The REST path of a collection (``name`` None) or of one object."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace is not None:
        base += f"/namespaces/{quote(namespace)}"
    base += f"/{plural}"
    return base if name is None else f"{base}/{quote(name)}"


class KubeClient:
    """JSON requests to the API server with the given client configuration."""

    def __init__(self, configuration: Any) -> None:
        self.configuration = configuration
        self._api = kubernetes.client.ApiClient(configuration)

    def close(self) -> None:
        """Release the connection pool."""
        self._api.close()  # type: ignore[no-untyped-call]

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float = _TIMEOUT,
    ) -> Any:
        """One API call; the decoded answer, or KubeApiError."""
        api = self._api
        method, url, headers, data, post = api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list(query.items()) if query else None,
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = api.call_api(method, url, headers, data, post, _request_timeout=timeout)
        raw: bytes = response.read() or b""  # type: ignore[no-untyped-call]
        if response.status >= 400:
            raise KubeApiError(method, path, response.status, raw)
        return json.loads(raw) if raw else None

    def get(self, path: str) -> Any:
        """GET an object, or None when it does not exist."""
        try:
            return self.request("GET", path)
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, path: str, *, label_selector: str | None = None) -> list[Any]:
        """The items of a collection (all pages)."""
        items: list[Any] = []
        query: dict[str, str] = {"limit": "500"}
        if label_selector:
            query["labelSelector"] = label_selector
        while True:
            page = self.request("GET", path, query=query)
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items
            query["continue"] = token

    def apply(self, path: str, manifest: Mapping[str, Any]) -> Any:
        """Server-side apply ``manifest`` at its object ``path`` (create or update)."""
        return self.request(
            "PATCH",
            path,
            dict(manifest),
            query={"fieldManager": FIELD_MANAGER, "force": "true"},
            content_type="application/apply-patch+yaml",
        )

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> Any:
        """A JSON merge patch (RFC 7386)."""
        return self.request(
            "PATCH",
            path,
            dict(patch),
            query={"fieldManager": FIELD_MANAGER},
            content_type="application/merge-patch+json",
        )

    def server_version(self) -> tuple[int, int]:
        """The API server's (major, minor) version."""
        version = self.request("GET", "/version")
        major = int("".join(ch for ch in str(version["major"]) if ch.isdigit()))
        minor = int("".join(ch for ch in str(version["minor"]) if ch.isdigit()))
        return major, minor
