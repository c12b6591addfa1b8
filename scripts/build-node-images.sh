#!/usr/bin/env bash
# Builds the images the test node's pods run (tests/node), besides localhost/querywarden:dev
# (scripts/build-image.sh), with podman. No registry is reachable: everything comes from
# Debian's packages (mmdebstrap) or from the binaries scripts/build-tools.sh builds from
# their Go modules. `make node-images` builds the binaries first, then runs this.
#
# Usage:
#   scripts/build-node-images.sh [--save DIR] [IMAGE...]
#
# IMAGE is one of (default: all):
#   pause     localhost/querywarden-pause:3.10    the pod sandbox: Debian's static catatonit,
#                                                 in pause mode (catatonit -P), FROM scratch
#   postgres  localhost/querywarden-postgres:15   Debian bookworm's postgresql-15 on an
#                                                 mmdebstrap minbase; entrypoint and
#                                                 variables like the official image's
#   otelcol   localhost/querywarden-otelcol:dev   the OpenTelemetry Collector of
#                                                 scripts/build-tools.sh, FROM scratch
#   coredns   localhost/querywarden-coredns:dev   CoreDNS of scripts/build-tools.sh,
#                                                 FROM scratch
#
# An image is skipped when one built from the same inputs exists: its label
# querywarden.inputs holds a hash of its Containerfile, of the function here that prepares
# its build context, and of every file that goes in (binaries included).
# QW_NODE_IMAGES_FORCE=1 rebuilds anyway; the Debian-based images need that to pick up
# Debian's updates, which the hash cannot see.
#
# --save DIR writes each IMAGE to DIR/IMAGE.tar with `podman save --format oci-archive`,
# for the node harness to load into containerd (`ctr -n k8s.io images import`).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
source scripts/podman-env.sh
# shellcheck source=../tools/versions.env
source tools/versions.env

ALL_IMAGES=(pause postgres otelcol coredns)
SUITE=bookworm
TOOLS_DIR=${QUERYWARDEN_TOOLS_DIR:-$HOME/.cache/querywarden/tools}

log() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'build-node-images: error: %s\n' "$*" >&2
  exit 1
}

image_of() {
  case $1 in
  pause) echo localhost/querywarden-pause:3.10 ;;
  postgres) echo localhost/querywarden-postgres:15 ;;
  otelcol) echo localhost/querywarden-otelcol:dev ;;
  coredns) echo localhost/querywarden-coredns:dev ;;
  *) die "unknown image '$1' (expected one of: ${ALL_IMAGES[*]})" ;;
  esac
}

# tool_binary NAME PIN: the binary scripts/build-tools.sh built at the pinned version.
tool_binary() {
  local binary=$TOOLS_DIR/bin/$1 stamp=$TOOLS_DIR/stamps/$1
  [[ -x $binary && -f $stamp ]] || die "$1 is not built: run scripts/build-tools.sh $1"
  [[ "$(head -n1 "$stamp")" == "version $2" ]] ||
    die "$binary was built for '$(head -n1 "$stamp")', not $2: run scripts/build-tools.sh $1"
  printf '%s\n' "$binary"
}

# --- pause ----------------------------------------------------------------------------
# The sandbox container of every pod: it holds the pod's namespaces and does nothing else.
# catatonit -P (pause mode) sleeps until a signal and exits 0 on SIGTERM or SIGINT, like
# registry.k8s.io/pause, and as that image it runs as 65535:65535. Debian builds catatonit
# statically (podman copies it into containers), so it needs nothing beside it.

containerfile_pause() {
  cat <<'EOF'
FROM scratch
COPY catatonit /catatonit
USER 65535:65535
ENTRYPOINT ["/catatonit", "-P"]
EOF
}

context_pause() { # DIR
  # --variant=extract unpacks the named package only: no dependencies, no maintainer scripts.
  mmdebstrap --quiet --variant=extract --include=catatonit "$SUITE" "$1/catatonit.tar"
  tar -xf "$1/catatonit.tar" -C "$1" --strip-components=3 ./usr/bin/catatonit
  rm "$1/catatonit.tar"
}

files_pause() { :; }

