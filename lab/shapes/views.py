"""The shapes world through a camera (issue 24): Zero-1-to-3's task, a new view from one view and a camera change.

Our world is flat, so the camera is a 2D one: a scene lives in world coordinates (pixels of the canonical
64x64 frame, objects as :class:`lab.shapes.world.ShapeObject`), and a :class:`Camera` looks at it from a centre,
with a zoom (image pixels per world pixel) and a roll (radians; the image turns the other way, so triangles and
squares come out rotated). ``Camera(32, 32, 1, 0)`` renders what :func:`lab.shapes.world.render` does, to within
edge pixels (circles are 192-gons here).

A training or eval pair (:func:`make_pair`) is a scene, an input camera and a target camera: every object is
at least :data:`MIN_INPUT_SHARE` in the input view (what the input does not show, nothing could predict), and
the target camera is the input one moved by a relative change drawn from :data:`RELATIVE_RANGE`, in the input
view's own axes (:func:`relative`): the target may show what the input cut off (a half object at the edge made
whole: generation, not a warp) and objects may leave the frame. The view model reads the relative camera as
five numbers (Zero-1-to-3's ``(dpolar, sin dazimuth, cos dazimuth, dradius)``, ours ``(dx, dy, dlog zoom, sin
droll, cos droll)``, :data:`CAMERA_FEATURES`).

:func:`warp` maps the input view to the target camera with the pixels it has (an affine warp, the background
colour outside): what a model that only moved pixels would do, a baseline beside "copy the input" that the
eval measures too.
"""
from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from . import world

CAMERA_FEATURES = ("dx", "dy", "dlog_zoom", "sin_droll", "cos_droll")
#: the input camera: centre within +-INPUT_SHIFT px of the world's middle, zoom and roll from these ranges
INPUT_SHIFT = 8.0
INPUT_ZOOM = (0.8, 1.25)
INPUT_ROLL = math.radians(30)
#: the relative change to the target camera: dx, dy (fractions of the frame, input view axes), log zoom, roll
RELATIVE_RANGE = {"dx": 0.25, "dy": 0.25, "dlog_zoom": 0.3, "droll": math.radians(40)}
WORLD_EXTENT = (-8.0, 72.0)  # where object centres may lie (world px): beyond the canonical frame
MIN_INPUT_SHARE = 0.3  # each object shows at least this share of its area in the input view
N_OUTLINE = 192  # outline points per object (a circle's polygon at 4x supersampling and zoom up to 1.7)


@dataclass(frozen=True)
class Camera:
    """A 2D camera: ``x, y`` the world point at the image centre, ``zoom`` image px per world px, ``roll`` in
    radians (counter-clockwise camera turn: the content turns clockwise in the image)."""

    x: float = world.SIZE / 2
    y: float = world.SIZE / 2
    zoom: float = 1.0
    roll: float = 0.0

    def to_image(self, pts: np.ndarray) -> np.ndarray:
        """World points ``[n, 2]`` -> image pixels ``[n, 2]``."""
        c, s = math.cos(self.roll), math.sin(self.roll)
        d = np.asarray(pts, np.float64) - (self.x, self.y)
        # R(-roll) d: the camera turned by roll sees the world turned by -roll
        rx, ry = c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]
        return np.stack([rx, ry], 1) * self.zoom + world.SIZE / 2

    def to_world(self, uv: np.ndarray) -> np.ndarray:
        """Image pixels ``[n, 2]`` -> world points ``[n, 2]`` (inverse of :meth:`to_image`)."""
        c, s = math.cos(self.roll), math.sin(self.roll)
        d = (np.asarray(uv, np.float64) - world.SIZE / 2) / self.zoom
        return np.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1]], 1) + (self.x, self.y)


def relative(a: Camera, b: Camera) -> np.ndarray:
    """The change from camera ``a`` to ``b`` as the view model reads it (:data:`CAMERA_FEATURES`): where ``b``'s
    centre lies in ``a``'s image, as a fraction of the frame from ``a``'s centre (``a``'s axes), the log of the
    zoom ratio, and the roll difference's sine and cosine. ``float32 [5]``."""
    u = a.to_image(np.array([[b.x, b.y]]))[0] - world.SIZE / 2
    droll = b.roll - a.roll
    return np.array([u[0] / world.SIZE, u[1] / world.SIZE, math.log(b.zoom / a.zoom), math.sin(droll),
                     math.cos(droll)], np.float32)


