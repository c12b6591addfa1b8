#!/usr/bin/env bash
# Build the tools the Kubernetes test harness runs (tests/k8s, docs/test-harness.md):
# kube-apiserver, etcd, kubectl, helm, an OpenTelemetry Collector, and the node's kubelet,
# kube-controller-manager, kube-scheduler and kube-proxy (tests/node), from their official
# Go modules at the versions pinned in tools/versions.env. No Docker, no release
# downloads: only the Go module proxy and the machine's Go toolchain.
# Also CoreDNS (tools/coredns), the cluster DNS of the test node's images
# (scripts/build-node-images.sh), and promtext (tools/promtext), Prometheus's own parser of
# the text exposition format, which checks what the gateway serves at /metrics.
#
# Usage:
#   scripts/build-tools.sh [--force] [TOOL...]   build what is missing or stale (default: all)
#   scripts/build-tools.sh --repin               regenerate tools/*/go.mod and go.sum from
#                                                tools/versions.env (needs the module proxy)
#   scripts/build-tools.sh --print-bin-dir       print where the binaries go
#
# TOOL is one of: kube-apiserver etcd kubectl helm otelcol coredns promtext kubelet
# kube-controller-manager kube-scheduler kube-proxy.
#
# Binaries go to ${QUERYWARDEN_TOOLS_DIR:-$HOME/.cache/querywarden/tools}/bin. Each has a
# stamp (stamps/TOOL) holding its pinned version and a hash of the wrapper module it was
# built from; a tool whose stamp matches is skipped, so a second run does nothing.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS_SRC=$ROOT/tools
# shellcheck source=../tools/versions.env
source "$TOOLS_SRC/versions.env"

TOOLS_DIR=${QUERYWARDEN_TOOLS_DIR:-$HOME/.cache/querywarden/tools}
BIN=$TOOLS_DIR/bin
STAMPS=$TOOLS_DIR/stamps
ALL_TOOLS=(etcd kube-apiserver kubectl helm otelcol coredns promtext kubelet kube-controller-manager kube-scheduler kube-proxy)
# The Kubernetes commands built from tools/kube (k8s.io/kubernetes/cmd/NAME).
KUBE_COMMANDS=(kube-apiserver kubectl kubelet kube-controller-manager kube-scheduler kube-proxy)
# Part of every stamp: bump it when a change to this script changes what gets built
# (flags, ldflags), so that caches built the old way are rebuilt.
RECIPE=1

# Static, path-independent binaries; never let `go` fetch a different toolchain behind our
# back (a too-old Go must fail here, loudly, not download one).
export CGO_ENABLED=0 GOTOOLCHAIN=local
export GOFLAGS="-trimpath -buildvcs=false"

log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'build-tools: error: %s\n' "$*" >&2
    exit 1
}

# Report which tool failed: with `set -e` alone a failed `go build` deep in a function
# leaves only Go's own output, which does not say what we were building.
CURRENT=""
trap 'rc=$?; if [[ $rc -ne 0 && -n $CURRENT ]]; then printf "build-tools: error: building %s failed (exit %d)\n" "$CURRENT" "$rc" >&2; fi' EXIT

