#!/usr/bin/env bash
# examples/pipeline split over two network namespaces ("edge", "server") with a broker
# each and tensorbus-bridge between them. Usage (as root):
#   examples/edge/run.sh [--frames N] [--fps F] [--rate 50mbit] [--quantize int8|f16] [-q]
# Sets up the pipeline's .venv like examples/pipeline/run.sh, and builds
# tensorbus-bridge (release) when none is built.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
source "$root/scripts/python-env.sh"
tb_ensure_venv
if ! "$tb_venv/bin/python" -c 'import tensorbus' 2>/dev/null; then
  echo "run.sh: building the tensorbus Python module into $tb_venv (first run only)" >&2
  tb_build_module
fi
tb_install_pins "$root/examples/pipeline/requirements.txt"
tb_install_pins "$root/examples/pipeline/requirements-nodeps.txt" --no-deps
target="${CARGO_TARGET_DIR:-$root/target}"
if [ -z "${TENSORBUS_BRIDGE:-}" ] && [ ! -x "$target/release/tensorbus-bridge" ] && [ ! -x "$target/debug/tensorbus-bridge" ]; then
  (cd "$root" && cargo build --release --quiet -p tensorbus-bridge)
fi
exec "$tb_venv/bin/python" "$here/run.py" "$@"
