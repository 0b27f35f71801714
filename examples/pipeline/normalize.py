"""Camera frame → model input, written straight into the model-input slot.

``cv2.resize`` needs somewhere to put its uint8 result (one scratch image,
allocated once); the normalisation then reads that scratch through a
channel-reversed, channel-first view and writes float32 straight into the
``[1, 3, H', W']`` slot with ``out=``. No other array is made per frame.
"""

from __future__ import annotations

import cv2
import numpy as np

from detector import NORM_OFFSET, NORM_SCALE


class Resizer:
    """Resizes ``(H, W, 3)`` uint8 RGB frames to the model's ``(h, w)`` and
    normalises them into ``(1, 3, h, w)`` float32 BGR, in place."""

    def __init__(self, height: int, width: int, interpolation: int = cv2.INTER_LINEAR):
        self.height, self.width = height, width
        self.interpolation = interpolation
        self.scratch = np.empty((height, width, 3), np.uint8)  # cv2.resize's dst

    def resize(self, frame: np.ndarray) -> None:
        """``frame`` (read-only view of the camera's slot) → the scratch image."""
        out = cv2.resize(frame, (self.width, self.height), dst=self.scratch, interpolation=self.interpolation)
        if out is not self.scratch and out.ctypes.data != self.scratch.ctypes.data:
            raise RuntimeError("cv2.resize did not write into dst")

    def normalize(self, out: np.ndarray) -> None:
        """The scratch image → ``out`` (``(1, 3, h, w)`` float32, the writable
        view of a model-input slot): RGB → BGR by a reversed channel view,
        HWC → CHW by a transposed view, ``x * 2/255 - 1`` by two ufuncs
        that write into ``out``."""
        chw = out[0]
        bgr_chw = self.scratch.transpose(2, 0, 1)[::-1]
        np.multiply(bgr_chw, NORM_SCALE, out=chw)
        np.add(chw, NORM_OFFSET, out=chw)

    def __call__(self, frame: np.ndarray, out: np.ndarray) -> None:
        """Both steps: ``frame`` → ``out``."""
        self.resize(frame)
        self.normalize(out)