require_go() {
    command -v go >/dev/null || die "go not found on PATH; Go >= 1.26 is needed to build the test tools"
    local v
    v=$(go env GOVERSION)
    v=${v#go}
    local major=${v%%.*} rest=${v#*.}
    local minor=${rest%%.*}
    if ((major < 1 || (major == 1 && minor < 26))); then
        die "Go $v is too old; Kubernetes $KUBERNETES_VERSION needs Go >= 1.26"
    fi
}

# stamp_key VERSION FILE...: what a tool's stamp must contain for the binary to count as
# built from the current pins.
stamp_key() {
    local version=$1
    shift
    printf 'version %s\nrecipe %s\n' "$version" "$RECIPE"
    (cd "$ROOT" && sha256sum "$@")
}

# fresh TOOL KEY: the binary exists and was built from exactly KEY.
fresh() {
    [[ -z ${FORCE:-} && -x $BIN/$1 && -f $STAMPS/$1 && "$(cat "$STAMPS/$1")" == "$2" ]]
}

finish() { # TOOL KEY: record a successful build
    printf '%s\n' "$2" >"$STAMPS/$1"
    log "$1: done ($("$BIN/$1" "${@:3}" 2>&1 | head -n1))"
}

# check_pin DIR MODULE VERSION: the wrapper go.mod was generated from tools/versions.env.
check_pin() {
    local got
    got=$(cd "$1" && go list -m -f '{{.Version}}' "$2")
    [[ $got == "$3" ]] || die "$1/go.mod has $2 $got but tools/versions.env pins $3; run scripts/build-tools.sh --repin"
}

# module_info MODULE VERSION: "TIME COMMIT" of a release from the module proxy's .info
# (COMMIT is empty when the proxy does not record the origin).
module_info() {
    local info
    info=$(go mod download -json "$1@$2" | sed -n 's/^\s*"Info": "\(.*\)",$/\1/p')
    [[ -f $info ]] || die "cannot download $1@$2 from the module proxy"
    python3 - "$info" <<'EOF'
import json, sys
info = json.load(open(sys.argv[1]))
print(info["Time"], info.get("Origin", {}).get("Hash", ""))
EOF
}

kube_ldflags() { # the ldflags hack/lib/version.sh passes, for both version packages
    local info commit released minor=${KUBERNETES_VERSION#v1.}
    info=$(module_info k8s.io/kubernetes "$KUBERNETES_VERSION")
    read -r released commit <<<"$info"
    minor=${minor%%.*}
    local flags="-s -w" pkg
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        flags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$released"
        [[ -z $commit ]] || flags+=" -X $pkg.gitCommit=$commit"
    done
    printf '%s' "$flags"
}

build_kube() { # TOOL (one of KUBE_COMMANDS)
    local tool=$1 dir=$TOOLS_SRC/kube key
    key=$(stamp_key "$KUBERNETES_VERSION" tools/kube/go.mod tools/kube/go.sum)
    fresh "$tool" "$key" && {
        log "$tool $KUBERNETES_VERSION: up to date"
        return
    }
    check_pin "$dir" k8s.io/kubernetes "$KUBERNETES_VERSION"
    log "$tool $KUBERNETES_VERSION: building k8s.io/kubernetes/cmd/$tool"
    (cd "$dir" && go build -ldflags "$(kube_ldflags)" -o "$BIN/.$tool.tmp" "k8s.io/kubernetes/cmd/$tool")
    mv -f "$BIN/.$tool.tmp" "$BIN/$tool"
    if [[ $tool == kubectl ]]; then finish "$tool" "$key" version --client; else finish "$tool" "$key" --version; fi
}

build_kubectl() {
    # A kubectl on PATH is fine when it is within the supported version skew of the API
    # server (one minor version either way); otherwise build the pinned one.
    local system want=${KUBERNETES_VERSION#v1.}
    want=${want%%.*}
    system=$(PATH=$(printf '%s' "$PATH" | tr ':' '\n' | grep -vxF "$BIN" | paste -sd:) command -v kubectl || true)
    if [[ -n $system ]]; then
        local minor
        minor=$("$system" version --client -o json 2>/dev/null | python3 -c \
            'import json,sys; print(int("".join(c for c in json.load(sys.stdin)["clientVersion"]["minor"] if c.isdigit())))' ||
            echo -1)
        if ((minor >= want - 1 && minor <= want + 1)); then
            local key="system $system 1.$minor"
            if ! fresh kubectl "$key"; then
                ln -sfn "$system" "$BIN/kubectl"
                finish kubectl "$key" version --client
            fi
            log "kubectl: using $system (1.$minor)"
            return
        fi
        log "kubectl: not using $system (1.$minor): outside the version skew policy for $KUBERNETES_VERSION"
    fi
    build_kube kubectl
}

build_etcd() {
    local dir=$TOOLS_SRC/etcd key
    key=$(stamp_key "$ETCD_VERSION" tools/etcd/go.mod tools/etcd/go.sum tools/etcd/main.go)
    fresh etcd "$key" && {
        log "etcd $ETCD_VERSION: up to date"
        return
    }
    check_pin "$dir" go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
    local info commit released
    info=$(module_info go.etcd.io/etcd/server/v3 "$ETCD_VERSION")
    read -r released commit <<<"$info"
    log "etcd $ETCD_VERSION: building go.etcd.io/etcd/server/v3/etcdmain"
    (cd "$dir" && go build -ldflags "-s -w${commit:+ -X go.etcd.io/etcd/api/v3/version.GitSHA=$commit}" \
        -o "$BIN/.etcd.tmp" .)
    mv -f "$BIN/.etcd.tmp" "$BIN/etcd"
    finish etcd "$key" --version
}

build_helm() {
    local dir=$TOOLS_SRC/helm key
    key=$(stamp_key "$HELM_VERSION" tools/helm/go.mod tools/helm/go.sum)
    fresh helm "$key" && {
        log "helm $HELM_VERSION: up to date"
        return
    }
    check_pin "$dir" helm.sh/helm/v4 "$HELM_VERSION"
    local info commit released pkg=helm.sh/helm/v4/internal/version
    info=$(module_info helm.sh/helm/v4 "$HELM_VERSION")
    read -r released commit <<<"$info"
    log "helm $HELM_VERSION: building helm.sh/helm/v4/cmd/helm"
    (cd "$dir" && go build \
        -ldflags "-s -w -X $pkg.version=$HELM_VERSION -X $pkg.gitTreeState=clean${commit:+ -X $pkg.gitCommit=$commit}" \
        -o "$BIN/.helm.tmp" helm.sh/helm/v4/cmd/helm)
    mv -f "$BIN/.helm.tmp" "$BIN/helm"
    finish helm "$key" version --short
}

build_otelcol() {
    local dir=$TOOLS_SRC/otelcol key manifest=$TOOLS_SRC/otelcol/manifest.yaml
    key=$(stamp_key "$OTELCOL_BUILDER_VERSION" tools/otelcol/go.mod tools/otelcol/go.sum tools/otelcol/manifest.yaml)
    fresh otelcol "$key" && {
        log "otelcol (builder $OTELCOL_BUILDER_VERSION): up to date"
        return
    }
    check_pin "$dir" go.opentelemetry.io/collector/cmd/builder "$OTELCOL_BUILDER_VERSION"
    # The builder does not check that the manifest's core components match its release;
    # a mismatch surfaces later as a confusing compile error, so check here.
    grep -q "otlpreceiver $OTELCOL_BUILDER_VERSION\$" "$manifest" ||
        die "$manifest: core components must be at $OTELCOL_BUILDER_VERSION (the builder's version)"

    local work=$TOOLS_DIR/src/otelcol
    log "otelcol: building the collector builder $OTELCOL_BUILDER_VERSION"
    (cd "$dir" && go build -ldflags "-s -w" -o "$TOOLS_DIR/libexec/ocb" go.opentelemetry.io/collector/cmd/builder)
    log "otelcol: generating and compiling the distribution in tools/otelcol/manifest.yaml"
    # The builder writes the generated module (main.go, go.mod, ...) next to the binary, so
    # point it at a scratch directory in the cache rather than into the repository.
    rm -rf "$work"
    mkdir -p "$work"
    sed "s|^\(\s*output_path:\).*|\1 $work|" "$manifest" >"$work.manifest.yaml"
    # The builder's `go mod tidy` also resolves the test-only dependencies of every
    # component (fileexporter's tests import otlpencodingextension), which a filtered
    # module proxy may not serve. GOFLAGS=-e reaches only the go commands that know -e
    # (tidy, list): tidy records what it can resolve, and `go build` still fails loudly
    # if anything the binary itself needs is missing.
    GOFLAGS="$GOFLAGS -e" "$TOOLS_DIR/libexec/ocb" --config "$work.manifest.yaml"
    mv -f "$work/otelcol" "$BIN/otelcol"
    finish otelcol "$key" --version
}

build_coredns() {
    local dir=$TOOLS_SRC/coredns key
    key=$(stamp_key "$COREDNS_VERSION" tools/coredns/go.mod tools/coredns/go.sum tools/coredns/main.go)
    fresh coredns "$key" && {
        log "coredns $COREDNS_VERSION: up to date"
        return
    }
    check_pin "$dir" github.com/coredns/coredns "$COREDNS_VERSION"
    local info commit released
    info=$(module_info github.com/coredns/coredns "$COREDNS_VERSION")
    read -r released commit <<<"$info"
    # CoreDNS's Makefile stamps the commit the same way; `coredns -version` prints it after
    # the version (coremain.CoreVersion, a constant of the release).
    log "coredns $COREDNS_VERSION: building tools/coredns (coremain with the plugins in main.go)"
    (cd "$dir" && go build -ldflags "-s -w${commit:+ -X github.com/coredns/coredns/coremain.GitCommit=$commit}" \
        -o "$BIN/.coredns.tmp" .)
    mv -f "$BIN/.coredns.tmp" "$BIN/coredns"
    finish coredns "$key" -version
}

build_promtext() {
    local dir=$TOOLS_SRC/promtext key
    key=$(stamp_key "$PROMETHEUS_COMMON_VERSION" tools/promtext/go.mod tools/promtext/go.sum tools/promtext/main.go)
    fresh promtext "$key" && {
        log "promtext $PROMETHEUS_COMMON_VERSION: up to date"
        return
    }
    check_pin "$dir" github.com/prometheus/common "$PROMETHEUS_COMMON_VERSION"
    log "promtext $PROMETHEUS_COMMON_VERSION: building tools/promtext (expfmt's text parser)"
    (cd "$dir" && go build -ldflags "-s -w" -o "$BIN/.promtext.tmp" .)
    mv -f "$BIN/.promtext.tmp" "$BIN/promtext"
    finish promtext "$key" -version
}

build() { # TOOL
    CURRENT=$1
    case $1 in
    kubectl) build_kubectl ;;
    kube-apiserver | kubelet | kube-controller-manager | kube-scheduler | kube-proxy) build_kube "$1" ;;
    etcd) build_etcd ;;
    helm) build_helm ;;
    otelcol) build_otelcol ;;
    coredns) build_coredns ;;
    promtext) build_promtext ;;
    *) die "unknown tool '$1' (expected one of: ${ALL_TOOLS[*]})" ;;
    esac
    CURRENT=""
}

