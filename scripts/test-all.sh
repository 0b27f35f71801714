#!/usr/bin/env bash
# Runs every test of the project: formatting and lints, the Rust unit,
# integration (multi-process) and doc tests, the loom models of every
# lock-free structure, and the hot-path syscall check under strace.
# Usage: scripts/test-all.sh        (from anywhere; exits non-zero on the first failure)
# On a fresh machine it first installs what it needs (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s ==\n' "$*"; }

step "setup: tools and packages the tests need (scripts/setup.sh)"
scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "Rust tests (unit, cross-process integration, doc)"
cargo test --workspace

step "loom models (tensorbus-core)"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/loom" cargo test -p tensorbus-core --release --quiet

step "hot path makes no syscall (strace)"
scripts/hot-path-syscalls.sh

step "demo smoke run"
cargo run --release --quiet -p tensorbus-cli -- demo --frames 60 --fps 0 --quiet

# --- C bindings ---
step "C API: header up to date (cbindgen)"
make -C bindings/c check-header

step "C API: C tests under valgrind, examples"
make -C bindings/c test
# --- end C bindings ---

# --- chaos ---
step "chaos: 200 kill -9s of random clients, then no leak/loss/duplicate/corruption/crash"
scripts/chaos.sh --kills 200
# --- end chaos ---

# --- hardening ---
step "chaos with broker kills: 100 client kill -9s, the broker kill -9ed after every 25, each new broker adopting the bus"
scripts/chaos.sh --kills 100 --kill-broker --broker-every 25

step "control-plane chaos: broker frozen past request timeouts, greedy clients, fd exhaustion, deaths mid-request; no phantom subscriber"
scripts/chaos.sh --kills 200 --control

step "chaos with many handles: 660 open (extension holder ids), 100 kill -9s, half of them of crowd processes holding dozens; the broker kill -9ed after every 50 and adopted"
scripts/chaos.sh --many --kills 100 --kill-broker --broker-every 50

step "sanitizers: ASan and TSan over core, shm, broker, client and the cross-process tests"
if [ -d "$(rustc --print sysroot)/lib/rustlib/src/rust/library" ]; then
  scripts/sanitizers.sh asan tsan
else
  scripts/sanitizers.sh asan
  echo "sanitizers: tsan NOT RUN: it rebuilds std and needs the rust-src component (rustup component add rust-src)"
fi
# (The libFuzzer runs, scripts/fuzz.sh, are manual; their harnesses run above
# on stable with a seeded PRNG: tensorbus-core's fuzz_seeded test. Miri needs
# a nightly toolchain: scripts/sanitizers.sh miri.)
# --- end hardening ---

# --- Python bindings ---
step "Python bindings: build into .venv (maturin), pytest across processes"
bindings/python/test.sh
# --- end Python bindings ---

# --- doc snippets ---
step "docs: every code block of README.md, bindings/python/README.md, bindings/c/README.md and examples/README.md runs as written (scripts/test-snippets.sh)"
scripts/test-snippets.sh
# --- end doc snippets ---

# --- model pipeline ---
step "model pipeline: camera → preprocess → PP-OCRv4 detector → sink (installs examples/pipeline pins into .venv)"
examples/pipeline/test.sh
# --- end model pipeline ---

# --- edge ---
step "edge: the model pipeline across two network namespaces, bridged over Zenoh (hit_rate >= 0.95; int8 on a 50 Mbit/s link)"
examples/edge/test.sh
# --- end edge ---

printf '\nall tests passed\n'
