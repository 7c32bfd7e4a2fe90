"""ControlNet conditioning: residuals added to the UNet's skip connections, per net, block and step.

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

from ..steps import in_fraction_window
from .base import Conditioning, Setup, StepInfo, UNetInputs

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
            raise ValueError(f"control start/end must satisfy 0 <= start <= end <= 1, got start={self.start}, "
                             f"end={self.end}")
        if self.mode not in MODES:
            close = difflib.get_close_matches(str(self.mode), MODES, n=2, cutoff=0.3)
            raise ValueError(f"unknown control mode {self.mode!r}; modes: {MODES}"
                             + (f"; did you mean {close}?" if close else ""))
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
        return float(in_fraction_window(i, n, self.start, self.end))


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
    (float in [0, 1], or ``uint8`` 0-255). A float image outside [0, 1] is a ValueError. Anything else is a
    TypeError; another size is a ValueError (never a silent resize)."""
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
            _check_unit_range(torch.from_numpy(arr), "array")
        else:
            raise TypeError(f"control array dtype must be uint8, bool or float, got {arr.dtype}")
        t = torch.from_numpy(np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr.copy()).permute(2, 0, 1)[None]
    elif isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if image.dtype == torch.uint8:
            t = t / 255.0
        elif image.is_floating_point():
            _check_unit_range(t, "tensor")
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


def _check_unit_range(t: torch.Tensor, kind: str) -> None:
    """Float control images are documented as 0..1: one in 0..255 is refused, never taken as it is."""
    finite = t[torch.isfinite(t)]
    if finite.numel() and (float(finite.min()) < 0.0 or float(finite.max()) > 1.0):
        raise ValueError(f"a float control {kind} must hold values in [0, 1], got [{float(finite.min()):g}, "
                         f"{float(finite.max()):g}]; divide a 0..255 image by 255, or pass it as uint8")


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


def residual_heights(net, latent_h: int) -> list[int]:
    """Latent height of each residual of ``net`` (encoder blocks, then the middle block)."""
    h = latent_h
    heights = [h]  # conv_in's output is the first residual
    for block in net.down_blocks:
        heights += [h] * len(block.resnets)
        if block.downsamplers is not None:
            h = (h + 1) // 2
            heights.append(h)
    heights.append(h)  # the middle block
    if len(heights) != len(net.controlnet_down_blocks) + 1:
        raise RuntimeError(f"could not map the ControlNet's residuals to blocks ({len(heights)} heights for "
                           f"{len(net.controlnet_down_blocks) + 1} residuals)")
    return heights


def residual_names(net_name: str, n_down: int) -> list[str]:
    """Record names of a net's residuals: ``controlnet[NAME].down_block_res_samples.i`` and the middle block."""
    return [f"controlnet[{net_name}].down_block_res_samples.{i}" for i in range(n_down)] + [
        f"controlnet[{net_name}].mid_block_res_sample"]


class ControlNet(Conditioning):
    """One :class:`Control` as a plug-in: at each step its net sees the latents, the timestep, the text
    embeddings and the condition image, and its residuals, weighted by the control's ``[blocks, steps]``
    grid, are added to what the UNet receives (``y = F(x) + Z(F(x + Z(c)))``). Under guess mode/CFG-RW the
    net sees the conditional half only and the unconditional half gets no residuals.

    A net with ``global_pool_conditions`` (e.g. ControlNet's "shuffle") pools each residual to one value per
    channel; as diffusers does, it then runs in guess mode (conditional half only) unless the control says
    ``halves="both"``. A step whose blocks all have one weight passes it to the net as its
    ``conditioning_scale`` (scaled before pooling, exactly as diffusers); other grids scale after."""

    enters = "residuals"

    def __init__(self, control: Control):
        self.control = control
        self.kind = f"controlnet[{control.net}]"
        self.heights: list[int] = []
        self.grid: np.ndarray | None = None
        self._image = self._net = self._condition = None
        self.pooled = False

    @property
    def names(self) -> list[str]:
        return residual_names(self.control.net, len(self.heights) - 1)

    def condition(self, height: int, width: int) -> torch.Tensor:
        """The control's image as ``[N, 3, H, W]`` in [0, 1], checked (:func:`condition_tensor`); made once."""
        if self._condition is None:
            self._condition = condition_tensor(self.control.image, height, width)
        return self._condition

    def setup(self, s: Setup) -> None:
        c, layout = self.control, s.layout
        net = self._net = s.pipe.controlnets[c.net]
        img = self.condition(s.settings["height"], s.settings["width"])
        if img.shape[0] not in (1, layout.n_prompts):
            raise ValueError(f"{img.shape[0]} control images for {layout.n_prompts} prompts: give one image, "
                             f"or one per prompt")
        img = img.repeat_interleave(layout.batch if img.shape[0] == 1 else layout.per_prompt, dim=0)
        img = img.to(s.device, net.dtype)
        self._image = torch.cat([img] * 2) if layout.cfg else img
        self.heights = residual_heights(net, s.latent_hw[0])
        self.grid = c.grid(self.heights, len(s.timesteps))
        self.pooled = bool(getattr(net.config, "global_pool_conditions", False))

    @property
    def cond_only(self) -> bool:
        """Residuals for the conditional half only (guess mode, CFG-RW, or a global-pool net)."""
        return self.control.cond_only or (self.pooled and self.control.halves is None)

    def apply(self, x: UNetInputs, step: StepInfo) -> None:
        col = self.grid[:, step.index]
        if not col.any():
            return  # outside [start, end]: diffusers multiplies by 0; skipping adds exactly nothing
        c, layout = self.control, step.layout
        net = self._net
        inp, emb, image, added = x.latents, x.encoder_hidden_states, self._image, x.added_cond_kwargs
        halved = self.cond_only and layout.cfg
        if halved:  # guess mode: the net sees the conditional half only
            cond = layout.half("cond")
            inp, emb, image = inp[cond], emb[cond], image[cond]
            added = {k: v[cond] for k, v in added.items()} if added else None
        kw = {"added_cond_kwargs": added} if added else {}
        uniform = bool((col == col[0]).all())  # one weight: the net scales (before its pooling, if any)
        d, m = net(inp, x.timestep, encoder_hidden_states=emb, controlnet_cond=image, guess_mode=False,
                   conditioning_scale=float(col[0]) if uniform else 1.0, return_dict=False, **kw)
        if not uniform:
            d = [r * float(wi) for r, wi in zip(d, col[:-1])]
            m = m * float(col[-1])
        if halved:
            d = [torch.cat([torch.zeros_like(r), r]) for r in d]
            m = torch.cat([torch.zeros_like(m), m])
        step.observe_residuals(c.net, d, m)
        x.add_residuals(d, m)

    def describe(self) -> dict:
        c = self.control
        return dict(net=c.net, scale=c.scale, start=c.start, end=c.end, mode=c.mode,
                    halves="cond" if self.cond_only else "both", **({"pooled": True} if self.pooled else {}),
                    weights=None if c.weights is None else np.asarray(c.weights).tolist())


def control_grid(plugins, control: Control, num_steps: int) -> np.ndarray:
    """The ``[blocks, steps]`` weights ``control`` applies among ``plugins`` (its net's plug-in gives the blocks)."""
    p = next((p for p in plugins if isinstance(p, ControlNet) and p.control.net == control.net), None)
    if p is None:
        nets = [p.control.net for p in plugins if isinstance(p, ControlNet)]
        raise KeyError(f"no ControlNet {control.net!r} in this sampler; controls: {nets}")
    return p.grid if p.control is control else control.grid(p.heights, num_steps)
