"""ControlNet conditions in the sampler: which net, which image, how strong, when."""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


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
