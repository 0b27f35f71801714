"""Preprocess process: ``camera/raw`` → ``model/input``.

For each frame: receive the read-only view of the camera's slot, loan a
``(1, 3, h, w)`` float32 slot on ``model/input``, resize the frame with
``cv2.resize(..., dst=scratch)`` and normalise the scratch image straight
into the loan (``normalize.Resizer``), release the camera's slot, publish.
The frame index and the camera's publish time travel on in the user header.
"""

from __future__ import annotations

import cv2
import numpy as np
import tensorbus as tb

import common
from normalize import Resizer


def main() -> None:
    args = common.role_parser(__doc__).parse_args()
    cv2.setNumThreads(1)
    in_h, in_w = args.input_size
    resizer = Resizer(in_h, in_w)
    client = common.connect(args, "preprocess")
    frames = client.consumer(common.RAW, policy="block", depth=common.DEPTH, wait_strategy="park")
    producer = client.producer(common.INPUT)
    record = common.Record("preprocess")
    laps = common.Laps()
    common.mark_ready(args, "preprocess")

    timeout = common.FIRST_WAIT_S
    for _ in range(args.frames):
        try:
            raw = common.receive(frames, timeout, laps)
        except tb.Timeout:
            break  # the camera stopped; the launcher reports the missing frames
        timeout = common.NEXT_WAIT_S
        hop_ns = common.now_ns() - raw.timestamp_ns
        frame, _ = common.FRAME_HEADER.unpack(raw.user_header[: common.FRAME_HEADER.size])
        camera_ns = raw.timestamp_ns

        src = np.asarray(raw)
        loan = producer.loan((1, 3, in_h, in_w), "float32", timeout=common.NEXT_WAIT_S)
        dst = np.asarray(loan)
        laps.mark("loan")
        resizer.resize(src)
        laps.mark("resize")
        del src
        raw.release()  # the camera's slot is free again as soon as the resize has read it
        laps.mark("release")
        resizer.normalize(dst)
        del dst
        laps.mark("normalize")
        loan.publish(user_header=common.FRAME_HEADER.pack(frame, camera_ns))
        laps.mark("publish")
        record.add(frame=frame, hop=common.us(hop_ns), **laps.columns())
    record.save(args.run_dir)
    client.close()


if __name__ == "__main__":
    main()
