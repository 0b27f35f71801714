"""Camera process: draws each frame straight into a loaned ``camera/raw``
slot and publishes it, paced to ``--fps``.

The frame is never built anywhere else: the background is copied into the
slot's numpy view (one ``np.copyto``) and ``cv2.putText`` draws on that view.
The user header carries the frame index, from which the sink recomputes the
truth (``scene.truth_boxes``).
"""

from __future__ import annotations

import time

import cv2
import numpy as np

import common
import scene


def main() -> None:
    p = common.role_parser(__doc__)
    p.add_argument("--fps", type=float, default=5.0, help="frames per second (0 = as fast as the pipeline takes them)")
    args = p.parse_args()
    cv2.setNumThreads(1)
    height, width = args.frame_size
    painter = scene.Painter(height, width)
    client = common.connect(args, "camera")
    producer = client.producer(common.RAW)
    record = common.Record("camera")
    laps = common.Laps()
    common.mark_ready(args, "camera")

    period_ns = int(1e9 / args.fps) if args.fps > 0 else 0
    start = common.now_ns()
    for frame in range(args.frames):
        if period_ns:
            delay = start + frame * period_ns - common.now_ns()
            if delay > 0:
                time.sleep(delay / 1e9)
        laps.restart()
        loan = producer.loan((height, width, 3), "uint8", timeout=common.NEXT_WAIT_S)
        view = np.asarray(loan)
        laps.mark("loan")
        painter.draw(frame, view)
        del view
        laps.mark("draw")
        loan.publish(user_header=common.FRAME_HEADER.pack(frame, 0))
        laps.mark("publish")
        record.add(frame=frame, **laps.columns())
    record.save(args.run_dir, published=args.frames, elapsed_s=(common.now_ns() - start) / 1e9)
    client.close()


if __name__ == "__main__":
    main()
