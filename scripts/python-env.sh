# Sourced (not run) by the scripts that use Python: the repository's virtual
# environment and pinned installs, in one place.
#   source "$root/scripts/python-env.sh"   # from anywhere
#   tb_ensure_venv                   # creates $tb_venv (.venv, or $TENSORBUS_VENV) if missing
#   tb_install_pins FILE [--no-deps] # pip-installs FILE's `name==version` pins unless all are there
#   tb_build_module                  # builds the tensorbus module into $tb_venv (maturin, release)
# Pins that are already installed cost no network, so the scripts stay quick on a warm machine.

tb_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tb_venv=${TENSORBUS_VENV:-$tb_root/.venv}

tb_ensure_venv() {
  if [ ! -x "$tb_venv/bin/python" ]; then
    python3 -m venv "$tb_venv"
  fi
}

# Exit status 0 when every `name==version` line of the given files is installed at that version.
tb_pins_installed() {
  "$tb_venv/bin/python" - "$@" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
for path in sys.argv[1:]:
    for line in open(path):
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, want = line.split("==")
        try:
            if version(name.strip()) != want.strip():
                sys.exit(1)
        except PackageNotFoundError:
            sys.exit(1)
PY
}

tb_install_pins() {
  local file=$1
  shift
  tb_pins_installed "$file" ||
    "$tb_venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" -r "$file"
}

tb_build_module() {
  tb_install_pins "$tb_root/bindings/python/requirements-dev.txt"
  CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$tb_root/target}/python" VIRTUAL_ENV="$tb_venv" \
    "$tb_venv/bin/maturin" develop --quiet --release -m "$tb_root/bindings/python/Cargo.toml"
}
