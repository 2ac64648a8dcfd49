# Spillway's two front doors:
#   make run    start a local Spillway end to end (control plane, NATS, operator,
#               gateway, processors, demo sink) and send sample webhooks through it
#   make test   everything CI checks: fmt, clippy, CRD sync, all tests
CRD_FILES := crds/webhookendpoints.spillway.dev.yaml crds/webhooklisteners.spillway.dev.yaml \
	charts/spillway/templates/crds.yaml docs/reference.md

.PHONY: tools crds check-crds fmt lint build test run fuzz bench-gateway deny deny-advisories

tools:
	hack/install-tools.sh

crds:
	cargo run -q -p spillway-api --bin crdgen -- --write $(CRD_FILES)

check-crds:
	cargo run -q -p spillway-api --bin crdgen -- --check $(CRD_FILES)

fmt:
	cargo fmt --all -- --check

lint:
	cargo clippy --workspace --all-targets -- -D warnings

build:
	cargo build --workspace --bins

# The fault suite kills and restarts NATS nodes and processes on a timed
# script: it runs on its own, after the rest, not beside other tests on
# this machine's two cores.
test: tools fmt lint check-crds build
	cargo test --workspace -- --skip fault_suite::
	cargo test -p spillway-tests --test it fault_suite::

# The long fuzz run (tests/it/fuzz.rs); `make test` runs 256 cases of
# each property. FUZZ_CASES sets the count.
FUZZ_CASES ?= 200000
fuzz:
	PROPTEST_CASES=$(FUZZ_CASES) cargo test -p spillway-tests --test it fuzz:: -- --nocapture

run: tools build
	"$${CARGO_TARGET_DIR:-target}/debug/spillway-local"

# cargo-deny (deny.toml): licences, duplicate crates, sources. Not part of
# `make test`: cargo-deny is not a pinned tool (install it with
# `cargo install --locked cargo-deny`). Works offline once the crates of the
# checked platforms are downloaded; tests/it/release.rs checks the licence
# allow-list without it.
deny:
	cargo deny check licenses bans sources

# The RustSec advisory database, fetched from GitHub (needs the network).
deny-advisories:
	cargo deny check advisories

# The gateway beside the Go bridge (../shared/peers/gobridge, built with go
# here, not copied) and a raw publish loop, one nats-server, one run:
# writes docs/benchmarks/gateway.md and gateway.svg. PEERS names the peers
# folder.
PEERS ?= ../shared/peers
bench-gateway: tools
	cargo build --release -p spillway-gateway --bins --examples
	cd "$(PEERS)/gobridge" && go build -o "$(CURDIR)/target/release/gobridge" .
	target/release/examples/loadgen --bridge-bin target/release/gobridge --out docs/benchmarks/gateway.md
