#!/usr/bin/env bash
# Makes the virtual environment of the bridge's Python interop test
# (crates/tensorbus-bridge/tests/python_interop.rs): plain eclipse-zenoh and
# numpy, deliberately without the tensorbus module, at $TENSORBUS_BRIDGE_VENV
# (default .venv-bridge). Costs nothing when the pins are already there.
# Usage: scripts/bridge-python-env.sh      (run by scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${TENSORBUS_BRIDGE_VENV:-$PWD/.venv-bridge}
pins=crates/tensorbus-bridge/python/requirements.txt
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
TENSORBUS_VENV=$venv source scripts/python-env.sh
tb_pins_installed "$pins" ||
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$pins"
