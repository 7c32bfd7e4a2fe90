"""Sweeps: a grid of sampler settings, one run per cell, each run reduced to a few arrays, all in one zarr store.

    ds = lab.sweep("shapes", grid={"prompt": prompts, "seed": range(8), "guidance": [1, 3, 5, 7.5]},
                   record=lab.sweeps.image(), store="sweeps/guidance.zarr", fixed={"steps": 30})
    ds = lab.sweep(..., client=dask.distributed.Client(n_workers=2))   # the same on a cluster
    ds["image"]            # [prompt, seed, guidance, y, x, rgb]; ds["done"] says which cells are stored

The grid is the product of named axes (:data:`AXES`: sampler settings and ControlNet settings). Each cell
is one :class:`lab.Sampler` run; ``record`` (a :class:`Reduce`) says which recorders the run needs and
turns the run into a few fixed-shape arrays, so the store holds what the analysis needs and not every
step's tensors. The store is an xarray Dataset in zarr with the grid axes as its leading dims, chunked
one cell per chunk: each cell is written into its own region as soon as it is done (workers write in
parallel), a partial sweep is readable at any time, and calling the same sweep again resumes it (cells
whose ``done`` flag is set are skipped).

Without a ``client`` the cells run here, one after the other, with a progress bar. With a
``dask.distributed.Client`` each cell is a task; every worker loads the model once and keeps it; a
worker that dies loses nothing but its current cell, which the scheduler runs again elsewhere.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import xarray as xr

from .conditioning import MODES, Control, normalise_controls
from .schedulers import SCHEDULERS

FORMAT = "latent-lab sweep 1"


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


# axis -> (check, what it must be); control_* axes change the one Control given in fixed["control"]
AXES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "prompt": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
    "negative_prompt": (lambda v: isinstance(v, str), "a string"),
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "guidance": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "scheduler": (lambda v: v in SCHEDULERS, f"one of {sorted(SCHEDULERS)}"),
    "eta": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "control_scale": (lambda v: _is_num(v), "a finite number"),
    "control_start": (lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "control_end": (lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "control_mode": (lambda v: v in MODES, f"one of {MODES}"),
}
SAMPLER_KWARGS = ("prompt", "negative_prompt", "seed", "guidance", "steps", "scheduler", "eta", "height", "width",
                  "control", "prompt_2", "negative_prompt_2")


@dataclass(frozen=True)
class Reduce:
    """What a sweep keeps of each run. ``fn(run) -> {name: DataArray}`` (fixed dims per name, as declared in
    ``variables``: ``{name: dims}``); ``recorders()`` makes the fresh recorders the run needs; ``name``
    identifies the reduction in the store (a resumed sweep must use the same)."""

    fn: Callable[[Any], dict]
    variables: dict[str, tuple[str, ...]]
    recorders: Callable[[], list] = list
    name: str = ""

    def __call__(self, run) -> dict:
        out = self.fn(run)
        missing = set(self.variables) - set(out)
        if missing:
            raise ValueError(f"reduction {self.name!r} did not return {sorted(missing)}")
        arrays = {}
        for k, dims in self.variables.items():
            da = out[k] if isinstance(out[k], xr.DataArray) else xr.DataArray(np.asarray(out[k]), dims=dims)
            if tuple(da.dims) != tuple(dims):
                raise ValueError(f"reduction {self.name!r}: {k} has dims {da.dims}, declared {dims}")
            arrays[k] = da
        return arrays


def image() -> Reduce:
    """The final decoded image, ``uint8 [y, x, rgb]``."""
    def fn(run):
        return {"image": xr.DataArray(np.asarray(run.image.convert("RGB")), dims=("y", "x", "rgb"))}
    return Reduce(fn, {"image": ("y", "x", "rgb")}, name="image")


def final_latents() -> Reduce:
    """The final latents, ``float32 [channel, latent_y, latent_x]``."""
    def fn(run):
        return {"latents": xr.DataArray(run.final_latents[0].float().cpu().numpy(),
                                        dims=("channel", "latent_y", "latent_x"))}
    return Reduce(fn, {"latents": ("channel", "latent_y", "latent_x")}, name="final_latents")


def residual_norms() -> Reduce:
    """ControlNet residual norms ``[step, net, block]`` (cond half), from :class:`lab.ResidualRecorder`."""
    from .recording import ResidualRecorder

    def fn(run):
        # every step of the run: a step where a net was off (scale 0, outside [start, end]) added exactly
        # nothing, so its norm is 0 (the run itself leaves such steps out)
        meta = run.recording_meta["residuals"]
        nets = meta["nets"]
        n_blocks = len(meta["names"][nets[0]])
        out = np.zeros((len(run.steps), len(nets), n_blocks), np.float32)
        for i, st in enumerate(run.steps):
            for j, net in enumerate(nets):
                for k, name in enumerate(meta["names"][net]):
                    if name in st.records:
                        out[i, j, k] = float(st.records[name].norm[0])
        return {"residual_norm": xr.DataArray(out, dims=("step", "net", "block"),
                                              coords={"net": nets, "block": np.arange(n_blocks)})}
    return Reduce(fn, {"residual_norm": ("step", "net", "block")}, recorders=lambda: [ResidualRecorder()],
                  name="residual_norms")


def combine(*reductions: Reduce) -> Reduce:
    """Several reductions in one sweep (their recorders together, their variables side by side)."""
    names = [v for r in reductions for v in r.variables]
    if len(set(names)) != len(names):
        raise ValueError(f"reductions return the same variable twice: {names}")

    def fn(run):
        out = {}
        for r in reductions:
            out.update(r(run))
        return out
    return Reduce(fn, {k: v for r in reductions for k, v in r.variables.items()},
                  recorders=lambda: [rec for r in reductions for rec in r.recorders()],
                  name="+".join(r.name for r in reductions))


# ---------------------------------------------------------------------------------------------- validation
def _check_grid(grid: dict, fixed: dict, record: Reduce) -> dict[str, list]:
    if not isinstance(grid, dict) or not grid:
        raise ValueError("grid must be a non-empty dict {axis: [values, ...]}; axes: " + ", ".join(AXES))
    out = {}
    for axis, values in grid.items():
        if axis not in AXES:
            close = difflib.get_close_matches(str(axis), list(AXES), n=3, cutoff=0.4)
            raise KeyError(f"unknown sweep axis {axis!r}; axes: {list(AXES)}" + (f"; did you mean {close}?" if close else ""))
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise TypeError(f"grid[{axis!r}] must be a list of values, got {type(values).__name__} "
                            f"(write [{values!r}] for a single value)")
        values = [v.item() if isinstance(v, np.generic) else v for v in values]
        if not values:
            raise ValueError(f"grid axis {axis!r} is empty: give it at least one value")
        ok, what = AXES[axis]
        bad = [v for v in values if not ok(v)]
        if bad:
            raise ValueError(f"grid[{axis!r}] values must each be {what}; bad: {bad[:5]}")
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"grid axis {axis!r} repeats a value: {values}")
        if axis in fixed:
            raise ValueError(f"{axis!r} is both a grid axis and in fixed=; keep it in one place")
        out[axis] = values
    unknown = [k for k in fixed if k not in SAMPLER_KWARGS]
    if unknown:
        raise KeyError(f"fixed= has unknown settings {unknown}; allowed: {list(SAMPLER_KWARGS)}")
    if "prompt" not in out and "prompt" not in fixed:
        raise ValueError("no prompt: add a 'prompt' axis to the grid or a prompt to fixed=")
    control_axes = [a for a in out if a.startswith("control_")]
    if control_axes and fixed.get("control") is None:
        raise ValueError(f"grid axes {control_axes} change a ControlNet, but fixed= has no control: "
                         "pass fixed={'control': lab.Control(net, image)}")
    if control_axes and not isinstance(fixed["control"], Control):
        raise TypeError(f"grid axes {control_axes} change one ControlNet: fixed['control'] must be one lab.Control, "
                        f"not {type(fixed['control']).__name__}")
    if "control_start" in out or "control_end" in out:
        c = fixed["control"] if isinstance(fixed["control"], Control) else None
        starts = out.get("control_start", [c.start if c else 0.0])
        ends = out.get("control_end", [c.end if c else 1.0])
        if any(s > e for s in starts for e in ends):
            raise ValueError(f"control_start {starts} and control_end {ends} make cells with start > end")
    clash = {d for dims in record.variables.values() for d in dims} & set(out)
    if clash:
        raise ValueError(f"reduction {record.name!r} uses dims {sorted(clash)} that are also grid axes; rename them")
    if len(out.get("steps", [])) > 1 and any("step" in dims for dims in record.variables.values()):
        per_step = [k for k, dims in record.variables.items() if "step" in dims]
        raise ValueError(f"'steps' varies over the grid but {per_step} have a per-step dim: cells would differ in "
                         "shape. Fix steps in fixed=, or reduce over the steps")
    return out


def _cell_kwargs(axes: dict[str, list], index: tuple[int, ...], fixed: dict) -> dict:
    kw = dict(fixed)
    control_changes = {}
    for (axis, values), i in zip(axes.items(), index):
        v = values[i]
        if axis.startswith("control_"):
            control_changes[axis.removeprefix("control_")] = v
        else:
            kw[axis] = v
    if control_changes:
        c = kw["control"]
        if not isinstance(c, Control):
            raise TypeError("control_* axes need fixed['control'] to be one lab.Control")
        kw["control"] = dataclasses.replace(c, **control_changes)
    return kw


def _fingerprint(model: str, axes: dict, fixed: dict, record: Reduce) -> str:
    def enc(v):
        if isinstance(v, Control):
            return {"net": v.net, "image": enc(v.image), "scale": v.scale, "start": v.start, "end": v.end,
                    "mode": v.mode, "weights": enc(v.weights), "halves": v.halves}
        if isinstance(v, dict):
            return {str(k): enc(x) for k, x in sorted(v.items())}
        if isinstance(v, (list, tuple)):
            return [enc(x) for x in v]
        if hasattr(v, "shape") or hasattr(v, "tobytes"):  # images and arrays: their bytes, not their repr
            arr = np.ascontiguousarray(np.asarray(v.cpu() if hasattr(v, "cpu") else v))
            return f"{arr.dtype}{arr.shape}:" + hashlib.sha1(arr.tobytes()).hexdigest()[:16]
        return repr(v)
    blob = json.dumps({"model": model, "axes": {k: [repr(x) for x in v] for k, v in axes.items()},
                       "fixed": {k: enc(v) for k, v in sorted(fixed.items())}, "record": record.name},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- one cell
def run_cell(pipe, kwargs: dict, record: Reduce) -> tuple[dict, float]:
    """One sampler run with the reduction's recorders; returns ``(arrays, seconds)``."""
    t0 = time.perf_counter()
    run = pipe.sampler(**kwargs, recorders=record.recorders(), progress=False).run()
    arrays = record(run)
    return arrays, time.perf_counter() - t0


