"""Helpers for the operator's tests: its CRD, policies, and the operator in the test process.

The harness runs no kubelet, so the operator's Deployment from the chart never starts.
Instead the operator runs in a thread of the test process (``run_operator``, the same
entry point as ``querywarden operator``), logged in as the chart's ServiceAccount, so
the chart's RBAC is what it gets; its webhook listens on a loopback HTTPS address that
the chart's webhook configuration names (``webhook.url``).
"""

from __future__ import annotations

import base64
import datetime
import gc
import secrets
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from image_harness import container, readable_by_image, wait_until_serving
from k8sharness.cluster import NAMESPACE_LABEL, Cluster, KubeError
from k8sharness.helm import Helm
from k8sharness.pki import CertificateAuthority
from k8sharness.processes import free_port
from k8sharness.tools import REPO
from querywarden_operator import OperatorConfig, run_operator
from querywarden_operator.spec import API_VERSION, CRD_NAME, GROUP, KIND, PLURAL, VERSION

T = TypeVar("T")

CRD_FILE = REPO / "crds" / "databaseaccesspolicies.yaml"
CHART = REPO / "charts" / "querywarden"
EXAMPLE_POLICY = CHART / "examples" / "databaseaccesspolicy.yaml"
#: Never pulled: no kubelet runs.
SIDECAR_IMAGE = "registry.invalid/querywarden:test"
RELEASE = "qw"


def wait_until(fetch: Callable[[], T | None], *, timeout: float = 30.0, what: str) -> T:
    """Poll ``fetch`` until it returns something other than None (or False)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            found = fetch()
        except (KubeError, AssertionError, KeyError) as exc:
            last_error = exc
            found = None
        if found is not None and found is not False:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f}s (last error: {last_error})")
        time.sleep(0.2)


def renewed_certificate(k8s: Cluster, policy_path: str, secret_path: str) -> dict[str, Any]:
    """Put a policy's issued certificate inside its renewal window; the renewed Secret.

    The status is patched as if the certificate had been issued long ago (expiring a day
    inside the window), and the operator's resync issues a new one into the Secret.
    """
    from querywarden_operator.certificates import RENEW_BEFORE

    issued = k8s.get(secret_path)["data"]["tls.crt"]
    soon = datetime.datetime.now(datetime.UTC) + RENEW_BEFORE - datetime.timedelta(days=1)
    k8s.request(
        "PATCH", f"{policy_path}/status",
        {"status": {"certificateNotAfter": soon.strftime("%Y-%m-%dT%H:%M:%SZ")}},
        content_type="application/merge-patch+json",
    )  # fmt: skip
    renewed: dict[str, Any] = wait_until(
        lambda: (s := k8s.get(secret_path))["data"]["tls.crt"] != issued and s,
        what="the renewed certificate",
    )
    return renewed


def apply_crd(k8s: Cluster) -> None:
    """Apply the committed CRD and wait until the API server serves the resource.

    Like Helm, the tests never delete it: the local cluster is thrown away, and on a
    shared one ``kubectl delete crd databaseaccesspolicies.querywarden.io`` removes it.
    """
    k8s.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    k8s.wait_established(CRD_NAME)
    k8s.wait_for(
        lambda: k8s.get(f"/apis/{GROUP}/{VERSION}").get("resources") or None,
        what=f"{GROUP}/{VERSION} in discovery",
    )


def policies(namespace: str) -> str:
    """The REST path of the policies of a namespace."""
    return f"/apis/{API_VERSION}/namespaces/{namespace}/{PLURAL}"


def policy(name: str, spec: Mapping[str, Any], **metadata: Any) -> dict[str, Any]:
    """A DatabaseAccessPolicy manifest."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, **metadata},
        "spec": dict(spec),
    }


