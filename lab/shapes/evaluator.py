"""The shapes world's oracle: find the objects in an image and check them against a caption.

Classic image analysis, no learning: the background colour is the median of the border pixels;
foreground is every pixel far from it (RGB distance > 60), cleaned by a 3x3 opening; each connected
component larger than 30 px is an object. Its colour is the palette colour nearest to the median of
its interior (the component eroded by one pixel, so anti-aliased rims do not vote); its shape is the
template (inscribed circle, full square, upward triangle, all fitted to the component's bounding box)
with the highest IoU; its size is "large" when the bounding box's longer side is >= 22 px (the two
sizes are 16 and 28 px at 64x64).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageDraw

from .world import BACKGROUNDS, COLOURS, SHAPES, SIZES

FG_DISTANCE = 60.0
MIN_AREA = 30
LARGE_SIDE = (SIZES["small"] + SIZES["large"]) // 2  # 22: between the two sizes (16 and 28 px)

_CAPTION = re.compile(r"a (small|large) (\w+) (circle|square|triangle)")


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    size: str
    area: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    shape_iou: float
    mask: np.ndarray

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.size, self.colour, self.shape)


def parse_caption(caption: str) -> tuple[list[tuple[str, str, str]], str | None]:
    """``"a large red circle and ... on a gray background"`` -> ``([(size, colour, shape), ...], background)``."""
    objs = [m.groups() for m in _CAPTION.finditer(caption)]
    bg = re.search(r"on a (\w+) background", caption)
    return [tuple(o) for o in objs], (bg.group(1) if bg else None)


def _nearest(rgb: np.ndarray, palette: dict) -> str:
    names = list(palette)
    d = [np.linalg.norm(rgb - np.asarray(palette[n], np.float32)) for n in names]
    return names[int(np.argmin(d))]


@lru_cache(maxsize=4096)
def _templates(w: int, h: int) -> dict[str, np.ndarray]:
    """Each shape drawn to fill a ``w`` x ``h`` box, as the world draws it (PIL at 4x, box-filtered)."""
    s = 4
    out = {}
    for shape in SHAPES:
        big = Image.new("L", (w * s, h * s), 0)
        draw = ImageDraw.Draw(big)
        if shape == "circle":
            draw.ellipse([0, 0, w * s - 1, h * s - 1], fill=255)
        elif shape == "square":
            draw.rectangle([0, 0, w * s - 1, h * s - 1], fill=255)
        else:
            draw.polygon([(w * s / 2, 0), (w * s - 1, h * s - 1), (0, h * s - 1)], fill=255)
        out[shape] = np.asarray(big.resize((w, h), Image.BOX)) >= 128
    return out


def detect(image: np.ndarray) -> tuple[str, list[Detection], np.ndarray]:
    """``image`` ``uint8 [H, W, 3]`` -> (background name, objects, foreground mask ``bool [H, W]``)."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {img.shape}")
    f = img.astype(np.float32)
    border = np.concatenate([f[0], f[-1], f[:, 0], f[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)
    fg = (np.linalg.norm(f - bg_rgb, axis=2) > FG_DISTANCE).astype(np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    objects = []
    keep = np.zeros(fg.shape, bool)
    for k in range(1, n):
        x, y, w, h, area = stats[k]
        if area < MIN_AREA:
            continue
        comp = labels == k
        keep |= comp
        inner = cv2.erode(comp.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        pix = f[inner] if inner.sum() >= 5 else f[comp]
        colour = _nearest(np.median(pix, axis=0), COLOURS)
        crop = comp[y:y + h, x:x + w]
        ious = {}
        for shape, tpl in _templates(w, h).items():
            inter = np.logical_and(crop, tpl).sum()
            ious[shape] = inter / max(1, np.logical_or(crop, tpl).sum())
        shape = max(ious, key=ious.get)
        size = "large" if max(w, h) >= LARGE_SIDE else "small"
        objects.append(Detection(colour, shape, size, int(area), (int(x), int(y), int(x + w), int(y + h)),
                                 float(ious[shape]), comp))
    return background, objects, keep


def evaluate(image: np.ndarray, caption: str) -> dict:
    """Check ``image`` against ``caption``. Keys: ``n_expected``, ``n_detected``, ``background_ok``,
    ``colour_ok`` (the detected colours equal the caption's, as multisets), ``shape_ok`` (likewise for
    (colour, shape) pairs), ``all_ok`` ((size, colour, shape) triples equal and nothing extra),
    ``detections`` (list of (size, colour, shape)), ``objects`` (the :class:`Detection` objects, with masks),
    ``foreground`` (mask)."""
    want, bg = parse_caption(caption)
    background, dets, fg = detect(image)
    got = [d.key for d in dets]
    return {
        "n_expected": len(want),
        "n_detected": len(dets),
        "background_ok": bg is None or background == bg,
        "colour_ok": Counter(c for _, c, _ in want) == Counter(c for _, c, _ in got),
        "shape_ok": Counter((c, s) for _, c, s in want) == Counter((c, s) for _, c, s in got),
        "all_ok": Counter(want) == Counter(got),
        "detections": got,
        "objects": dets,
        "foreground": fg,
    }


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0

