"""Views of recorded ControlNet residuals."""
from __future__ import annotations

import numpy as np
import xarray as xr


def short_block(name) -> str:
    """A residual block's short label: ``down_block_res_samples.3`` -> ``down 3``, ``mid_block_res_sample``
    -> ``mid``."""
    name = str(name)
    if name.startswith("down_block_res_samples."):
        return "down " + name.rsplit(".", 1)[1]
    return "mid" if name.startswith("mid_block") else name


def residual_norms(run, *, batch: int = 0) -> xr.DataArray:
    """L2 norm of each residual the UNet received: ``[step, net, block]``."""
    return run.residuals["norm"].isel(batch=batch)


def residual_map(run, net: str, block, step: int, *, batch: int = 0) -> xr.DataArray:
    """Channel-norm map ``[y, x]`` of ``net``'s residual ``block`` (index or name) at ``step``."""
    m = run.residual_map(net, block, step, index=batch)
    return xr.DataArray(m, dims=("y", "x"), name="residual norm", attrs={"net": net, "block": str(block), "step": step})


def plot_residual_norms(run, net: str | None = None, *, ax=None, batch: int = 0):
    """Block x step image of residual norms for one net (default: the first). Returns the axes."""
    import matplotlib.pyplot as plt
    da = residual_norms(run, batch=batch)
    net = net or str(da["net"].values[0])
    d = da.sel(net=net)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3))
    im = ax.imshow(d.transpose("block", "step").values, aspect="auto", cmap="magma", origin="upper")
    labels = [f"{short_block(n)} · {r}" for n, r in zip(d["block_name"].values, d["resolution"].values)]
    ax.set_yticks(np.arange(len(labels)), labels, fontsize=9)
    ax.set_xlabel("step")
    ax.set_title(f"controlnet[{net}] residual norms")
    ax.figure.colorbar(im, ax=ax, fraction=0.04)
    return ax
