#!/usr/bin/env python3
"""producer: publishes small float32 frames, written in place in shared memory.

Every frame is a 4 x 8 float32 tensor; element i (row-major) of frame n is
n * 100 + i. The user header carries the frame counter (uint64, little-endian,
bytes 0..8) and how many stages changed the frame (uint32, bytes 8..12; 0
here). The same frames come from examples/rust/producer.rs and
examples/c/producer.c, so any consumer or stage of the three languages reads
them.

    tensorbus broker --config examples/tensorbus.toml --socket /tmp/tb-ex.sock &
    python examples/python/consumer.py --socket /tmp/tb-ex.sock --channel frames/raw &
    python examples/python/producer.py --socket /tmp/tb-ex.sock [--count 10] [--interval-ms 100]

Needs the tensorbus module (pip install ./bindings/python) and numpy. Without
--socket it connects to $TENSORBUS_SOCKET or the default socket. Options:
--channel NAME (default frames/raw), --count N frames (default 10),
--interval-ms MS between frames (default 100).
"""

import argparse
import struct
import sys
import time

import numpy as np

import tensorbus as tb

ROWS, COLS = 4, 8


def main() -> int:
    p = argparse.ArgumentParser(description="publishes the example frames")
    p.add_argument("--socket", help="broker socket (default: $TENSORBUS_SOCKET or the default path)")
    p.add_argument("--channel", default="frames/raw")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--interval-ms", type=float, default=100)
    args = p.parse_args()

    with tb.Client(args.socket, name="producer.py") as client:
        producer = client.producer(args.channel)
        what = f"{args.count} frames of {ROWS}x{COLS} float32 on {args.channel}"
        print(f"producer: publishing {what}", flush=True)
        for frame in range(args.count):
            # Wait up to 1 s for a free slot if every slot is still being read.
            with producer.loan((ROWS, COLS), "float32", timeout=1.0) as t:
                x = np.asarray(t)  # a writable view of the slot: no copy
                x[:] = (frame * 100 + np.arange(ROWS * COLS)).reshape(ROWS, COLS)
                del x
                header = struct.pack("<QI", frame, 0)  # frame counter, stages so far
                delivered = t.publish(user_header=header)  # readers hold the slot now
            print(f"producer: frame {frame} delivered to {delivered}", flush=True)
            time.sleep(args.interval_ms / 1000)
        print(f"producer: published {args.count} frames", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except tb.TensorbusError as e:
        sys.exit(f"producer: {e}")
