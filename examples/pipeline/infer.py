"""Inference process: ``model/input`` → PP-OCRv4 detector → ``detections``.

The model reads its input straight from the received slot
(``OrtValue.ortvalue_from_numpy`` on the read-only view: no copy, the
OrtValue's ``data_ptr()`` is the slot's address) and, through IO binding,
writes its probability map straight into a slot loaned on ``model/prob``.
DB post-processing reads that slot in place; the boxes, scaled to camera
pixels, are published on ``detections`` as ``(K, 5)`` float32, and the
probability map on ``model/prob`` for anyone who wants to look at it (nobody
subscribes in this pipeline, so its slot is freed at once).
"""

from __future__ import annotations

import cv2
import numpy as np
import onnxruntime as ort
import tensorbus as tb

import common
import detector


def bind(sess, out_name: str, x: np.ndarray, prob: np.ndarray, x_addr: int, prob_addr: int):
    """IO binding of the model's input to ``x`` and its output to ``prob``,
    both views of slots; raises if onnxruntime would copy either."""
    x_ort = ort.OrtValue.ortvalue_from_numpy(x)
    prob_ort = ort.OrtValue.ortvalue_from_numpy(prob)
    if x_ort.data_ptr() != x_addr or prob_ort.data_ptr() != prob_addr:
        raise RuntimeError("onnxruntime copied a slot instead of wrapping it")
    binding = sess.io_binding()
    binding.bind_ortvalue_input(detector.INPUT_NAME, x_ort)
    binding.bind_ortvalue_output(out_name, prob_ort)
    return binding, (x_ort, prob_ort)


def main() -> None:
    p = common.role_parser(__doc__)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = p.parse_args()
    cv2.setNumThreads(1)
    (height, width), (in_h, in_w) = args.frame_size, args.input_size
    scale_x, scale_y = width / in_w, height / in_h
    sess = detector.session(args.threads)
    out_name = detector.output_name(sess)
    sess.run(None, {detector.INPUT_NAME: np.zeros((1, 3, in_h, in_w), np.float32)})  # warm-up

    client = common.connect(args, "infer")
    inputs = client.consumer(common.INPUT, policy="block", depth=common.DEPTH, wait_strategy="park")
    probs = client.producer(common.PROB)
    detections = client.producer(common.DETECTIONS)
    record = common.Record("infer")
    laps = common.Laps()
    common.mark_ready(args, "infer")

    timeout = common.FIRST_WAIT_S
    for _ in range(args.frames):
        try:
            x = common.receive(inputs, timeout, laps)
        except tb.Timeout:
            break
        timeout = common.NEXT_WAIT_S
        hop_ns = common.now_ns() - x.timestamp_ns
        header = x.user_header[: common.FRAME_HEADER.size]

        x_view = np.asarray(x)
        prob = probs.loan((1, 1, in_h, in_w), "float32", timeout=common.NEXT_WAIT_S)
        prob_view = np.asarray(prob)
        laps.mark("loan")
        binding, ort_values = bind(sess, out_name, x_view, prob_view, x.address, prob.address)
        laps.mark("bind")
        sess.run_with_iobinding(binding)
        laps.mark("model")
        del binding, ort_values, x_view
        x.release()
        laps.mark("release")
        boxes = detector.boxes_from_prob(prob_view[0, 0], scale_x, scale_y, width, height)
        laps.mark("postprocess")
        det = detections.loan(boxes.shape, "float32", timeout=common.NEXT_WAIT_S)
        laps.mark("loan")
        np.copyto(np.asarray(det), boxes)  # K x 5 floats: the only bytes this stage writes itself
        laps.mark("postprocess")
        det.publish(user_header=header)
        del prob_view
        prob.publish(user_header=header)
        laps.mark("publish")
        record.add(frame=common.FRAME_HEADER.unpack(header)[0], hop=common.us(hop_ns), boxes=len(boxes), **laps.columns())
    record.save(args.run_dir, threads=args.threads)
    client.close()


if __name__ == "__main__":
    main()
