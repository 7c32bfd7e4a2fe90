"""The shapes world: a procedural dataset of coloured shapes with captions, masks and conditions.

Every scene is drawn from ``numpy.random.default_rng([seed, index])``, so scene ``i`` of a seed is the
same whatever the batch or the number of worker processes that produce it.

A scene holds one or two non-overlapping objects (circle, square, triangle; six colours; two sizes;
free positions) on a plain background (gray, white, black), a caption from a small grammar::

    "a large red circle and a small blue square on a gray background"

per-object masks, and five ControlNet conditions made from the scene and the image:

* ``scribble``: each outline redrawn as a person would with a mouse: low-frequency wobble, a
  random start point, a stroke that may stop short or overshoot, a varying stroke width;
* ``segmentation``: one colour per shape class (:data:`SEG_PALETTE`), black background;
* ``edges``: Canny on the colour image (:func:`lab.conditions.canny`, thresholds 100/200, as ControlNet's annotator);
* ``pose``: each object's keypoints (its vertices, or four points on a circle's rim, and its centre) joined by
  coloured limbs on black, drawn the OpenPose way (:func:`pose_map`; one colour per keypoint slot, so the
  colours say the shape);
* ``depth``: an inverse-depth map as MiDaS gives (near is bright, the background black; :func:`depth_map`):
  each object at a depth by its drawing order (later is nearer), circles shaded as spheres, squares and
  triangles as planes tilted back at the top.

With ``overlap=True`` (two objects) the second object overlaps the first and hides part of it (it is drawn
later, so it is nearer: the depth map's and the composition eval's case); the two take different colours.

Images and conditions are ``uint8`` arrays ``[H, W, 3]``; masks are ``bool`` ``[H, W]``.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from ..conditioning.text import STOP_WORDS
from ..conditions import canny

SIZE = 64  # image side in pixels
MAX_OBJECTS = 2  # objects per scene: one or two
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 16, "large": 28}  # bounding-box side in pixels at SIZE=64
SEG_PALETTE: dict[str, tuple[int, int, int]] = {  # segmentation colour per class (ADE20K-like)
    "background": (0, 0, 0),
    "circle": (255, 0, 128),
    "square": (0, 200, 255),
    "triangle": (255, 200, 0),
}
CONDITION_KINDS = ("scribble", "segmentation", "edges", "pose", "depth")
OVERLAP_KINDS = ("pose", "depth")  # their ControlNets train on a mix with overlapping objects (Preset.overlap_share)
# OpenPose's limb colours (its 18-colour wheel), one per keypoint slot: a circle's rim points (top, right,
# bottom, left), a square's corners (clockwise from top left), a triangle's vertices (apex, right, left)
POSE_SLOTS: dict[str, tuple[int, ...]] = {"circle": (0, 1, 2, 3), "square": (5, 6, 7, 8), "triangle": (11, 12, 13)}
OPENPOSE_COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
                    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
                    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
DEPTH_NEAR, DEPTH_STEP = 200.0, 70.0  # the nearest object's base inverse depth, and the step to the next one back
DEPTH_RELIEF = 40.0  # a sphere's bulge, and a plane's tilt over its height
VOCABULARY = sorted(
    {"a", "and", "on", "background", *COLOURS, *BACKGROUNDS, *SHAPES, *SIZES}
)


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    cx: float  # centre, pixels
    cy: float

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        h = SIZES[self.size] / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str
    caption: str = field(default="")

    @staticmethod
    def make_caption(objects, background) -> str:
        return " and ".join(o.phrase for o in objects) + f" on a {background} background"


def _combo_key(objects, background) -> str:
    parts = sorted(f"{o[2]} {o[1]} {o[0]}" if isinstance(o, tuple) else f"{o.size} {o.colour} {o.shape}"
                   for o in objects)
    return "|".join(parts) + "|" + background


def is_held_out(objects, background) -> bool:
    """True for the ~10% of two-object combinations that training never sees (stable hash). ``objects``:
    :class:`ShapeObject` or ``(shape, colour, size)`` tuples."""
    if len(objects) < 2:
        return False
    digest = hashlib.sha1(_combo_key(objects, background).encode()).digest()
    return digest[0] < 26  # 26/256 ~ 10%


def sample_attributes(rng: np.random.Generator, *, split: str = "train", n_objects: int | None = None,
                      touching: bool = False, two_share: float = 0.5) -> tuple[list[tuple[str, str, str]], str]:
    """What a scene shows, before any placement: ``[(shape, colour, size), ...]`` and the background. Each
    attribute is uniform and independent (``touching``: the second object takes another colour than the
    first); two objects with probability ``two_share`` unless ``n_objects`` says; ``split`` keeps held-out
    two-object combinations out of ``"train"`` and only those in ``"heldout"``."""
    while True:
        n = (2 if rng.random() < two_share else 1) if n_objects is None else n_objects
        background = str(rng.choice(list(BACKGROUNDS)))
        attrs: list[tuple[str, str, str]] = []
        for _ in range(n):
            shape, size = str(rng.choice(SHAPES)), str(rng.choice(list(SIZES)))
            colours = [c for c in COLOURS if not (touching and attrs and c == attrs[0][1])]
            attrs.append((shape, str(rng.choice(colours)), size))
        held = is_held_out(attrs, background)
        if n == 2 and ((split == "train" and held) or (split == "heldout" and not held)):
            continue
        return attrs, background


def sample_scene(rng: np.random.Generator, *, split: str = "train", n_objects: int | None = None,
                 touching: bool = False, two_share: float = 0.5, overlap: bool = False) -> Scene:
    """Draw one scene: its objects' attributes first (shape, colour, size, each uniform and independent;
    two objects with probability ``two_share`` unless ``n_objects`` says), then places for them, so that every
    caption the grammar allows comes out as often as its attributes say (two large objects in a quarter of the
    two-object scenes; a placement that cannot fit is redrawn, not the attributes). ``split="train"`` never
    yields a held-out two-object combination; ``split="heldout"`` yields only held-out ones when it draws two
    objects. ``touching=True`` (two objects) puts the second one against a side of the first, bounding boxes
    abutting, in another colour (the oracle's hard case; the training mix keeps objects 3 px apart);
    ``overlap=True`` (two objects) puts the second one over part of the first (:func:`_over`), in another colour."""
    if overlap and n_objects not in (None, 2):
        raise ValueError(f"overlap=True needs two objects, got n_objects={n_objects}")
    while True:
        attrs, background = sample_attributes(rng, split=split, n_objects=2 if overlap else n_objects,
                                              touching=touching or overlap, two_share=two_share)
        objects = _place_over(rng, attrs) if overlap else _place(rng, attrs, touching)
        if objects is not None:
            return Scene(tuple(objects), background, Scene.make_caption(objects, background))


def _place(rng: np.random.Generator, attrs, touching: bool) -> list[ShapeObject] | None:
    """Places for objects of the given (shape, colour, size): the first anywhere, each next one apart from
    (or, ``touching``, against) the first; the whole placement is redrawn when one does not fit. Two large
    objects (28 px, 3 px apart, on 64 px) fit only along opposite sides, so they take many tries."""
    for _placement in range(400):
        objects: list[ShapeObject] = []
        for shape, colour, size in attrs:
            for _attempt in range(20):
                obj = (_against(rng, objects[0], shape, colour, size) if touching and objects
                       else _free(rng, shape, colour, size))
                if obj is not None and all(_apart(obj, o, gap=0.0 if touching else 3.0) for o in objects):
                    objects.append(obj)
                    break
            else:
                break
        if len(objects) == len(attrs):
            return objects
    return None


def _place_over(rng: np.random.Generator, attrs) -> list[ShapeObject] | None:
    """Two objects, the second over part of the first: its centre 35-75% of the two half-sides away from the
    first's along a random direction, so that it hides some of the first, with at least 40% of the first's
    bounding box left in view."""
    (s0, c0, z0), (s1, c1, z1) = attrs
    reach = (SIZES[z0] + SIZES[z1]) / 2
    for _attempt in range(200):
        first = _free(rng, s0, c0, z0)
        angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.35, 0.75) * reach
        cx, cy = first.cx + dist * np.cos(angle), first.cy + dist * np.sin(angle)
        half = SIZES[z1] / 2
        second = ShapeObject(s1, c1, z1, float(cx), float(cy))
        if half + 1 <= cx <= SIZE - half - 1 and half + 1 <= cy <= SIZE - half - 1 and _in_view(first, second) >= 0.4:
            return [first, second]
    return None


def _in_view(back: ShapeObject, front: ShapeObject) -> float:
    """The share of ``back``'s bounding box that ``front``'s does not cover."""
    ax0, ay0, ax1, ay1 = back.bbox
    bx0, by0, bx1, by1 = front.bbox
    cover = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    return 1.0 - cover / ((ax1 - ax0) * (ay1 - ay0))


def _free(rng: np.random.Generator, shape: str, colour: str, size: str) -> ShapeObject:
    half = SIZES[size] / 2
    cx = float(rng.uniform(half + 2, SIZE - half - 2))
    cy = float(rng.uniform(half + 2, SIZE - half - 2))
    return ShapeObject(shape, colour, size, cx, cy)


def _against(rng: np.random.Generator, first: ShapeObject, shape: str, colour: str, size: str) -> ShapeObject | None:
    """An object whose bounding box abuts ``first``'s on a random side (None: off the image)."""
    half, other = SIZES[size] / 2, SIZES[first.size] / 2
    side = int(rng.integers(4))
    slide = float(rng.uniform(-(half + other) / 2, (half + other) / 2))
    dx, dy = [(half + other, slide), (-(half + other), slide), (slide, half + other), (slide, -(half + other))][side]
    cx, cy = first.cx + dx, first.cy + dy
    if not (half + 1 <= cx <= SIZE - half - 1 and half + 1 <= cy <= SIZE - half - 1):
        return None
    return ShapeObject(shape, colour, size, cx, cy)


def caption_category(scene) -> str:
    """The caption category of a scene (or of ``(shape, colour, size)`` tuples), as the eval and the frequency
    table name them: ``two_large``, ``two_small`` or ``large_small`` by sizes, with ``+same_shape`` /
    ``+same_colour`` when the two objects share that attribute; one-object scenes are ``single``."""
    objs = [(o.shape, o.colour, o.size) for o in scene.objects] if isinstance(scene, Scene) else list(scene)
    if len(objs) < 2:
        return "single"
    (sa, ca, za), (sb, cb, zb) = objs
    cat = {("large", "large"): "two_large", ("small", "small"): "two_small"}.get((za, zb), "large_small")
    if sa == sb:
        cat += "+same_shape"
    if ca == cb:
        cat += "+same_colour"
    return cat


def word_groups(caption: str) -> list[int]:
    """What each word of a caption names: the index of its object (in caption order) for the size, colour
    and shape words, ``MAX_OBJECTS`` for the background's colour and "background", -1 for function words
    (:data:`lab.conditioning.text.STOP_WORDS`: "a", "and", "on").
    ``"a large red circle on a gray background"`` -> ``[-1, 0, 0, 0, -1, -1, 2, 2]``."""
    out, group = [], 0
    for word in caption.split():
        if word == "and":
            group += 1
        elif word == "on":
            group = MAX_OBJECTS
        out.append(-1 if word in STOP_WORDS else group)
    return out


def _apart(a: ShapeObject, b: ShapeObject, gap: float = 3.0) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def _outline(obj: ShapeObject, n: int = 96) -> np.ndarray:
    """Closed outline of an object as ``[n, 2]`` points (x, y) in pixels, evenly spaced by angle/edge."""
    x0, y0, x1, y1 = obj.bbox
    if obj.shape == "circle":
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        r = (x1 - x0) / 2
        return np.stack([obj.cx + r * np.cos(t), obj.cy + r * np.sin(t)], 1)
    if obj.shape == "square":
        corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    else:  # triangle, pointing up
        corners = np.array([[obj.cx, y0], [x1, y1], [x0, y1]])
    k = len(corners)
    per = n // k
    pts = [corners[i] + (corners[(i + 1) % k] - corners[i]) * s
           for i in range(k) for s in np.linspace(0, 1, per, endpoint=False)]
    return np.array(pts)


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, fill) -> None:
    s = SUPERSAMPLE
    x0, y0, x1, y1 = (v * s for v in obj.bbox)
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif obj.shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    else:
        draw.polygon([(obj.cx * s, y0), (x1, y1), (x0, y1)], fill=fill)


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Image ``[H, W, 3] uint8`` and masks ``[n_objects, H, W] bool`` of a scene."""
    big = SIZE * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    masks = []
    for obj in scene.objects:
        _draw_object(draw, obj, COLOURS[obj.colour])
        m = Image.new("L", (big, big), 0)
        _draw_object(ImageDraw.Draw(m), obj, 255)
        masks.append(np.asarray(m.resize((SIZE, SIZE), Image.BOX)) >= 128)
    image = np.asarray(img.resize((SIZE, SIZE), Image.BOX))
    return image, np.stack(masks) if masks else np.zeros((0, SIZE, SIZE), bool)


def segmentation_map(scene: Scene, masks: np.ndarray) -> np.ndarray:
    """Colour per shape class (:data:`SEG_PALETTE`) on black: ``[H, W, 3] uint8``."""
    seg = np.zeros((SIZE, SIZE, 3), np.uint8)
    for obj, m in zip(scene.objects, masks):
        seg[m] = SEG_PALETTE[obj.shape]
    return seg


def visible_masks(masks: np.ndarray) -> np.ndarray:
    """What of each object is in view: its mask less the masks of the objects drawn after it (nearer)."""
    out = masks.copy()
    for i in range(len(masks)):
        out[i] &= ~masks[i + 1:].any(0)
    return out


def keypoints(obj: ShapeObject) -> np.ndarray:
    """An object's keypoints ``[k + 1, 2]`` (x, y in pixels): its slots (:data:`POSE_SLOTS`: a circle's four rim
    points top, right, bottom, left; a square's corners clockwise from top left; a triangle's apex, right and left
    base corners), then its centre (the bounding box's)."""
    x0, y0, x1, y1 = obj.bbox
    cx, cy = obj.cx, obj.cy
    pts = {"circle": [(cx, y0), (x1, cy), (cx, y1), (x0, cy)],
           "square": [(x0, y0), (x1, y0), (x1, y1), (x0, y1)],
           "triangle": [(cx, y0), (x1, y1), (x0, y1)]}[obj.shape]
    return np.array(pts + [(cx, cy)], np.float64)


def pose_map(objects, *, size: int = SIZE) -> np.ndarray:
    """The OpenPose-style skeleton of ``objects`` (:class:`ShapeObject`, back to front) on black, ``[H, W, 3]
    uint8``: a limb from the centre to each keypoint in that slot's colour (:data:`OPENPOSE_COLOURS`, dimmed to
    60% as OpenPose draws limbs), then the keypoints as dots in full colour, the centre white."""
    s = SUPERSAMPLE
    big = Image.new("RGB", (size * s, size * s), (0, 0, 0))
    draw = ImageDraw.Draw(big)
    r = 1.5 * s
    for obj in objects:
        pts = keypoints(obj) * s
        centre = tuple(pts[-1])
        for slot, p in zip(POSE_SLOTS[obj.shape], pts[:-1]):
            colour = tuple(int(0.6 * v) for v in OPENPOSE_COLOURS[slot])
            draw.line([centre, tuple(p)], fill=colour, width=int(1.5 * s))
        for slot, (x, y) in zip(POSE_SLOTS[obj.shape], pts[:-1]):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=OPENPOSE_COLOURS[slot])
        draw.ellipse([centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r], fill=(255, 255, 255))
    return np.asarray(big.resize((size, size), Image.BOX))


