#!/usr/bin/env bash
# The model pipeline: camera → preprocess → PP-OCRv4 text detector → sink,
# four processes on an embedded broker. Usage: examples/pipeline/run.sh [--frames N] [--fps F] [-q] ...
# (see run.py --help). Runs in the repository's .venv (or $TENSORBUS_VENV); on a fresh
# clone the first run sets it up: builds the tensorbus module into it (maturin, needs cargo)
# and installs the pinned OpenCV and model wheel (requirements*.txt). Later runs start at once.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../../scripts/python-env.sh"
tb_ensure_venv
if ! "$tb_venv/bin/python" -c 'import tensorbus' 2>/dev/null; then
  echo "run.sh: building the tensorbus Python module into $tb_venv (first run only)" >&2
  tb_build_module
fi
tb_install_pins "$here/requirements.txt"
tb_install_pins "$here/requirements-nodeps.txt" --no-deps
exec "$tb_venv/bin/python" "$here/run.py" "$@"
