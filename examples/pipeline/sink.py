"""Sink process: ``detections`` → checked against the truth.

For each frame it recomputes the true text boxes from the frame index in the
user header (``scene.truth_boxes``), matches them to the detected boxes by
IoU, and measures the end-to-end latency: now minus the camera's publish time
(both CLOCK_MONOTONIC). A frame is a hit when every true box has a detection
with IoU >= 0.5.
"""

from __future__ import annotations

import numpy as np
import tensorbus as tb

import common
import scene

IOU_HIT = 0.5


def iou_matrix(truth: np.ndarray, found: np.ndarray) -> np.ndarray:
    """IoU of every true box (rows) with every found box (columns); boxes are ``x0, y0, x1, y1``."""
    t = truth[:, None, :4].astype(np.float64)
    f = found[None, :, :4].astype(np.float64)
    w = np.clip(np.minimum(t[..., 2], f[..., 2]) - np.maximum(t[..., 0], f[..., 0]), 0, None)
    h = np.clip(np.minimum(t[..., 3], f[..., 3]) - np.maximum(t[..., 1], f[..., 1]), 0, None)
    inter = w * h
    area_t = (t[..., 2] - t[..., 0]) * (t[..., 3] - t[..., 1])
    area_f = (f[..., 2] - f[..., 0]) * (f[..., 3] - f[..., 1])
    return inter / np.maximum(area_t + area_f - inter, 1e-9)


def match(truth: np.ndarray, found: np.ndarray) -> tuple[np.ndarray, int]:
    """Best IoU of each true box, and how many found boxes match no true box."""
    if len(found) == 0:
        return np.zeros(len(truth)), 0
    ious = iou_matrix(truth, found)
    extra = int((ious.max(axis=0, initial=0.0) < IOU_HIT).sum())
    return ious.max(axis=1), extra


def main() -> None:
    args = common.role_parser(__doc__).parse_args()
    height, width = args.frame_size
    client = common.connect(args, "sink")
    detections = client.consumer(common.DETECTIONS, policy="block", depth=common.DEPTH, wait_strategy="park")
    record = common.Record("sink")
    laps = common.Laps()
    common.mark_ready(args, "sink")

    timeout = common.FIRST_WAIT_S
    for _ in range(args.frames):
        try:
            det = common.receive(detections, timeout, laps)
        except tb.Timeout:
            break
        arrived = common.now_ns()
        timeout = common.NEXT_WAIT_S
        frame, camera_ns = common.FRAME_HEADER.unpack(det.user_header[: common.FRAME_HEADER.size])
        e2e_ns = arrived - camera_ns
        hop_ns = arrived - det.timestamp_ns

        laps.mark("recv")  # the header and the two clock reads
        best, extra = match(scene.truth_boxes(frame, height, width), np.asarray(det))
        found = det.shape[0]
        laps.mark("match")
        det.release()
        laps.mark("release")
        hit = bool((best >= IOU_HIT).all())
        record.add(
            frame=frame,
            arrived_ns=arrived,
            e2e=common.us(e2e_ns),
            hop=common.us(hop_ns),
            hit=hit,
            min_iou=round(float(best.min(initial=1.0)), 3),
            extra=extra,
            **laps.columns(),
        )
        if not args.quiet:
            print(
                f"frame {frame:5d} e2e_ms={e2e_ns / 1e6:7.1f} boxes={found} "
                f"truth={len(best)} min_iou={best.min(initial=1.0):.2f} extra={extra} {'hit' if hit else 'MISS'}",
                flush=True,
            )
    record.save(args.run_dir)
    client.close()


if __name__ == "__main__":
    main()
