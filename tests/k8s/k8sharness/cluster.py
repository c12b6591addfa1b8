"""A Kubernetes API server for the tests: a local etcd + kube-apiserver, or an existing cluster.

The local control plane is what envtest runs: etcd and kube-apiserver only. No kubelet,
no controller manager, no scheduler: objects are stored and admitted but nothing acts on
them. Pods stay Pending forever, namespaces are never finalized, no ``default`` service
account appears. Tests check what the API server (validation, admission, webhooks, RBAC,
token issuance) made of an object, never what a controller would do with it.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import kubernetes.client
import kubernetes.config
import yaml

from k8sharness.pki import CertificateAuthority, IssuedCertificate, write_service_account_key
from k8sharness.processes import ManagedProcess, free_port
from k8sharness.tools import tool

T = TypeVar("T")

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
#: Names the serving certificate covers: how clients on the machine and (were there any)
#: pods reach the API server.
API_SERVER_HOSTS = (
    "127.0.0.1",
    "localhost",
    "10.0.0.1",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
#: The ClusterRoleBinding that lets anyone read the service-account issuer's discovery
#: document and JWKS, as managed clusters do, so a relying party (the gateway) can verify
#: tokens without credentials of its own.
ANONYMOUS_DISCOVERY_BINDING = "querywarden-test:service-account-issuer-discovery"
#: Label on every namespace a test creates: webhooks in tests select on it, so that on a
#: shared cluster they never see anything but their own test's objects.
NAMESPACE_LABEL = "querywarden.test/namespace"
#: The JWKS media type (RFC 7517, section 8.5.1): the only one /openid/v1/jwks produces.
JWKS_MEDIA_TYPE = "application/jwk-set+json"
START_TIMEOUT = 120.0
COMMAND_TIMEOUT = 120.0


class KubeError(RuntimeError):
    """The API server answered a request with an error status."""

    def __init__(self, method: str, path: str, status: int, body: bytes) -> None:
        try:
            self.body: Any = json.loads(body)
        except ValueError:
            self.body = body.decode(errors="replace")
        message = self.body.get("message") if isinstance(self.body, dict) else self.body
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status
        self.message = str(message)


@dataclass
class Cluster:
    """A reachable Kubernetes API server and the credentials to drive it.

    ``request`` speaks JSON to the REST API with plain dicts, as a manifest reads;
    ``kubectl`` and ``run`` run command-line tools against the same cluster.
    """

    server: str
    #: CA bundle for the API server's certificate (None: the system's CAs).
    ca_file: Path | None
    #: What KUBECONFIG is set to for tools: one file, or a list as KUBECONFIG allows.
    kubeconfig: str
    #: True when the harness started this API server (no kubelet, no controllers).
    local: bool
    api: kubernetes.client.ApiClient = field(repr=False)
    #: More environment for tools (the harness points kubectl's discovery cache away
    #: from ~/.kube/cache).
    tool_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_kubeconfig(cls, kubeconfig: str, *, local: bool) -> Cluster:
        """Connect to the current context of ``kubeconfig`` (a path or a KUBECONFIG list)."""
        configuration = kubernetes.client.Configuration()
        # The loader merges a KUBECONFIG-style list of files itself.
        kubernetes.config.load_kube_config(
            config_file=kubeconfig, client_configuration=configuration, persist_config=False
        )
        ca = configuration.ssl_ca_cert
        return cls(
            server=str(configuration.host).rstrip("/"),
            ca_file=Path(ca) if ca else None,
            kubeconfig=kubeconfig,
            local=local,
            api=kubernetes.client.ApiClient(configuration),
        )

    def close(self) -> None:
        """Release the client's connection pool."""
        self.api.close()

    # REST ------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        accept: str = "application/json",
        timeout: float = 30.0,
    ) -> Any:
        """One API call; returns the decoded JSON answer, raises KubeError on an error.

        ``accept`` matters: the API server answers 406 to an Accept header its endpoint
        does not produce (the JWKS is ``application/jwk-set+json`` only).
        """
        api = self.api
        method, url, headers, data, post = api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list(query.items()) if query else None,
            header_params={"Accept": accept, "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = api.call_api(method, url, headers, data, post, _request_timeout=timeout)
        raw = response.read() or b""
        if response.status >= 400:
            raise KubeError(method, path, response.status, raw)
        return json.loads(raw) if raw else None

    def create(self, path: str, manifest: Mapping[str, Any]) -> Any:
        """POST ``manifest`` to the collection at ``path``; return the stored object."""
        return self.request("POST", path, manifest)

    def get(self, path: str) -> Any:
        """GET one object or a list."""
        return self.request("GET", path)

    def jwks(self) -> Any:
        """The service-account issuer's JSON Web Key Set, as the API server publishes it."""
        return self.request("GET", "/openid/v1/jwks", accept=JWKS_MEDIA_TYPE)

    def delete(self, path: str) -> None:
        """DELETE an object; one that is already gone is fine."""
        try:
            self.request("DELETE", path)
        except KubeError as exc:
            if exc.status != 404:
                raise

    def wait_for(self, fetch: Callable[[], T | None], *, timeout: float = 30.0, what: str) -> T:
        """Poll ``fetch`` until it returns something other than None (404s count as None)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                found = fetch()
            except KubeError as exc:
                if exc.status != 404:
                    raise
                found = None
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not after {timeout:.0f}s")
            time.sleep(0.2)

    def create_namespace(self, name: str, labels: Mapping[str, str]) -> None:
        """Create a namespace as a cluster's controllers complete it.

        They add the ``default`` ServiceAccount and the ``kube-root-ca.crt`` ConfigMap
        (the cluster's CA) to every namespace; the local control plane runs no
        controllers, so the harness does it. The sidecar's projected ServiceAccount
        volume needs both.
        """
        self.create(
            "/api/v1/namespaces",
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": dict(labels)},
            },
        )
        published: list[tuple[str, dict[str, Any]]] = [
            (
                "serviceaccounts",
                {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}},
            )
        ]
        if self.ca_file is not None:
            published.append(
                (
                    "configmaps",
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "metadata": {"name": "kube-root-ca.crt"},
                        "data": {"ca.crt": self.ca_file.read_text()},
                    },
                )
            )
        for resource, manifest in published:
            try:
                self.create(f"/api/v1/namespaces/{name}/{resource}", manifest)
            except KubeError as exc:
                if exc.status != 409:  # a real cluster's controller was quicker
                    raise

    def wait_established(self, crd_name: str, *, timeout: float = 60.0) -> None:
        """Wait until the API server reports the CRD ``crd_name`` Established.

        Polled here rather than with ``kubectl wait --for=condition=Established``: kubectl
        fails at once, instead of waiting, when it reads the CRD before the API server has
        written any condition into its status (seen on a loaded machine).
        """

        def established() -> bool | None:
            crd = self.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd_name}")
            conditions = (crd.get("status") or {}).get("conditions") or []
            ok = any(c["type"] == "Established" and c["status"] == "True" for c in conditions)
            return True if ok else None

        self.wait_for(established, timeout=timeout, what=f"crd/{crd_name} Established")

    # command-line tools ----------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a tool run against this cluster."""
        return {**os.environ, "KUBECONFIG": self.kubeconfig, **self.tool_env, **extra}

    def run(
        self,
        binary: Path,
        *args: str,
        stdin: str | None = None,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run a tool with KUBECONFIG pointing here; with ``check``, fail with its output."""
        result = subprocess.run(
            [str(binary), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(**(env or {})),
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{binary.name} {' '.join(args)} exited with {result.returncode}:\n"
                f"{result.stderr}{result.stdout}"
            )
        return result

    def kubectl(
        self,
        *args: str,
        stdin: str | None = None,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl against this cluster."""
        return self.run(tool("kubectl"), *args, stdin=stdin, check=check, timeout=timeout)


def bind_anonymous_discovery(cluster: Cluster) -> None:
    """Let anyone read the service-account issuer's discovery document and JWKS.

    As managed clusters do: a relying party (the gateway) verifies tokens without
    credentials of its own. Idempotent: every module on a shared node asks for it.
    """
    try:
        _create_anonymous_discovery(cluster)
    except KubeError as exc:
        if exc.status != 409:  # already bound (by an earlier module on this cluster)
            raise


def _create_anonymous_discovery(cluster: Cluster) -> None:
    cluster.create(
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": ANONYMOUS_DISCOVERY_BINDING},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:service-account-issuer-discovery",
            },
            "subjects": [
                {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Group",
                    "name": "system:unauthenticated",
                }
            ],
        },
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_kubeconfig(
    path: Path, *, server: str, ca_pem: bytes, identity: IssuedCertificate, user: str
) -> None:
    """A kubeconfig (mode 0600) for ``server`` that authenticates with a client certificate."""
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "querywarden-test",
                        "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)},
                    }
                ],
                "users": [
                    {
                        "name": user,
                        "user": {
                            "client-certificate-data": _b64(identity.cert_file.read_bytes()),
                            "client-key-data": _b64(identity.key_file.read_bytes()),
                        },
                    }
                ],
                "contexts": [
                    {
                        "name": "querywarden-test",
                        "context": {"cluster": "querywarden-test", "user": user},
                    }
                ],
                "current-context": "querywarden-test",
            }
        )
    )
    path.chmod(0o600)


