#!/usr/bin/env bash
# Builds the Python module into the repository's virtual environment (.venv)
# and runs its tests: rustfmt and clippy on the binding crate, `maturin
# develop --release`, then pytest (real processes, an embedded broker, and
# the `tensorbus broker` binary, built here).
# Usage: bindings/python/test.sh [pytest args...]   (from anywhere)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
venv=${TENSORBUS_VENV:-$root/.venv}
# The real broker binary for tests/test_cli_broker.py (debug build, like `cargo test`'s).
cargo build --quiet -p tensorbus-cli
export TENSORBUS_CLI="${CARGO_TARGET_DIR:-$root/target}/debug/tensorbus"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}/python"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# Install the pinned tools only when they are not there yet (no network then).
if ! "$venv/bin/python" - bindings/python/requirements-dev.txt <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, want = line.split("==")
    try:
        if version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PY
then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r bindings/python/requirements-dev.txt
fi

cargo fmt --manifest-path bindings/python/Cargo.toml -- --check
PYO3_PYTHON="$venv/bin/python" cargo clippy --quiet --release --manifest-path bindings/python/Cargo.toml --all-targets -- -D warnings
VIRTUAL_ENV="$venv" "$venv/bin/maturin" develop --quiet --release -m bindings/python/Cargo.toml
# Types: mypy --strict on the package, its stubs and tests/typing_usage.py
# (settings in pyproject.toml), then the stubs against the compiled module.
export MYPY_CACHE_DIR="$CARGO_TARGET_DIR/mypy"
(cd bindings/python && "$venv/bin/python" -m mypy)
"$venv/bin/python" -m mypy.stubtest tensorbus._tensorbus tensorbus._errors tensorbus._aio
cd bindings/python
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