def apply_relative(a: Camera, rel) -> Camera:
    """The camera that ``rel`` (:func:`relative`'s five numbers) moves ``a`` to."""
    rel = np.asarray(rel, np.float64)
    if rel.shape != (5,) or not np.isfinite(rel).all():
        raise ValueError(f"a relative camera is 5 finite numbers {CAMERA_FEATURES}, got {rel!r}")
    centre = a.to_world(np.array([[rel[0] * world.SIZE + world.SIZE / 2, rel[1] * world.SIZE + world.SIZE / 2]]))[0]
    return Camera(float(centre[0]), float(centre[1]), a.zoom * math.exp(rel[2]), a.roll + math.atan2(rel[3], rel[4]))


def camera_change(dx: float = 0.0, dy: float = 0.0, zoom: float = 1.0, roll_degrees: float = 0.0) -> np.ndarray:
    """A relative camera from readable numbers: pan ``dx, dy`` (fractions of the frame), ``zoom`` (a ratio),
    ``roll_degrees``; ``float32 [5]`` as :func:`relative` gives."""
    if zoom <= 0 or not all(math.isfinite(v) for v in (dx, dy, zoom, roll_degrees)):
        raise ValueError(f"a camera change needs finite numbers and zoom > 0, got {(dx, dy, zoom, roll_degrees)}")
    r = math.radians(roll_degrees)
    return np.array([dx, dy, math.log(zoom), math.sin(r), math.cos(r)], np.float32)


def render_view(scene: world.Scene, camera: Camera) -> tuple[np.ndarray, np.ndarray]:
    """Image ``[64, 64, 3] uint8`` and per-object masks ``[n, 64, 64] bool`` of ``scene`` (world coordinates)
    seen through ``camera``; drawn as :func:`lab.shapes.world.render` draws (4x supersampled, box-filtered)."""
    s = world.SUPERSAMPLE
    big = world.SIZE * s
    img = Image.new("RGB", (big, big), world.BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    masks = []
    for obj in scene.objects:
        poly = [tuple(p) for p in camera.to_image(world._outline(obj, N_OUTLINE)) * s]
        draw.polygon(poly, fill=world.COLOURS[obj.colour])
        m = Image.new("L", (big, big), 0)
        ImageDraw.Draw(m).polygon(poly, fill=255)
        masks.append(np.asarray(m.resize((world.SIZE, world.SIZE), Image.BOX)) >= 128)
    image = np.asarray(img.resize((world.SIZE, world.SIZE), Image.BOX))
    return image, np.stack(masks) if masks else np.zeros((0, world.SIZE, world.SIZE), bool)


def full_area(obj: world.ShapeObject, camera: Camera) -> float:
    """An object's area in ``camera``'s image pixels, had the frame no edges."""
    side = world.SIZES[obj.size] * camera.zoom
    return {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}[obj.shape] * side * side


def warp(image: np.ndarray, a: Camera, b: Camera, background=None) -> np.ndarray:
    """The input view (camera ``a``; ``[H, W, 3]`` or a ``[H, W]`` mask) moved to camera ``b`` with the pixels it
    has: an affine warp, bilinear, ``background`` (default: the median of the border pixels) where the input saw
    nothing."""
    import cv2
    if background is None:
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).reshape(4 * world.SIZE, -1)
        background = np.median(border, 0)
    src = np.array([[0.0, 0.0], [world.SIZE, 0.0], [0.0, world.SIZE]])
    dst = b.to_image(a.to_world(src))
    m = cv2.getAffineTransform(src.astype(np.float32), dst.astype(np.float32))
    return cv2.warpAffine(image, m, (world.SIZE, world.SIZE), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(tuple(float(v) for v in np.atleast_1d(background)) + (0.0,) * 3)[:4])