# --repin: regenerate a wrapper module's go.mod/go.sum from tools/versions.env.
new_module() { # DIR NAME
    rm -f "$1/go.mod" "$1/go.sum"
    # `go mod init` writes the local toolchain's version; start low instead so that
    # `go mod tidy` raises the go line only as far as the dependencies need, and any Go
    # that can build them can build the wrapper.
    (cd "$1" && go mod init "querywarden/tools/$2" 2>/dev/null && go mod edit -go=1.22)
}

repin_kube() {
    local dir=$TOOLS_SRC/kube gomod staging_version=v0.${KUBERNETES_VERSION#v1.}
    log "repin kube: k8s.io/kubernetes $KUBERNETES_VERSION, staging modules at $staging_version"
    gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')
    [[ -f $gomod ]] || die "cannot download k8s.io/kubernetes@$KUBERNETES_VERSION"
    # k8s.io/kubernetes maps each staging module to ./staging/src/... ; a module outside
    # that tree must take the published copy instead (v1.X.Y <-> v0.X.Y).
    local -a args=("-require=k8s.io/kubernetes@$KUBERNETES_VERSION")
    local module
    for module in $(sed -n '/^replace (/,/^)/p' "$gomod" | awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print $1}'); do
        args+=("-replace=$module=$module@$staging_version")
    done
    ((${#args[@]} > 10)) || die "found no staging replace directives in $gomod"
    new_module "$dir" kube
    local command
    for command in "${KUBE_COMMANDS[@]}"; do
        args+=("-tool=k8s.io/kubernetes/cmd/$command")
    done
    (cd "$dir" && go mod edit "${args[@]}" && go mod tidy)
}

repin_etcd() {
    local dir=$TOOLS_SRC/etcd module
    log "repin etcd: go.etcd.io/etcd/server/v3 $ETCD_VERSION"
    # server/v3 maps its sibling etcd modules with local replaces too; requiring them all at
    # the release keeps the binary one consistent etcd version.
    local -a args=()
    for module in server/v3 api/v3 client/pkg/v3 client/v3 pkg/v3; do
        args+=("-require=go.etcd.io/etcd/$module@$ETCD_VERSION")
    done
    new_module "$dir" etcd
    (cd "$dir" && go mod edit "${args[@]}" && go mod tidy)
}

repin_coredns() {
    # Like etcd: main.go is ours (the chosen plugins), so only the release is required.
    log "repin coredns: github.com/coredns/coredns $COREDNS_VERSION"
    new_module "$TOOLS_SRC/coredns" coredns
    (cd "$TOOLS_SRC/coredns" && go mod edit "-require=github.com/coredns/coredns@$COREDNS_VERSION" && go mod tidy)
}

repin_promtext() {
    # main.go is ours; it needs expfmt and the data model it parses into.
    log "repin promtext: github.com/prometheus/common $PROMETHEUS_COMMON_VERSION"
    new_module "$TOOLS_SRC/promtext" promtext
    (cd "$TOOLS_SRC/promtext" && go mod edit "-require=github.com/prometheus/common@$PROMETHEUS_COMMON_VERSION" && go mod tidy)
}

repin_tool_module() { # NAME MODULE VERSION PACKAGE
    log "repin $1: $2 $3"
    new_module "$TOOLS_SRC/$1" "$1"
    (cd "$TOOLS_SRC/$1" && go mod edit "-require=$2@$3" "-tool=$4" && go mod tidy)
}

repin() {
    CURRENT=repin
    repin_kube
    repin_etcd
    repin_tool_module helm helm.sh/helm/v4 "$HELM_VERSION" helm.sh/helm/v4/cmd/helm
    repin_tool_module otelcol go.opentelemetry.io/collector/cmd/builder "$OTELCOL_BUILDER_VERSION" \
        go.opentelemetry.io/collector/cmd/builder
    repin_coredns
    repin_promtext
    CURRENT=""
    log "repinned; review the diff under tools/ and run scripts/build-tools.sh"
}

main() {
    local -a tools=()
    FORCE=""
    while (($#)); do
        case $1 in
        --force) FORCE=1 ;;
        --repin)
            require_go
            repin
            return
            ;;
        --print-bin-dir)
            printf '%s\n' "$BIN"
            return
            ;;
        -h | --help)
            sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
            return
            ;;
        -*) die "unknown option $1" ;;
        *) tools+=("$1") ;;
        esac
        shift
    done
    ((${#tools[@]})) || tools=("${ALL_TOOLS[@]}")

    require_go
    mkdir -p "$BIN" "$STAMPS" "$TOOLS_DIR/libexec"
    log "tools cache: $TOOLS_DIR (Go $(go env GOVERSION), GOFLAGS=$GOFLAGS, CGO_ENABLED=0)"
    local start=$SECONDS tool
    for tool in "${tools[@]}"; do
        build "$tool"
    done
    log "all tools ready in $BIN ($((SECONDS - start))s)"
}

main "$@"
