"""Word heat maps and other views of recorded attention (DAAM-style, per layer and over time).

Every function takes a :class:`lab.Run` with recorded attention (or its ``run.attention`` DataTree)
and returns labelled arrays; plot functions take ``ax=None`` and return the axes.
"""
from __future__ import annotations

import difflib
import fnmatch

import numpy as np
import torch
import xarray as xr

from lab.conditioning.text import content_words
from lab.steps import select_steps


def _tree(run):
    return run if isinstance(run, xr.DataTree) else run.attention


def _image_size(run, tree) -> tuple[int, int]:
    if not isinstance(run, xr.DataTree):
        return int(run.settings["height"]), int(run.settings["width"])
    biggest = max(tree.children.values(), key=lambda n: n.to_dataset().sizes["query_y"]).to_dataset()
    return biggest.sizes["query_y"], biggest.sizes["query_x"]


def _words(ds: xr.Dataset, batch: int) -> list[str]:
    w = [str(x) for x in ds["word"].isel(batch=batch).values]
    seen, out = set(), []
    for x in w:
        if x and x not in seen:
            seen.add(x)
            out.append(x)
    return out


def _item(da: xr.DataArray, batch: int) -> xr.DataArray:
    """One image's attention: batch item ``batch``, and the conditional half when both halves were recorded
    (``AttentionRecorder(half="both")``)."""
    da = da.isel(batch=batch)
    return da.sel(half="cond") if "half" in da.dims else da


def _token_mask(ds: xr.Dataset, word, batch: int) -> np.ndarray:
    if isinstance(word, (int, np.integer)):
        return ds["word_index"].isel(batch=batch).values == int(word)
    words = ds["word"].isel(batch=batch).values.astype(str)
    mask = np.char.lower(words) == str(word).lower()
    if not mask.any():
        known = _words(ds, batch)
        close = difflib.get_close_matches(str(word), known, n=3)
        raise KeyError(f"word {word!r} is not in the prompt; its words: {known}"
                       + (f"; did you mean {close}?" if close else ""))
    return mask


def _n_steps(run, tree) -> int:
    """Steps of the trajectory (for ``steps=`` windows): the run's, or past the last recorded one."""
    if not isinstance(run, xr.DataTree) and run.settings.get("num_steps"):
        return int(run.settings["num_steps"])
    return 1 + max(int(node.to_dataset()["step"].max()) for node in tree.children.values())


def _select(da: xr.DataArray, *, layers=None, steps=None, heads=None, n_steps=None) -> xr.DataArray:
    layer_dim = "layer" if "layer" in da.dims else "layer_self"
    if layers is not None:
        pats = [layers] if isinstance(layers, str) else list(layers)
        names = [str(n) for n in da[layer_dim].values]
        keep = [n for n in names if any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n, "unet." + p) for p in pats)]
        da = da.sel({layer_dim: keep})
    if steps is not None:  # what steps= means: lab.steps
        chosen = set(select_steps(steps, n_steps or int(da["step"].max()) + 1))
        keep = [int(s) for s in da["step"].values if int(s) in chosen]
        if not keep:
            raise ValueError(f"steps={steps!r} selects none of the recorded steps {list(da['step'].values)}")
        da = da.sel(step=keep)
    if heads is not None:  # an index keeps the dimension (a list of one)
        da = da.sel(head=[heads] if np.isscalar(heads) else list(heads))
    return da


def _selections(tree, kind: str, batch: int, **sel):
    """``(ds, da, layer_dim)`` for every resolution node that recorded ``kind`` (``"cross"`` or ``"self"``)
    with at least one layer and step left after :func:`_select` (``layers``, ``steps``, ``heads``, ``n_steps``)."""
    for node in tree.children.values():
        ds = node.to_dataset()
        if kind not in ds:
            continue
        da = _select(_item(ds[kind], batch), **sel)
        dim = "layer_self" if "layer_self" in da.dims else "layer"
        if da.sizes[dim] and da.sizes["step"]:
            yield ds, da, dim