def _region(axes: dict, index: tuple[int, ...]) -> dict:
    return {a: slice(i, i + 1) for a, i in zip(axes, index)}


def _write_cell(store: str, axes: dict, index: tuple[int, ...], arrays: dict, seconds: float) -> None:
    """Write one cell into its region: the data first, then its ``done`` flag (a cell killed half-way is
    not marked done, and is simply computed again)."""
    lead = (1,) * len(axes)
    data = xr.Dataset({k: (tuple(axes) + da.dims, da.values.reshape(lead + da.shape)) for k, da in arrays.items()})
    data.to_zarr(store, region=_region(axes, index), mode="r+", zarr_format=2, consolidated=False)
    flags = xr.Dataset({"done": (tuple(axes), np.ones(lead, bool)),
                        "seconds": (tuple(axes), np.full(lead, seconds, np.float32))})
    flags.to_zarr(store, region=_region(axes, index), mode="r+", zarr_format=2, consolidated=False)


def _init_store(store: str, axes: dict, arrays: dict, attrs: dict) -> None:
    """Create the store: every variable at full size, one chunk per cell, nothing written but metadata."""
    import dask.array as dsa
    shape = tuple(len(v) for v in axes.values())
    lead_chunks = (1,) * len(axes)
    variables = {}
    coords = {a: (np.asarray(v, dtype=str) if isinstance(v[0], str) else np.asarray(v)) for a, v in axes.items()}
    encoding = {}
    for k, da in arrays.items():
        full = shape + da.shape
        dtype = da.dtype
        variables[k] = (tuple(axes) + da.dims, dsa.zeros(full, dtype=dtype, chunks=lead_chunks + da.shape))
        fill = np.nan if np.issubdtype(dtype, np.floating) else 0
        encoding[k] = {"_FillValue": fill}
        for d, c in da.coords.items():
            if d not in coords and set(c.dims) <= set(da.dims):
                coords[d] = (c.dims, c.values)
    variables["done"] = (tuple(axes), dsa.zeros(shape, dtype=bool, chunks=lead_chunks))
    variables["seconds"] = (tuple(axes), dsa.zeros(shape, dtype=np.float32, chunks=lead_chunks))
    encoding["done"] = {"_FillValue": False}
    encoding["seconds"] = {"_FillValue": np.nan}
    ds = xr.Dataset(variables, coords=coords, attrs=attrs)
    ds.to_zarr(store, mode="w-", compute=False, encoding=encoding, zarr_format=2, consolidated=True)


