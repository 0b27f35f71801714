#!/usr/bin/env bash
# examples/edge's test: two short runs across the namespaces, each must end
# with hit_rate >= 0.95; the second on a link throttled to 50 Mbit/s with
# model/input quantized to int8, whose bytes on the wire must be under 30%
# of the f32 tensors'. Needs root and iproute2 (skips without them, fails
# instead under TENSORBUS_REQUIRE_NETNS=1), and the pipeline's .venv
# (examples/pipeline/test.sh, which runs first in scripts/test-all.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/python-env.sh
if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
  if [ -n "${TENSORBUS_REQUIRE_NETNS:-}" ]; then
    echo "examples/edge/test.sh: TENSORBUS_REQUIRE_NETNS is set but this is not root with iproute2" >&2
    exit 1
  fi
  echo "examples/edge/test.sh: SKIPPED: needs root and iproute2 (ip netns, tc)"
  exit 0
fi
target="${CARGO_TARGET_DIR:-target}"
[ -x "$target/debug/tensorbus-bridge" ] || [ -x "$target/release/tensorbus-bridge" ] || cargo build --quiet -p tensorbus-bridge

check() { # ARGS...: one run; prints its lines; fails below hit_rate 0.95
  local out line hit
  out=$("$tb_venv/bin/python" examples/edge/run.py --frames 20 --fps 5 -q "$@")
  echo "$out"
  line=$(grep '^edge: frames=' <<<"$out")
  hit=$(sed -E 's/.*hit_rate=([0-9.]+).*/\1/' <<<"$line")
  awk -v h="$hit" 'BEGIN { exit !(h >= 0.95) }' || { echo "examples/edge/test.sh: hit_rate $hit < 0.95 ($*)" >&2; exit 1; }
  ratio=$(grep '^edge: model/input' <<<"$out" | sed -E 's/.*wire\/raw=([0-9.]+).*/\1/')
}
check
check --rate 50mbit --quantize int8
awk -v r="$ratio" 'BEGIN { exit !(r < 0.30) }' || { echo "examples/edge/test.sh: int8 route sent $ratio of the bytes" >&2; exit 1; }
echo "examples/edge/test.sh: ok"
