#!/usr/bin/env bash
# Builds the querywarden image (gateway and operator) with podman from the Dockerfile, as
# localhost/querywarden:dev. `make image` runs it; the image tests run it too.
#
# - Base: python:3.11-slim when a registry serves it (or it is already loaded); otherwise an
#   equivalent base made from Debian's packages with mmdebstrap (Debian's Python 3.11, pip
#   through ensurepip, CA certificates), so the same Dockerfile builds without a registry.
# - pip's configuration on this machine (index and CA bundle, from `pip config` and PIP_*)
#   reaches the build as the secret `pip.conf`; nothing of it stays in a layer.
# - The compiled row masker (native/, querywarden_native) is built on this machine as a
#   wheel (build/native-wheel/) and installed in the image: Debian bookworm's Rust is too
#   old for PyO3 and the build reaches no crates registry. This machine is bookworm too,
#   so the wheel links against the image's glibc; the build fails if it does not load.
# - Skipped when an image built from the same inputs exists (label querywarden.inputs).
#
# Environment: QW_IMAGE (default localhost/querywarden:dev), QW_IMAGE_FORCE=1 to rebuild.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/podman-env.sh

image=${QW_IMAGE:-localhost/querywarden:dev}
upstream_base=docker.io/library/python:3.11-slim
debian_base=localhost/querywarden-base:bookworm-python3.11

# What the image is made of: the build context (by .dockerignore) and the Dockerfile.
inputs=$(
  {
    sha256sum Dockerfile .dockerignore pyproject.toml constraints.txt README.md LICENSE
    git ls-files -co --exclude-standard proxy operator native \
      | grep -v -e '__pycache__' -e '\.pyc$' -e '^native/target/' | sort | xargs sha256sum
  } | sha256sum | cut -c1-32
)
if [[ "${QW_IMAGE_FORCE:-}" != 1 ]] \
  && [[ "$(podman image inspect --format '{{ index .Labels "querywarden.inputs" }}' "$image" 2>/dev/null)" == "$inputs" ]]; then
  exit 0
fi

# The native wheel, from the same sources the venv's build uses (cargo reuses native/target).
pip=${QW_PIP:-.venv/bin/pip}
[[ -x "$pip" ]] || { echo "no $pip: run make first (the image's native wheel is built with it)"; exit 1; }
rm -rf build/native-wheel
"$pip" wheel --quiet --no-deps --wheel-dir build/native-wheel ./native

base=""
if podman image exists "$upstream_base" \
  || timeout 60 podman pull -q "$upstream_base" >/dev/null 2>&1; then
  base=$upstream_base
else
  if ! podman image exists "$debian_base"; then
    echo "no $upstream_base from a registry: making $debian_base from Debian's packages"
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    # minbase + what python:3.11-slim carries for a Python service: CA certificates,
    # netbase, tzdata; `python` on PATH as in the official image.
    mmdebstrap --quiet --variant=minbase \
      --include=python3,python3-venv,ca-certificates,netbase,tzdata \
      --customize-hook='ln -sf /usr/bin/python3 "$1/usr/local/bin/python"' \
      --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
      bookworm "$rootfs/base.tar"
    podman import --quiet \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'CMD ["python3"]' \
      "$rootfs/base.tar" "$debian_base" >/dev/null
  fi
  base=$debian_base
fi

# pip's settings as this machine has them, written as one pip.conf for the build.
secret_dir=$(mktemp -d)
trap 'rm -rf "$secret_dir" ${rootfs:-}' EXIT
pip_conf="$secret_dir/pip.conf"
python3 - "$pip_conf" <<'PY'
import configparser, os, subprocess, sys

# `pip config list` prints the merged files and PIP_* variables as section.key='value'.
listed = subprocess.run(
    [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
).stdout.splitlines()
settings = {}
for line in listed:
    name, _, value = line.partition("=")
    key = name.rsplit(".", 1)[-1]
    settings[key] = value.strip().strip("'\"")
wanted = {}
for key in ("index-url", "extra-index-url", "trusted-host", "timeout", "default-timeout"):
    if settings.get(key):
        wanted[key] = settings[key]
cert = settings.get("cert")
conf = configparser.ConfigParser()
conf["global"] = wanted
if cert and os.path.isfile(cert):
    # The bundle itself travels inside the secret: inline it next to pip.conf.
    bundle = os.path.join(os.path.dirname(sys.argv[1]), "ca.pem")
    with open(cert, "rb") as src, open(bundle, "wb") as dst:
        dst.write(src.read())
with open(sys.argv[1], "w") as out:
    conf.write(out)
PY
secrets=(--secret "id=pip.conf,src=$pip_conf")
if [[ -f "$secret_dir/ca.pem" ]]; then
  # pip reads the bundle from the path pip.conf names, inside the build container.
  printf 'cert = /run/secrets/pip-ca.pem\n' >>"$pip_conf"
  secrets+=(--secret "id=pip-ca.pem,src=$secret_dir/ca.pem")
fi

echo "building $image from $base"
start=$(date +%s)
podman build --quiet --layers \
  --build-arg "BASE_IMAGE=$base" \
  "${secrets[@]}" \
  --label "querywarden.inputs=$inputs" \
  --tag "$image" . >/dev/null
echo "built $image in $(($(date +%s) - start)) s"
# The previous build's images (and this build's stage cache) would fill the disk over many
# builds: a rebuild pays the dependency layer again instead (about a minute).
# Best effort: an image a running container uses (a test's, another build's) is kept.
podman image prune --force >/dev/null 2>&1 || true