def depth_map(objects, *, size: int = SIZE) -> np.ndarray:
    """Inverse depth as MiDaS gives it (near is bright, the background 0), ``[H, W, 3] uint8``, of ``objects``
    (back to front): the nearest object at :data:`DEPTH_NEAR`, each one further back :data:`DEPTH_STEP` less;
    a circle bulges towards the viewer as a sphere (+:data:`DEPTH_RELIEF` at its centre), a square or triangle
    is a plane tilted back at the top (+:data:`DEPTH_RELIEF` at its bottom edge, +0 at its top)."""
    s = SUPERSAMPLE
    n = len(objects)
    yy, xx = (np.mgrid[0:size * s, 0:size * s] + 0.5) / s
    depth = np.zeros((size * s, size * s), np.float64)
    for i, obj in enumerate(objects):
        m = Image.new("L", (size * s, size * s), 0)
        _draw_object(ImageDraw.Draw(m), obj, 255)
        inside = np.asarray(m) >= 128
        x0, y0, x1, y1 = obj.bbox
        base = DEPTH_NEAR - DEPTH_STEP * (n - 1 - i)
        if obj.shape == "circle":
            rr = ((xx - obj.cx) ** 2 + (yy - obj.cy) ** 2) / ((x1 - x0) / 2) ** 2
            relief = DEPTH_RELIEF * np.sqrt(np.clip(1 - rr, 0, 1))
        else:
            relief = DEPTH_RELIEF * np.clip((yy - y0) / (y1 - y0), 0, 1)
        depth[inside] = (base + relief)[inside]
    small = depth.reshape(size, s, size, s).mean((1, 3))
    return np.repeat(np.clip(small, 0, 255).round().astype(np.uint8)[:, :, None], 3, axis=2)