class LocalControlPlane:
    """etcd and kube-apiserver on free loopback ports, with a throwaway PKI, in ``workdir``.

    The flags are the ones envtest passes, plus what makes the API server a usable OIDC
    issuer for the gateway: the issuer is the API server's own URL, so its discovery
    document and JWKS are where a relying party looks for them.
    """

    def __init__(self, workdir: Path, *, service_account_issuer: str | None = None) -> None:
        """Prepare a control plane in ``workdir``.

        ``service_account_issuer`` defaults to the API server's own URL; another value
        (``https://kubernetes.default.svc.cluster.local``, as kind uses) makes it look
        like a cluster whose issuer this machine cannot reach.
        """
        self.workdir = workdir
        self.service_account_issuer = service_account_issuer
        self.processes: list[ManagedProcess] = []
        self.cluster: Cluster | None = None

    def start(self) -> Cluster:
        """Start etcd, then the API server; wait for /readyz; return the Cluster."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> Cluster:
        work = self.workdir
        work.mkdir(parents=True, exist_ok=True)
        pki = work / "pki"
        ca = CertificateAuthority(pki, "querywarden-test-cluster-ca")
        serving = ca.issue(
            "apiserver", common_name="kube-apiserver", hosts=API_SERVER_HOSTS, server=True
        )
        # system:masters bypasses RBAC, as the admin credentials of a new cluster do.
        admin = ca.issue(
            "admin",
            common_name="querywarden-test-admin",
            organizations=["system:masters"],
            client=True,
        )
        sa_key, sa_pub = write_service_account_key(pki)

        etcd_port, etcd_peer_port, api_port = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        etcd = ManagedProcess(
            "etcd",
            [
                tool("etcd"),
                "--name=default",
                f"--data-dir={work / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{etcd_peer_port}",
                # Test data is thrown away: durability only costs time.
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
            work / "etcd.log",
        )
        self.processes.append(etcd)
        etcd.wait_until(
            lambda: http_get(f"{etcd_url}/health").get("health") == "true",
            timeout=START_TIMEOUT,
            what="healthy",
        )

        server = f"https://127.0.0.1:{api_port}"
        apiserver = ManagedProcess(
            "kube-apiserver",
            [
                tool("kube-apiserver"),
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                # The `kubernetes` Service's endpoints would be 127.0.0.1, which the
                # reconciler refuses (since 1.37); no pod ever runs here to use them.
                "--endpoint-reconciler-type=none",
                f"--secure-port={api_port}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={serving.cert_file}",
                f"--tls-private-key-file={serving.key_file}",
                f"--client-ca-file={ca.cert_file}",
                f"--etcd-servers={etcd_url}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={self.service_account_issuer or server}",
                # Said explicitly: left alone, the API server advertises a JWKS URL built
                # from its external address, which need not be the one clients use.
                f"--service-account-jwks-uri={server}/openid/v1/jwks",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={sa_key}",
                # No controller manager creates the default service accounts this plugin
                # insists on, so without this no Pod could be created.
                "--disable-admission-plugins=ServiceAccount",
                "--allow-privileged=true",
                "--anonymous-auth=true",
            ],
            work / "kube-apiserver.log",
        )
        self.processes.append(apiserver)
        context = ssl.create_default_context(cafile=str(ca.cert_file))
        context.load_cert_chain(admin.cert_file, admin.key_file)
        apiserver.wait_until(
            lambda: http_get(f"{server}/readyz", context=context, raw=True) == b"ok",
            timeout=START_TIMEOUT,
            what="ready (/readyz)",
        )

        kubeconfig = work / "kubeconfig"
        write_kubeconfig(
            kubeconfig,
            server=server,
            ca_pem=ca.cert_pem,
            identity=admin,
            user="querywarden-test-admin",
        )
        cluster = Cluster.from_kubeconfig(str(kubeconfig), local=True)
        self.cluster = cluster
        cluster.ca_file = ca.cert_file
        bind_anonymous_discovery(cluster)
        return cluster

    def stop(self) -> None:
        """Stop the API server before etcd (it would only retry a vanished etcd)."""
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
        errors: list[BaseException] = []
        while self.processes:
            process = self.processes.pop()
            try:
                process.stop()
            except Exception as exc:  # stop the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]


#: Loopback requests must never go through a proxy the environment may name.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, *, context: ssl.SSLContext | None = None, raw: bool = False) -> Any:
    """GET ``url`` directly (never through a proxy): its JSON, or its bytes with ``raw``."""
    opener = _OPENER
    if context is not None:
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
    with opener.open(url, timeout=5) as response:
        body = response.read()
    return body if raw else json.loads(body)
