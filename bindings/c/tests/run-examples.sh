#!/usr/bin/env bash
# Smoke run of the C examples: a broker with examples/c/sensor.toml, the C
# consumer, and the C sensor producer publishing 20 sweeps at 200 Hz.
# Usage: run-examples.sh TENSORBUS_BIN BUILD_DIR EXAMPLES_DIR
set -euo pipefail
broker_bin=$1 build=$2 examples=$3
dir=$(mktemp -d /tmp/tb-cexample-XXXXXX)
sock=$dir/broker.sock
"$broker_bin" broker --config "$examples/sensor.toml" --socket "$sock" 2>/dev/null &
broker=$!
trap 'kill $broker 2>/dev/null; wait $broker 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
"$build/consumer" "$sock" 20 > "$dir/consumer.out" &
consumer=$!
sleep 0.3   # let the consumer subscribe before the first sweep
"$build/sensor_producer" "$sock" 20 200
wait $consumer
tail -n 2 "$dir/consumer.out"
grep -q "consumer: received 20 sweeps" "$dir/consumer.out"