# --- postgres -------------------------------------------------------------------------
# PostgreSQL 15 from Debian's packages, its own minbase (not querywarden's base image):
# - the postgres user and group are 999:999, as in the official image (written into
#   /etc/passwd and /etc/group before postgresql-common's postinst, which keeps them);
# - no "main" cluster is made at install (createcluster.d): the entrypoint runs initdb;
# - the binaries of /usr/lib/postgresql/15/bin come first on PATH (psql is the real one,
#   not Debian's pg_wrapper);
# - left out: documentation, manual pages, translations, and the JIT (llvmjit.so and its
#   bitcode, libLLVM and libz3, which only it needs: about 150 MB); without llvmjit.so the
#   server plans without JIT, as with jit = off;
# - no private key: ssl-cert's snakeoil key, made at install and the same in every copy of
#   the image, is removed (the server does not use TLS unless configured to).

containerfile_postgres() {
  cat <<'EOF'
FROM scratch
ADD rootfs.tar /
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PG_MAJOR=15 \
    PGDATA=/var/lib/postgresql/data
USER 999:999
WORKDIR /var/lib/postgresql
VOLUME /var/lib/postgresql/data
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["postgres"]
EOF
}

context_postgres() { # DIR
  cp scripts/node-images/postgres-entrypoint.sh "$1/docker-entrypoint.sh"
  chmod 0755 "$1/docker-entrypoint.sh"
  local -a excludes=( # dpkg's globs, not the shell's
    '/usr/share/doc/*' '/usr/share/man/*' '/usr/share/info/*' '/usr/share/locale/*'
    '/usr/lib/postgresql/15/lib/llvmjit*' '/usr/lib/postgresql/15/lib/bitcode/*'
    '/usr/lib/*/libLLVM-14.so*' '/usr/lib/*/libz3.so*'
  ) dpkg_opts=() pattern
  for pattern in "${excludes[@]}"; do
    dpkg_opts+=("--dpkgopt=path-exclude=$pattern")
  done
  dpkg_opts+=("--dpkgopt=path-include=/usr/share/doc/*/copyright")
  # shellcheck disable=SC2016 # the hooks' $1 is mmdebstrap's, expanded by its shell
  mmdebstrap --quiet --variant=minbase --include=postgresql-15 "${dpkg_opts[@]}" \
    --essential-hook='echo "postgres:x:999:999:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash" >>"$1/etc/passwd"' \
    --essential-hook='echo "postgres:x:999:" >>"$1/etc/group"' \
    --essential-hook='mkdir -p "$1/etc/postgresql-common/createcluster.d"' \
    --essential-hook='echo "create_main_cluster = false" >"$1/etc/postgresql-common/createcluster.d/00-querywarden.conf"' \
    --customize-hook='test ! -e "$1/etc/postgresql/15/main" || { echo "a main cluster was created" >&2; exit 1; }' \
    --customize-hook='chroot "$1" getent passwd postgres | grep -q "^postgres:x:999:999:"' \
    --customize-hook='install -d -o 999 -g 999 -m 0700 "$1/var/lib/postgresql/data"' \
    --customize-hook='mkdir -p "$1/docker-entrypoint-initdb.d"' \
    --customize-hook='rm -f "$1/etc/ssl/private/ssl-cert-snakeoil.key" "$1/etc/ssl/certs/ssl-cert-snakeoil.pem"' \
    --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
    "$SUITE" "$1/rootfs.tar"
  # The socket directory: mmdebstrap keeps nothing of /run (a tmpfs while it works), so it
  # goes into the tarball directly.
  mkdir -p "$1/extra/run/postgresql"
  tar --append --file="$1/rootfs.tar" --directory="$1/extra" --no-recursion \
    --numeric-owner --owner=999 --group=999 --mode=2775 ./run/postgresql
  rm -rf "$1/extra"
}

files_postgres() { echo scripts/node-images/postgres-entrypoint.sh; }

# --- otelcol --------------------------------------------------------------------------
# The Collector the tests already run on the host (tools/otelcol/manifest.yaml: OTLP in,
# batch, debug and file out), as a pod. Its command line is the official image's: the
# configuration at /etc/otelcol/config.yaml (a ConfigMap, say). It exports nowhere that
# needs TLS, so no CA certificates.

containerfile_otelcol() {
  cat <<'EOF'
FROM scratch
COPY otelcol /otelcol
USER 65532:65532
EXPOSE 4317 4318
ENTRYPOINT ["/otelcol"]
CMD ["--config=/etc/otelcol/config.yaml"]
EOF
}

context_otelcol() { # DIR
  cp "$(tool_binary otelcol "$OTELCOL_BUILDER_VERSION")" "$1/otelcol"
}

files_otelcol() { tool_binary otelcol "$OTELCOL_BUILDER_VERSION"; }

