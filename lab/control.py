"""ControlNet conditions in the sampler: which net, which image, how strong, when, and per block.

ControlNet adds one residual per encoder level and one for the middle block (13 for SD 1.5):
``y = F(x) + Z(F(x + Z(c)))``. How strongly each of them is added is a weight per block and step:

* ``balanced``: every block at ``scale``, both halves of the CFG batch (diffusers' default);
* ``prompt``: soft weights ``w_i = scale * 10^(-(N-1-i)/(N-1))`` (i = 0 the first encoder block, N-1 the
  middle block; for N = 13 this is 0.825^(12-i), sd-webui-controlnet's "my prompt is more important"),
  both halves;
* ``control``: the same soft weights on the conditional half only, the unconditional half gets no
  residuals (ControlNet's guess mode, diffusers' ``guess_mode=True``);
* ``cfg_rw``: the ControlNet paper's CFG resolution weighting, conditional half only, with
  ``w_i = 64 / h_i`` for a block of latent height h_i, divided by its largest value so the middle
  block gets ``scale``: ``w_i = scale * h_min / h_i``. For SD 1.5 at 512 px (h = 64, 32, 16, 8) this is
  1/8, 1/4, 1/2, 1 — the same shape as the code's 0.825^(12-i), which runs from 0.099 to 1;
* ``weights``: an explicit grid ``[N blocks, steps]`` (any array-like) that all of the above are
  shortcuts for (see :meth:`Control.grid`); ``halves`` says which halves it applies to.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


MODES = ("balanced", "prompt", "control", "cfg_rw")


@dataclass(frozen=True)
class Control:
    """One ControlNet applied during sampling.

    ``net``: a name in ``pipe.controlnets`` (e.g. ``"scribble"``); ``image``: the condition (PIL image,
    ``uint8``/float array ``[H, W]`` or ``[H, W, 3]``, or a float tensor ``[3, H, W]`` in [0, 1]) at the
    sampler's exact size; ``scale``: the conditioning scale; ``start``/``end``: the fraction of the
    trajectory during which the net is applied (diffusers' ``control_guidance_start/end``)."""

    net: str
    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    weights: Any = None
    halves: str | None = None

    def validate(self, available) -> None:
        if self.net not in available:
            close = difflib.get_close_matches(str(self.net), list(available), n=3, cutoff=0.3)
            raise KeyError(f"no ControlNet named {self.net!r}; loaded: {sorted(available)}"
                           + (f"; did you mean {close}?" if close else "")
                           + ". Load one with lab.load(model, controlnet=NAME).")
        for name in ("scale", "start", "end"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"control {name} must be a finite number, got {v!r}")
        if not (0.0 <= self.start <= 1.0 and 0.0 <= self.end <= 1.0) or self.start > self.end:
            raise ValueError(f"control start/end must satisfy 0 <= start <= end <= 1, got start={self.start}, end={self.end}")
        if self.mode not in MODES:
            close = difflib.get_close_matches(str(self.mode), MODES, n=2, cutoff=0.3)
            raise ValueError(f"unknown control mode {self.mode!r}; modes: {MODES}" + (f"; did you mean {close}?" if close else ""))
        if self.halves not in (None, "both", "cond"):
            raise ValueError(f"halves must be 'both' or 'cond', got {self.halves!r}")

    @property
    def cond_only(self) -> bool:
        """Residuals go to the conditional half only (guess mode / CFG-RW)."""
        if self.halves is not None:
            return self.halves == "cond"
        return self.mode in ("control", "cfg_rw")

    def block_weights(self, heights: list[int]) -> list[float]:
        """Per-block weights of the mode (without start/end), for blocks of latent heights ``heights``
        (encoder blocks first, middle block last)."""
        n = len(heights)
        if self.mode == "balanced":
            return [float(self.scale)] * n
        if self.mode in ("prompt", "control"):
            # exactly diffusers' guess-mode scales: torch.logspace(-1, 0, N) * conditioning_scale
            return [float(v) for v in torch.logspace(-1, 0, n) * self.scale]
        h_min = min(heights)
        return [float(self.scale * h_min / h) for h in heights]

    def grid(self, heights: list[int], n_steps: int) -> np.ndarray:
        """The ``[blocks, steps]`` weight grid this control applies (explicit ``weights`` or the mode's)."""
        if self.weights is not None:
            g = np.asarray(self.weights, dtype=np.float64)
            if g.shape != (len(heights), n_steps):
                raise ValueError(f"weights grid must be [blocks, steps] = [{len(heights)}, {n_steps}], got {g.shape}")
            if not np.isfinite(g).all():
                raise ValueError("weights grid has NaN/inf")
            return g
        w = np.asarray(self.block_weights(heights))
        keep = np.array([self.keep(i, n_steps) for i in range(n_steps)])
        return w[:, None] * keep[None, :]

    def keep(self, i: int, n: int) -> float:
        """1.0 if step ``i`` of ``n`` lies in [start, end] (diffusers' ``controlnet_keep`` rule), else 0.0."""
        return 1.0 - float(i / n < self.start or (i + 1) / n > self.end)


def condition_tensor(image, height: int, width: int) -> torch.Tensor:
    """One condition image, or a list of them (one per prompt) -> float32 ``[N, 3, H, W]`` in [0, 1]."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("empty list of control images")
        return torch.cat([_one_condition(im, height, width) for im in image])
    return _one_condition(image, height, width)


def _one_condition(image, height: int, width: int) -> torch.Tensor:
    """A condition image as float32 ``[1, 3, H, W]`` in [0, 1].

    Accepted: PIL images (modes RGB, L, 1, RGBA, P are converted to RGB), numpy arrays ``[H, W]`` or
    ``[H, W, 1|3]`` (``uint8`` 0-255, or float 0-1), torch tensors ``[3, H, W]`` / ``[1, 3, H, W]``
    in [0, 1]. Anything else is a TypeError; another size is a ValueError (never a silent resize)."""
    if isinstance(image, Image.Image):
        if image.mode not in ("RGB", "L", "1", "RGBA", "P"):
            raise TypeError(f"control image mode {image.mode!r} is not supported; use RGB or L")
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        t = torch.from_numpy(arr).permute(2, 0, 1)[None]
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3):
            raise TypeError(f"control array must be [H, W] or [H, W, 1|3], got shape {image.shape}")
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        elif np.issubdtype(arr.dtype, np.floating) or arr.dtype == bool:
            arr = arr.astype(np.float32)
        else:
            raise TypeError(f"control array dtype must be uint8, bool or float, got {arr.dtype}")
        t = torch.from_numpy(np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr.copy()).permute(2, 0, 1)[None]
    elif isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[:2] != (1, 3):
            raise TypeError(f"control tensor must be [3, H, W] or [1, 3, H, W], got {tuple(image.shape)}")
    else:
        raise TypeError(f"control image must be a PIL image, numpy array or torch tensor, not {type(image).__name__}")
    h, w = t.shape[-2:]
    if (h, w) != (height, width):
        raise ValueError(f"control image is {w}x{h} but the sampler makes {width}x{height} images; "
                         f"resize the condition to {width}x{height} (width x height) or sample at {w}x{h}")
    if not torch.isfinite(t).all():
        raise ValueError("control image has NaN/inf values")
    return t.contiguous()


def normalise_controls(control, pipe) -> list[Control]:
    """``control``: ``None``, an image (needs exactly one loaded net), a :class:`Control`, a dict
    ``{net: image}``, or a list of those."""
    if control is None:
        return []
    if isinstance(control, Control):
        items = [control]
    elif isinstance(control, dict):
        items = [Control(k, v) for k, v in control.items()]
    elif isinstance(control, (list, tuple)):
        items = []
        for c in control:
            items.extend(normalise_controls(c, pipe))
    else:
        if len(pipe.controlnets) != 1:
            raise ValueError(f"a bare control image needs exactly one loaded ControlNet, this pipeline has "
                             f"{sorted(pipe.controlnets) or 'none'}; pass lab.Control(net, image) or {{net: image}}")
        items = [Control(next(iter(pipe.controlnets)), control)]
    for c in items:
        c.validate(pipe.controlnets)
    return items
