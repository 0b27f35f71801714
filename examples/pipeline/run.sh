#!/usr/bin/env bash
# The model pipeline: camera → preprocess → PP-OCRv4 text detector → sink,
# four processes on an embedded broker. Usage: examples/pipeline/run.sh [--frames N] [--fps F] [-q] ...
# (see run.py --help). Uses the repository's .venv when it exists (bindings/python/test.sh
# builds tensorbus into it; examples/pipeline/test.sh installs requirements.txt into it).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${TENSORBUS_VENV:-$here/../../.venv}"
python=python3
if [ -x "$venv/bin/python" ]; then python="$venv/bin/python"; fi
exec "$python" "$here/run.py" "$@"
