#!/usr/bin/env bash
# Installs the system packages querywarden's demo, tests and benchmark need, when missing:
# PostgreSQL server binaries and clients (psql, pgbench) from Debian's packages, and
# pgbouncer for the benchmark (pass --bench), podman and mmdebstrap for the image (--image),
# and what the test node runs besides the Kubernetes binaries (--node): containerd, the CNI
# plugins, catatonit (the pause image), iptables and conntrack (kube-proxy); Chromium and
# its WebDriver for the approvals console's browser tests (--browser).
# Flags combine (--image --node). Idempotent; prints nothing when all is there.
set -euo pipefail

bench="" image="" node="" browser=""
for flag in "$@"; do
  case $flag in
  --bench) bench=1 ;;
  --image) image=1 ;;
  --node) node=1 ;;
  --browser) browser=1 ;;
  *) echo "ensure-system-deps: unknown flag $flag (expected --bench, --image, --node, --browser)" >&2; exit 2 ;;
  esac
done

need=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  need+=(postgresql postgresql-contrib)
fi
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
if ! command -v pgbench >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1; then
  need+=(postgresql-contrib)
fi
if [[ -n $bench ]] && ! command -v pgbouncer >/dev/null 2>&1 && [[ ! -x /usr/sbin/pgbouncer ]]; then
  need+=(pgbouncer)
fi
if [[ -n $image ]]; then
  # The container image: podman builds and runs it; mmdebstrap makes its base where no
  # registry serves python:3.11-slim; runc runs it on cgroup v1 hosts (crun refuses them).
  command -v podman >/dev/null 2>&1 || need+=(podman)
  command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
  command -v runc >/dev/null 2>&1 || [[ -x /usr/sbin/runc ]] || need+=(runc)
  # setcap: the node's CoreDNS image gives its binary cap_net_bind_service (build-node-images.sh).
  command -v setcap >/dev/null 2>&1 || [[ -x /usr/sbin/setcap ]] || need+=(libcap2-bin)
fi
if [[ -n $node ]]; then
  command -v containerd >/dev/null 2>&1 || need+=(containerd)
  [[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/portmap ]] \
    || need+=(containernetworking-plugins)
  [[ -x /usr/bin/catatonit ]] || need+=(catatonit)
  command -v iptables >/dev/null 2>&1 || [[ -x /usr/sbin/iptables ]] || need+=(iptables)
  command -v conntrack >/dev/null 2>&1 || [[ -x /usr/sbin/conntrack ]] || need+=(conntrack)
  command -v curl >/dev/null 2>&1 || need+=(curl)
fi
if [[ -n $browser ]]; then
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
fi
[[ ${#need[@]} -eq 0 ]] && exit 0

echo "installing system packages: ${need[*]}"
sudo=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 || { echo "need root (or sudo) to install: ${need[*]}" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# policy-rc.d keeps the package from starting a system-wide cluster we do not use.
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
