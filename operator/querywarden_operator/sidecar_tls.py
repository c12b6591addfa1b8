"""The serving certificate of injected sidecars that name no ``target.tlsSecretName``.

Pure functions, like :mod:`external`, whose Secret and ConfigMap they share (same names,
same keys): :mod:`reconcile` issues the certificate from the operator's CA
(:mod:`certificates`) and the webhook mounts ``<policy>-querywarden-tls`` in the sidecar.

The names are those clients reach the database pods by: for every Service of the
policy's namespace whose selector selects them, ``<svc>``, ``<svc>.<ns>``,
``<svc>.<ns>.svc`` and ``<svc>.<ns>.svc.<clusterDomain>``; for a headless Service (a
StatefulSet's governing Service) also ``*.<svc>.<ns>.svc`` and
``*.<svc>.<ns>.svc.<clusterDomain>``, the names of its pods. With no such Service the
certificate is for ``localhost`` alone (``kubectl port-forward``; other clients verify
the CA only, ``sslmode=verify-ca``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from querywarden_operator.external import serving_secret_name
from querywarden_operator.spec import DatabaseAccessPolicySpec

#: The certificate's only name when no Service selects the pods.
NO_SERVICE_NAME = "localhost"


def issues_certificate(spec: DatabaseAccessPolicySpec) -> bool:
    """Whether the operator's CA makes the sidecar's certificate (none named, TLS served)."""
    return (
        spec.target.external is None
        and spec.target.tls_secret_name is None
        and spec.sidecar.plaintext != "always"
    )


def resolved_spec(policy: str, spec: DatabaseAccessPolicySpec) -> DatabaseAccessPolicySpec:
    """The spec with the issued certificate's Secret as ``tlsSecretName`` (if it issues one).

    The webhook and the reconciler both render from it, so the pods' settings hash and
    the census agree.
    """
    if not issues_certificate(spec):
        return spec
    target = spec.target.model_copy(update={"tls_secret_name": serving_secret_name(policy)})
    return spec.model_copy(update={"target": target})


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def selecting_services(
    services: Iterable[Mapping[str, Any]], label_sets: Iterable[Mapping[str, str]]
) -> list[Mapping[str, Any]]:
    """The Services whose selector selects a pod with one of ``label_sets``.

    A Service without a selector (its endpoints are managed by hand) is left out.
    """
    labels = list(label_sets)
    found = []
    for service in services:
        selector = (service.get("spec") or {}).get("selector") or {}
        if selector and any(_selects(selector, pod) for pod in labels):
            found.append(service)
    return found


def dns_names(
    services: Iterable[Mapping[str, Any]], namespace: str, cluster_domain: str
) -> list[str]:
    """The names the certificate carries for ``services`` (sorted by Service name)."""
    names: list[str] = []
    for service in sorted(services, key=lambda s: str((s.get("metadata") or {}).get("name"))):
        name = str((service.get("metadata") or {}).get("name"))
        names += [
            f"{name}.{namespace}.svc.{cluster_domain}",
            f"{name}.{namespace}.svc",
            f"{name}.{namespace}",
            name,
        ]
        if (service.get("spec") or {}).get("clusterIP") == "None":
            names += [f"*.{name}.{namespace}.svc.{cluster_domain}", f"*.{name}.{namespace}.svc"]
    return names or [NO_SERVICE_NAME]
