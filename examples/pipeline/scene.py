"""The synthetic camera's world: a textured, drifting background with lines
of text that move from frame to frame.

Everything here is a pure function of the frame index and the frame size,
so the camera draws frame ``i`` and the sink recomputes the true text boxes
of frame ``i`` without anything passing between them but the index.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
"""OpenCV's plain sans-serif Hershey font."""

DRIFT = 64
"""Pixels of extra background on each axis; the view into it drifts by up to this much."""


@dataclasses.dataclass(frozen=True)
class TextLine:
    """One line of text drawn on a frame and its true box ``(x0, y0, x1, y1)`` in pixels."""

    text: str
    origin: tuple[int, int]  # bottom-left of the baseline, as cv2.putText wants it
    scale: float
    thickness: int
    color: tuple[int, int, int]
    box: tuple[int, int, int, int]


# Per band: a text template, font scale, stroke, colour (RGB), horizontal speed (px/frame).
_BANDS = (
    ("TENSORBUS {i:05d}", 1.6, 3, (15, 15, 25), 23),
    ("zero-copy frame {i}", 1.2, 2, (250, 250, 240), -17),
    ("PP-OCRv4 det {t}", 1.4, 3, (20, 40, 110), 11),
    ("camera0 lane {lane}", 1.0, 2, (245, 235, 120), -29),
)


def background(height: int, width: int, seed: int = 7) -> np.ndarray:
    """A ``(height + DRIFT, width + DRIFT, 3)`` uint8 texture: a colour gradient,
    soft blobs and fine noise, mid-grey on average so both dark and light text
    stand out from it without making the detector's job trivial."""
    rng = np.random.default_rng(seed)
    h, w = height + DRIFT, width + DRIFT
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    img[..., 0] = 120 + 40 * np.sin(xx / 97.0) * np.cos(yy / 131.0)
    img[..., 1] = 128 + 35 * np.sin((xx + yy) / 173.0)
    img[..., 2] = 110 + 45 * np.cos(xx / 211.0 - yy / 89.0)
    blobs = rng.normal(0.0, 1.0, (h // 16 + 1, w // 16 + 1, 3)).astype(np.float32)
    img += 18 * cv2.resize(blobs, (w, h), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0.0, 9.0, (h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _triangle(t: float, span: float) -> float:
    """A value that goes 0 → span → 0 as t goes 0 → 2·span → 4·span…"""
    t = t % (2 * span) if span > 0 else 0.0
    return t if t <= span else 2 * span - t


def text_lines(frame: int, height: int, width: int) -> list[TextLine]:
    """The lines of text on frame ``frame``: one per horizontal band, each
    sliding back and forth at its own speed and bobbing up and down."""
    lines = []
    bands = len(_BANDS)
    for band, (template, scale, thickness, color, speed) in enumerate(_BANDS):
        text = template.format(i=frame, t=f"t={frame / 10:.1f}s", lane=frame % 7)
        (tw, th), baseline = cv2.getTextSize(text, FONT, scale, thickness)
        margin = 24
        x = margin + int(_triangle(abs(speed) * frame + 150 * band, width - tw - 2 * margin))
        if speed < 0:
            x = width - tw - x
        band_center = height * (band + 0.5) / bands
        y = int(band_center + th / 2 + 0.25 * height / bands * math.sin(frame / 9.0 + 2 * band))
        box = (x, y - th - thickness // 2, x + tw, y + baseline)
        lines.append(TextLine(text, (x, y), scale, thickness, color, box))
    return lines


def truth_boxes(frame: int, height: int, width: int) -> np.ndarray:
    """The true text boxes of frame ``frame`` as a ``(K, 4)`` int array of ``x0, y0, x1, y1``."""
    return np.array([line.box for line in text_lines(frame, height, width)], dtype=np.int32).reshape(-1, 4)


class Painter:
    """Draws frames straight into a caller's ``(height, width, 3)`` uint8 array
    (the camera passes the writable view of a loaned slot)."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self.texture = background(height, width)

    def draw(self, frame: int, out: np.ndarray) -> None:
        """Frame ``frame`` into ``out``: one copy of the drifting background, then the text on top."""
        dy = int(_triangle(frame * 2, DRIFT))
        dx = int(_triangle(frame * 3, DRIFT))
        np.copyto(out, self.texture[dy : dy + self.height, dx : dx + self.width])
        for line in text_lines(frame, self.height, self.width):
            cv2.putText(out, line.text, line.origin, FONT, line.scale, line.color, line.thickness, cv2.LINE_AA)
