#!/usr/bin/env bash
# Proves that the hot path (loan, publish, recv, release) makes no syscall when
# nobody is parked: runs examples/hot_path_syscalls.rs (100,000 messages, a
# producer thread and a busy-polling consumer thread) under `strace -f` and
# counts the syscalls those two threads make between the BEGIN and END markers.
# Exit status 0 and "hot path syscalls: 0" when there are none.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v strace >/dev/null || { echo "strace is not installed (apt-get install strace)" >&2; exit 2; }
cargo build --release --quiet --example hot_path_syscalls
out=$(mktemp)
trap 'rm -f "$out"' EXIT
tids=$(strace -f -qq -o "$out" "${CARGO_TARGET_DIR:-target}/release/examples/hot_path_syscalls" | grep -oE 'TB-HOT-TIDS [0-9]+ [0-9]+' | cut -d' ' -f2-)
[ -n "$tids" ] || { echo "could not find the thread ids" >&2; exit 2; }
set -- $tids
awk -v a="$1" -v b="$2" '
  /TB-HOT-BEGIN/ { on = 1; next }
  /TB-HOT-END/   { on = 0; next }
  on && ($1 == a || $1 == b) && $2 !~ /^</ && $0 !~ /resumed>/ { n++; print "  " $0 > "/dev/stderr" }
  END { printf "hot path syscalls: %d (threads %s and %s, 100000 messages)\n", n, a, b; exit (n > 0) }
' "$out"
