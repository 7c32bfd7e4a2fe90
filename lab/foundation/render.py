"""What score distillation optimises: images made by differentiable parameterisations.

Each is a ``torch.nn.Module`` whose ``forward()`` returns images ``[B, 3, H, W]`` in [0, 1] (``B`` independent
runs, each with its own parameters); :mod:`lab.foundation.sds` encodes them with the VAE and pushes the
parameters the way the frozen prior's score says. DreamFusion optimises a NeRF seen through a camera; a 2D
world's analogue is a scene of shapes seen by a soft rasteriser:

* :class:`SoftShapes`: per object a centre, a size, a colour, a soft shape (a mixture over circle, square
  and upward triangle) and an edge softness, composited over a background colour. Every pixel is a smooth
  function of every parameter (signed distances through a sigmoid), so gradients reach positions and sizes,
  not only colours.
* :class:`PixelImage`: every pixel free (a sigmoid of an unconstrained value), seen through the VAE encoder.
* :class:`RawLatent`: the latent itself, no image and no encoder (``forward`` returns the latent; the
  distiller skips the VAE).

Parameters are unconstrained tensors mapped into their ranges (sigmoid, softplus, softmax), so a plain Adam
step never leaves the valid set.
"""
from __future__ import annotations

import math

import torch

SHAPES = ("circle", "square", "triangle")
PARAMS = ("cx", "cy", "size", "red", "green", "blue", "circle", "square", "triangle", "softness")


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-4, 1 - 1e-4)
    return torch.log(p) - torch.log1p(-p)


def shape_distances(px: torch.Tensor, py: torch.Tensor, cx, cy, r) -> torch.Tensor:
    """Signed distances (pixels; negative inside) of pixel centres ``px``/``py`` ``[H, W]`` to a circle of radius
    ``r``, an axis-aligned square of half side ``r`` and an upward triangle filling the square's box (apex at the
    top centre, base the bottom side, as the shapes world draws them), each centred at ``cx``/``cy`` ``[...]``:
    ``[..., 3, H, W]``. The square's and the triangle's are the maximum of their edges' half-plane distances
    (exact inside, a smooth-enough bound outside)."""
    cx, cy, r = (v[..., None, None] for v in (cx, cy, r))
    dx, dy = px - cx, py - cy
    circle = torch.sqrt(dx * dx + dy * dy + 1e-6) - r
    square = torch.maximum(dx.abs(), dy.abs()) - r
    # triangle (cx, cy - r), (cx + r, cy + r), (cx - r, cy + r): the base y = cy + r and two sides whose outward
    # normals are (2, -1)/sqrt(5) and (-2, -1)/sqrt(5), passing through the apex
    n = 1 / math.sqrt(5)
    base = dy - r
    right = (2 * dx - (dy + r)) * n
    left = (-2 * dx - (dy + r)) * n
    triangle = torch.maximum(base, torch.maximum(right, left))
    return torch.stack([circle, square, triangle], dim=-3)


