#!/usr/bin/env bash
# The model pipeline's tests: installs its pinned dependencies into the
# repository's .venv (only those missing or at another version; no network
# otherwise), then runs pytest on examples/pipeline (a short run of the whole
# pipeline, and the zero-copy checks). Needs the tensorbus module in .venv
# (bindings/python/test.sh builds it). Usage: examples/pipeline/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/python-env.sh
dir=examples/pipeline

if ! "$tb_venv/bin/python" -c 'import tensorbus' 2>/dev/null; then
  echo "examples/pipeline/test.sh: no tensorbus module in $tb_venv; build it first: bindings/python/test.sh" >&2
  exit 1
fi
tb_install_pins "$dir/requirements.txt"
tb_install_pins "$dir/requirements-nodeps.txt" --no-deps

exec "$tb_venv/bin/python" -m pytest -q -p no:cacheprovider "$dir" "$@"
