"""Condition extractors that need no downloaded model: Canny edges, a pencil sketch, grayscale.

``canny`` follows OpenCV's ``cv2.Canny(gray, low, high)`` (3×3 Sobel without prior blur, L1 gradient
magnitude, non-maximum suppression in four directions, hysteresis with 8-connectivity), written in
numpy so that no OpenCV install is needed; it is what the OFT paper's control metric uses with
thresholds (100, 200).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CONDITIONS = ("canny", "sketch", "grayscale")


def to_gray(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 RGB (or gray) -> float64 gray with OpenCV's weights (0.299, 0.587, 0.114), rounded like cv2."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        return arr.astype(np.float64)
    arr = arr[..., :3].astype(np.float64)
    return np.round(arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114)


def sobel(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3×3 Sobel derivatives (x, y), replicated borders."""
    p = np.pad(gray, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return gx, gy


def canny_edges(image: Image.Image | np.ndarray, low: float = 100.0, high: float = 200.0) -> np.ndarray:
    """Boolean edge map (H, W) of an RGB/gray uint8 image."""
    gx, gy = sobel(to_gray(image))
    mag = np.abs(gx) + np.abs(gy)
    h, w = mag.shape
    m = np.pad(mag, 1)
    ax, ay = np.abs(gx), np.abs(gy)
    tan22 = 0.4142135623730951
    horizontal = ay <= ax * tan22  # gradient along x: compare left / right
    vertical = ay > ax / tan22  # gradient along y: compare up / down
    diag_same_sign = (gx * gy) > 0
    c = m[1:-1, 1:-1]
    left, right = m[1:-1, :-2], m[1:-1, 2:]
    up, down = m[:-2, 1:-1], m[2:, 1:-1]
    up_left, down_right = m[:-2, :-2], m[2:, 2:]
    up_right, down_left = m[:-2, 2:], m[2:, :-2]
    nms = np.where(
        horizontal,
        (c > left) & (c >= right),
        np.where(
            vertical,
            (c > up) & (c >= down),
            np.where(diag_same_sign, (c > up_left) & (c >= down_right), (c > up_right) & (c >= down_left)),
        ),
    )
    candidate = nms & (mag > low)
    strong = candidate & (mag > high)
    # hysteresis: grow the strong set through 8-connected candidates until nothing changes
    edges = strong.copy()
    while True:
        p = np.pad(edges, 1)
        grown = np.zeros_like(edges)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                grown |= p[dy : dy + h, dx : dx + w]
        new = candidate & grown & ~edges
        if not new.any():
            return edges
        edges |= new


def canny(image: Image.Image, low: float = 100.0, high: float = 200.0) -> Image.Image:
    """ControlNet-style Canny condition: white edges on black, RGB."""
    edges = canny_edges(image.convert("RGB"), low, high)
    return Image.fromarray((edges * 255).astype(np.uint8)).convert("RGB")


def sketch(image: Image.Image) -> Image.Image:
    """A pencil-sketch condition: dark soft strokes (Sobel magnitude of a box-blurred gray) on white."""
    gray = to_gray(image.convert("RGB"))
    p = np.pad(gray, 1, mode="edge")
    blurred = sum(p[dy : dy + gray.shape[0], dx : dx + gray.shape[1]] for dy in range(3) for dx in range(3)) / 9.0
    gx, gy = sobel(blurred)
    strength = np.clip(np.hypot(gx, gy) / 4.0, 0, 255)
    return Image.fromarray((255 - strength).astype(np.uint8)).convert("RGB")


def grayscale(image: Image.Image) -> Image.Image:
    """A colourisation condition: the image's luminance, as RGB."""
    return Image.fromarray(to_gray(image.convert("RGB")).astype(np.uint8)).convert("RGB")


def make_condition(image: Image.Image, kind: str, low: float = 100.0, high: float = 200.0) -> Image.Image:
    if kind == "canny":
        return canny(image, low, high)
    if kind == "sketch":
        return sketch(image)
    if kind == "grayscale":
        return grayscale(image)
    raise ValueError(f"unknown condition {kind!r}; known: {', '.join(CONDITIONS)}")


def edge_scores(reference: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """IoU and F1 between two boolean edge maps (reference = the input condition's edges)."""
    reference, predicted = reference.astype(bool), predicted.astype(bool)
    inter = float(np.logical_and(reference, predicted).sum())
    union = float(np.logical_or(reference, predicted).sum())
    precision = inter / float(predicted.sum()) if predicted.sum() else 0.0
    recall = inter / float(reference.sum()) if reference.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"iou": inter / union if union else 1.0, "f1": f1, "precision": precision, "recall": recall}
