"""Reductions for :func:`lab.sweep` that need analysis, and views of a sweep Dataset.

    ds = lab.sweep("shapes", grid={"prompt": captions, "seed": range(4), "guidance": [1, 3, 5, 7.5]},
                   record=analysis.sweep.noun_iou(), store="iou.zarr", fixed={"steps": 20})
    analysis.sweep.plot_over(ds["noun_iou"], "guidance")      # mean heat-map IoU per guidance value
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from .attention import heatmap_iou, word_heatmap, words as prompt_words


def word_heatmaps(words, *, size=None, layers=None, steps=None) -> "lab.sweeps.Reduce":  # noqa: F821
    """Keep each of ``words``' heat map (:func:`analysis.word_heatmap`) per cell: ``heatmap[word, y, x]``,
    NaN where the cell's prompt does not have the word."""
    import lab
    words = [str(w) for w in words]

    def fn(run):
        have = {w.lower() for w in prompt_words(run)}
        h, w_ = (size, size) if isinstance(size, int) else (size or (run.settings["height"], run.settings["width"]))
        maps = np.full((len(words), h, w_), np.nan, np.float32)
        for i, w in enumerate(words):
            if w.lower() in have:
                maps[i] = word_heatmap(run, w, size=(h, w_), layers=layers, steps=steps).values
        return {"heatmap": xr.DataArray(maps, dims=("word", "y", "x"), coords={"word": words})}
    return lab.sweeps.Reduce(fn, {"heatmap": ("word", "y", "x")}, recorders=lambda: [lab.AttentionRecorder()],
                             name=f"word_heatmaps({','.join(words)})")


def noun_iou(threshold: float = 0.4) -> "lab.sweeps.Reduce":  # noqa: F821
    """Shapes world: per shape noun of the caption, the IoU of its heat map (thresholded at ``threshold``)
    with the masks of the objects of that shape that the oracle finds in the generated image
    (``noun_iou[noun]``, NaN when the caption has no such noun or the oracle finds no such object), and
    whether the image is right for its caption (``correct``, the oracle's colour-and-shape check)."""
    import lab
    from lab.shapes import evaluator, world
    nouns = list(world.SHAPES)

    def fn(run):
        caption = run.settings["prompt"]
        verdict = evaluator.evaluate(np.asarray(run.image), caption)  # one detection pass for both results
        dets = verdict["objects"]
        want, _ = evaluator.parse_caption(caption)
        ious = np.full(len(nouns), np.nan, np.float32)
        for i, noun in enumerate(nouns):
            hits = [d.mask for d in dets if d.shape == noun]
            if any(s == noun for _, _, s in want) and hits:
                ious[i] = heatmap_iou(word_heatmap(run, noun), np.logical_or.reduce(hits), threshold)
        correct = bool(verdict["shape_ok"])  # colours and shapes right (what fidelity counts)
        return {"noun_iou": xr.DataArray(ious, dims=("noun",), coords={"noun": nouns}),
                "correct": xr.DataArray(np.array(correct), dims=())}
    return lab.sweeps.Reduce(fn, {"noun_iou": ("noun",), "correct": ()}, recorders=lambda: [lab.AttentionRecorder()],
                             name=f"noun_iou({threshold})")


def done_only(da: xr.DataArray, ds: xr.Dataset) -> xr.DataArray:
    """``da`` with the cells that are not stored yet (a partial sweep) masked to NaN."""
    return da.astype(np.float32).where(ds["done"])


def mean_over(da: xr.DataArray, dim: str) -> xr.DataArray:
    """Mean of ``da`` per value of grid axis ``dim``, over every other dim (NaN-skipping): ``[dim]``."""
    if dim not in da.dims:
        raise KeyError(f"{dim!r} is not a dim of {da.name!r}; dims: {list(da.dims)}")
    return da.astype(np.float64).mean([d for d in da.dims if d != dim], skipna=True)


def plot_over(da: xr.DataArray, x: str, *, hue: str | None = None, ax=None, **kw):
    """Mean of ``da`` per value of grid axis ``x`` (one line per value of ``hue``), over all other dims.
    Returns the matplotlib axes."""
    import matplotlib.pyplot as plt
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 3))
    xs = da[x].values
    pos = np.arange(len(xs)) if xs.dtype.kind in "US" else xs
    if hue is None:
        ax.plot(pos, mean_over(da, x).values, marker="o", **kw)
    else:
        for v in da[hue].values:
            sub = da.sel({hue: v})
            ax.plot(pos, mean_over(sub, x).values, marker="o", label=f"{hue}={v}", **kw)
        ax.legend(fontsize=7)
    if xs.dtype.kind in "US":
        ax.set_xticks(pos, [str(v)[:18] for v in xs], rotation=30, ha="right", fontsize=7)
    ax.set_xlabel(x)
    ax.set_ylabel(f"mean {da.name}" if da.name else "mean")
    return ax
