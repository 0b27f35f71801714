#!/usr/bin/env bash
# The model pipeline's tests: installs its pinned dependencies into the
# repository's .venv (only those missing or at another version; no network
# otherwise), then runs pytest on examples/pipeline (a short run of the whole
# pipeline, and the zero-copy checks). Needs the tensorbus module in .venv
# (bindings/python/test.sh builds it). Usage: examples/pipeline/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${TENSORBUS_VENV:-$PWD/.venv}
dir=examples/pipeline

if ! "$venv/bin/python" -c 'import tensorbus' 2>/dev/null; then
  echo "examples/pipeline/test.sh: no tensorbus module in $venv; build it first: bindings/python/test.sh" >&2
  exit 1
fi
# Exit status 0 when every pin of the given requirements files is installed at its version.
pinned() {
  "$venv/bin/python" - "$@" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
for path in sys.argv[1:]:
    for line in open(path):
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
}
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
pinned "$dir/requirements.txt" || "${pip[@]}" -r "$dir/requirements.txt"
pinned "$dir/requirements-nodeps.txt" || "${pip[@]}" --no-deps -r "$dir/requirements-nodeps.txt"

exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$dir" "$@"
