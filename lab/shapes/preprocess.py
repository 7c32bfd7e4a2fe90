"""Preprocessors: the ControlNet conditions of the shapes world read back from an image, by classical vision.

ControlNet's users make conditions from photographs with annotators (a segmenter, MiDaS, OpenPose). The shapes
world's are classical and need no download:

1. **Colour clustering** (:func:`regions`): k-means on the pixels' RGB (OpenCV's, k = 5, fixed seed); clusters
   closer than :data:`MERGE_DISTANCE` merge, the border's commonest cluster is the background, a cluster is an
   object colour when its pixels, opened by a 3x3 square, hold a blob of :data:`MIN_AREA` pixels; every other
   pixel (anti-aliased rims, seams) goes to the nearest kept cluster. Each blob of an object colour is one
   object's *visible* region.
2. **Shape completion and depth order from occlusion** (:func:`objects`): each region is fitted with the world's
   shapes at both sizes and quarter-pixel offsets (:func:`_fit`). The fit scores the template's IoU with the
   region, where pixels of a *nearer* object may stand for the template's hidden part. Of two regions that
   touch, the one in front is the one whose hypothesis explains both: in front, a region fits a whole shape by
   itself, while the one behind is completed under it. The fit gives each object's shape, size and centre,
   hidden parts included.
3. The conditions are then drawn from the objects as the world draws them: :func:`segmentation` (the visible
   regions in their class colours), :func:`depth` (:func:`lab.shapes.world.depth_map`, in the order found),
   :func:`pose` (:func:`lab.shapes.world.pose_map`) and :func:`keypoints` (:func:`lab.shapes.world.keypoints`,
   from the fitted outline: the vertices of the shape the region's contour fits, and its centre).

Scores against the world's ground truth are in :func:`score` (``python -m lab eval shapes`` reports them).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageDraw

from . import world

K = 5  # k-means clusters: the background, up to two objects, and room for rim colours
MERGE_DISTANCE = 40.0  # RGB distance under which two cluster centres are one colour
MIN_AREA = 20  # pixels a region keeps after a 3x3 opening
OFFSETS = (0.0, 0.25, 0.5, 0.75)  # quarter-pixel template offsets
PCK_PIXELS = 2.0  # a keypoint is right within this distance (pixels at 64x64)


@dataclass(frozen=True)
class Found:
    """One object read from an image: its fitted shape, size, centre, its mean colour, its visible region, the fit
    (IoU of the completed template) and its depth rank (0 = furthest back)."""
    shape: str
    size: str
    cx: float
    cy: float
    rgb: tuple[float, float, float]
    visible: np.ndarray
    fit: float
    rank: int = 0

    def as_object(self) -> world.ShapeObject:
        colour = min(world.COLOURS, key=lambda c: np.linalg.norm(np.subtract(world.COLOURS[c], self.rgb)))
        return world.ShapeObject(self.shape, colour, self.size, self.cx, self.cy)


def _check(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {img.dtype} {img.shape}")
    return img


def regions(image) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Colour clustering of ``image`` (``uint8 [H, W, 3]``): the background colour ``[3]``, the objects' visible
    regions (``bool [H, W]``, largest first) and their mean colours."""
    img = _check(image)
    h, w, _ = img.shape
    px = img.reshape(-1, 3).astype(np.float32)
    cv2.setRNGSeed(0)
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 30, 0.5)
    _, label, centres = cv2.kmeans(px, K, None, criteria, 2, cv2.KMEANS_PP_CENTERS)
    label = label.ravel()
    # merge clusters of one colour (k-means splits a large uniform region when fewer colours than k are present)
    for a in range(K):
        for b in range(a):
            if np.linalg.norm(centres[a] - centres[b]) < MERGE_DISTANCE and (label == a).any():
                label[label == a] = b
    label = label.reshape(h, w)
    border = np.concatenate([label[0], label[-1], label[:, 0], label[:, -1]])
    background = int(np.bincount(border, minlength=K).argmax())
    kept = [background]
    for c in np.unique(label):
        if c == background:
            continue
        opened = cv2.morphologyEx((label == c).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        if opened.sum() >= MIN_AREA:
            kept.append(int(c))
    # every pixel to the nearest kept colour (rims and seams split between their two sides)
    dist = np.linalg.norm(px[:, None] - centres[kept][None], axis=2)
    nearest = np.asarray(kept)[dist.argmin(1)].reshape(h, w)
    found, colours = [], []
    for c in kept[1:]:
        n, comp, stats, _ = cv2.connectedComponentsWithStats((nearest == c).astype(np.uint8), connectivity=8)
        for k in range(1, n):
            if stats[k, 4] >= MIN_AREA:
                m = comp == k
                found.append(m)
                colours.append(img[m].astype(np.float64).mean(0))
    order = np.argsort([-m.sum() for m in found], kind="stable")
    return centres[background], [found[i] for i in order], [colours[i] for i in order]


@lru_cache(maxsize=None)
def _template(shape: str, size: str, fx: float, fy: float) -> np.ndarray:
    """The world's drawing of ``shape`` at ``size`` in a canvas of side + 2, centred at ``(half + 1 + fx, ...)``."""
    side = world.SIZES[size]
    canvas = side + 3
    obj = world.ShapeObject(shape, "red", size, side / 2 + 1 + fx, side / 2 + 1 + fy)
    s = world.SUPERSAMPLE
    m = Image.new("L", (canvas * s, canvas * s), 0)
    world._draw_object(ImageDraw.Draw(m), obj, 255)
    return (np.asarray(m.resize((canvas, canvas), Image.BOX)) >= 128).astype(np.float32)


def _fit(visible: np.ndarray, nearer: np.ndarray) -> tuple[float, str, str, float, float]:
    """The world's object that best explains a visible region when pixels of ``nearer`` may hide it: the best
    IoU of a template T with the region V, counting T's pixels under ``nearer`` as seen,
    ``|T ∩ (V ∪ nearer)| / |T ∪ V|``, and the shape, size and centre of that template."""
    h, w = visible.shape
    pad = max(world.SIZES.values()) + 4
    v = np.pad(visible.astype(np.float32), pad)
    seen = np.pad((visible | nearer).astype(np.float32), pad)
    n_v = float(visible.sum())
    best = (-1.0, "", "", 0.0, 0.0)
    for shape in world.SHAPES:
        for size in world.SIZES:
            for fy in OFFSETS:
                for fx in OFFSETS:
                    t = _template(shape, size, fx, fy)
                    inter_v = cv2.matchTemplate(v, t, cv2.TM_CCORR)
                    inter_seen = cv2.matchTemplate(seen, t, cv2.TM_CCORR)
                    iou = inter_seen / (t.sum() + n_v - inter_v)
                    y, x = np.unravel_index(int(iou.argmax()), iou.shape)
                    if iou[y, x] > best[0]:
                        half = world.SIZES[size] / 2
                        best = (float(iou[y, x]), shape, size, x - pad + half + 1 + fx, y - pad + half + 1 + fy)
    return best


def _touching(a: np.ndarray, b: np.ndarray) -> bool:
    grown = cv2.dilate(a.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    return bool((grown & b).any())


def objects(image) -> list[Found]:
    """The objects of ``image``, back to front (:func:`regions`, then :func:`_fit`). Of two touching regions the
    one in front is the one for which ``fit(front alone) + fit(back, behind front)`` is larger; regions that do not
    touch keep the order of their size (the larger further back: no cue tells)."""
    _, visible, colours = regions(image)
    empty = np.zeros(visible[0].shape, bool) if visible else None
    n = len(visible)
    alone = [_fit(m, empty) for m in visible]
    front_of = np.zeros((n, n))  # front_of[i, j]: score of "i is in front of j"
    for i in range(n):
        for j in range(n):
            if i != j and _touching(visible[i], visible[j]):
                front_of[i, j] = alone[i][0] + _fit(visible[j], visible[i])[0]
    # rank: how many touching neighbours each region is judged in front of (two objects: 0 or 1)
    wins = [sum(1 for j in range(n) if front_of[i, j] > front_of[j, i]) for i in range(n)]
    order = sorted(range(n), key=lambda i: (wins[i], i))  # back to front
    out = []
    for rank, i in enumerate(order):
        nearer = np.zeros_like(visible[i])
        for j in order[rank + 1:]:
            nearer |= visible[j]
        score, shape, size, cx, cy = _fit(visible[i], nearer) if nearer.any() else alone[i]
        out.append(Found(shape, size, cx, cy, tuple(colours[i]), visible[i], score, rank))
    return out


def segmentation(image) -> np.ndarray:
    """The segmentation condition of ``image``: each object's visible region in its shape's colour
    (:data:`lab.shapes.world.SEG_PALETTE`) on black, ``uint8 [H, W, 3]``."""
    return _segmentation_of(objects(image), _check(image).shape)


def _segmentation_of(found: list[Found], shape) -> np.ndarray:
    seg = np.zeros(shape, np.uint8)
    for f in found:
        seg[f.visible] = world.SEG_PALETTE[f.shape]
    return seg


def depth(image) -> np.ndarray:
    """The depth condition of ``image``: :func:`lab.shapes.world.depth_map` of its objects in the order found."""
    return world.depth_map([f.as_object() for f in objects(image)], size=_check(image).shape[0])


def pose(image) -> np.ndarray:
    """The pose condition of ``image``: :func:`lab.shapes.world.pose_map` of its objects."""
    return world.pose_map([f.as_object() for f in objects(image)], size=_check(image).shape[0])


def keypoints(image) -> list[np.ndarray]:
    """Each object's keypoints (:func:`lab.shapes.world.keypoints`, ``[k + 1, 2]``), back to front."""
    return [world.keypoints(f.as_object()) for f in objects(image)]


# ---------------------------------------------------------------- scores against the world's ground truth
SEG_CLASSES = ("background", *world.SHAPES)


def _class_map(seg: np.ndarray) -> np.ndarray:
    pal = np.asarray([world.SEG_PALETTE[c] for c in SEG_CLASSES], np.float32)
    return np.linalg.norm(seg.astype(np.float32)[:, :, None] - pal[None, None], axis=3).argmin(2)


def _pck(found: list[np.ndarray], truth: list[np.ndarray]) -> tuple[int, int]:
    """Keypoints of ``truth`` objects within :data:`PCK_PIXELS` of the found object nearest to each one's centre
    (with the same number of keypoints; else none of them count): (right, total)."""
    right = total = 0
    for t in truth:
        total += len(t)
        cands = [f for f in found if len(f) == len(t)]
        if cands:
            f = min(cands, key=lambda f: np.linalg.norm(f[-1] - t[-1]))
            right += int((np.linalg.norm(f - t, axis=1) <= PCK_PIXELS).sum())
    return right, total


def score(n: int = 500, *, seed: int = 400) -> dict:
    """The preprocessors on ``n`` held-out world scenes each:

    * ``segmentation_miou``: mean over the four classes (background, circle, square, triangle) of the IoU
      accumulated over the scenes, on scenes as the world draws them; ``segmentation_miou_overlap`` on
      overlapping ones;
    * ``depth_order_accuracy``: overlapping scenes where the nearer object hides at least 10 pixels of the other,
      the share whose order is found right (``depth_order_n``: how many such scenes);
    * ``pose_pck``: keypoints within :data:`PCK_PIXELS` px (:func:`_pck`), on scenes as the world draws them;
      ``pose_pck_overlap`` on overlapping ones (hidden vertices included)."""
    out: dict = {"n": n, "pck_pixels": PCK_PIXELS}
    for tag, overlap in (("", False), ("_overlap", True)):
        inter, union = np.zeros(len(SEG_CLASSES)), np.zeros(len(SEG_CLASSES))
        right = total = order_ok = order_n = 0
        for i in range(n):
            ex = world.make_example(seed, i, split="heldout", overlap=overlap)
            found = objects(ex["image"])
            a, b = _class_map(_segmentation_of(found, ex["image"].shape)), _class_map(ex["segmentation"])
            for c in range(len(SEG_CLASSES)):
                inter[c] += np.logical_and(a == c, b == c).sum()
                union[c] += np.logical_or(a == c, b == c).sum()
            r, t = _pck([world.keypoints(f.as_object()) for f in found],
                        [world.keypoints(o) for o in ex["scene"].objects])
            right, total = right + r, total + t
            if overlap and (ex["masks"][0] & ex["masks"][1]).sum() >= 10:
                order_n += 1
                if len(found) == 2:
                    back = world.keypoints(found[0].as_object())[-1]
                    order_ok += int(np.linalg.norm(back - world.keypoints(ex["scene"].objects[0])[-1])
                                    < np.linalg.norm(back - world.keypoints(ex["scene"].objects[1])[-1]))
        iou = inter / np.maximum(union, 1)
        out[f"segmentation_miou{tag}"] = float(iou.mean())
        out[f"segmentation_iou_per_class{tag}"] = dict(zip(SEG_CLASSES, map(float, iou)))
        out[f"pose_pck{tag}"] = right / max(total, 1)
        if overlap:
            out["depth_order_accuracy"] = order_ok / max(order_n, 1)
            out["depth_order_n"] = order_n
    return out