def edges(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edges of an RGB image, white on black, ``[H, W, 3] uint8``: :func:`lab.conditions.canny`, the one
    Canny of the lab (users' edge conditions and the edges ControlNet's training data agree)."""
    return canny(image, low, high)


def scribble(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Hand-drawn-looking outlines of every object, white strokes on black, ``[H, W, 3] uint8``.

    The outline is perturbed along its normal by a smooth random wobble (a few low Fourier modes),
    each point gets a little jitter, the stroke starts at a random point and covers 85-105% of the
    perimeter, and the stroke width is drawn per object (1-3 px at 64x64)."""
    s = SUPERSAMPLE
    big = SIZE * s
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        pts = _outline(obj)
        n = len(pts)
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        wobble = sum(rng.normal(0, 0.6) * np.sin(k * t + rng.uniform(0, 2 * np.pi)) for k in (1, 2, 3))
        centre = np.array([obj.cx, obj.cy])
        direction = pts - centre
        direction /= np.linalg.norm(direction, axis=1, keepdims=True) + 1e-6
        pts = pts + direction * wobble[:, None] + rng.normal(0, 0.25, pts.shape)
        start = int(rng.integers(0, n))
        cover = rng.uniform(0.85, 1.05)
        idx = (start + np.arange(int(round(cover * n)))) % n
        path = [(float(x * s), float(y * s)) for x, y in pts[idx]]
        width = int(rng.integers(1 * s, 3 * s + 1))
        draw.line(path, fill=255, width=width, joint="curve")
    arr = np.asarray(canvas.resize((SIZE, SIZE), Image.BOX)) >= 96
    out = np.where(arr, 255, 0).astype(np.uint8)
    return np.repeat(out[:, :, None], 3, axis=2)


def make_example(seed: int, index: int, *, split: str = "train", n_objects: int | None = None,
                 touching: bool = False, two_share: float = 0.5, overlap: bool = False) -> dict:
    """Scene ``index`` of ``seed``: image, masks (whole objects, back to front; ``visible``: what is in view),
    caption, objects, and every condition of :data:`CONDITION_KINDS`. ``overlap``: the second object over part of
    the first (:func:`sample_scene`)."""
    split_tag = {"train": 0, "heldout": 1}[split]
    rng = np.random.default_rng([seed, index, split_tag] + ([1] if touching else []) + ([2] if overlap else []))
    scene = sample_scene(rng, split=split, n_objects=n_objects, touching=touching, two_share=two_share,
                         overlap=overlap)
    image, masks = render(scene)
    visible = visible_masks(masks)
    return {
        "scene": scene,
        "caption": scene.caption,
        "image": image,
        "masks": masks,
        "visible": visible,
        "scribble": scribble(scene, rng),
        "segmentation": segmentation_map(scene, visible),
        "edges": edges(image),
        "pose": pose_map(scene.objects),
        "depth": depth_map(scene.objects),
    }


def overlaps(seed: int, index: int, overlap_share: float) -> bool:
    """Whether scene ``index`` of ``seed`` is drawn as two overlapping objects in a set with ``overlap_share``
    (its own random stream: the other scenes stay what they are without overlaps)."""
    return overlap_share > 0 and np.random.default_rng([seed, index, 3]).random() < overlap_share


def _chunk(args):
    seed, start, stop, split, two_share, overlap_share = args
    out = {k: [] for k in ("image", "caption", *CONDITION_KINDS, "mask_union", "object_masks")}
    for i in range(start, stop):
        ex = make_example(seed, i, split=split, two_share=two_share, overlap=overlaps(seed, i, overlap_share))
        for k in ("image", "caption", *CONDITION_KINDS):
            out[k].append(ex[k])
        out["mask_union"].append(ex["masks"].any(0))
        masks = np.zeros((MAX_OBJECTS, SIZE, SIZE), bool)
        masks[:len(ex["masks"])] = ex["masks"]
        out["object_masks"].append(masks)
    return out


def generate(n: int, seed: int = 0, *, split: str = "train", workers: int = 1, chunk: int = 2048,
             two_share: float = 0.5, overlap_share: float = 0.0) -> dict:
    """``n`` examples as stacked arrays: ``image`` and each condition of :data:`CONDITION_KINDS`
    ``[n, H, W, 3] uint8``, ``mask_union`` ``[n, H, W] bool``, ``object_masks`` ``[n, 2, H, W] bool`` (whole
    objects in caption order; all False for a missing second object) and ``caption`` (list of str).
    ``two_share``: the share of two-object scenes; ``overlap_share``: the share of scenes drawn instead as two
    overlapping objects (:func:`overlaps`; the pose and depth ControlNets' mix). The result does not depend on
    ``workers`` or ``chunk``."""
    if not 0.0 <= overlap_share <= 1.0:
        raise ValueError(f"overlap_share must be within [0, 1], got {overlap_share}")
    jobs = [(seed, a, min(a + chunk, n), split, two_share, overlap_share) for a in range(0, n, chunk)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_chunk, jobs))
    else:
        parts = [_chunk(j) for j in jobs]
    out = {}
    for k in parts[0]:
        vals = [v for p in parts for v in p[k]]
        out[k] = vals if k == "caption" else np.stack(vals)
    return out


def grammar_frequencies(n: int = 20_000, seed: int = 0, *, split: str = "train", two_share: float = 0.5) -> dict:
    """How often the world draws each caption category (:func:`caption_category`) and background, over ``n``
    scenes of ``split``: ``two_objects`` (share of all scenes), ``category`` (share of the two-object scenes),
    ``background`` (share of all scenes). The README's table."""
    from collections import Counter
    scenes = [sample_scene(np.random.default_rng([seed, i, 0]), split=split, two_share=two_share) for i in range(n)]
    two = [s for s in scenes if len(s.objects) == 2]
    cats = Counter(caption_category(s) for s in two)
    return {"n": n, "two_objects": len(two) / n,
            "category": {k: v / len(two) for k, v in sorted(cats.items())},
            "background": {k: v / n for k, v in sorted(Counter(s.background for s in scenes).items())}}