def minimal_spec(labels: Mapping[str, str] | None = None, **sidecar: Any) -> dict[str, Any]:
    """The smallest valid spec: a selector, credentials, plaintext (no TLS Secret)."""
    return {
        "target": {
            "podSelector": {"matchLabels": dict(labels or {"app": "db"})},
            "credentials": {"secretName": "db-gateway"},
        },
        "sidecar": {"plaintext": "always", **sidecar},
    }


def create_namespace(k8s: Cluster, prefix: str = "qw-op") -> str:
    """A fresh labelled namespace (the caller deletes it)."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    k8s.create_namespace(name, {NAMESPACE_LABEL: name})
    return name


def create_secret(
    k8s: Cluster,
    namespace: str,
    name: str,
    data: Mapping[str, str | bytes],
    *,
    type_: str = "Opaque",
) -> Any:
    """A Secret with ``data`` (values encoded here)."""
    encoded = {
        key: base64.b64encode(value.encode() if isinstance(value, str) else value).decode()
        for key, value in data.items()
    }
    return k8s.create(
        f"/api/v1/namespaces/{namespace}/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "type": type_,
            "data": encoded,
        },
    )


def pod(name: str, labels: Mapping[str, str], **spec: Any) -> dict[str, Any]:
    """A database-looking Pod (never started: no kubelet)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {
            "containers": [
                {
                    "name": "postgres",
                    "image": "registry.invalid/postgres:17",
                    "ports": [{"containerPort": 5432}],
                }
            ],
            "automountServiceAccountToken": False,
            **spec,
        },
    }


def condition(obj: Mapping[str, Any], type_: str) -> dict[str, Any] | None:
    """One condition of an object's status, or None."""
    for item in (obj.get("status") or {}).get("conditions") or []:
        if item.get("type") == type_:
            return dict(item)
    return None


def bind_cluster_role(
    k8s: Cluster,
    namespace: str,
    name: str,
    cluster_role: str,
    *,
    users: Sequence[str] = (),
    service_accounts: Sequence[str] = (),
) -> None:
    """A RoleBinding of ``cluster_role`` in ``namespace`` to users and ServiceAccounts of it."""
    subjects: list[dict[str, str]] = [
        {"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"} for user in users
    ]
    subjects += [
        {"kind": "ServiceAccount", "name": account, "namespace": namespace}
        for account in service_accounts
    ]
    k8s.create(
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": cluster_role,
            },
            "subjects": subjects,
        },
    )


