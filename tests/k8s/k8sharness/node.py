"""A real one-node Kubernetes cluster for the tests, inside a network namespace of its own.

Everything a user's cluster runs, from the same pinned ``k8s.io/kubernetes`` release as
the API server: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet
and kube-proxy; containerd and runc from Debian's packages; the CNI bridge plugin;
CoreDNS as a Deployment. Images are loaded into containerd from files (no registry).

The network: the harness creates a network namespace and runs every one of these
processes in it (``nsenter --net``, which leaves the mount namespace alone: the kubelet's
volume mounts must be visible to containerd and runc). A veth pair links it to the host
with a /30 of private addresses: the tests reach the API server at the node's address,
and the pods' /24 through a host route via the veth, as a machine on a cluster's network
would. The pod bridge (``cni0``) and every pod's traffic stay inside the namespace: it
has no default route out, only a route for the Service range onto the pod bridge (so
kube-proxy's DNAT sees locally made connections to a ClusterIP). Removing the namespace
removes all of it, the veth and its route too.

Not a production cluster: the kubelet trusts any client certificate the cluster CA
signed (authorization AlwaysAllow), runs with ``cgroupsPerQOS: false`` on this host's
cgroup v1, and the bridge plugin enforces no NetworkPolicy (docs/test-harness.md).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import secrets
import signal
import ssl
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from k8sharness.cluster import (
    API_SERVER_HOSTS,
    Cluster,
    KubeError,
    bind_anonymous_discovery,
    http_get,
    write_kubeconfig,
)
from k8sharness.pki import CertificateAuthority, IssuedCertificate, write_service_account_key
from k8sharness.processes import ManagedProcess
from k8sharness.tools import tool

NODE_NAME = "qw-node"
SERVICE_CIDR = "10.96.0.0/24"
#: The ``kubernetes`` Service's ClusterIP: the first address of the Service range.
API_SERVICE_IP = "10.96.0.1"
#: Where CoreDNS's Service sits (kubelet's ``clusterDNS``), as kubeadm places it.
DNS_SERVICE_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
#: The issuer of service-account tokens: what kind and kubeadm clusters use.
SERVICE_ACCOUNT_ISSUER = f"https://kubernetes.default.svc.{CLUSTER_DOMAIN}"
API_PORT = 6443
START_TIMEOUT = 180.0
CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
RUNC = "/usr/sbin/runc"
CNI_BIN_DIR = "/usr/lib/cni"
#: The pod sandbox image (scripts/build-node-images.sh makes it from catatonit).
PAUSE_IMAGE = "localhost/querywarden-pause:3.10"
COREDNS_IMAGE = "localhost/querywarden-coredns:dev"


class NodeError(RuntimeError):
    """The node could not be set up."""


def run(
    argv: Sequence[str | os.PathLike[str]], *, check: bool = True, timeout: float = 60.0
) -> str:
    """Run a set-up command; fail with its output."""
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise NodeError(
            f"{' '.join(str(a) for a in argv)} exited with {result.returncode}: "
            f"{result.stderr.strip() or result.stdout.strip()}"
        )
    return result.stdout


@dataclass(frozen=True)
class Addresses:
    """The /30 between the host and the node's namespace, and the pods' /24 behind it."""

    host: str
    node: str
    pod_cidr: str
    prefix: int = 30


class NodeNetwork:
    """A network namespace for the node, linked to the host by a veth pair.

    The names carry a random suffix, and the /30 is chosen among ``10.200.0.0/16`` so
    that it overlaps nothing the host has, so two harnesses can run side by side.
    """

    def __init__(self) -> None:
        suffix = secrets.token_hex(3)
        self.name = f"qwnode-{suffix}"
        self.host_link = f"qwh{suffix}"
        self.addresses = self._free_addresses()
        self.created = False

    @staticmethod
    def _free_addresses() -> Addresses:
        taken = [
            ipaddress.ip_network(word, strict=False)
            for line in [
                *run(["ip", "-o", "-4", "addr", "show"]).splitlines(),
                *run(["ip", "-4", "route", "show"]).splitlines(),
            ]
            for word in line.split()
            if re.fullmatch(r"\d+\.\d+\.\d+\.\d+/\d+", word)
        ]

        def free(candidates: list[str]) -> ipaddress.IPv4Network:
            random.shuffle(candidates)
            for candidate in candidates:
                net = ipaddress.IPv4Network(candidate)
                if not any(net.overlaps(other) for other in taken):
                    return net
            raise NodeError(f"no free network for the node among {candidates[0]}...")

        link = free([f"10.200.{i // 64}.{(i % 64) * 4}/30" for i in range(256 * 64)])
        pods = free([f"10.244.{i}.0/24" for i in range(256)])
        host, node = (str(a) for a in link.hosts())
        return Addresses(host, node, str(pods))

    def argv(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        """``argv`` run inside the namespace (network only; mounts are shared)."""
        return ["nsenter", f"--net=/run/netns/{self.name}", "--", *(str(a) for a in argv)]

    def inside(self, *argv: str, check: bool = True) -> str:
        """Run a command inside the namespace."""
        return run(self.argv(argv), check=check)

    def create(self) -> None:
        """Create the namespace, the veth pair and the dummy device for the Service range."""
        a = self.addresses
        run(["ip", "netns", "add", self.name])
        self.created = True
        run(["ip", "link", "add", self.host_link, "type", "veth", "peer", "name", "eth0",
             "netns", self.name])  # fmt: skip
        run(["ip", "addr", "add", f"{a.host}/{a.prefix}", "dev", self.host_link])
        run(["ip", "link", "set", self.host_link, "up"])
        # The tests reach pods directly, as from a machine on a cluster's network; the
        # route goes when the veth does.
        run(["ip", "route", "add", a.pod_cidr, "via", a.node, "dev", self.host_link])
        self.inside("ip", "addr", "add", f"{a.node}/{a.prefix}", "dev", "eth0")
        self.inside("ip", "link", "set", "eth0", "up")
        self.inside("ip", "link", "set", "lo", "up")
        # Connections the node itself makes to a ClusterIP need a route before kube-proxy's
        # DNAT rewrites them. The pod bridge gives one (the CNI bridge plugin adopts the
        # existing cni0): whatever is not rewritten finds no one there. (No dummy device:
        # this kernel has no dummy driver.)
        self.inside("ip", "link", "add", "cni0", "type", "bridge")
        self.inside("ip", "link", "set", "cni0", "up")
        self.inside("ip", "route", "add", SERVICE_CIDR, "dev", "cni0")
        for key, value in {
            "net/ipv4/ip_forward": "1",
            # Pod-to-Service-to-pod on one bridge: iptables must see bridged frames.
            "net/bridge/bridge-nf-call-iptables": "1",
            # kube-proxy's route_localnet for NodePorts on 127.0.0.1: not needed, left.
        }.items():
            self.inside("sh", "-c", f"echo {value} > /proc/sys/{key}")

    def remove(self) -> None:
        """Delete the namespace (its devices, bridge and routes go with it) and the veth."""
        if not self.created:
            return
        run(["ip", "link", "del", self.host_link], check=False)
        run(["ip", "netns", "del", self.name], check=False)
        self.created = False


class ContainerRuntime:
    """containerd with its CRI plugin, state under ``workdir``, in the node's namespace."""

    def __init__(self, workdir: Path, network: NodeNetwork) -> None:
        self.workdir = workdir
        self.network = network
        self.socket = workdir / "containerd.sock"
        self.cni_conf_dir = workdir / "cni" / "net.d"
        self.process: ManagedProcess | None = None

    def _config(self) -> str:
        w = self.workdir
        cri = {
            "sandbox_image": PAUSE_IMAGE,
            # Without it runc fails with "can't get final child's PID from pipe": the
            # kernel refuses the oom_score_adj containerd would otherwise set.
            "restrict_oom_score_adj": True,
            "disable_apparmor": True,
            "enable_selinux": False,
            "stream_server_address": "127.0.0.1",
            "stream_server_port": "0",
            # Pod network namespaces are pinned under our state directory, not under the
            # host's /var/run/netns, so teardown finds every one.
            "netns_mounts_under_state_dir": True,
            "containerd": {
                "snapshotter": "overlayfs",
                "default_runtime_name": "runc",
                "runtimes": {
                    "runc": {
                        "runtime_type": "io.containerd.runc.v2",
                        "options": {
                            "BinaryName": RUNC,
                            "SystemdCgroup": False,
                            "Root": str(w / "runc"),
                        },
                    }
                },
            },
            "cni": {"bin_dir": CNI_BIN_DIR, "conf_dir": str(self.cni_conf_dir)},
        }
        config = {
            "version": 2,
            "root": str(w / "root"),
            "state": str(w / "state"),
            "grpc": {"address": str(self.socket)},
            "ttrpc": {"address": str(w / "containerd.ttrpc.sock")},
            "debug": {"level": "warn"},
            "disabled_plugins": [
                "io.containerd.snapshotter.v1.aufs",
                "io.containerd.snapshotter.v1.btrfs",
                "io.containerd.snapshotter.v1.devmapper",
                "io.containerd.snapshotter.v1.zfs",
                "io.containerd.tracing.processor.v1.otlp",
                "io.containerd.internal.v1.tracing",
            ],
            "plugins": {
                "io.containerd.grpc.v1.cri": cri,
                "io.containerd.internal.v1.opt": {"path": str(w / "opt")},
            },
        }
        return _toml(config)

    def _cni_config(self) -> dict[str, Any]:
        pod_cidr = self.network.addresses.pod_cidr
        gateway = str(next(ipaddress.ip_network(pod_cidr).hosts()))
        return {
            "cniVersion": "1.0.0",
            "name": "querywarden-node",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": True,
                    # A pod reaching itself through its own Service comes back on its port.
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": pod_cidr, "gateway": gateway}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.workdir / "cni" / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    def start(self) -> None:
        """Write the configuration and start containerd; wait for its socket."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cni_conf_dir.mkdir(parents=True, exist_ok=True)
        (self.cni_conf_dir / "10-querywarden.conflist").write_text(
            json.dumps(self._cni_config(), indent=2)
        )
        config = self.workdir / "config.toml"
        config.write_text(self._config())
        self.process = ManagedProcess(
            "containerd",
            self.network.argv([CONTAINERD, "--config", config]),
            self.workdir / "containerd.log",
        )
        self.process.wait_until(
            lambda: self.ctr("version", check=False).startswith("Client"),
            timeout=60,
            what="serving its socket",
        )

    def ctr(self, *args: str, check: bool = True, timeout: float = 120.0) -> str:
        """Run ``ctr`` against this containerd, in the CRI's ``k8s.io`` namespace."""
        return run([CTR, "--address", str(self.socket), "-n", "k8s.io", *args],
                   check=check, timeout=timeout)  # fmt: skip

    def import_image(self, archive: Path) -> None:
        """Load an image archive (``podman save``) as the kubelet will look it up."""
        self.ctr("images", "import", "--no-unpack=false", "--snapshotter", "overlayfs",
                 str(archive), timeout=300)  # fmt: skip

    def kill_all(self) -> None:
        """SIGKILL every container (see :func:`kill_containers`)."""
        kill_containers(self.workdir)

    def stop(self) -> None:
        """Stop containerd, then the shims it started (each in a session of its own)."""
        if self.process is not None:
            self.process.stop()
        address = str(self.socket)
        for pid in _pids_with_argument(address):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@dataclass
class NodeCertificates:
    """The cluster's CA and every identity the node's components present."""

    ca: CertificateAuthority
    apiserver: IssuedCertificate
    admin: IssuedCertificate
    kubelet_client: IssuedCertificate  # the API server, when it calls the kubelet
    kubelet_serving: IssuedCertificate
    kubelet: IssuedCertificate  # the kubelet, when it calls the API server
    controller_manager: IssuedCertificate
    scheduler: IssuedCertificate
    proxy: IssuedCertificate
    sa_key: Path
    sa_pub: Path

    @classmethod
    def issue(cls, directory: Path, node_ip: str) -> NodeCertificates:
        """A fresh CA and the certificates the default RBAC bindings expect."""
        ca = CertificateAuthority(directory, "querywarden-test-node-ca")
        sa_key, sa_pub = write_service_account_key(directory)
        return cls(
            ca=ca,
            apiserver=ca.issue(
                "apiserver",
                common_name="kube-apiserver",
                hosts=(*API_SERVER_HOSTS, node_ip, API_SERVICE_IP),
                server=True,
            ),
            admin=ca.issue(
                "admin",
                common_name="querywarden-test-admin",
                organizations=["system:masters"],
                client=True,
            ),
            kubelet_client=ca.issue(
                "apiserver-kubelet-client",
                common_name="kube-apiserver-kubelet-client",
                organizations=["system:masters"],
                client=True,
            ),
            kubelet_serving=ca.issue(
                "kubelet-serving", common_name=NODE_NAME, hosts=(node_ip, NODE_NAME), server=True
            ),
            kubelet=ca.issue(
                "kubelet",
                common_name=f"system:node:{NODE_NAME}",
                organizations=["system:nodes"],
                client=True,
            ),
            controller_manager=ca.issue(
                "controller-manager", common_name="system:kube-controller-manager", client=True
            ),
            scheduler=ca.issue("scheduler", common_name="system:kube-scheduler", client=True),
            proxy=ca.issue("kube-proxy", common_name="system:kube-proxy", client=True),
            sa_key=sa_key,
            sa_pub=sa_pub,
        )


class Node:
    """The whole one-node cluster: start it, get a Cluster, stop it and leave nothing."""

    def __init__(self, workdir: Path, images: Iterable[Path], *, dns: bool = True) -> None:
        self.workdir = workdir
        self.dns = dns
        self.image_archives = list(images)
        self.network = NodeNetwork()
        self.runtime = ContainerRuntime(workdir / "containerd", self.network)
        self.processes: list[ManagedProcess] = []
        self.cluster: Cluster | None = None
        #: How long each start-up step took, in seconds (docs/test-harness.md).
        self.timings: dict[str, float] = {}

    @property
    def node_ip(self) -> str:
        """The node's address: the API server and the kubelet listen there."""
        return self.network.addresses.node

    def start(self) -> Cluster:
        """Bring up everything; return the Cluster once the node is Ready and DNS runs."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _timed(self, what: str, since: float) -> float:
        now = time.monotonic()
        self.timings[what] = round(now - since, 1)
        return now

    def _start(self) -> Cluster:
        t = time.monotonic()
        sweep_abandoned()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._claim()
        self.network.create()
        certs = NodeCertificates.issue(self.workdir / "pki", self.node_ip)
        t = self._timed("network and certificates", t)
        self.runtime.start()
        for archive in self.image_archives:
            self.runtime.import_image(archive)
        t = self._timed("containerd and images", t)
        cluster = self._start_control_plane(certs)
        t = self._timed("control plane", t)
        self._start_node_agents(certs)
        self._wait_node_ready(cluster)
        t = self._timed("kubelet Ready", t)
        if self.dns:
            self._deploy_dns(cluster)
            self._timed("DNS", t)
        return cluster

    def _spawn(self, name: str, argv: Sequence[str | os.PathLike[str]]) -> ManagedProcess:
        process = ManagedProcess(name, self.network.argv(argv), self.workdir / f"{name}.log")
        self.processes.append(process)
        return process

    def _kubeconfig(self, name: str, certs: NodeCertificates, identity: IssuedCertificate) -> Path:
        path = self.workdir / f"{name}.kubeconfig"
        write_kubeconfig(
            path,
            server=f"https://{self.node_ip}:{API_PORT}",
            ca_pem=certs.ca.cert_pem,
            identity=identity,
            user=name,
        )
        return path

    def _start_control_plane(self, certs: NodeCertificates) -> Cluster:
        work = self.workdir
        etcd = self._spawn(
            "etcd",
            [
                tool("etcd"),
                "--name=default",
                f"--data-dir={work / 'etcd'}",
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=default=http://127.0.0.1:2380",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        etcd.wait_until(
            lambda: (
                "true"
                in self.network.inside(
                    "curl", "-s", "--noproxy", "*", "http://127.0.0.1:2379/health", check=False
                )
            ),
            timeout=START_TIMEOUT,
            what="healthy",
        )
        apiserver = self._spawn(
            "kube-apiserver",
            [
                tool("kube-apiserver"),
                "--bind-address=0.0.0.0",
                f"--advertise-address={self.node_ip}",
                f"--secure-port={API_PORT}",
                f"--cert-dir={work / 'pki'}",
                f"--tls-cert-file={certs.apiserver.cert_file}",
                f"--tls-private-key-file={certs.apiserver.key_file}",
                f"--client-ca-file={certs.ca.cert_file}",
                f"--kubelet-client-certificate={certs.kubelet_client.cert_file}",
                f"--kubelet-client-key={certs.kubelet_client.key_file}",
                f"--kubelet-certificate-authority={certs.ca.cert_file}",
                "--kubelet-preferred-address-types=InternalIP",
                "--etcd-servers=http://127.0.0.1:2379",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-jwks-uri=https://{self.node_ip}:{API_PORT}/openid/v1/jwks",
                f"--service-account-key-file={certs.sa_pub}",
                f"--service-account-signing-key-file={certs.sa_key}",
                "--allow-privileged=true",
                "--anonymous-auth=true",
            ],
        )
        context = ssl.create_default_context(cafile=str(certs.ca.cert_file))
        context.load_cert_chain(certs.admin.cert_file, certs.admin.key_file)
        server = f"https://{self.node_ip}:{API_PORT}"
        apiserver.wait_until(
            lambda: http_get(f"{server}/readyz", context=context, raw=True) == b"ok",
            timeout=START_TIMEOUT,
            what="ready (/readyz)",
        )
        kubeconfig = self._kubeconfig("admin", certs, certs.admin)
        cluster = Cluster.from_kubeconfig(str(kubeconfig), local=True)
        cluster.ca_file = certs.ca.cert_file
        self.cluster = cluster
        bind_anonymous_discovery(cluster)
        controller_kubeconfig = self._kubeconfig(
            "controller-manager", certs, certs.controller_manager
        )
        self._spawn(
            "kube-controller-manager",
            [
                tool("kube-controller-manager"),
                f"--kubeconfig={controller_kubeconfig}",
                "--bind-address=127.0.0.1",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={certs.sa_key}",
                f"--root-ca-file={certs.ca.cert_file}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--cluster-cidr={self.network.addresses.pod_cidr}",
                "--allocate-node-cidrs=false",
                # Terminated pods are collected at once: tests delete and recreate pods.
                "--terminated-pod-gc-threshold=10",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                tool("kube-scheduler"),
                f"--kubeconfig={self._kubeconfig('scheduler', certs, certs.scheduler)}",
                "--bind-address=127.0.0.1",
                "--leader-elect=false",
            ],
        )
        return cluster

    def _start_node_agents(self, certs: NodeCertificates) -> None:
        work = self.workdir
        resolv = work / "resolv.conf"
        # What pods with dnsPolicy Default (CoreDNS itself) get: nothing resolves beyond
        # the cluster, as nothing is reachable beyond it.
        resolv.write_text("nameserver 127.0.0.1\n")
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": "0.0.0.0",
            "readOnlyPort": 0,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(certs.ca.cert_file)},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "tlsCertFile": str(certs.kubelet_serving.cert_file),
            "tlsPrivateKeyFile": str(certs.kubelet_serving.key_file),
            "containerRuntimeEndpoint": f"unix://{self.runtime.socket}",
            # cgroup v1 hybrid here: cgroupfs (runc), and no QoS hierarchy to manage.
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failSwapOn": False,
            "clusterDNS": [DNS_SERVICE_IP],
            "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(resolv),
            "podLogsDir": str(work / "pod-logs"),
            # A shared test machine's disk is not the node's to police.
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            # ConfigMap volumes follow edits within seconds (a cluster's default is 1m).
            "syncFrequency": "5s",
            "rotateCertificates": False,
            "serializeImagePulls": False,
        }
        config_file = work / "kubelet.yaml"
        config_file.write_text(yaml.safe_dump(config))
        self._spawn(
            "kubelet",
            [
                tool("kubelet"),
                f"--config={config_file}",
                f"--kubeconfig={self._kubeconfig('kubelet', certs, certs.kubelet)}",
                f"--node-ip={self.node_ip}",
                f"--hostname-override={NODE_NAME}",
                f"--root-dir={work / 'kubelet'}",
                "--v=1",
            ],
        )
        proxy_config = work / "kube-proxy.yaml"
        proxy_config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "mode": "iptables",
                    "clusterCIDR": self.network.addresses.pod_cidr,
                    "hostnameOverride": NODE_NAME,
                    "clientConnection": {
                        "kubeconfig": str(self._kubeconfig("kube-proxy", certs, certs.proxy))
                    },
                    # Pod to Service back to a pod on the same bridge: SNAT keeps the reply
                    # on the path the DNAT knows.
                    "iptables": {"masqueradeAll": True},
                    # Leave the host's conntrack table size alone.
                    "conntrack": {"maxPerCore": 0},
                    "metricsBindAddress": "127.0.0.1:10249",
                    "healthzBindAddress": "127.0.0.1:10256",
                }
            )
        )
        self._spawn("kube-proxy", [tool("kube-proxy"), f"--config={proxy_config}"])

    def _wait_node_ready(self, cluster: Cluster) -> None:
        kubelet = next(p for p in self.processes if p.name == "kubelet")

        def ready() -> bool:
            try:
                node = cluster.get(f"/api/v1/nodes/{NODE_NAME}")
            except KubeError as exc:
                if exc.status == 404:  # not registered yet
                    return False
                raise
            return any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in node.get("status", {}).get("conditions", [])
            )

        kubelet.wait_until(ready, timeout=START_TIMEOUT, what="Ready", interval=1.0)
        # Pods can be created once the controllers have made the namespace's account.
        cluster.wait_for(
            lambda: cluster.get("/api/v1/namespaces/default/serviceaccounts/default"),
            timeout=START_TIMEOUT,
            what="the default ServiceAccount",
        )

    def _deploy_dns(self, cluster: Cluster) -> None:
        """CoreDNS in kube-system, as kubeadm deploys it, at ``DNS_SERVICE_IP``."""
        corefile = (
            ".:53 {\n"
            "    errors\n"
            "    health\n"
            "    ready\n"
            f"    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{\n"
            "        pods insecure\n"
            "        fallthrough in-addr.arpa ip6.arpa\n"
            "    }\n"
            "    cache 30\n"
            "    loop\n"
            "    reload\n"
            "    loadbalance\n"
            "}\n"
        )
        manifests = render_dns_manifests(corefile)
        cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(manifests))
        cluster.kubectl(
            "-n", "kube-system", "rollout", "status", "deployment/coredns", "--timeout=120s"
        )

    def stop(self) -> None:
        """Tear down in reverse, and leave no process, mount or namespace behind."""
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
        errors: list[BaseException] = []
        kubelet = [p for p in self.processes if p.name == "kubelet"]
        for process in kubelet:
            self.processes.remove(process)
            _collect(errors, process.stop)
        _collect(errors, self.runtime.kill_all)
        _collect(errors, self.runtime.stop)
        while self.processes:
            _collect(errors, self.processes.pop().stop)
        _collect(errors, lambda: unmount_under(self.workdir))
        _collect(errors, self.network.remove)
        if not errors:
            (OWNERS / f"{self.network.name}.json").unlink(missing_ok=True)
        if errors:
            raise errors[0]

    def _claim(self) -> None:
        """Record who runs this node, so a later run can clean up if we are killed."""
        OWNERS.mkdir(parents=True, exist_ok=True)
        (OWNERS / f"{self.network.name}.json").write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "netns": self.network.name,
                    "host_link": self.network.host_link,
                    "workdir": str(self.workdir),
                }
            )
        )

    def logs(self, name: str, lines: int = 60) -> str:
        """The last lines of a component's log (``kubelet``, ``containerd``, ...)."""
        log = self.workdir / f"{name}.log"
        if name == "containerd":
            log = self.runtime.workdir / "containerd.log"
        try:
            return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def render_dns_manifests(corefile: str) -> list[dict[str, Any]]:
    """The CoreDNS objects kubeadm creates, trimmed to what one node needs."""
    labels = {"k8s-app": "kube-dns"}
    meta = {"namespace": "kube-system"}
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "coredns", **meta},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:coredns",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", **meta}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "coredns", **meta},
            "data": {"Corefile": corefile},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "coredns", "labels": labels, **meta},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "dnsPolicy": "Default",
                        "containers": [
                            {
                                "name": "coredns",
                                "image": COREDNS_IMAGE,
                                "imagePullPolicy": "Never",
                                "args": ["-conf", "/etc/coredns/Corefile"],
                                "ports": [
                                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                    {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                                ],
                                "securityContext": {
                                    "allowPrivilegeEscalation": False,
                                    "capabilities": {
                                        "add": ["NET_BIND_SERVICE"],
                                        "drop": ["ALL"],
                                    },
                                    "readOnlyRootFilesystem": True,
                                },
                                "readinessProbe": {
                                    "httpGet": {"path": "/ready", "port": 8181},
                                    "periodSeconds": 2,
                                },
                                "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}],
                            }
                        ],
                        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kube-dns", "labels": labels, **meta},
            "spec": {
                "selector": labels,
                "clusterIP": DNS_SERVICE_IP,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                ],
            },
        },
    ]


