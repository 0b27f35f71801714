#!/usr/bin/env python3
"""stage: takes each example frame exclusively, doubles every value in place
(in the shared-memory slot itself, no copy), adds one to the stage count in
the user header and forwards the very same slot.

Input: the frames of examples/{rust,python,c}/producer.*, or of another stage;
output: what examples/{rust,python,c}/consumer.* checks. A stage's input must
be a workqueue channel (each frame goes to one worker).

    tensorbus broker --config examples/tensorbus.toml --socket /tmp/tb-ex.sock &
    python examples/python/consumer.py --socket /tmp/tb-ex.sock &
    python examples/python/stage.py --socket /tmp/tb-ex.sock [--input frames/raw] [--output frames/doubled] &
    python examples/python/producer.py --socket /tmp/tb-ex.sock

Needs the tensorbus module (pip install ./bindings/python) and numpy.
Options: --input NAME (default frames/raw), --output NAME (default
frames/doubled), --count N frames to forward (default 10), --timeout S to
wait for each one (default 10).
"""

import argparse
import struct
import sys

import numpy as np

import tensorbus as tb


def main() -> int:
    p = argparse.ArgumentParser(description="doubles the example frames in place and forwards them")
    p.add_argument("--socket", help="broker socket (default: $TENSORBUS_SOCKET or the default path)")
    p.add_argument("--input", default="frames/raw")
    p.add_argument("--output", default="frames/doubled")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--timeout", type=float, default=10)
    args = p.parse_args()

    with tb.Client(args.socket, name="stage.py") as client:
        stage = client.stage(args.input, args.output)
        print(f"stage: {args.input} -> {args.output}", flush=True)
        for _ in range(args.count):
            with stage.recv_mut(timeout=args.timeout) as t:  # writable: we hold it alone
                x = np.asarray(t)
                x *= 2  # in the slot itself
                del x
                if len(t.user_header) < 12:
                    print(f"stage: user header has {len(t.user_header)} bytes, want 12", file=sys.stderr)
                    return 1
                frame, stages = struct.unpack_from("<QI", t.user_header)
                t.user_header = struct.pack("<QI", frame, stages + 1)
                delivered = t.forward()  # the same slot goes on to the output
            print(f"stage: frame {frame} doubled, forwarded to {delivered}", flush=True)
        print(f"stage: {args.count} frames forwarded", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except tb.TensorbusError as e:
        sys.exit(f"stage: {e}")
