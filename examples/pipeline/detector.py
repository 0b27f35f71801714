"""The PP-OCRv4 text detector: where its ONNX file is, an onnxruntime session
for it, the input normalisation it was trained with, and the DB
(differentiable binarisation) post-processing that turns its probability
map into boxes.

The model ships inside the ``rapidocr_onnxruntime`` wheel; it is located on
disk without importing that package (its import pulls in dependencies this
example does not install).
"""

from __future__ import annotations

import importlib.util
import os

import cv2
import numpy as np

MODEL_FILE = "ch_PP-OCRv4_det_infer.onnx"
INSTALL_HINT = (
    "install it with: pip install --no-deps rapidocr_onnxruntime==1.4.4 "
    "(or examples/pipeline/test.sh, which installs every pin into .venv)"
)

INPUT_NAME = "x"
"""The model's input: ``[N, 3, H, W]`` float32, H and W multiples of 32."""

# PP-OCR's detector input: BGR, (x / 255 - 0.5) / 0.5, i.e. x * 2/255 - 1.
NORM_SCALE = np.float32(2.0 / 255.0)
NORM_OFFSET = np.float32(-1.0)

# DB post-processing, as in rapidocr's config.yaml for this model.
THRESH = 0.3  # probability above which a pixel is text
BOX_THRESH = 0.5  # mean probability a candidate box needs
UNCLIP_RATIO = 1.6  # how far a shrunk text kernel is grown back
MIN_SIDE = 3  # smaller candidates are noise
MAX_CANDIDATES = 1000


class ModelMissing(RuntimeError):
    """The detector's ONNX file is not installed."""


def model_path() -> str:
    """The path of ``ch_PP-OCRv4_det_infer.onnx`` inside the installed
    ``rapidocr_onnxruntime`` package, or ``$TENSORBUS_DET_MODEL`` if set."""
    override = os.environ.get("TENSORBUS_DET_MODEL")
    if override:
        if not os.path.isfile(override):
            raise ModelMissing(f"TENSORBUS_DET_MODEL={override} is not a file; unset it, or {INSTALL_HINT}")
        return override
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise ModelMissing(f"the text detector model is not installed; {INSTALL_HINT}")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "models", MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise ModelMissing(f"rapidocr_onnxruntime has no models/{MODEL_FILE}; {INSTALL_HINT}")


def session(threads: int = 1):
    """An onnxruntime CPU session of the detector with ``threads`` intra-op
    threads and no spinning thread pool (the machine is shared with the other
    stages)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_path(), opts, providers=["CPUExecutionProvider"])


def output_name(sess) -> str:
    """The name of the probability-map output, ``[N, 1, H, W]`` float32."""
    return sess.get_outputs()[0].name


def _box_score(prob: np.ndarray, corners: np.ndarray) -> float:
    """Mean probability inside the quadrilateral ``corners`` (DB's "fast" score)."""
    h, w = prob.shape
    x0 = int(np.clip(np.floor(corners[:, 0].min()), 0, w - 1))
    x1 = int(np.clip(np.ceil(corners[:, 0].max()), 0, w - 1))
    y0 = int(np.clip(np.floor(corners[:, 1].min()), 0, h - 1))
    y1 = int(np.clip(np.ceil(corners[:, 1].max()), 0, h - 1))
    mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
    shifted = corners - np.array([x0, y0], np.float32)
    cv2.fillPoly(mask, [shifted.round().astype(np.int32)], 1)
    return cv2.mean(prob[y0 : y1 + 1, x0 : x1 + 1], mask)[0]


def boxes_from_prob(prob: np.ndarray, scale_x: float, scale_y: float, width: int, height: int) -> np.ndarray:
    """DB post-processing of one probability map ``prob`` (``(H', W')``
    float32, read in place): threshold, dilate, contours, minimum-area
    rectangles, score, grow each rectangle back by ``area * UNCLIP_RATIO /
    perimeter`` on every side (what pyclipper's offset does to a rectangle),
    then scale to the camera frame (``scale_x``, ``scale_y``) and clip to
    ``width`` x ``height``. Returns ``(K, 5)`` float32 rows
    ``x0, y0, x1, y1, score`` of axis-aligned boxes."""
    bitmap = (prob > THRESH).view(np.uint8)
    bitmap = cv2.dilate(bitmap, np.ones((2, 2), np.uint8))
    contours, _ = cv2.findContours(bitmap, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    rows = []
    for contour in contours[:MAX_CANDIDATES]:
        center, (w, h), angle = cv2.minAreaRect(contour)
        if min(w, h) < MIN_SIDE:
            continue
        score = _box_score(prob, cv2.boxPoints((center, (w, h), angle)))
        if score < BOX_THRESH:
            continue
        grow = w * h * UNCLIP_RATIO / (2 * (w + h))
        corners = cv2.boxPoints((center, (w + 2 * grow, h + 2 * grow), angle))
        if min(w, h) + 2 * grow < MIN_SIDE + 2:
            continue
        x0 = np.clip(corners[:, 0].min() * scale_x, 0, width)
        x1 = np.clip(corners[:, 0].max() * scale_x, 0, width)
        y0 = np.clip(corners[:, 1].min() * scale_y, 0, height)
        y1 = np.clip(corners[:, 1].max() * scale_y, 0, height)
        rows.append((x0, y0, x1, y1, score))
    return np.array(rows, np.float32).reshape(-1, 5)
