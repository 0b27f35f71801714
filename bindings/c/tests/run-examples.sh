#!/usr/bin/env bash
# Smoke runs of the C examples:
#  0. --help / -h of each program;
#  1. a broker with examples/c/sensor.toml, the C sensor_consumer, and the C
#     sensor producer publishing 20 sweeps at 200 Hz;
#  2. a broker with examples/tensorbus.toml and the C frame chain
#     producer -> stage -> consumer (issue 13.8), the consumer checking every
#     value. (bindings/python/tests/test_examples.py runs the same programs
#     mixed with their Rust and Python mirrors.)
# Usage: run-examples.sh TENSORBUS_BIN BUILD_DIR EXAMPLES_DIR
set -euo pipefail
broker_bin=$1 build=$2 examples=$3
dir=$(mktemp -d /tmp/tb-cexample-XXXXXX)
brokers=()
trap 'for b in "${brokers[@]}"; do kill $b 2>/dev/null; wait $b 2>/dev/null; done; rm -rf "$dir"' EXIT

# start_broker CONFIG SOCKET: starts a broker and waits for its socket.
start_broker() {
  "$broker_bin" broker --config "$1" --socket "$2" 2>/dev/null &
  brokers+=($!)
  for _ in $(seq 100); do [ -S "$2" ] && return; sleep 0.05; done
  echo "run-examples: the broker did not create $2" >&2
  exit 1
}

# wait_line FILE TEXT: waits (up to 5 s) until FILE has a line starting with TEXT.
wait_line() {
  for _ in $(seq 100); do grep -q "^$2" "$1" && return; sleep 0.05; done
  echo "run-examples: no line '$2' in $1:" >&2
  cat "$1" >&2
  exit 1
}

# 0. every program answers --help and -h with its usage (exit 0), and
#    refuses an unknown option with its usage (exit 2)
for prog in producer stage consumer sensor_producer sensor_consumer; do
  for flag in --help -h; do
    "$build/$prog" "$flag" > "$dir/help.out"
    grep -q "^usage: $prog " "$dir/help.out"
  done
  status=0
  "$build/$prog" --no-such-option > /dev/null 2> "$dir/help.err" || status=$?
  [ "$status" = 2 ] && grep -q "^usage: $prog " "$dir/help.err" \
    || { echo "run-examples: $prog --no-such-option: status $status" >&2; cat "$dir/help.err" >&2; exit 1; }
done

# 1. sensor sweeps
sock=$dir/sensor.sock
start_broker "$examples/sensor.toml" "$sock"
"$build/sensor_consumer" "$sock" 20 > "$dir/consumer.out" &
consumer=$!
sleep 0.3   # let the consumer subscribe before the first sweep
"$build/sensor_producer" "$sock" 20 200
wait $consumer
tail -n 2 "$dir/consumer.out"
grep -q "sensor_consumer: received 20 sweeps" "$dir/consumer.out"

# 2. producer -> stage -> consumer
sock=$dir/frames.sock
start_broker "$examples/../tensorbus.toml" "$sock"
"$build/consumer" --socket "$sock" --count 20 > "$dir/frames-consumer.out" &
consumer=$!
wait_line "$dir/frames-consumer.out" "consumer: subscribed"
"$build/stage" --socket "$sock" --count 20 > "$dir/stage.out" &
stage=$!
wait_line "$dir/stage.out" "stage: frames/raw -> frames/doubled"
"$build/producer" --socket "$sock" --count 20 --interval-ms 0 > "$dir/producer.out"
wait $stage
wait $consumer
tail -n 2 "$dir/frames-consumer.out"
grep -q "consumer: frame 19 seq 19 stages 1 row 0 \[3800, 3802, 3804" "$dir/frames-consumer.out"
grep -q "consumer: 20 frames checked" "$dir/frames-consumer.out"
