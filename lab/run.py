"""A recorded sampling run: its steps, its provenance, and its labelled-array form.

``run.to_xarray()`` gives an ``xarray.Dataset`` with ``step`` as the leading dim::

    latents, prev_latents, pred_x0, noise_pred, noise_pred_cond, noise_pred_uncond
        [step, batch, channel, y, x]
    coords: step, timestep(step), sigma(step), batch, channel, y, x
    attrs:  latent_lab_run (format version), model, seed, scheduler, guidance, prompt, ...,
            config (all settings as one JSON string), lab_version, interrupted

``run.save(path)`` writes zarr (or netCDF for ``.nc``) to a temporary sibling and renames it into
place, so an interrupted save leaves no run behind; ``Run.load(path)`` reads it back identically.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from .runfile import is_run, read_tree, write_tree
from .errors import RunFileError
from .recipe import Recipe
from .recipe import decode as recipe_decode
from .state import StepState
from .transfer import Records
from .version import __version__

FORMAT = 2  # 2: a checksum manifest (lab.runfile)
TENSORS = ("latents", "prev_latents", "pred_x0", "noise_pred", "noise_pred_cond", "noise_pred_uncond")
PROVENANCE_KEYS = ("model", "model_kind", "seed", "scheduler", "guidance", "steps", "num_steps", "height", "width",
                   "batch", "dtype")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy() if t.dtype in (torch.float16, torch.bfloat16) else t.detach().cpu().numpy()


class Run:
    """The steps of one sampling run (see :class:`lab.StepState`) with its settings."""

    def __init__(self, steps: list[StepState], *, settings: dict, pipe=None, final_latents=None,
                 interrupted: bool = False, truncated: dict | None = None, recording_meta: dict | None = None,
                 attention=None, recipe: Recipe | None = None):
        self.steps = list(steps)
        self.settings = dict(settings)
        self.pipe = pipe
        self.final_latents = final_latents if final_latents is not None else (
            self.steps[-1].prev_latents if self.steps else None)
        self.interrupted = interrupted
        self.truncated = dict(truncated or {})
        self.recording_meta = dict(recording_meta or {})
        self._attention = attention
        self.recipe = recipe  # what lab.replay needs (lab.recipe); None for runs saved before it existed
        self._residuals = None
        self._images = None

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> StepState:
        return self.steps[i]

    def __repr__(self) -> str:
        flag = ", interrupted" if self.interrupted else ""
        return (f"<lab.Run {len(self.steps)}/{self.settings.get('num_steps')} steps, {self.settings.get('scheduler')}, "
                f"guidance {self.settings.get('guidance')}, seed {self.settings.get('seed')}{flag}: "
                f"{self.settings.get('prompt')!r}>")

    # ------------------------------------------------------------------ images
    def _need_pipe(self, pipe=None):
        pipe = pipe or self.pipe
        if pipe is None:
            raise RuntimeError("this run has no pipeline attached (it was loaded from disk); "
                               "pass pipe= or call run.attach(lab.load(...))")
        return pipe

    def attach(self, pipe) -> "Run":
        self.pipe = pipe
        return self

    @property
    def images(self):
        """The decoded final images (PIL), one per batch item."""
        if self._images is None:
            self._images = self._need_pipe().decode(self.final_latents)
        return self._images

    @property
    def image(self):
        return self.images[0]

    def decode(self, step: int = -1, *, pipe=None):
        """VAE decode of ``pred_x0`` at ``step`` (the model's x0 estimate then): a list of PIL images."""
        return self._need_pipe(pipe).decode(self.steps[step].pred_x0)

    def preview(self, step: int = -1, *, which: str = "pred_x0", pipe=None, index: int = 0) -> np.ndarray:
        """Cheap RGB preview ``uint8 [H, W, 3]`` of ``which`` (``pred_x0`` or ``latents``) at ``step``
        (:mod:`lab.preview`): an x0 estimate through the model's preview decoder where it ships one
        (:meth:`lab.Pipeline.preview`), noisy latents ``x_t`` through the latent-resolution colour map."""
        pipe = self._need_pipe(pipe)
        z = getattr(self.steps[step], which)[index]
        return pipe.preview(z) if which == "pred_x0" else pipe.preview_map(z)

    # ------------------------------------------------------------------ arrays
    @property
    def attention(self) -> "xr.DataTree":
        """Recorded attention probabilities, one DataTree node per query resolution (:mod:`lab.recording.attention`)."""
        if self._attention is None:
            if "attention" not in self.recording_meta:
                raise ValueError("this run recorded no attention; sample with recorders=[lab.AttentionRecorder()]")
            from .recording.attention import attention_tree
            self._attention = attention_tree(self.steps, self.recording_meta["attention"])
        return self._attention

    @property
    def residuals(self) -> xr.Dataset:
        """Recorded ControlNet residual norms ``norm[step, net, block, batch]`` (:mod:`lab.recording.residuals`)."""
        if self._residuals is None:
            if "residuals" not in self.recording_meta:
                raise ValueError("this run recorded no residuals; sample with recorders=[lab.ResidualRecorder()]")
            from .recording.residuals import residual_dataset
            self._residuals = residual_dataset(self.steps, self.recording_meta["residuals"])
        return self._residuals

    def residual_map(self, net: str, block, step: int, index: int = 0):
        """Channel-norm map ``[h, w]`` (numpy) of one residual at one step (needs ``ResidualRecorder(maps=True)``);
        ``block`` is an index or a name such as ``"down_block_res_samples.3"``."""
        meta, ds = self.recording_meta.get("residuals"), self._residuals
        if meta is not None and net in meta["names"]:
            names = meta["names"][net]
        elif meta is None and ds is not None and net in ds["net"].values:  # a loaded run
            names = [f"controlnet[{net}].{b}" for b in ds["block_name"].values]
        else:
            raise KeyError(f"no residuals recorded for ControlNet {net!r}")
        name = names[block] if isinstance(block, int) else f"controlnet[{net}].{block}"
        if name not in names:
            raise KeyError(f"no block {block!r}; blocks: {[n.split('].', 1)[1] for n in names]}")
        rec = self.steps[step].records.get(name)
        if rec is not None and rec.map is not None:
            return rec.map[index].numpy()
        i = names.index(name)  # a loaded run: the maps were saved with the norms
        var = next((v for v in (ds.data_vars if ds is not None else ()) if v.startswith("map_")
                    and i in ds[v][ds[v].dims[2]].values), None)
        if var is None:
            raise ValueError("no spatial map at that step: record with lab.ResidualRecorder(maps=True)")
        m = ds[var].sel(step=self.steps[step].index, net=net, **{ds[var].dims[2]: i}).isel(batch=index).values
        if np.isnan(m).all():
            raise ValueError(f"no spatial map at step {step}: {net} added nothing then (outside its start/end)")
        return m

    def has_attention(self) -> bool:
        return self._attention is not None or "attention" in self.recording_meta

    def to_datatree(self) -> "xr.DataTree":
        """The run with everything recorded: ``/run`` is :meth:`to_xarray`, recorded attention lives under
        ``/attention/<resolution>`` (siblings, so their differing ``step``/``batch`` coords never clash);
        the root carries the run's attrs."""
        ds = self.to_xarray()
        nodes = {"/": xr.Dataset(attrs=ds.attrs), "/run": ds}
        if self.recipe is not None:  # the root keeps it; its arrays (control images, masks) live under /inputs
            spec, arrays = self.recipe.encode()
            nodes["/"].attrs["recipe"] = json.dumps(spec)
            nodes["/inputs"] = xr.Dataset({k: ([f"{k}_{i}" for i in range(a.ndim)], a) for k, a in arrays.items()})
        if self.has_attention():
            for child in self.attention.children.values():
                nodes[f"/attention/{child.name}"] = child.to_dataset(inherit=False)
        if self._residuals is not None or "residuals" in self.recording_meta:
            nodes["/residuals"] = self.residuals
        return xr.DataTree.from_dict(nodes)

    def to_xarray(self) -> xr.Dataset:
        if not self.steps:
            raise ValueError("the run has no steps")
        s0 = self.steps[0]
        b, c, h, w = s0.latents.shape
        dims = ("step", "batch", "channel", "y", "x")
        data = {}
        for name in TENSORS:
            vals = [getattr(s, name) for s in self.steps]
            if any(v is None for v in vals):
                continue
            data[name] = (dims, np.stack([_np(v) for v in vals]))
        coords = {
            "step": np.array([s.index for s in self.steps], np.int64),
            "timestep": ("step", np.array([s.timestep for s in self.steps], np.float64)),
            "sigma": ("step", np.array([s.sigma for s in self.steps], np.float64)),
            "batch": np.arange(b), "channel": np.arange(c), "y": np.arange(h), "x": np.arange(w),
        }
        attrs = {"latent_lab_run": FORMAT, "lab_version": __version__, "interrupted": int(self.interrupted),
                 "prompt": json.dumps(self.settings.get("prompt")),
                 "negative_prompt": json.dumps(self.settings.get("negative_prompt")),
                 "config": json.dumps(self.settings, default=str, sort_keys=True),
                 "truncated": json.dumps(self.truncated)}
        for k in PROVENANCE_KEYS:
            v = self.settings.get(k)
            attrs[k] = v if isinstance(v, (int, float, str)) and not isinstance(v, bool) else json.dumps(v, default=str)
        ds = xr.Dataset(data, coords=coords, attrs=attrs)
        if self.final_latents is not None:
            ds["final_latents"] = (("batch", "channel", "y", "x"), _np(self.final_latents))
        return ds

    @classmethod
    def from_xarray(cls, ds: xr.Dataset, pipe=None) -> "Run":
        if ds.attrs.get("latent_lab_run") is None:
            raise RunFileError("not a latent-lab run: the attribute 'latent_lab_run' is missing")
        if int(ds.attrs["latent_lab_run"]) > FORMAT:
            raise RunFileError(f"run format {ds.attrs['latent_lab_run']} is newer than this latent-lab "
                               f"({FORMAT}); upgrade latent-lab to read it")
        missing = [k for k in ("latents", "prev_latents", "pred_x0", "noise_pred", "noise_pred_cond", "timestep",
                               "sigma") if k not in ds.variables]
        if missing:
            raise RunFileError(f"run is missing variables {missing}")
        steps = []
        for j, idx in enumerate(ds["step"].values):
            get = lambda n: torch.from_numpy(np.ascontiguousarray(ds[n].values[j])) if n in ds else None  # noqa: E731
            steps.append(StepState(int(idx), float(ds["timestep"].values[j]), float(ds["sigma"].values[j]),
                                   get("latents"), get("prev_latents"), get("pred_x0"), get("noise_pred_cond"),
                                   get("noise_pred_uncond"), get("noise_pred"), Records()))
        settings = json.loads(ds.attrs["config"])
        final = torch.from_numpy(ds["final_latents"].values.copy()) if "final_latents" in ds else None
        return cls(steps, settings=settings, pipe=pipe, final_latents=final,
                   interrupted=bool(int(ds.attrs.get("interrupted", 0))),
                   truncated=json.loads(ds.attrs.get("truncated", "{}")))

    # ------------------------------------------------------------------ files
    def save(self, path, *, overwrite: bool = True) -> Path:
        """Write the run to ``path`` (zarr directory; ``.nc`` -> netCDF via h5netcdf), atomically, with a
        checksum manifest written last (:mod:`lab.runfile`). An existing latent-lab run at ``path`` is
        replaced only after the new one is complete; any other existing file or directory is left alone and
        a ``FileExistsError`` raised."""
        return write_tree(self.to_datatree(), path, overwrite=overwrite, is_ours=is_run)

    @classmethod
    def load(cls, path, *, pipe=None) -> "Run":
        """Read a run written by :meth:`save`, every array checked against the manifest. Foreign, temporary,
        incomplete or corrupted files raise :class:`RunFileError` naming the file and the array."""
        tree = read_tree(path, newest_format=FORMAT)
        if "run" not in tree.children:
            raise RunFileError(f"{path} is not a latent-lab run: it has no /run group")
        run = cls.from_xarray(tree["run"].to_dataset(inherit=False), pipe=pipe)
        if "recipe" in tree.attrs:
            inputs = tree["inputs"].to_dataset(inherit=False) if "inputs" in tree.children else {}
            try:
                run.recipe = recipe_decode(json.loads(tree.attrs["recipe"]),
                                           {k: inputs[k].values for k in inputs.data_vars} if inputs else {})
            except (ValueError, KeyError, TypeError) as e:
                raise RunFileError(f"{path}: its recipe cannot be read ({type(e).__name__}: {e})") from e
        if "residuals" in tree.children:
            run._residuals = tree["residuals"].to_dataset(inherit=False)
        if "attention" in tree.children:
            run._attention = xr.DataTree.from_dict(
                {f"/{name}": node.to_dataset(inherit=False) for name, node in tree["attention"].children.items()})
        return run
