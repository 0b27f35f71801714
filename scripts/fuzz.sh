#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz: libFuzzer + AddressSanitizer) of
# everything consumers and the broker read from shared memory: slot headers
# and tensor metadata (`slot_header`), ring cells and descriptors on the
# receive path plus the broker's repairs over corrupted state
# (`descriptor`), and the ring itself (`ring`). The targets and what they
# check: fuzz/fuzz_targets/, crates/tensorbus-core/tests/fuzz_harness/mod.rs.
#
# Usage: scripts/fuzz.sh [--seconds S] [TARGET...]
#   S: seconds per target (default 60); TARGET: slot_header descriptor ring
#   (default: all three). Prints one line per target:
#     fuzz: TARGET seconds=S execs=N exec_per_s=R corpus=C cov=V crashes=0
#   and exits non-zero on the first crash (the input is in fuzz/artifacts/).
#
# Runs on stable Rust: cargo-fuzz passes -Zsanitizer=address, which stable
# rustc accepts with RUSTC_BOOTSTRAP=1 (its sysroot ships the ASan runtime).
# Installs cargo-fuzz from crates.io if it is missing (a few minutes).
# Not run by CI (installing and building take ~6 minutes on 2 cores); CI
# runs the same harnesses with a seeded PRNG instead
# (cargo test -p tensorbus-core --test fuzz_seeded).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=60
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(slot_header descriptor ring)

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
# -O: optimized; -a: debug assertions, so integer overflow panics too.
cargo fuzz build -O -a

mkdir -p fuzz/logs
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/regressions/$t"
  log="fuzz/logs/$t.log"
  # The regression inputs run first (second corpus directory, read only).
  set +e
  cargo fuzz run -O -a "$t" "fuzz/corpus/$t" "fuzz/regressions/$t" -- \
    -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
  corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
  crashes=0
  [ $rc -eq 0 ] || crashes=1
  echo "fuzz: $t seconds=$seconds execs=$(stat number_of_executed_units) exec_per_s=$(stat average_exec_per_sec) corpus=$corpus cov=${cov:-?} crashes=$crashes"
  if [ $rc -ne 0 ]; then
    grep -E 'panicked|ERROR: AddressSanitizer|Failing input|artifact' -A3 "$log" | head -40 >&2
    echo "fuzz.sh: $t failed (exit $rc); full log: $log" >&2
    exit 1
  fi
done