# --- coredns --------------------------------------------------------------------------
# The cluster DNS, started as the official image is (`-conf /etc/coredns/Corefile` from the
# coredns ConfigMap). It runs as 65532 and listens on port 53, a privileged port. As in the
# official image the binary carries the file capability cap_net_bind_service=+ep (setcap
# here; podman keeps it as an xattr in the layer, `podman save` and containerd's unpacking
# keep it too): a non-root process gets NET_BIND_SERVICE from its binary because
# containerd sets no ambient capabilities, so listing the capability in the pod (as
# CoreDNS's and kubeadm's manifests do: drop ALL, add NET_BIND_SERVICE) is not enough
# alone. In turn the pod must leave NET_BIND_SERVICE in the bounding set, as those
# manifests do: with `drop: [ALL]` and nothing added the binary does not even start
# ("operation not permitted"), whatever port it would listen on.

containerfile_coredns() {
  cat <<'EOF'
FROM scratch
COPY coredns /coredns
USER 65532:65532
EXPOSE 53 53/udp
ENTRYPOINT ["/coredns"]
EOF
}

context_coredns() { # DIR
  cp "$(tool_binary coredns "$COREDNS_VERSION")" "$1/coredns"
  "$(command -v setcap || echo /usr/sbin/setcap)" cap_net_bind_service=+ep "$1/coredns"
}

files_coredns() { tool_binary coredns "$COREDNS_VERSION"; }

# --------------------------------------------------------------------------------------

inputs() { # NAME: the hash the image's label must hold
  local name=$1 listed
  local -a files=()
  listed=$("files_$name")
  [[ -z $listed ]] || mapfile -t files <<<"$listed"
  {
    printf 'image %s\nsuite %s\n' "$(image_of "$name")" "$SUITE"
    "containerfile_$name"
    declare -f "context_$name"
    ((${#files[@]} == 0)) || sha256sum "${files[@]}"
  } | sha256sum | cut -c1-32
}

build_one() { # NAME
  local name=$1 image want old new context start
  image=$(image_of "$name")
  want=$(inputs "$name")
  if [[ "${QW_NODE_IMAGES_FORCE:-}" != 1 ]] &&
    [[ "$(podman image inspect --format '{{ index .Labels "querywarden.inputs" }}' "$image" 2>/dev/null)" == "$want" ]]; then
    log "$image: up to date"
    return
  fi
  log "$image: building"
  start=$SECONDS
  context=$(mktemp -d)
  CONTEXTS+=("$context")
  "context_$name" "$context"
  "containerfile_$name" >"$context/Containerfile"
  old=$(podman image inspect --format '{{ .Id }}' "$image" 2>/dev/null || true)
  # --layers=false: one layer on scratch, no intermediate images left behind.
  podman build --quiet --layers=false --label "querywarden.inputs=$want" --tag "$image" \
    --file "$context/Containerfile" "$context" >/dev/null
  rm -rf "$context"
  new=$(podman image inspect --format '{{ .Id }}' "$image")
  # The image this one replaces is untagged now; remove it unless something still uses it.
  if [[ -n $old && $old != "$new" ]]; then podman rmi "$old" >/dev/null 2>&1 || true; fi
  log "$image: built in $((SECONDS - start)) s, $(podman image inspect --format '{{ .Size }}' "$image" | numfmt --to=si)B"
}

save_one() { # NAME DIR
  local image
  image=$(image_of "$1")
  rm -f "$2/$1.tar"
  podman save --quiet --format oci-archive --output "$2/$1.tar" "$image"
  log "$image: saved to $2/$1.tar"
}

main() {
  local -a names=()
  local save="" name
  while (($#)); do
    case $1 in
    --save)
      (($# >= 2)) || die "--save needs a directory"
      save=$2
      shift
      ;;
    -h | --help)
      sed -n '2,/^set -euo/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
      return
      ;;
    -*) die "unknown option $1" ;;
    *)
      image_of "$1" >/dev/null
      names+=("$1")
      ;;
    esac
    shift
  done
  ((${#names[@]})) || names=("${ALL_IMAGES[@]}")

  CONTEXTS=()
  trap 'rm -rf "${CONTEXTS[@]}"' EXIT
  local start=$SECONDS
  for name in "${names[@]}"; do
    build_one "$name"
  done
  if [[ -n $save ]]; then
    mkdir -p "$save"
    for name in "${names[@]}"; do
      save_one "$name" "$save"
    done
  fi
  log "node images ready ($((SECONDS - start)) s)"
}

main "$@"
