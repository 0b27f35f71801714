#!/usr/bin/env bash
# Chaos harness: runs producers, stages and consumers of a live broker on
# broadcast and work-queue channels with all four policies, kill -9's random
# clients at random moments and restarts them, then quiesces and checks that
# no slot leaked and no tensor was lost, duplicated or corrupted, and that no
# client crashed. See docs/reliability.md ("Chaos") for the exact definitions.
#
# Usage: scripts/chaos.sh [--kills N] [--seconds S] [--seed X]
#                         [--interval-ms M] [--dir D] [--keep]
#                         [--kill-broker [--broker-every K] | --control | --many]
#
# Progress goes to stderr; the last line on stdout is
#   chaos: kills=N leaked_slots=L lost=M duplicated=D corrupt=C crashed=X unaccounted_drops=U
# and the exit status is non-zero unless every counter but kills is 0.
# --kill-broker also kill -9s the broker (its own process then) after every
# K client kills (default 50): the line gains broker_kills=B after kills and
# broker_failures=F at the end (see docs/reliability.md, "Broker kills").
# --control adds control-plane chaos (the broker runs as its own process):
# it is frozen with SIGSTOP past the openers' request timeout, clients send
# requests and never read the replies, run out of file descriptors, and are
# kill -9ed mid-request, and a client forks children whose inherited handles
# must be inert while its own keep working; the line gains freezes=F
# greedy_disconnected=G opener_kills=K request_timeouts=T emfile=E forks=N
# forked_child_errors=R after kills and phantom_subscribers=P
# control_failures=C fork_failures=X at the end (all three must be 0).
# --many adds hundreds of handles (issue 16): 10 crowd processes of 64 lossy
# subscriptions each (most on extension holder ids) that check every byte,
# hold dozens of tensors at once and take half the kills; the broker admits
# 256 subscribers per channel and 1,024 handles. The line gains
# crowd_kills=K open_handles_peak=N after kills and too_few_handles=T at the
# end (1 when fewer than 500 handles were ever open at once). --many runs
# with the embedded broker only (not with --kill-broker or --control).
# Re-run with the printed --seed to replay the same kill schedule (the
# processes' own interleaving still varies from run to run).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p tensorbus-chaos
exec cargo run --release --quiet -p tensorbus-chaos -- "$@"