def _upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[n, h, w]`` -> ``[n, H, W]``, bicubic (DAAM), clamped at 0."""
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
    up = torch.nn.functional.interpolate(t, size=size, mode="bicubic", align_corners=False)
    return up[:, 0].clamp(min=0).numpy()


def word_heatmap(run, word, *, layers=None, steps=None, heads=None, size=None, batch: int = 0,
                 normalize: bool = True) -> xr.DataArray:
    """DAAM-style heat map of ``word`` (a word of the prompt, or its word index): the cross-attention
    probabilities of the word's tokens (summed: a word split into several tokens counts once) at every
    query position, averaged over heads and the chosen steps, each layer's map upsampled (bicubic) to
    ``size`` (default: the image size) and clamped at 0, then averaged over layers. ``layers``: glob
    patterns of layer names; ``steps``: which steps (:mod:`lab.steps`: indices, a slice, a ``(first, last)``
    window of indices or of fractions of the trajectory). Returns ``[y, x]`` scaled to max 1 (``normalize``)."""
    tree = _tree(run)
    size = size or _image_size(run, tree)
    size = (size, size) if isinstance(size, int) else tuple(size)
    n_steps = _n_steps(run, tree)
    maps, names = [], []
    for ds, da, _ in _selections(tree, "cross", batch, layers=layers, steps=steps, heads=heads, n_steps=n_steps):
        tok = _token_mask(ds, word, batch)
        m = da.isel(token=np.flatnonzero(tok)).sum("token").mean(["step", "head"])  # [layer, y, x]
        maps.append(_upsample(m.transpose("layer", "query_y", "query_x").values, size))
        names += [str(n) for n in m["layer"].values]
    if not maps:
        raise ValueError("no recorded cross-attention layer matches the selection")
    heat = np.concatenate(maps).mean(0)
    if normalize and heat.max() > 0:
        heat = heat / heat.max()
    return xr.DataArray(heat, dims=("y", "x"), coords={"y": np.arange(size[0]), "x": np.arange(size[1])},
                        name="heatmap", attrs={"word": str(word), "layers": len(names), "batch": batch})


def token_heatmaps(run, *, batch: int = 0, **kw) -> xr.DataArray:
    """:func:`word_heatmap` for every word of the prompt: ``[word, y, x]``."""
    tree = _tree(run)
    ds = next(n.to_dataset() for n in tree.children.values() if "cross" in n.to_dataset())
    words = _words(ds, batch)
    maps = [word_heatmap(run, w, batch=batch, **kw) for w in words]
    return xr.concat(maps, dim=xr.DataArray(words, dims="word", name="word"))


def frame_heatmaps(video, word, **kw) -> xr.DataArray:
    """:func:`word_heatmap` of ``word`` for every frame of a :func:`lab.video` (its frames' run, or that run
    itself): ``[frame, y, x]``; keyword arguments as :func:`word_heatmap`'s (``steps`` index the frames' run)."""
    run = getattr(video, "frames", video)
    n = int(run.final_latents.shape[0])
    maps = [word_heatmap(run, word, batch=k, **kw) for k in range(n)]
    return xr.concat(maps, dim="frame").assign_coords(frame=np.arange(n)).assign_attrs(word=str(word))


def attention_over_time(run, word, *, batch: int = 0) -> xr.DataArray:
    """Attention mass on ``word`` per step and layer: the word's probability summed over its tokens,
    averaged over query positions and heads. ``[step, layer]``, layers of every resolution."""
    tree = _tree(run)
    out = []
    for node in tree.children.values():
        ds = node.to_dataset()
        if "cross" not in ds:
            continue
        tok = _token_mask(ds, word, batch)
        da = _item(ds["cross"], batch).isel(token=np.flatnonzero(tok)).sum("token")
        out.append(da.mean(["head", "query_y", "query_x"]).drop_vars("timestep", errors="ignore"))
    res = xr.concat(out, dim="layer").transpose("step", "layer")
    res.name = f"attention mass of {word!r}"
    return res


def words(run, *, batch: int = 0) -> list[str]:
    """The prompt's words as recorded (in order, each once; what ``word=`` arguments accept)."""
    tree = _tree(run)
    ds = next((n.to_dataset() for n in tree.children.values() if "cross" in n.to_dataset()), None)
    if ds is None:
        raise ValueError("no cross-attention was recorded")
    return _words(ds, batch)