class SoftShapes(torch.nn.Module):
    """A differentiable scene of ``objects`` shapes on a plain background, ``batch`` independent scenes.

    Parameters (unconstrained; :meth:`values` gives them in their units): ``centre`` ``[B, K, 2]`` (pixels, kept
    inside the middle ``1 - 2 * margin`` of the image), ``size`` ``[B, K]`` (the bounding box's side in pixels,
    in ``size_range``), ``colour`` ``[B, K, 3]`` (RGB in [0, 1]), ``shape`` ``[B, K, 3]`` (logits over
    circle, square, triangle: the object's coverage is their softmax-weighted mix), ``softness`` ``[B, K]``
    (edge width in pixels, between ``min_softness`` and ``max_softness``: coverage is
    ``sigmoid(-distance / softness)``; unbounded, an object can dissolve into a faint blur that the prior
    cannot tell from a wrong one), ``background``
    ``[B, 3]``. Objects are composited in order, later ones over earlier ones.

    ``seed`` draws a random start: centres uniform in the allowed box, sizes uniform in ``size_range``, colours
    uniform in RGB, shape logits N(0, 0.5) (a blend of the three), softness 1 px, background uniform.
    """

    def __init__(self, batch: int = 1, objects: int = 1, *, size: int = 64, size_range=(12.0, 32.0),
                 margin: float = 0.2, min_softness: float = 0.3, max_softness: float = 3.0, seed: int | None = 0):
        super().__init__()
        if batch < 1 or objects < 1:
            raise ValueError(f"batch and objects must be >= 1, got batch={batch}, objects={objects}")
        lo, hi = map(float, size_range)
        if not 0 < lo < hi:
            raise ValueError(f"size_range must be 0 < low < high pixels, got {size_range}")
        if not 0 < min_softness < max_softness:
            raise ValueError(f"softness must satisfy 0 < min_softness < max_softness, got {min_softness}, {max_softness}")
        self.image_size, self.size_range, self.margin = int(size), (lo, hi), float(margin)
        self.softness_range = (float(min_softness), float(max_softness))
        g = torch.Generator().manual_seed(0 if seed is None else int(seed))
        u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
        self.centre = torch.nn.Parameter(_logit(u(batch, objects, 2)))
        self.size = torch.nn.Parameter(_logit(u(batch, objects)))
        self.colour = torch.nn.Parameter(_logit(u(batch, objects, 3)))
        self.shape = torch.nn.Parameter(0.5 * torch.randn(batch, objects, 3, generator=g))
        start = (1.0 - min_softness) / (max_softness - min_softness) if min_softness < 1.0 < max_softness else 0.5
        self.softness = torch.nn.Parameter(_logit(torch.full((batch, objects), start)))
        self.background = torch.nn.Parameter(_logit(u(batch, 3)))
        ys, xs = torch.meshgrid(torch.arange(self.image_size) + 0.5, torch.arange(self.image_size) + 0.5, indexing="ij")
        self.register_buffer("px", xs, persistent=False)
        self.register_buffer("py", ys, persistent=False)

    @property
    def batch(self) -> int:
        return self.centre.shape[0]

    @property
    def objects(self) -> int:
        return self.centre.shape[1]

    def values(self) -> dict[str, torch.Tensor]:
        """The parameters in their units: ``centre`` (pixels), ``size`` (pixels), ``colour`` and ``background``
        (RGB 0..1), ``shape`` (mixture weights), ``softness`` (pixels)."""
        lo, hi = self.size_range
        span = self.image_size * (1 - 2 * self.margin)
        return {
            "centre": self.image_size * self.margin + span * torch.sigmoid(self.centre),
            "size": lo + (hi - lo) * torch.sigmoid(self.size),
            "colour": torch.sigmoid(self.colour),
            "shape": torch.softmax(self.shape, dim=-1),
            "softness": self.softness_range[0] + (self.softness_range[1] - self.softness_range[0]) * torch.sigmoid(self.softness),
            "background": torch.sigmoid(self.background),
        }

    def table(self) -> torch.Tensor:
        """The parameters as one array ``[B, K, 10]`` in the order of :data:`PARAMS` (centre x, y, size, RGB,
        the three shape weights, softness): what a recorded optimisation stores per iteration."""
        v = self.values()
        return torch.cat([v["centre"], v["size"][..., None], v["colour"], v["shape"], v["softness"][..., None]], -1)

    def coverage(self) -> torch.Tensor:
        """Each object's soft coverage ``[B, K, H, W]`` in [0, 1]."""
        v = self.values()
        d = shape_distances(self.px, self.py, v["centre"][..., 0], v["centre"][..., 1], v["size"] / 2)  # [B,K,3,H,W]
        per_shape = torch.sigmoid(-d / v["softness"][..., None, None, None])
        return (v["shape"][..., None, None] * per_shape).sum(-3)

    def forward(self) -> torch.Tensor:
        v = self.values()
        alpha = self.coverage()
        img = v["background"][:, :, None, None].expand(-1, -1, self.image_size, self.image_size)
        for k in range(self.objects):
            a = alpha[:, k, None]
            img = img * (1 - a) + v["colour"][:, k, :, None, None] * a
        return img

    def extra_repr(self) -> str:
        return f"batch={self.batch}, objects={self.objects}, size={self.image_size}, size_range={self.size_range}"


class PixelImage(torch.nn.Module):
    """Free pixels: ``sigmoid(logits)`` ``[B, 3, H, W]``, started uniform in [0.25, 0.75] (``seed``)."""

    def __init__(self, batch: int = 1, *, size: int = 64, seed: int | None = 0):
        super().__init__()
        g = torch.Generator().manual_seed(0 if seed is None else int(seed))
        self.logits = torch.nn.Parameter(_logit(0.25 + 0.5 * torch.rand(batch, 3, size, size, generator=g)))

    @property
    def batch(self) -> int:
        return self.logits.shape[0]

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)


class RawLatent(torch.nn.Module):
    """The (scaled) latent itself ``[B, C, h, w]``, started N(0, 1) (``seed``). ``is_latent`` tells the
    distiller to skip the VAE encoder."""

    is_latent = True

    def __init__(self, batch: int = 1, *, channels: int = 4, size: int = 16, seed: int | None = 0):
        super().__init__()
        g = torch.Generator().manual_seed(0 if seed is None else int(seed))
        self.latent = torch.nn.Parameter(torch.randn(batch, channels, size, size, generator=g))

    @property
    def batch(self) -> int:
        return self.latent.shape[0]

    def forward(self) -> torch.Tensor:
        return self.latent
