"""One-call ControlNet counterfactuals: what if block j's residual had been zeroed (or scaled) for a while?"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import xarray as xr

from .conditioning.controlnet import ControlNet, residual_names
from .steps import select_steps


@dataclass
class Ablation:
    """The two branches of :func:`ablate` and how they differ.

    ``latent_distance[step]``: L2 distance between the branches' x_t after each step;
    ``image_delta``: mean absolute difference of the decoded images (0-255 scale);
    ``grid``: the weights the ablated branch used for the ablated net."""

    base: object
    ablated: object
    latent_distance: xr.DataArray
    image_delta: float
    grid: np.ndarray

    def __repr__(self) -> str:
        return (f"<Ablation: final latent distance {float(self.latent_distance[-1]):.3f}, "
                f"image delta {self.image_delta:.2f}/255>")


def _block_index(sampler, control, block) -> int:
    n = sampler.control_grid(control).shape[0]
    if isinstance(block, (int, np.integer)):
        if not -n <= block < n:
            raise IndexError(f"block {block} out of range for {n} residual blocks")
        return int(block) % n
    names = [nm.split("].", 1)[1] for nm in residual_names(control.net, n - 1)]
    if block not in names:
        import difflib
        raise KeyError(f"no block {block!r}; blocks: {names}; did you mean {difflib.get_close_matches(block, names)}?")
    return names.index(block)


def ablate(sampler, net: str, block, *, at: int = 0, steps: tuple[int, int] | None = None, scale: float = 0.0):
    """Fork ``sampler`` at step ``at`` into two branches run to the end: ``base`` (unchanged) and
    ``ablated``, where ``net``'s residual ``block`` (index or name such as ``"down_block_res_samples.3"``)
    is multiplied by ``scale`` (0: removed) for ``steps`` (:mod:`lab.steps`: ``(a, b)`` is steps a..b
    inclusive, ``(0.2, 0.6)`` a fraction window; default: from ``at`` to the end). Returns an
    :class:`Ablation`. The sampler itself is left where it was."""
    controls = {c.net: c for c in sampler.controls}
    if net not in controls:
        raise KeyError(f"no ControlNet {net!r} in this sampler; controls: {sorted(controls)}")
    c = controls[net]
    j = _block_index(sampler, c, block)
    n = sampler.num_steps
    if not 0 <= at <= sampler.position:
        raise ValueError(f"need 0 <= at <= position ({sampler.position}); got at={at}")
    chosen = select_steps(steps if steps is not None else (at, n - 1), n)
    if chosen and chosen[0] < at:
        raise ValueError(f"steps {chosen} start before the fork at step {at}: those steps are shared, not ablated")
    grid = sampler.control_grid(c).copy()
    grid[j, chosen] *= scale
    base = sampler.fork(at=at).run()
    plugin = next(p for p in sampler.conditioning if isinstance(p, ControlNet) and p.control.net == net)
    changed = dataclasses.replace(c, weights=grid, halves="cond" if plugin.cond_only else "both")
    ablated = sampler.fork(at=at, control=[changed if x.net == net else x for x in sampler.controls]).run()
    dist = [float((p.prev_latents - q.prev_latents).float().norm()) for p, q in zip(base.steps, ablated.steps)]
    latent_distance = xr.DataArray(dist, dims="step", coords={"step": [s.index for s in base.steps]},
                                   name="latent distance")
    img_a = np.asarray(base.image, dtype=np.float32)
    img_b = np.asarray(ablated.image, dtype=np.float32)
    return Ablation(base, ablated, latent_distance, float(np.abs(img_a - img_b).mean()), grid)
