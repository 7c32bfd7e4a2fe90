"""Recording ControlNet residuals per net (before nets are summed), per block and per step.

    rec = lab.ResidualRecorder(maps=True)            # norms always; channel-norm maps; full=True for tensors
    run = pipe.sampler(prompt, control=..., recorders=[rec]).run()
    run.residuals                                      # xarray: norm[step, net, block, batch]

What is recorded is what the UNet receives: each residual after its block weight (scale, mode, start/end
or the explicit grid). Names follow the module tree: ``controlnet[scribble].down_block_res_samples.3``
and ``controlnet[scribble].mid_block_res_sample``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batch import HALVES
from ..conditioning.controlnet import residual_names
from ..steps import check_steps, select_steps
from .base import Binding, RecordingContext

__all__ = ["ResidualRecord", "ResidualRecorder", "residual_dataset", "residual_names"]


@dataclass(frozen=True)
class ResidualRecord:
    """One residual at one step: ``norm`` [batch] (L2 over channels and positions), ``map`` [batch, h, w]
    (L2 over channels) when asked, ``tensor`` [batch, channels, h, w] when asked."""

    norm: torch.Tensor
    map: torch.Tensor | None = None
    tensor: torch.Tensor | None = None


@dataclass
class ResidualRecorder:
    """``maps``: keep channel-norm maps; ``full``: keep the residual tensors; ``half``: ``"cond"``,
    ``"uncond"`` or ``"both"`` (with guidance); ``steps``: which steps (:mod:`lab.steps`; default all)."""

    maps: bool = False
    full: bool = False
    half: str = "cond"
    steps: object = None

    def __post_init__(self):
        if self.half not in HALVES:
            raise ValueError(f"half must be 'cond', 'uncond' or 'both', got {self.half!r}")
        check_steps(self.steps)

    def bind(self, ctx: RecordingContext) -> "ResidualBinding":
        return ResidualBinding(self, ctx)


class ResidualBinding(Binding):
    """A :class:`ResidualRecorder` bound to one sampler."""

    key = "residuals"

    def __init__(self, rec: ResidualRecorder, ctx: RecordingContext):
        if not ctx.controlnets:
            raise ValueError("ResidualRecorder needs a sampler with control=...")
        self.rec, self.ctx = rec, ctx
        self.steps = frozenset(select_steps(rec.steps, ctx.num_steps))
        self._rows = ctx.layout.half(rec.half)  # the batch rows recorded
        nets = ctx.controlnets
        self.meta = {"nets": [p.control.net for p in nets], "cfg": ctx.layout.cfg, "batch": ctx.layout.batch,
                     "half": rec.half, "heights": {p.control.net: list(p.heights) for p in nets},
                     "names": {p.control.net: p.names for p in nets}, "maps": bool(rec.maps),
                     "steps": None if rec.steps is None else sorted(self.steps)}
        self._buf: dict = {}

    def observe_residuals(self, net: str, step: int, down, mid) -> None:
        if step not in self.steps:
            return
        sel = self._rows
        host = self.ctx.host
        for name, r in zip(self.meta["names"][net], [*down, mid]):
            r = r[sel].float()
            # norms stay on the device (read once, after the loop); maps and tensors are opt-in host copies,
            # made on the sampler's side stream on CUDA (no sync in the loop)
            self._buf[name] = ResidualRecord(norm=r.flatten(1).norm(dim=1),
                                             map=host.to_host(r.norm(dim=1)) if self.rec.maps else None,
                                             tensor=host.to_host(r) if self.rec.full else None)

    def collect(self, step: int) -> dict:
        out, self._buf = self._buf, {}
        return out


def residual_dataset(steps, meta: dict):
    """``norm[step, net, block, batch]`` with coords ``block_name`` (net-independent path) and
    ``resolution`` per block. Every recorded step is a row (all steps, or the recorder's ``steps``), so the
    step axis lines up with the run's; a net outside its ``start``/``end`` window at a step added nothing
    and reads NaN there."""
    import numpy as np
    import xarray as xr
    nets = meta["nets"]
    first = meta["names"][nets[0]]
    n_blocks = len(first)
    chosen = meta.get("steps")
    some = next((s.records[nm] for s in steps for n in nets for nm in meta["names"][n][:1] if nm in s.records), None)
    if some is None:
        raise ValueError("this run recorded no ControlNet residuals (pass recorders=[lab.ResidualRecorder()])")
    missing = torch.full_like(some.norm, float("nan"))  # the recorded half's batch, on the norms' device
    norms, idx = [], []
    for s in steps:
        if chosen is not None and s.index not in chosen:
            continue
        norms += [s.records[nm].norm if nm in s.records else missing for n in nets for nm in meta["names"][n]]
        idx.append(s)
    # the norms stayed on the device during the loop: one copy to the host for all of them
    arr = torch.stack(norms).float().cpu().numpy().reshape(len(idx), len(nets), n_blocks, -1)  # [step, net, block, b]
    heights = meta["heights"][nets[0]]
    block_paths = [nm.split("].", 1)[1] for nm in first]
    ds = xr.Dataset(
        {"norm": (("step", "net", "block", "batch"), arr)},
        coords={"step": [s.index for s in idx], "timestep": ("step", [s.timestep for s in idx]), "net": nets,
                "block": np.arange(n_blocks), "block_name": ("block", block_paths),
                "resolution": ("block", [f"{h}x{h}" for h in heights])},
        attrs={"half": meta["half"]})
    if meta.get("maps"):
        _add_maps(ds, idx, meta)
    return ds


def _add_maps(ds, steps, meta: dict) -> None:
    """The channel-norm maps (``ResidualRecorder(maps=True)``), one variable per map size, ``map_HxW[step, net,
    block_HxW, batch, y_HxW, x_HxW]`` with ``block_HxW`` the indices of the blocks of that size (NaN where a
    net added nothing at a step)."""
    import numpy as np
    nets, names = meta["nets"], meta["names"]
    shapes: dict[tuple, list[int]] = {}
    for s in steps:
        for i, nm in enumerate(names[nets[0]]):
            rec = s.records.get(nm)
            if rec is not None and rec.map is not None and i not in shapes.setdefault(tuple(rec.map.shape), []):
                shapes[tuple(rec.map.shape)].append(i)
    for shape, blocks in shapes.items():
        b, h, w = shape
        key = f"{h}x{w}"
        arr = np.full((len(steps), len(nets), len(blocks), b, h, w), np.nan, np.float32)
        for j, s in enumerate(steps):
            for k, n in enumerate(nets):
                for q, i in enumerate(blocks):
                    rec = s.records.get(names[n][i])
                    if rec is not None and rec.map is not None:
                        arr[j, k, q] = rec.map.float().numpy()
        ds[f"map_{key}"] = (("step", "net", f"block_{key}", "batch", f"y_{key}", f"x_{key}"), arr)
        ds.coords[f"block_{key}"] = sorted(blocks)
