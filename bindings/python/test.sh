#!/usr/bin/env bash
# Builds the Python module into the repository's virtual environment (.venv)
# and runs its tests: rustfmt and clippy on the binding crate, `maturin
# develop --release`, then pytest (real processes, an embedded broker, and
# the `tensorbus broker` binary, built here).
# Usage: bindings/python/test.sh [pytest args...]   (from anywhere)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
source scripts/python-env.sh
# The real broker binary for tests/test_cli_broker.py (debug build, like `cargo test`'s).
cargo build --quiet -p tensorbus-cli
export TENSORBUS_CLI="${CARGO_TARGET_DIR:-$root/target}/debug/tensorbus"

tb_ensure_venv
tb_install_pins bindings/python/requirements-dev.txt
cargo fmt --manifest-path bindings/python/Cargo.toml -- --check
PYO3_PYTHON="$tb_venv/bin/python" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}/python" \
  cargo clippy --quiet --release --manifest-path bindings/python/Cargo.toml --all-targets -- -D warnings
tb_build_module
# Types: mypy --strict on the package, its stubs and tests/typing_usage.py
# (settings in pyproject.toml), then the stubs against the compiled module.
export MYPY_CACHE_DIR="${CARGO_TARGET_DIR:-$root/target}/python/mypy"
(cd bindings/python && "$tb_venv/bin/python" -m mypy)
"$tb_venv/bin/python" -m mypy.stubtest tensorbus._tensorbus tensorbus._errors tensorbus._aio
cd bindings/python
exec "$tb_venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