def attention_at(run, y: float, x: float, *, layers=None, heads=None, batch: int = 0) -> xr.DataArray:
    """What the image location ``(y, x)`` (image pixels) attended to over time: per step and word, the
    cross-attention probability of the word's tokens at the query cell that covers the location, averaged
    over heads (or ``heads``: an index or a list) and the chosen layers (all resolutions; ``layers`` as in
    :func:`word_heatmap`). ``[step, word]``."""
    tree = _tree(run)
    height, width = _image_size(run, tree)
    if not (0 <= y < height and 0 <= x < width):
        raise ValueError(f"location (y={y}, x={x}) is outside the {width}x{height} image")
    per_layer, vocab = [], None
    for ds, da, _ in _selections(tree, "cross", batch, layers=layers, heads=heads):
        qy = int(y * da.sizes["query_y"] / height)
        qx = int(x * da.sizes["query_x"] / width)
        cell = da.isel(query_y=qy, query_x=qx).mean("head").drop_vars(
            ["query_y", "query_x", "timestep"], errors="ignore")  # [step, layer, token]
        vocab = vocab or _words(ds, batch)
        by_word = [cell.isel(token=np.flatnonzero(_token_mask(ds, w, batch))).sum("token") for w in vocab]
        per_layer.append(xr.concat(by_word, dim=xr.DataArray(vocab, dims="word", name="word"), coords="minimal"))
    if not per_layer:
        raise ValueError("no recorded cross-attention layer matches the selection")
    out = xr.concat(per_layer, dim="layer", coords="minimal").mean("layer")
    out = out.transpose("step", "word")
    out.name = "attention"
    out.attrs.update(y=float(y), x=float(x), batch=batch)
    return out


def self_attention_at(run, y: float, x: float, *, layers=None, steps=None, heads=None, size=None,
                      batch: int = 0) -> xr.DataArray:
    """Where the image location ``(y, x)`` (image pixels) looked in self-attention: at every recorded
    self-attention layer (``lab.AttentionRecorder(kind="self" | "both")``), the attention probabilities of
    the query cell that covers the location over all keys, as a map at the layer's resolution, upsampled
    (bicubic, clamped at 0) to ``size`` (default the image's), averaged over heads (or ``heads``), the
    chosen ``steps`` and ``layers`` (as in :func:`word_heatmap`). Each layer's map sums to 1 before
    upsampling, so the values are attention probabilities per key cell. ``[y, x]``."""
    tree = _tree(run)
    height, width = _image_size(run, tree)
    if not (0 <= y < height and 0 <= x < width):
        raise ValueError(f"location (y={y}, x={x}) is outside the {width}x{height} image")
    size = size or (height, width)
    size = (size, size) if isinstance(size, int) else tuple(size)
    n_steps = _n_steps(run, tree)
    maps, names = [], []
    for _, da, dim in _selections(tree, "self", batch, layers=layers, steps=steps, heads=heads, n_steps=n_steps):
        hh, ww = da.sizes["query_y"], da.sizes["query_x"]
        cell = da.isel(query_y=int(y * hh / height), query_x=int(x * ww / width)).mean(["step", "head"])
        m = cell.transpose(dim, "key").values.reshape(-1, hh, ww)  # keys are the same grid as the queries
        maps.append(_upsample(m, size))
        names += [str(n) for n in cell[dim].values]
    if not maps:
        raise ValueError("no recorded self-attention layer matches the selection; record it with "
                         "lab.AttentionRecorder(kind='both')")
    heat = np.concatenate(maps).mean(0)
    return xr.DataArray(heat, dims=("y", "x"), coords={"y": np.arange(size[0]), "x": np.arange(size[1])},
                        name="self_attention", attrs={"y": float(y), "x": float(x), "layers": len(names),
                                                      "batch": batch})


def entropy(run, *, batch: int = 0, kind: str = "cross") -> xr.DataArray:
    """Mean entropy (nats) of the attention distribution over keys, per step and layer: ``[step, layer]``."""
    tree = _tree(run)
    out = []
    for node in tree.children.values():
        ds = node.to_dataset()
        if kind not in ds:
            continue
        da = _item(ds[kind], batch)
        last = "token" if kind == "cross" else "key"
        p = da.clip(min=1e-12)
        h = -(p * np.log(p)).sum(last).mean(["head", "query_y", "query_x"])
        if "layer_self" in h.dims:
            h = h.rename(layer_self="layer")
        out.append(h.drop_vars("timestep", errors="ignore"))
    res = xr.concat(out, dim="layer").transpose("step", "layer")
    res.name = f"{kind}-attention entropy"
    return res


