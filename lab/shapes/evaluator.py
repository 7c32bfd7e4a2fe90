"""The shapes world's oracle: find the objects in an image and check them against a caption.

Classic image analysis, no learning: the background colour is the median of the border pixels;
foreground is every pixel far from it (RGB distance > 60), cleaned by a 3x3 opening; each connected
component larger than 30 px holds one object per colour (touching objects of different colours are split,
:func:`_by_colour`). An object's colour is the palette colour nearest to the median of its interior (the
component eroded by one pixel, so anti-aliased rims do not vote); its shape is what the bounding box's corners
say (:func:`_corner_shape`), or else a triangle when its pixels fill its minimum enclosing triangle
(:func:`_triangle_fill`), or else the template (inscribed circle, full square, upward triangle, all fitted
to the bounding box) with the highest IoU; its size is "large" when the bounding box's longer side is >= 22 px
(the two sizes are 16 and 28 px at 64x64).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageDraw

from .world import BACKGROUNDS, COLOURS, MAX_OBJECTS, SHAPES, SIZES

FG_DISTANCE = 60.0
MIN_AREA = 30
PURE_COLOUR = 45.0  # RGB distance of a split-off part's median colour to its palette colour
# area / minimum enclosing triangle, on 2 x 1,000 ground-truth scenes as drawn and after a VAE round trip: large
# triangles 0.86-1.06, circles and squares 0.53-0.73 but for a few small ones that a touching neighbour cut
TRIANGLE_FILL = 0.8
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
        if stats[k][4] < MIN_AREA:
            continue
        comp = labels == k
        keep |= comp
        for part, colour in _by_colour(f, comp):
            objects.append(_describe(f, part, colour))
    return background, objects, keep


def _by_colour(f: np.ndarray, comp: np.ndarray) -> list[tuple[np.ndarray, str]]:
    """A foreground component as one object per colour: touching objects of different colours are split.
    Each pixel takes its nearest palette colour; a colour is an object when its pixels, opened by a 3x3
    square, still hold a blob of :data:`MIN_AREA` pixels (anti-aliased rims and the seam between two objects
    take mixed colours, but only in lines one or two pixels wide, which the opening removes). Every pixel of
    the component then goes to the nearest of the colours kept. One colour: the component is one object."""
    names = list(COLOURS)
    pal = np.asarray([COLOURS[c] for c in names], np.float32)
    ys, xs = np.nonzero(comp)
    dist = np.linalg.norm(f[ys, xs][:, None] - pal[None], axis=2)  # [pixels, colours]
    label = dist.argmin(1)
    kept = []
    for j in np.argsort(-np.bincount(label, minlength=len(names))):
        if (label == j).sum() < MIN_AREA:
            break
        blob = _blob(comp.shape, ys[label == j], xs[label == j])
        # a real object's colour is its palette colour; a VAE's drift across one object gives in-between ones
        if blob is not None and np.linalg.norm(np.median(f[blob], axis=0) - pal[j]) <= PURE_COLOUR:
            kept.append((int(blob.sum()), int(j)))
    # the world's scenes hold two objects at most: a third colour in one component is a seam's mix (red and
    # yellow blur to orange) or a drift, and smaller than the two objects it lies between
    kept = [j for _, j in sorted(kept, reverse=True)[:MAX_OBJECTS]]
    if len(kept) < 2:
        inner = cv2.erode(comp.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        pix = f[inner] if inner.sum() >= 5 else f[comp]
        return [(comp, _nearest(np.median(pix, axis=0), COLOURS))]
    nearest = dist[:, kept].argmin(1)
    parts = [(_blob(comp.shape, ys[nearest == q], xs[nearest == q]), names[j]) for q, j in enumerate(kept)]
    return [(m, c) for m, c in parts if m is not None]


def _blob(shape, ys, xs) -> np.ndarray | None:
    """The largest 8-connected blob of these pixels after a 3x3 opening, if it has :data:`MIN_AREA` pixels."""
    m = np.zeros(shape, np.uint8)
    m[ys, xs] = 1
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n < 2:
        return None
    big = 1 + int(np.argmax(stats[1:, 4]))
    return labels == big if stats[big, 4] >= MIN_AREA else None


def _describe(f: np.ndarray, comp: np.ndarray, colour: str) -> Detection:
    """Shape (best template IoU in the bounding box) and size of one object's mask."""
    ys, xs = np.nonzero(comp)
    x, y, w, h = int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
    crop = comp[y:y + h, x:x + w]
    ious = {}
    for shape, tpl in _templates(w, h).items():
        inter = np.logical_and(crop, tpl).sum()
        ious[shape] = inter / max(1, np.logical_or(crop, tpl).sum())
    shape = _corner_shape(crop)
    if shape is None and _triangle_fill(crop) >= TRIANGLE_FILL:
        shape = "triangle"
    shape = shape or max(ious, key=ious.get)
    size = "large" if max(w, h) >= LARGE_SIDE else "small"
    return Detection(colour, shape, size, int(comp.sum()), (x, y, x + w, y + h), float(ious[shape]), comp)


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


def _corner_shape(crop: np.ndarray) -> str | None:
    """The shape the bounding box's four corners say, or None when they are not clear. A square fills all
    four, an upward triangle its two bottom corners only, a circle none. Robust where the template IoU is not:
    a blurred small triangle (its tip lost after a VAE round trip) fits the square template better."""
    h, w = crop.shape
    k, q = max(1, round(0.25 * h)), max(1, round(0.25 * w))
    tl, tr = crop[:k, :q].mean(), crop[:k, -q:].mean()
    bl, br = crop[-k:, :q].mean(), crop[-k:, -q:].mean()
    full, empty = 0.6, 0.3
    if min(tl, tr, bl, br) >= full:
        return "square"
    if min(bl, br) >= full and max(tl, tr) <= empty:
        return "triangle"
    if max(tl, tr, bl, br) <= empty:
        return "circle"
    return None


def _triangle_fill(crop: np.ndarray) -> float:
    """The mask's area over the area of its minimum enclosing triangle (OpenCV's, around the pixel centres).
    Where a touching neighbour's seam cuts a small triangle, its base corners go and with them the corner rule
    and the template fit (the rest looks round), but what remains still fills a triangle: a triangle cut by a
    line is a triangle or a quadrilateral close to one. An ideal circle fills pi / (3 sqrt(3)) = 0.60 of
    its minimum enclosing triangle, a square 1/2."""
    pts = np.argwhere(crop)[:, ::-1].astype(np.float32)[:, None]
    if len(pts) < 3:
        return 0.0
    _, tri = cv2.minEnclosingTriangle(pts)
    return float(crop.sum()) / max(float(cv2.contourArea(tri)), 1.0)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0

