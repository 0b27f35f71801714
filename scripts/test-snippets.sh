#!/usr/bin/env bash
# Runs every fenced code block of README.md, bindings/python/README.md,
# bindings/c/README.md and examples/README.md as written (extracted from the
# files on each run), each against the broker its text says to start, with a
# timeout; prints a table (file:line, lang, result, seconds) and fails if a
# block fails or hangs. How each block runs is declared by the
# `<!-- snippet: ... -->` comment before it: see scripts/snippets.py.
#
# Usage: scripts/test-snippets.sh [-v] [--keep] [FILE | FILE:LINE ...]
#   scripts/test-snippets.sh README.md        one file
#   scripts/test-snippets.sh README.md:42     one block (with the blocks of its group before it)
#
# First it builds what the docs have a user build: the CLI (target/release/tensorbus,
# the `tensorbus` of the docs), the C library with its build-tree tensorbus.pc and
# the C examples, the Rust examples; and an empty venv into which
# `pip install ./bindings/python` installs the module (target/snippets-venv, kept
# while bindings/python and crates/ are unchanged). The docs name target/, so the
# default target directory is used whatever CARGO_TARGET_DIR says.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

for arg in "$@"; do
  if [ "$arg" = --list ]; then exec python3 scripts/snippets.py "$@"; fi
done

if [ -n "${CARGO_TARGET_DIR:-}" ] && [ "$(realpath -m "$CARGO_TARGET_DIR")" != "$root/target" ]; then
  echo "test-snippets: the docs name target/: building there, not in CARGO_TARGET_DIR=$CARGO_TARGET_DIR" >&2
fi
unset CARGO_TARGET_DIR

echo "test-snippets: building the CLI, the C library and examples, the Rust examples"
cargo build --quiet --release -p tensorbus-cli
make --quiet -C bindings/c examples >/dev/null 2>&1 || make -C bindings/c examples
cargo build --quiet --examples

# The venv: created empty, then `pip install ./bindings/python` as the README says;
# rebuilt when what goes into the module changes. What blocks install besides
# (the benchmark's optional peers) is uninstalled again at the end, so that each
# run starts from the same venv and nothing installed by a block can make the
# README's snippet pass.
venv=$root/target/snippets-venv
key=$( { python3 --version; find bindings/python crates Cargo.lock -type f \
           -not -path '*/target/*' -not -path '*/__pycache__/*' -not -name '*.pyc' -print0 |
           sort -z | xargs -0 sha256sum; } | sha256sum | cut -d' ' -f1)
freeze() { "$venv/bin/pip" freeze --disable-pip-version-check --exclude-editable 2>/dev/null | sort; }
if [ "$(cat "$venv/.snippets-key" 2>/dev/null)" != "$key" ] ||
   [ "$(freeze)" != "$(cat "$venv/.snippets-freeze" 2>/dev/null)" ]; then
  echo "test-snippets: new venv $venv (python3 -m venv, pip install ./bindings/python)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check ./bindings/python
  echo "$key" >"$venv/.snippets-key"
  freeze >"$venv/.snippets-freeze"
fi

# The driver itself first, on blocks whose outcomes are known (a few seconds).
selftest=$(python3 scripts/snippets.py --venv "$venv" --self-test 2>&1) || { echo "$selftest"; exit 1; }
echo "$selftest" | tail -1

rc=0
python3 scripts/snippets.py --venv "$venv" "$@" || rc=$?
extra=$(comm -13 "$venv/.snippets-freeze" <(freeze) | sed -e 's/[=@ ].*//')
if [ -n "$extra" ]; then
  # shellcheck disable=SC2086
  "$venv/bin/pip" uninstall --quiet --yes $extra || rm -f "$venv/.snippets-key"
fi
exit $rc