def heatmap_iou(heatmap, mask, threshold: float = 0.4) -> float:
    """IoU between a thresholded heat map and a boolean ``mask`` of the same shape, the way DAAM scores
    its maps: the map is min-max normalised to [0, 1] and the region is ``heatmap > threshold`` (DAAM's
    0.4 by default). A flat map (max == min) selects nothing."""
    h = np.asarray(heatmap, dtype=np.float32)
    m = np.asarray(mask, dtype=bool)
    if h.shape != m.shape:
        raise ValueError(f"heat map {h.shape} and mask {m.shape} differ in shape; pass size= to word_heatmap")
    lo, hi = float(h.min()), float(h.max())
    pred = (h - lo) / (hi - lo) > threshold if hi > lo else np.zeros(h.shape, bool)
    union = np.logical_or(pred, m).sum()
    return float(np.logical_and(pred, m).sum() / union) if union else 1.0


def self_attention_components(run, layer: str, step: int, k: int = 3, *, batch: int = 0) -> xr.DataArray:
    """Prompt-to-prompt's view of self-attention: the top ``k`` right singular vectors of the
    (head-averaged) self-attention matrix ``[queries, keys]`` of ``layer`` at ``step``, as maps
    ``[component, y, x]`` with the singular values in the ``singular_value`` coord."""
    tree = _tree(run)
    for node in tree.children.values():
        ds = node.to_dataset()
        if "self" not in ds:
            continue
        dim = "layer_self" if "layer_self" in ds["self"].dims else "layer"
        names = [str(n) for n in ds[dim].values]
        hit = [n for n in names if n == layer or fnmatch.fnmatchcase(n, layer) or n == "unet." + layer]
        if not hit:
            continue
        a = _item(ds["self"], batch).sel({dim: hit[0]}).sel(step=step).mean("head")
        hh, ww = a.sizes["query_y"], a.sizes["query_x"]
        mat = a.values.reshape(hh * ww, -1)
        _, s, vt = np.linalg.svd(mat - mat.mean(0, keepdims=True), full_matrices=False)
        comps = vt[:k].reshape(k, hh, ww)
        return xr.DataArray(comps, dims=("component", "y", "x"),
                            coords={"component": np.arange(k), "singular_value": ("component", s[:k])},
                            attrs={"layer": hit[0], "step": step})
    raise KeyError(f"no recorded self-attention layer {layer!r}; record with lab.AttentionRecorder(kind='self')")


def overlay(image, heatmap, ax=None, *, alpha: float = 0.5, cmap: str = "jet", title: str | None = None,
            stretch: bool = True):
    """Draw ``heatmap`` over ``image`` (PIL or array); returns the matplotlib axes. ``stretch`` maps the
    heat map's own min..max to the colour scale (shows where a word attends *relatively* more, also when
    the map is flat); ``stretch=False`` draws 0..1 as is."""
    import matplotlib.pyplot as plt
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    img = np.asarray(image)
    h = np.asarray(heatmap, dtype=np.float32)
    lo, hi = (float(h.min()), float(h.max())) if stretch else (0.0, 1.0)
    ax.imshow(img, extent=(0, h.shape[1], h.shape[0], 0))
    ax.imshow(h, cmap=cmap, alpha=alpha, extent=(0, h.shape[1], h.shape[0], 0), vmin=lo, vmax=max(hi, lo + 1e-6))
    ax.set_axis_off()
    if title is None and isinstance(heatmap, xr.DataArray):
        title = heatmap.attrs.get("word")
    if title:
        ax.set_title(title)
    return ax


def plot_heatmaps(run, words=None, *, ax=None, image=None, batch: int = 0, **kw):
    """A row of heat-map overlays, one per word (default: every word but articles). Returns the axes."""
    import matplotlib.pyplot as plt
    maps = token_heatmaps(run, batch=batch, **kw)
    if words is None:
        words = content_words(maps["word"].values)
    if ax is None:
        _, ax = plt.subplots(1, len(words), figsize=(2.2 * len(words), 2.4), squeeze=False)
        ax = ax[0]
    img = image if image is not None else run.images[batch]
    for a, w in zip(np.atleast_1d(ax), words):
        overlay(img, maps.sel(word=w), ax=a, title=str(w))
    return ax