def _open(store: str) -> xr.Dataset:
    # raw values: uint8 images stay uint8 and ``done`` stays bool (cells not yet written read as the fill
    # value: NaN for floats, 0 / False otherwise; ``done`` says which cells are real)
    return xr.open_zarr(store, consolidated=True, mask_and_scale=False)


# ---------------------------------------------------------------------------------------------- workers
def _worker_pipeline(model: str, controlnet):
    """The pipeline of this worker process, loaded once per (model, controlnets) and kept on the worker."""
    from distributed import get_worker

    from .loading import load
    worker = get_worker()
    cache = worker.__dict__.setdefault("_latent_lab_pipelines", {})
    key = (model, tuple(controlnet) if isinstance(controlnet, (list, tuple)) else controlnet)
    if key not in cache:
        cache[key] = load(model, controlnet=controlnet)
    return cache[key]


def _task(model, controlnet, kwargs, record, store, axes, index, write: bool):
    pipe = _worker_pipeline(model, controlnet)
    arrays, seconds = run_cell(pipe, kwargs, record)
    if write:
        _write_cell(store, axes, index, arrays, seconds)
        return index, seconds, None
    return index, seconds, arrays


# ---------------------------------------------------------------------------------------------- sweep
@dataclass
class SweepReport:
    """What a sweep did: cells run here and now, cells skipped (already stored), failures, wall time."""

    store: str
    cells: int
    ran: list = field(default_factory=list)
    skipped: int = 0
    failed: dict = field(default_factory=dict)
    seconds: float = 0.0


