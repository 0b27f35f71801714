#!/usr/bin/env bash
# Installs what scripts/test-all.sh needs on a fresh machine, and nothing that
# is already there (so it costs ~1 s on a set-up machine): Debian packages
# (strace, valgrind, pkg-config, make, gcc, python3-venv, GStreamer's
# videotestsrc, prometheus with promtool, tmux), the clippy/rustfmt/rust-src
# components, and cbindgen (pinned:
# the committed C header is checked against its exact output). The Python
# virtual environment and its pins are set up by scripts/python-env.sh when
# the Python steps run.
# Usage: scripts/setup.sh      (run by scripts/test-all.sh; apt-get needs root or sudo)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v strace >/dev/null || need_apt+=(strace)
# --- C bindings ---
command -v valgrind >/dev/null || need_apt+=(valgrind)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v make >/dev/null || need_apt+=(make)
command -v cc >/dev/null || need_apt+=(gcc)
# --- end C bindings ---
# --- Python bindings ---
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv python3-pip)
# --- end Python bindings ---
# --- shell pipes ---
# crates/tensorbus-cli/tests/pipes.rs pipes GStreamer's videotestsrc through pub/sub.
command -v gst-launch-1.0 >/dev/null || need_apt+=(gstreamer1.0-tools gstreamer1.0-plugins-base)
# --- end shell pipes ---
# --- top ---
# crates/tensorbus-cli/tests/top.rs drives `tensorbus top` in a real terminal under tmux.
command -v tmux >/dev/null || need_apt+=(tmux)
# --- end top ---
# --- metrics ---
# crates/tensorbus-cli/tests/metrics.rs has a real Prometheus scrape the broker and promtool lint
# the output; installed without its recommends (no node exporter).
need_apt_norec=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || need_apt_norec+=(prometheus)
# --- end metrics ---
# --- bridge ---
# crates/tensorbus-bridge/tests/netns.rs: bridges in two network namespaces (ip netns, veth, tc).
command -v ip >/dev/null && command -v tc >/dev/null || need_apt+=(iproute2)
# --- end bridge ---
if [ ${#need_apt[@]} -gt 0 ] || [ ${#need_apt_norec[@]} -gt 0 ]; then
  sudo=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then
      sudo=(sudo)
    else
      echo "setup: need Debian packages ${need_apt[*]} ${need_apt_norec[*]}; run as root: apt-get install ${need_apt[*]} ${need_apt_norec[*]}" >&2
      exit 1
    fi
  fi
  echo "setup: installing ${need_apt[*]} ${need_apt_norec[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  if [ ${#need_apt[@]} -gt 0 ]; then
    "${sudo[@]}" apt-get install -y -qq "${need_apt[@]}"
  fi
  if [ ${#need_apt_norec[@]} -gt 0 ]; then
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need_apt_norec[@]}"
  fi
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
# --- C bindings ---
cbindgen --version 2>/dev/null | grep -qx 'cbindgen 0.29.4' || cargo install cbindgen --version 0.29.4 --locked
# --- end C bindings ---
# --- hardening ---
# ThreadSanitizer rebuilds std instrumented (-Zbuild-std), which needs the std sources.
# If they cannot be downloaded, the TSan step says "NOT RUN" instead of failing.
rustup component list --installed 2>/dev/null | grep -q '^rust-src' || rustup component add rust-src ||
  echo "setup: WARNING: rustup could not add rust-src; ThreadSanitizer will not run" >&2
# --- end hardening ---
# --- bridge ---
# The bridge's Python interop test: plain eclipse-zenoh + numpy in .venv-bridge (no tensorbus).
scripts/bridge-python-env.sh
# --- end bridge ---
exit 0
