# querywarden — the README's two commands are `make demo` and `make test`.
# Each sets up what it needs: a virtualenv with pinned Python packages, and PostgreSQL
# server binaries from Debian's packages when the machine has none.

PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
NATIVE  := $(VENV)/.native-stamp
NATIVE_SOURCES := native/Cargo.toml native/Cargo.lock native/pyproject.toml \
	native/querywarden_native.pyi $(wildcard native/src/*.rs)
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck unit bench compat compat-fetch system-deps browser tools image node-images clean lock

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# The compiled row masker (querywarden_native, Rust + PyO3): pip builds it with maturin
# (pinned in native/pyproject.toml, from PyPI) and cargo (crates from crates.io, pinned by
# native/Cargo.lock); built again whenever its sources change. Without it the gateway
# masks with the pure-Python reference; the tests require it.
$(NATIVE): $(STAMP) $(NATIVE_SOURCES)
	@command -v cargo >/dev/null || { echo "cargo (Rust) is needed to build native/"; exit 1; }
	$(BIN)/pip install -q --force-reinstall --no-deps ./native
	touch $@

system-deps:
	@bash scripts/ensure-system-deps.sh

# Chromium and its WebDriver, from Debian's packages: the approvals console's browser test.
browser:
	@bash scripts/ensure-system-deps.sh --browser

# kube-apiserver, etcd, kubectl, helm, an OpenTelemetry Collector, CoreDNS and the test
# node's kubelet, kube-controller-manager, kube-scheduler and kube-proxy, built from their
# official Go modules into ~/.cache/querywarden/tools (skipped when already built).
tools:
	@bash scripts/build-tools.sh

# The one image (gateway and operator), localhost/querywarden:dev, built with podman; its
# base comes from Debian's packages where no registry serves python:3.11-slim. Skipped
# when nothing it is made of changed.
image:
	@bash scripts/ensure-system-deps.sh --image
	@bash scripts/build-image.sh

# The images the test node's pods run besides the querywarden image: pause, PostgreSQL 15,
# the Collector and CoreDNS (scripts/build-node-images.sh; the last two from the binaries
# of scripts/build-tools.sh). Each is skipped when nothing it is made of changed.
node-images:
	@bash scripts/ensure-system-deps.sh --image --node
	@bash scripts/build-tools.sh otelcol coredns
	@bash scripts/build-node-images.sh

demo: $(NATIVE) system-deps
	$(BIN)/querywarden demo

lint: $(STAMP)
	$(BIN)/ruff check proxy operator tests bench compat
	$(BIN)/ruff format --check proxy operator tests bench compat

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy compat/run.py compat/results.py

test: $(NATIVE) system-deps browser tools image node-images lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(NATIVE)
	@bash scripts/ensure-system-deps.sh --bench
	$(BIN)/python bench/run.py
	$(BIN)/python bench/run.py --agent
	$(BIN)/python bench/identity_latency.py
	$(BIN)/python bench/analysis_bench.py
	$(BIN)/python bench/masking_bench.py
	$(BIN)/python bench/audit_bench.py
	$(BIN)/python bench/large_message_bench.py --repeats 2

# The client libraries' own test suites (pgx, node-postgres), each run directly and
# through the gateway with audit off and on; prints passed directly / through / ratio and
# the tests that pass only directly (docs/compatibility.md). Not part of `make test`: it
# takes about 10 minutes, most of it pgx through the gateway. The suites come from the Go
# module proxy and the npm registry at the pins in compat/versions.env, cached in
# ~/.cache/querywarden/compat. COMPAT_ARGS, e.g. --suite pgx --mode audit-off.
COMPAT_ARGS ?=
compat-fetch:
	@bash scripts/fetch-compat.sh

compat: $(NATIVE) system-deps compat-fetch
	$(BIN)/python compat/run.py $(COMPAT_ARGS)

# Re-pin after changing dependencies in pyproject.toml.
lock:
	$(BIN)/pip freeze --exclude-editable | grep -v '^-e ' > constraints.txt

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .querywarden native/target
