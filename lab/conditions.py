"""ControlNet conditions from images, offline, with classic computer vision (OpenCV); no model downloads.

Every function takes a PIL image or a ``uint8`` array ``[H, W, 3]`` / ``[H, W]`` and returns a ``uint8``
``[H, W, 3]`` condition, white on black (the format ControlNet's annotators produce).
"""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        if image.mode not in ("RGB", "L", "RGBA", "P", "1"):
            raise TypeError(f"image mode {image.mode!r} is not supported; use RGB or L")
        arr = np.asarray(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 (0-255), got {arr.dtype}")
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise TypeError(f"image array must be [H, W], [H, W, 3] or [H, W, 4], got shape {image.shape}")
        arr = arr[:, :, :3]
    else:
        raise TypeError(f"image must be a PIL image or a numpy array, not {type(image).__name__}")
    if arr.shape[0] < 3 or arr.shape[1] < 3:
        raise ValueError(f"image is empty or too small: {arr.shape[1]}x{arr.shape[0]}")
    return np.ascontiguousarray(arr)


def _white_on_black(mask: np.ndarray) -> np.ndarray:
    return np.repeat(np.where(mask, 255, 0).astype(np.uint8)[:, :, None], 3, axis=2)


def canny(image, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edges of the colour image, white on black (thresholds 100/200 by default). As ControlNet's own
    annotator (``cv2.Canny(img, low, high)`` on the RGB array), the gradient at each pixel is that of the
    channel where it is largest, so an edge between two colours of equal brightness is found; the shapes
    world's ``edges`` condition (and so the edges ControlNet's training data) is this function."""
    if not 0 <= low <= high:
        raise ValueError(f"need 0 <= low <= high, got {low}, {high}")
    return _white_on_black(cv2.Canny(_as_rgb(image), low, high) > 0)


def scribble(image, sigma: float = 1.5, threshold: int = 4) -> np.ndarray:
    """An edge-based "fake scribble" (ControlNet's annotator does this from HED edges): Canny edges of the
    blurred image, blurred again with ``sigma`` and thresholded low, giving thick, smooth strokes."""
    gray = cv2.GaussianBlur(cv2.cvtColor(_as_rgb(image), cv2.COLOR_RGB2GRAY), (0, 0), 1.0)
    edges = cv2.Canny(gray, 50, 150)
    soft = cv2.GaussianBlur(edges, (0, 0), sigma)
    return _white_on_black(soft > threshold)


def hough(image, *, threshold: int = 20, min_length: int | None = None, max_gap: int = 3,
          thickness: int = 1) -> np.ndarray:
    """Straight lines (the seed's "Hough lines", M-LSD's role) found by a probabilistic Hough transform
    (``cv2.HoughLinesP``) on Canny edges, drawn white on black."""
    rgb = _as_rgb(image)
    edges = cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 50, 150)
    min_length = min_length or max(4, min(rgb.shape[:2]) // 8)
    lines = cv2.HoughLinesP(edges, 1, np.pi / 180, threshold, minLineLength=min_length, maxLineGap=max_gap)
    out = np.zeros(rgb.shape[:2], np.uint8)
    for x0, y0, x1, y1 in (np.asarray(lines).reshape(-1, 4) if lines is not None else []):
        cv2.line(out, (int(x0), int(y0)), (int(x1), int(y1)), 255, thickness)
    return _white_on_black(out > 0)


def segmentation_to_classes(seg, palette: dict[str, tuple[int, int, int]],
                            tolerance: float = 30.0) -> tuple[np.ndarray, list[str]]:
    """Colour-coded segmentation ``[H, W, 3]`` -> class indices ``[H, W]`` (into the returned names) by the
    nearest colour of ``palette`` (class name -> RGB; the shapes world's is ``lab.shapes.world.SEG_PALETTE``);
    pixels farther than ``tolerance`` from every colour raise ValueError."""
    if not palette:
        raise ValueError("segmentation_to_classes needs a palette {class name: (r, g, b)}")
    arr = _as_rgb(seg).astype(np.float32)
    names = list(palette)
    ref = np.array([palette[n] for n in names], np.float32)
    d = np.linalg.norm(arr[:, :, None, :] - ref[None, None], axis=-1)
    idx = d.argmin(-1)
    if (d.min(-1) > tolerance).any():
        bad = tuple(int(v) for v in arr[np.unravel_index(d.min(-1).argmax(), idx.shape)])
        raise ValueError(f"colour {bad} is not in the palette {palette}")
    return idx.astype(np.int64), names


def classes_to_segmentation(classes: np.ndarray, names: list[str],
                            palette: dict[str, tuple[int, int, int]]) -> np.ndarray:
    """Class indices ``[H, W]`` (into ``names``) -> colour-coded segmentation ``uint8 [H, W, 3]`` with the
    colours of ``palette`` (class name -> RGB)."""
    missing = [n for n in names if n not in palette]
    if missing:
        raise KeyError(f"no palette colour for classes {missing}")
    lut = np.array([palette[n] for n in names], np.uint8)
    classes = np.asarray(classes)
    if classes.min() < 0 or classes.max() >= len(names):
        raise ValueError(f"class indices must lie in [0, {len(names) - 1}]")
    return lut[classes]
