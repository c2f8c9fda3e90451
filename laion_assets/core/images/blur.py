"""Blur boxes of an image the way img2dataset's `bbox_col` does (its BoundingBoxBlurrer, after
the ImageNet face-obfuscation code; DataComp blurred faces with it), in numpy: OpenCV is not a
dependency, and its Gaussian kernel and border rule are reproduced here (tested against
img2dataset itself)."""

from __future__ import annotations

import json
import math

import numpy as np
from PIL import Image

# cv2.getGaussianKernel(k, sigma<=0) uses these fixed kernels for k <= 7, the formula above that.
_SMALL_KERNELS = {
    1: [1.0],
    3: [0.25, 0.5, 0.25],
    5: [0.0625, 0.25, 0.375, 0.25, 0.0625],
    7: [0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125],
}


def parse_boxes(value) -> list[tuple[float, float, float, float]]:
    """A row's boxes: a list of [x_min, y_min, x_max, y_max] in [0, 1] relative to the image,
    as a list or as its JSON text (a csv column). Raises ValueError naming what is wrong."""
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else []
    boxes = []
    for box in value or []:
        if box is None or len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
            raise ValueError(f"a box must be 4 numbers [x_min, y_min, x_max, y_max], got {box!r}")
        boxes.append(tuple(float(v) for v in box))
    return boxes


def _kernel(k: int) -> np.ndarray:
    if k in _SMALL_KERNELS:
        return np.array(_SMALL_KERNELS[k])
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    x = np.arange(k) - (k - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _gaussian(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur with OpenCV's default border (reflect, edge pixel not repeated)."""
    r = len(g) // 2
    p = np.pad(a, ((r, r), (r, r)) + ((0, 0),) * (a.ndim - 2), mode="reflect").astype(np.float32)
    h, w = a.shape[:2]
    rows = sum(np.float32(g[i]) * p[:, i : i + w] for i in range(len(g)))
    return sum(np.float32(g[i]) * rows[i : i + h] for i in range(len(g)))


def blur_boxes(img: Image.Image, boxes: list[tuple[float, float, float, float]]) -> Image.Image:
    """Each box grown by a tenth of the largest box side on every side, then blended with a
    Gaussian blur of the whole image through the blurred box mask (soft edges). The kernel is
    2*ceil(0.1 * largest side) + 1 pixels wide (at least 3), OpenCV's sigma for that size."""
    if not boxes:
        return img
    a = np.asarray(img, dtype=np.float32) / 255.0
    h, w = a.shape[:2]
    mask = np.zeros((h, w), np.float32)
    largest = 0
    for x0, y0, x1, y1 in boxes:
        b = [int(x0 * w), int(y0 * h), int(x1 * w), int(y1 * h)]
        side = max(b[2] - b[0], b[3] - b[1])
        largest = max(largest, side)
        b = [int(b[0] - 0.1 * side), int(b[1] - 0.1 * side), int(b[2] + 0.1 * side), int(b[3] + 0.1 * side)]
        left, right = np.clip([b[0], b[2]], 0, w - 1)
        top, bottom = np.clip([b[1], b[3]], 0, h - 1)
        mask[top:bottom, left:right] = 1
    k = max(3, int(2 * math.ceil(0.1 * largest) + 1))
    k += 1 - k % 2
    g = _kernel(k)
    blurred, soft = _gaussian(a, g), _gaussian(mask, g)
    if a.ndim == 3:
        soft = soft[..., None]
    out = a * (1 - soft) + blurred * soft
    return Image.fromarray((out * 255.0).astype(np.uint8), img.mode)