def sweep(model="shapes", grid: dict | None = None, *, record: Reduce | None = None, store=None, client=None,
          fixed: dict | None = None, controlnet=None, progress: bool = True, callback=None,
          report: SweepReport | None = None) -> xr.Dataset:
    """Run every cell of ``grid`` (see the module docstring) and return the store as a lazy Dataset.

    ``model``: a model name or path for :func:`lab.load` (a :class:`lab.Pipeline` also works without a
    client); ``controlnet``: the ControlNets to load; ``fixed``: sampler settings shared by all cells (e.g.
    ``steps``, ``control=lab.Control(...)``); ``record``: a :class:`Reduce` (default :func:`image`);
    ``store``: the zarr directory (created, or resumed when it holds this same sweep); ``client``: a
    ``dask.distributed.Client`` to run the cells on; ``callback(index, seconds)``: called here as each
    cell is stored; ``report``: a :class:`SweepReport` to fill in. Everything is checked before any run. A
    cell that raises does not stop the others: the sweep ends with a ``RuntimeError`` naming the failed
    cells (``report.failed``), whose ``done`` stays false, so running the sweep again retries just them.
    Ctrl-C stops it; the cells stored so far stay."""
    from .pipeline import Pipeline
    record = record if record is not None else image()
    fixed = dict(fixed or {})
    if store is None:
        raise ValueError("store= is required: the zarr directory the sweep writes to")
    store = str(Path(store))
    axes = _check_grid(grid, fixed, record)
    if isinstance(model, Pipeline):
        if client is not None:
            raise TypeError("with a client, pass the model's name or path (each worker loads it once), "
                            "not a loaded Pipeline")
        pipe, model_name = model, model.name
    else:
        if not isinstance(model, (str, Path)):
            raise TypeError(f"model must be a name, a path or a lab.Pipeline, not {type(model).__name__}")
        pipe, model_name = None, str(model)
    if fixed.get("control") is not None and pipe is not None:
        normalise_controls(fixed["control"], pipe)  # unknown nets, bad images: before any run
    fingerprint = _fingerprint(model_name, axes, fixed, record)
    report = report if report is not None else SweepReport(store=store, cells=0)
    report.store = store
    cells = list(itertools.product(*[range(len(v)) for v in axes.values()]))
    report.cells = len(cells)
    t0 = time.perf_counter()

    exists = Path(store).exists()
    if exists:
        try:
            ds = _open(store)
        except Exception as e:
            raise FileExistsError(f"{store} exists and is not a latent-lab sweep store ({type(e).__name__}); "
                                  "refusing to touch it") from e
        if ds.attrs.get("format") != FORMAT:
            raise FileExistsError(f"{store} exists and is not a latent-lab sweep store; refusing to touch it")
        if ds.attrs.get("fingerprint") != fingerprint:
            raise FileExistsError(f"{store} holds a different sweep (another grid, settings, model or record); "
                                  "use another store= to keep both")
        done = ds["done"].values
        pending = [c for c in cells if not done[c]]
    else:
        pending = list(cells)
    report.skipped = len(cells) - len(pending)
    attrs = {"format": FORMAT, "fingerprint": fingerprint, "model": model_name, "record": record.name,
             "axes": json.dumps(list(axes)),
             "fixed": json.dumps({k: (repr(v) if not isinstance(v, (int, float, str)) else v) for k, v in fixed.items()})}

    from tqdm.auto import tqdm
    bar = tqdm(total=len(cells), initial=report.skipped, desc="sweep", disable=not progress)

    def stored(index, seconds):
        report.ran.append(index)
        bar.update(1)
        if callback is not None:
            callback(index, seconds)

    try:
        if client is None:
            if pending and pipe is None:
                from .loading import load
                pipe = load(model_name, controlnet=controlnet)
            for index in pending:
                try:
                    arrays, seconds = run_cell(pipe, _cell_kwargs(axes, index, fixed), record)
                except Exception as e:  # noqa: BLE001 - like a failed task on a cluster: reported at the end
                    report.failed[index] = e
                    bar.update(1)
                    continue
                if not Path(store).exists():
                    _init_store(store, axes, arrays, attrs)
                _write_cell(store, axes, index, arrays, seconds)
                stored(index, seconds)
        elif pending:
            _run_distributed(client, model_name, controlnet, axes, fixed, record, store, pending, attrs, stored, report)
    finally:
        bar.close()
        report.seconds = time.perf_counter() - t0
    if report.failed:
        first = next(iter(report.failed.items()))
        raise RuntimeError(f"{len(report.failed)} of {len(cells)} cells failed (the others are stored in {store}; "
                           f"run the sweep again to retry them). First: cell {first[0]}: {first[1]!r}")
    return _open(store)


def _run_distributed(client, model, controlnet, axes, fixed, record, store, pending, attrs, stored, report):
    from distributed import as_completed
    token = hashlib.sha1(f"{store}{time.time()}".encode()).hexdigest()[:8]
    queue = list(pending)
    if not Path(store).exists():  # the first cell's arrays give the store its shapes and dtypes
        first = queue.pop(0)
        fut = client.submit(_task, model, controlnet, _cell_kwargs(axes, first, fixed), record, store, axes, first,
                             False, key=f"latent-lab-sweep-{token}-first", pure=False)
        index, seconds, arrays = fut.result()
        _init_store(store, axes, arrays, attrs)
        _write_cell(store, axes, index, arrays, seconds)
        stored(index, seconds)
    futures = {client.submit(_task, model, controlnet, _cell_kwargs(axes, c, fixed), record, store, axes, c, True,
                             key=f"latent-lab-sweep-{token}-{'-'.join(map(str, c))}", pure=False): c for c in queue}
    try:
        for fut in as_completed(futures):
            if fut.status == "error":
                report.failed[futures[fut]] = fut.exception()
                continue
            index, seconds, _ = fut.result()
            stored(tuple(index), seconds)
    except BaseException:
        client.cancel(list(futures))
        raise