def _scene(rng: np.random.Generator, split: str, two_share: float) -> world.Scene:
    """A scene in world coordinates: the world's attributes, objects anywhere in :data:`WORLD_EXTENT`, 3 px apart."""
    lo, hi = WORLD_EXTENT
    while True:
        attrs, background = world.sample_attributes(rng, split=split, two_share=two_share)
        for _placement in range(100):
            objects: list[world.ShapeObject] = []
            for shape, colour, size in attrs:
                obj = world.ShapeObject(shape, colour, size, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
                if all(world._apart(obj, o) for o in objects):
                    objects.append(obj)
            if len(objects) == len(attrs):
                return world.Scene(tuple(objects), background, world.Scene.make_caption(objects, background))


def _input_camera(rng: np.random.Generator) -> Camera:
    c = world.SIZE / 2
    return Camera(c + float(rng.uniform(-INPUT_SHIFT, INPUT_SHIFT)), c + float(rng.uniform(-INPUT_SHIFT, INPUT_SHIFT)),
                  float(np.exp(rng.uniform(*np.log(INPUT_ZOOM)))), float(rng.uniform(-INPUT_ROLL, INPUT_ROLL)))


def random_change(rng: np.random.Generator) -> np.ndarray:
    """A relative camera drawn uniformly from :data:`RELATIVE_RANGE`."""
    r = RELATIVE_RANGE
    droll = float(rng.uniform(-r["droll"], r["droll"]))
    return np.array([rng.uniform(-r["dx"], r["dx"]), rng.uniform(-r["dy"], r["dy"]),
                     rng.uniform(-r["dlog_zoom"], r["dlog_zoom"]), math.sin(droll), math.cos(droll)], np.float32)


def make_pair(seed: int, index: int, *, split: str = "train", two_share: float = 0.5) -> dict:
    """Pair ``index`` of ``seed`` (deterministic): ``scene`` (world coordinates), ``camera_in``, ``camera_out``,
    ``camera`` (the relative change, :func:`relative`), ``input`` and ``target`` images with their per-object
    masks (``input_masks``, ``target_masks``), ``caption`` (the scene's: every object shows in the input view)
    and ``left`` (per object: True when it is wholly out of the target frame)."""
    split_tag = {"train": 0, "heldout": 1}[split]
    rng = np.random.default_rng([seed, index, split_tag, 24])
    while True:
        scene = _scene(rng, split, two_share)
        cam_in = _input_camera(rng)
        image_in, masks_in = render_view(scene, cam_in)
        shares = [m.sum() / full_area(o, cam_in) for o, m in zip(scene.objects, masks_in)]
        if min(shares) >= MIN_INPUT_SHARE:
            break
    rel = random_change(rng)
    cam_out = apply_relative(cam_in, rel)
    image_out, masks_out = render_view(scene, cam_out)
    return {"scene": scene, "caption": scene.caption, "camera_in": cam_in, "camera_out": cam_out,
            "camera": relative(cam_in, cam_out), "input": image_in, "input_masks": masks_in,
            "target": image_out, "target_masks": masks_out, "left": ~masks_out.any((1, 2))}


def _chunk(args):
    seed, start, stop, split, two_share = args
    out = {k: [] for k in ("input", "target", "camera", "caption", "target_masks", "left")}
    for i in range(start, stop):
        p = make_pair(seed, i, split=split, two_share=two_share)
        for k in ("input", "target", "camera", "caption"):
            out[k].append(p[k])
        out["left"].append(int(p["left"].sum()))
        masks = np.zeros((world.MAX_OBJECTS, world.SIZE, world.SIZE), bool)
        masks[:len(p["target_masks"])] = p["target_masks"]
        out["target_masks"].append(masks)
    return out


def generate_pairs(n: int, seed: int = 0, *, split: str = "train", workers: int = 1, chunk: int = 2048,
                   two_share: float = 0.5) -> dict:
    """``n`` pairs as stacked arrays: ``input``, ``target`` ``[n, 64, 64, 3] uint8``, ``camera`` ``[n, 5]
    float32``, ``target_masks`` ``[n, 2, 64, 64] bool``, ``left`` ``[n]`` (objects wholly out of the target frame),
    ``caption`` (list); independent of ``workers``."""
    jobs = [(seed, a, min(a + chunk, n), split, two_share) for a in range(0, n, chunk)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_chunk, jobs))
    else:
        parts = [_chunk(j) for j in jobs]
    return {k: ([v for p in parts for v in p[k]] if k == "caption" else np.stack([v for p in parts for v in p[k]]))
            for k in parts[0]}
