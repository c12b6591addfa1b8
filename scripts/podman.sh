#!/usr/bin/env bash
# podman with the project's engine settings (scripts/podman-env.sh): what the image tests
# and `make image` use, and what to run the built image with by hand on this machine:
#   scripts/podman.sh run --rm localhost/querywarden:dev --version
set -euo pipefail
source "$(dirname "$0")/podman-env.sh"
exec podman "$@"