#: One file per running node: whose it is and what it holds (``Node._claim``).
OWNERS = Path("/run/querywarden-test-nodes")


def sweep_abandoned() -> None:
    """Tear down what nodes of killed test runs left: their processes, mounts, namespace.

    A run stopped by SIGKILL (a CI timeout) cannot clean up after itself; its containers
    would keep running and its network namespace stay. A node whose owner is gone is
    taken apart here, before a new one starts.
    """
    if not OWNERS.is_dir():
        return
    for claim in OWNERS.glob("*.json"):
        try:
            owner = json.loads(claim.read_text())
        except (OSError, ValueError):
            continue
        if Path(f"/proc/{owner.get('pid')}").exists():
            continue  # alive: someone else's running node
        workdir = Path(str(owner["workdir"]))
        kill_containers(workdir / "containerd")  # first: nothing restarts them after
        netns = str(owner["netns"])
        for pid in run(["ip", "netns", "pids", netns], check=False).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.5)
        unmount_under(workdir)
        run(["ip", "link", "del", str(owner["host_link"])], check=False)
        run(["ip", "netns", "del", netns], check=False)
        claim.unlink(missing_ok=True)


def kill_containers(runtime_dir: Path) -> None:
    """SIGKILL every container runc runs for the containerd in ``runtime_dir``.

    From runc's own state files (its root is ours, see ``ContainerRuntime``), so it works
    whether containerd still runs or not. Killing a container's first process ends its
    PID namespace, and every process in it.
    """
    for state in runtime_dir.glob("runc/*/*/state.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, ProcessLookupError):
            os.kill(int(json.loads(state.read_text())["init_process_pid"]), signal.SIGKILL)


def unmount_under(directory: Path) -> None:
    """Lazily unmount everything mounted below ``directory`` (deepest first)."""
    prefix = str(directory.resolve()) + "/"
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for target in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True, check=False)


def _pids_with_argument(argument: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argument.encode() in argv:
            found.append(int(entry.name))
    return found


def _collect(errors: list[BaseException], step: Any) -> None:
    try:
        step()
    except Exception as exc:  # keep tearing down; report the first failure
        errors.append(exc)


def _toml(document: dict[str, Any]) -> str:
    """Just enough TOML for containerd's configuration: tables, strings, bools, lists."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"no TOML for {v!r}")

    def table(path: list[str], body: dict[str, Any]) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict)}
        if path:
            lines.append("[" + ".".join(json.dumps(p) if "." in p else p for p in path) + "]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        lines.append("")
        for k, v in body.items():
            if isinstance(v, dict):
                table([*path, k], v)

    table([], document)
    return "\n".join(lines)