def service_account_kubeconfig(k8s: Cluster, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as a ServiceAccount (a TokenRequest token)."""
    answer = k8s.create(
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        },
    )
    cluster: dict[str, Any] = {"server": k8s.server}
    if k8s.ca_file is not None:
        cluster["certificate-authority-data"] = base64.b64encode(k8s.ca_file.read_bytes()).decode()
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": cluster}],
                "users": [{"name": account, "user": {"token": answer["status"]["token"]}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": account}}],
                "current-context": "test",
            }
        )
    )
    path.chmod(0o600)
    return path


class OperatorThread:
    """``run_operator`` in a background thread, stopped through its stop flag."""

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="querywarden-operator", daemon=True)

    def _run(self) -> None:
        try:
            run_operator(self.config, stop_flag=self.stop_flag, ready_flag=self.ready_flag)
        except BaseException as exc:
            self.error = exc

    def start(self, timeout: float = 60.0) -> OperatorThread:
        """Start and wait until kopf is up (its startup handlers ran)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.ready_flag.wait(0.2):
            if not self._thread.is_alive():
                raise RuntimeError(f"the operator exited while starting: {self.error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("the operator did not start")
        return self

    def stop(self) -> None:
        """Stop and wait for the thread (kopf cancels its tasks gracefully)."""
        self.stop_flag.set()
        self._thread.join(60)
        if self._thread.is_alive():
            raise RuntimeError("the operator thread did not stop")
        # kopf's HTTP client can leave a connection to the API server for the garbage
        # collector once its loop is gone. Collected here, where a stopped operator's
        # leftovers are expected, not at some later test's setup, where pytest would
        # report the ResourceWarning against that unrelated test.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()

    @property
    def alive(self) -> bool:
        """Whether the operator still runs."""
        return self._thread.is_alive()


class OperatorContainer:
    """``querywarden operator`` in the built image, as the chart's Deployment runs it.

    The same settings as :class:`OperatorThread`, given as the environment the chart sets
    (``QUERYWARDEN_OPERATOR_*``); the files they name (kubeconfig, webhook certificate) are
    mounted read-only at the same paths, owned by the image's user. The container shares
    the host's network, so the API server and the webhook stay on loopback.
    """

    def __init__(self, config: OperatorConfig, image: str) -> None:
        self.config = config
        self.image = image
        self.error: BaseException | None = None
        self._health_port = free_port()
        self._container: ExitStack | None = None
        self._running: Any = None

    @classmethod
    def factory(cls, image: str) -> Callable[[OperatorConfig], OperatorContainer]:
        """A runner for :func:`installed_operator` that uses ``image``."""
        return lambda config: cls(config, image)

    def environment(self) -> dict[str, str]:
        """The settings as environment variables, as the chart's Deployment gives them."""
        env: dict[str, str] = {}
        for name, value in self.config.model_dump(exclude_defaults=True).items():
            if value is None:
                continue
            env[f"QUERYWARDEN_OPERATOR_{name.upper()}"] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
        env["QUERYWARDEN_OPERATOR_LIVENESS_ENDPOINT"] = (
            f"http://127.0.0.1:{self._health_port}/healthz"
        )
        return env

    def start(self, timeout: float = 90.0) -> OperatorContainer:
        """Start the container and wait until its liveness endpoint answers."""
        files = [
            path
            for path in (
                self.config.kubeconfig,
                self.config.webhook_cert_file,
                self.config.webhook_key_file,
            )
            if path is not None
        ]
        readable_by_image(*files)
        stack = ExitStack()
        self._running = stack.enter_context(
            container(
                self.image,
                ["--log-level", "INFO", "operator"],
                volumes=[(path, str(path), "ro") for path in files],
                env=self.environment(),
            )
        )
        self._container = stack
        try:
            wait_until_serving(self._running, self._healthy, timeout=timeout)
        except BaseException:
            stack.close()
            raise
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self._health_port}/healthz", timeout=2
            ) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        """Stop and remove the container (its logs are gone with it)."""
        if self._container is not None:
            self._container.close()
            self._container = None

    def logs(self) -> str:
        """What the operator printed so far."""
        return str(self._running.logs()) if self._running is not None else ""

    @property
    def alive(self) -> bool:
        """Whether the container still runs."""
        return self._running is not None and bool(self._running.running())


@dataclass
class InstalledOperator:
    """The chart installed in ``namespace``, and the operator serving it in-process."""

    k8s: Cluster
    namespace: str
    release: str
    webhook_configuration: str
    peering: str
    service_account: str
    operator: OperatorThread | OperatorContainer
    webhook_ca: CertificateAuthority

    def webhook_names(self) -> list[str]:
        """The entries of the release's MutatingWebhookConfiguration."""
        config = self.k8s.get(
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/"
            + self.webhook_configuration
        )
        return [w["name"] for w in config.get("webhooks") or []]

    def wait_for_webhook(self, namespace: str, probe: Mapping[str, Any]) -> dict[str, Any]:
        """Wait until the API server calls the webhook for ``probe`` (a dry-run create).

        A new webhook entry reaches the API server's admission chain asynchronously;
        a dry run calls webhooks (they declare no side effects) and stores nothing.
        """

        def injected() -> dict[str, Any] | None:
            created = self.k8s.request(
                "POST", f"/api/v1/namespaces/{namespace}/pods", dict(probe), query={"dryRun": "All"}
            )
            annotations = created["metadata"].get("annotations") or {}
            return created if annotations.get(f"{GROUP}/status") == "injected" else None

        return wait_until(injected, what="the API server calling the policy's webhook")


