#!/usr/bin/env bash
# Runs the Rust tests under sanitizers and Miri, as far as this toolchain
# allows (see docs/reliability.md, "Sanitizers, fuzzing, Miri").
#
# Usage: scripts/sanitizers.sh [asan] [tsan] [miri]     (default: asan tsan)
#
#  asan  AddressSanitizer (+ LeakSanitizer) over tensorbus-core, -shm,
#        -broker, the client crate and the cross-process suite (tests/,
#        whose tb-peer children are instrumented too). Stable Rust with
#        RUSTC_BOOTSTRAP=1: the stable sysroot ships the ASan runtime, and an
#        uninstrumented std is fine for ASan.
#  tsan  ThreadSanitizer over the same crates, with std rebuilt instrumented
#        (-Zbuild-std; needs the rust-src component). Without that, rustc
#        refuses to mix a TSan crate with the uninstrumented std (target
#        modifier mismatch), and forcing it would report false races inside
#        std. TSan sees races between threads of one process; races between
#        processes through shared memory are outside what it can observe.
#  miri  Miri over tensorbus-core (unit tests and the seeded fuzz harness):
#        needs a nightly toolchain with the miri and rust-src components
#        (`rustup toolchain install nightly -c miri,rust-src`). The other
#        crates make syscalls Miri cannot run (memfd, mmap of shared memory,
#        futex, SCM_RIGHTS).
#
# The two tests that fault on purpose (a write through a read-only mapping
# must die of SIGSEGV) run separately with handle_segv=0, since the
# sanitizer's own SEGV handler would turn the signal into a report and exit 1.
# Prints one line per tool, `sanitizers: TOOL ok (N s)`; exits non-zero on the
# first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=(asan tsan)
host=$(rustc -vV | sed -n 's/^host: //p')
base=${CARGO_TARGET_DIR:-target}
crates=(-p tensorbus-core -p tensorbus-shm -p tensorbus-broker -p tensorbus -p tensorbus-suite)
export RUSTC_BOOTSTRAP=1

run_asan() {
  local flags="-Zsanitizer=address"
  export CARGO_TARGET_DIR="$base/asan"
  RUSTFLAGS="$flags" RUSTDOCFLAGS="$flags" \
    cargo test --quiet --target "$host" "${crates[@]}" -- --skip mapping_faults
  ASAN_OPTIONS=handle_segv=0 RUSTFLAGS="$flags" RUSTDOCFLAGS="$flags" \
    cargo test --quiet --target "$host" -p tensorbus-shm -p tensorbus-broker --lib --tests -- mapping_faults
}

run_tsan() {
  if ! [ -d "$(rustc --print sysroot)/lib/rustlib/src/rust/library" ]; then
    echo "sanitizers.sh: tsan needs the rust-src component (rustup component add rust-src)" >&2
    return 1
  fi
  export CARGO_TARGET_DIR="$base/tsan"
  # die_after_fork=0: the fork tests' children connect a client of their own,
  # which starts the client library's reconnect watcher thread; TSan by default
  # kills a child that starts a thread after a multi-threaded fork. The library
  # makes that fork safe (a pthread_atfork gate, crates/tensorbus/src/reconnect.rs).
  RUSTFLAGS="-Zsanitizer=thread" TSAN_OPTIONS="halt_on_error=1:die_after_fork=0" \
    cargo test --quiet -Zbuild-std --target "$host" "${crates[@]}" --lib --tests -- --skip mapping_faults
  RUSTFLAGS="-Zsanitizer=thread" TSAN_OPTIONS="halt_on_error=1:handle_segv=0" \
    cargo test --quiet -Zbuild-std --target "$host" -p tensorbus-shm -p tensorbus-broker --lib --tests -- mapping_faults
}

run_miri() {
  if ! cargo +nightly miri --version >/dev/null 2>&1; then
    echo "sanitizers.sh: miri needs a nightly toolchain with miri and rust-src (rustup toolchain install nightly -c miri,rust-src)" >&2
    return 1
  fi
  export CARGO_TARGET_DIR="$base/miri"
  unset RUSTC_BOOTSTRAP
  cargo +nightly miri test --quiet -p tensorbus-core
}

for t in "${tools[@]}"; do
  start=$(date +%s)
  case "$t" in
    asan) run_asan ;;
    tsan) run_tsan ;;
    miri) run_miri ;;
    *) echo "sanitizers.sh: unknown tool $t (asan, tsan, miri)" >&2; exit 2 ;;
  esac
  echo "sanitizers: $t ok ($(( $(date +%s) - start )) s)"
done
