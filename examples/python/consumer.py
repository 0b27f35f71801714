#!/usr/bin/env python3
"""consumer: receives the example frames as read-only views of the producer's
shared memory, prints them and checks every value.

It reads the frames of examples/{rust,python,c}/producer.* (4 x 8 float32,
element i of frame n is n * 100 + i, user header: frame counter uint64 LE +
stage count uint32 LE), directly or after any number of stages (each doubled
every value and added one to the stage count). It checks the shape, the
dtype, every value, and that the frame counters follow each other; it exits
with status 1 on the first mismatch.

    tensorbus broker --config examples/tensorbus.toml --socket /tmp/tb-ex.sock &
    python examples/python/consumer.py --socket /tmp/tb-ex.sock [--channel frames/doubled] [--count 10]

Start it before the producer (a channel keeps no history). Needs the
tensorbus module (pip install ./bindings/python) and numpy. Options:
--channel NAME (default frames/doubled, the stage's output; frames/raw reads
the producer directly), --count N frames to receive (default 10), --timeout S
to wait for each one (default 10).
"""

import argparse
import struct
import sys

import numpy as np

import tensorbus as tb

ROWS, COLS = 4, 8


def main() -> int:
    p = argparse.ArgumentParser(description="receives and checks the example frames")
    p.add_argument("--socket", help="broker socket (default: $TENSORBUS_SOCKET or the default path)")
    p.add_argument("--channel", default="frames/doubled")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--timeout", type=float, default=10)
    args = p.parse_args()

    with tb.Client(args.socket, name="consumer.py") as client:
        # Lossless: a producer waits for us rather than drop a frame.
        consumer = client.consumer(args.channel, policy="block")
        print(f"consumer: subscribed to {args.channel}", flush=True)
        expected = None
        for _ in range(args.count):
            with consumer.recv(timeout=args.timeout) as t:
                if len(t.user_header) < 12:
                    return fail(f"user header has {len(t.user_header)} bytes, want 12")
                frame, stages = struct.unpack_from("<QI", t.user_header)
                if t.shape != (ROWS, COLS) or t.dtype != "float32":
                    return fail(f"frame {frame}: {t.shape} {t.dtype}, want (4, 8) float32")
                if expected is not None and frame != expected:
                    return fail(f"frame {frame} arrived, want frame {expected}")
                expected = frame + 1
                x = np.asarray(t)  # read-only, the producer's own bytes
                # element i of frame n is n * 100 + i, doubled by each stage
                want = (frame * 100 + np.arange(ROWS * COLS, dtype=np.float32)) * 2.0**stages
                want = want.reshape(ROWS, COLS)
                wrong = np.flatnonzero(x != want)
                if wrong.size:
                    i = int(wrong[0])
                    return fail(f"frame {frame} element {i}: {x.flat[i]:g}, want {want.flat[i]:g}")
                row0 = ", ".join(f"{v:g}" for v in x[0])
                del x  # the slot is released at the end of the with block, once no array is left
                print(f"consumer: frame {frame} seq {t.seq} stages {stages} row 0 [{row0}] ok", flush=True)
        print(f"consumer: {args.count} frames checked", flush=True)
    return 0


def fail(message: str) -> int:
    print(f"consumer: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except tb.TensorbusError as e:
        sys.exit(f"consumer: {e}")