def webhook_tls(workdir: Path, host: str) -> tuple[CertificateAuthority, Path, Path]:
    """A CA and a serving certificate for the in-process webhook at ``host``."""
    ca = CertificateAuthority(workdir, "querywarden-test-operator-webhook-ca")
    issued = ca.issue("webhook", common_name=host, hosts=[host], server=True)
    return ca, issued.cert_file, issued.key_file


@contextmanager
def installed_operator(
    k8s: Cluster,
    helm: Helm,
    workdir: Path,
    *,
    host: str = "127.0.0.1",
    resync_interval: float = 1.0,
    otlp_endpoint: str | None = None,
    extra_values: Mapping[str, str] | None = None,
    runner: Callable[[OperatorConfig], OperatorThread | OperatorContainer] = OperatorThread,
    sidecar_image: str = SIDECAR_IMAGE,
    config_changes: Mapping[str, Any] | None = None,
) -> Iterator[InstalledOperator]:
    """``helm install`` the chart, then run the operator as its ServiceAccount.

    ``runner`` runs it: in-process (:class:`OperatorThread`) or in the built image
    (``OperatorContainer.factory(image)``). ``config_changes``: more operator settings
    (``OperatorConfig`` fields), as the chart's values would set them.
    """
    apply_crd(k8s)
    namespace = create_namespace(k8s, "qw-system")
    workdir.mkdir(parents=True, exist_ok=True)
    ca, cert_file, key_file = webhook_tls(workdir / "webhook-pki", host)
    port = free_port(host)
    values = {
        "webhook.url": f"https://{host}:{port}/inject",
        "webhook.caBundle": base64.b64encode(ca.cert_pem).decode(),
        "image.repository": sidecar_image.rsplit(":", 1)[0],
        "image.tag": sidecar_image.rsplit(":", 1)[1],
        # Reviews (the chart's default) install a cluster-wide CRD and the fixed-name
        # approver ClusterRole, which one test cluster can hold for one release only:
        # the tests of reviews turn them on (and apply the CRD themselves).
        "reviews.enabled": "false",
        **(extra_values or {}),
    }
    args = [f"{key}={value}" for key, value in values.items()]
    helm("install", RELEASE, str(CHART), "--namespace", namespace, "--wait=false",
         *[item for arg in args for item in ("--set", arg)])  # fmt: skip
    fullname = f"{RELEASE}-querywarden"
    cluster_name = f"{fullname}-{namespace}"
    kubeconfig = service_account_kubeconfig(k8s, namespace, fullname, workdir / "kubeconfig")
    config = OperatorConfig(
        namespace=namespace,
        kubeconfig=kubeconfig,
        sidecar_image=sidecar_image,
        otlp_endpoint=otlp_endpoint,
        webhook_configuration=cluster_name,
        webhook_host=host,
        webhook_port=port,
        webhook_cert_file=cert_file,
        webhook_key_file=key_file,
        peering_name=cluster_name,
        resync_interval=resync_interval,
        # What the chart's Deployment sets from reviews.enabled.
        reviews=values.get("reviews.enabled") == "true",
        sidecar_cluster_role=(
            f"{cluster_name}-sidecar"
            if values.get("reviews.enabled") == "true"
            and values.get("reviews.bindSidecars", "true") == "true"
            else None
        ),
        **(config_changes or {}),
    )
    operator = runner(config).start()
    try:
        yield InstalledOperator(
            k8s=k8s,
            namespace=namespace,
            release=RELEASE,
            webhook_configuration=cluster_name,
            peering=cluster_name,
            service_account=fullname,
            operator=operator,
            webhook_ca=ca,
        )
    finally:
        try:
            operator.stop()
        finally:
            helm("uninstall", RELEASE, "--namespace", namespace, check=False)
            k8s.delete(f"/api/v1/namespaces/{namespace}")
