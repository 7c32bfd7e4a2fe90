"""Recording cross- and self-attention probabilities, bound to one sampler.

    rec = lab.AttentionRecorder(kind="cross", layers="*attn2", heads="mean", half="cond")
    run = pipe.sampler(prompt, recorders=[rec]).run()
    run.attention          # xarray DataTree: one node per query resolution ("16x16", "8x8", ...)

The recorded layers go through the explicit attention path (:mod:`lab.recording.dispatch`): their output is
what diffusers' ``AttnProcessor2_0`` gives (scaled-dot-product attention), and the probabilities
``softmax(Q K^T / sqrt(d))`` of the chosen half of the batch are computed beside it (for cross-attention a
queries x tokens matrix, cheap). With edits (:mod:`lab.recording.edits`) the output is ``probs @ V`` of the
edited probabilities. Layers not recorded keep their own processor. Which steps: :mod:`lab.steps`.
"""
from __future__ import annotations

import difflib
import fnmatch
import math
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..batch import HALVES, BatchLayout
from ..steps import check_steps, select_steps
from .base import Binding, RecordingContext
from .dispatch import attention_probs, layer_name


class RecordingBudgetError(MemoryError):
    """The requested recording would exceed the recorder's memory budget."""


def attention_layer_names(unet, prefix: str = "unet") -> list[str]:
    """Module paths of all attention layers of ``unet`` (diffusers' processor keys without ``.processor``)."""
    return [layer_name(k, prefix) for k in unet.attn_processors]


def select_layers(names: list[str], layers) -> list[str]:
    """Resolve glob patterns or exact names against ``names``; unknown ones raise KeyError with close matches."""
    patterns = [layers] if isinstance(layers, str) else list(layers)
    chosen = []
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(n, "unet." + pat)]
        if not hits:
            close = difflib.get_close_matches(pat, names, n=3, cutoff=0.4)
            raise KeyError(f"no attention layer matches {pat!r}" + (f"; did you mean {close}?" if close else "")
                           + f" ({len(names)} layers; see lab.attention_layer_names(pipe.unet))")
        chosen += [h for h in hits if h not in chosen]
    return [n for n in names if n in chosen]


@dataclass
class AttentionRecorder:
    """What to record. ``kind``: ``"cross"``, ``"self"`` or ``"both"``. ``layers``: module-path names
    or glob patterns (default: every cross-attention layer ``*attn2``; self-attention is ``*attn1``).
    ``steps``: which steps (:mod:`lab.steps`; default all). ``heads``: ``"mean"`` or ``"all"``. ``half``:
    ``"cond"``, ``"uncond"`` or ``"both"`` (with classifier-free guidance). ``dtype``: storage dtype.
    ``max_bytes``: budget (in memory) for the whole run; a larger request fails before sampling starts.
    ``spill``: a directory: the probabilities go to memory-mapped files there instead of memory (one per
    layer, written step by step), ``run.attention`` reads them lazily (dask), and ``max_bytes`` does not
    apply; the free disk space is checked before sampling. The files stay (the run reads them).
    ``edits``: attention edits (:mod:`lab.recording.edits`); ``record=False`` edits without recording.

    The recorder is a description: each sampler binds it anew (:meth:`bind`), so one recorder may serve
    several samplers at once. :attr:`layer_names` and :attr:`meta` describe the latest binding."""

    kind: str = "cross"
    layers: object = None
    steps: object = None
    heads: str = "mean"
    half: str = "cond"
    dtype: torch.dtype = torch.float16
    max_bytes: int = 2 * 1024 ** 3
    edits: list = field(default_factory=list)
    record: bool = True
    spill: object = None

    def __post_init__(self):
        if self.kind not in ("cross", "self", "both"):
            raise ValueError(f"kind must be 'cross', 'self' or 'both', got {self.kind!r}")
        if self.heads not in ("mean", "all"):
            raise ValueError(f"heads must be 'mean' or 'all', got {self.heads!r}")
        if self.half not in HALVES:
            raise ValueError(f"half must be 'cond', 'uncond' or 'both', got {self.half!r}")
        check_steps(self.steps)
        if self.layers is None:
            self.layers = {"cross": ["*attn2"], "self": ["*attn1"], "both": ["*attn1", "*attn2"]}[self.kind]
        self.layer_names: list[str] = []
        self.meta: dict = {}

    def bind(self, ctx: RecordingContext) -> "AttentionBinding":
        """This recorder for one sampler: layers resolved, budget checked or spill files opened."""
        binding = AttentionBinding(self, ctx)
        self.layer_names, self.meta = binding.layer_names, binding.meta
        return binding

    def estimate_bytes(self, ctx: RecordingContext) -> int:
        """Bytes this recorder would store over a sampler's run (from shapes, before sampling)."""
        return AttentionBinding(self, ctx, check=False).estimate_bytes()


class AttentionBinding(Binding):
    """An :class:`AttentionRecorder` bound to one sampler: its layers, meta, buffers and spill files."""

    key = "attention"

    def __init__(self, rec: AttentionRecorder, ctx: RecordingContext, check: bool = True):
        self.rec, self.ctx = rec, ctx
        unet = ctx.pipe.unet
        names = attention_layer_names(unet)
        chosen = select_layers(names, rec.layers)
        if rec.kind == "cross":
            chosen = [n for n in chosen if not n.endswith("attn1")]
        elif rec.kind == "self":
            chosen = [n for n in chosen if not n.endswith("attn2")]
        if not chosen:
            raise KeyError(f"no {rec.kind}-attention layers among {rec.layers!r}")
        self.layer_names = chosen
        self.record_names = frozenset(chosen) if rec.record else frozenset()
        if not rec.record:
            self.key = ""  # edits only: the run records no attention (and describes none)
        edited = {n for n in names if any(fnmatch.fnmatchcase(n, e.layers) for e in rec.edits)}
        self.attention_layers = self.record_names | edited
        self.steps = select_steps(rec.steps, ctx.num_steps)
        self._slots = {s: j for j, s in enumerate(self.steps)}
        self._rows = ctx.layout.half(rec.half)  # the batch rows recorded
        self._every_step = len(self.steps) == ctx.num_steps  # then the step is not looked at inside the UNet
        # (a compiled UNet would otherwise guard on it and recompile at every step)
        mods = dict(unet.named_modules())
        layout = ctx.layout
        self.meta = {"latent_hw": tuple(ctx.latent_hw), "cfg": layout.cfg, "batch": layout.batch,
                     "per_prompt": layout.per_prompt, "tokens": ctx.tokens, "half": rec.half, "heads_mode": rec.heads,
                     "layers": list(chosen), "heads": {n: mods[n.removeprefix("unet.")].heads for n in chosen},
                     "steps": list(self.steps)}
        self.meta["query_sizes"] = query_sizes(unet, chosen, ctx.latent_hw)
        self._buf: dict = {}
        self._pinned: dict = {}  # (layer, shape, dtype) -> (pinned buffer of all recorded steps, slots written)
        if check and rec.record:
            if rec.spill is not None:
                self._open_spill()
            else:
                self._check_budget()

    # ----------------------------------------------------------------- sizes
    def estimate_bytes(self) -> int:
        rec, meta = self.rec, self.meta
        return _layer_bytes(self.ctx.pipe.unet, self.layer_names, meta["latent_hw"],
                            n_tokens=meta["tokens"]["n_tokens"], heads=rec.heads, batch=meta["batch"],
                            halves=self.ctx.layout.halves(rec.half), dtype=rec.dtype, steps=len(self.steps))

    def memory_bytes(self) -> int:
        """In memory: none when edits only or spilled to disk."""
        return self.estimate_bytes() if self.rec.record and self.rec.spill is None else 0

    def _check_budget(self):
        need, rec = self.estimate_bytes(), self.rec
        if need > rec.max_bytes:
            raise RecordingBudgetError(
                f"recording {len(self.layer_names)} layers ({rec.kind}, heads={rec.heads}, half={rec.half}) "
                f"for {len(self.steps)} steps needs {need / 2**20:.0f} MiB, over the budget of "
                f"{rec.max_bytes / 2**20:.0f} MiB; record fewer layers/steps, heads='mean', "
                f"or raise max_bytes")

    def _open_spill(self):
        """One memory-mapped file per recorded layer, ``[steps, batch x halves, heads, Q, K]``, in a new folder
        under ``spill``; refuses (before sampling) when the disk has not room for all of it."""
        rec, meta = self.rec, self.meta
        if rec.dtype not in (torch.float16, torch.float32):
            raise ValueError(f"spill= stores float16 or float32, not {rec.dtype}")
        need = self.estimate_bytes()
        root = Path(rec.spill)
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        if need > free * 0.9:
            raise RecordingBudgetError(f"spilling this recording needs {need / 2**20:.0f} MiB on disk but {root} has "
                                       f"{free / 2**20:.0f} MiB free; record fewer layers/steps or spill elsewhere")
        folder = root / f"attention-{uuid.uuid4().hex[:12]}"
        folder.mkdir()
        rows = meta["batch"] * self.ctx.layout.halves(rec.half)
        dtype = "float16" if rec.dtype == torch.float16 else "float32"
        shapes = {}
        self._spill_maps, self._spill_used = {}, {}
        for i, name in enumerate(self.layer_names):
            q = meta["query_sizes"][name]
            k = meta["tokens"]["n_tokens"] if name.endswith("attn2") else q
            h = 1 if rec.heads == "mean" else meta["heads"][name]
            shapes[name] = (len(self.steps), rows, h, q, k)
            self._spill_maps[name] = np.lib.format.open_memmap(folder / f"layer{i:03d}.npy", mode="w+", dtype=dtype,
                                                               shape=shapes[name])
            self._spill_used[name] = 0
        meta["spill"] = {"dir": str(folder), "shapes": shapes, "dtype": dtype}

    # ----------------------------------------------------------------- capture
    def edits_for(self, name: str, is_cross: bool, step: int) -> list:
        if not self.rec.edits:
            return []
        ctx = self.ctx
        info = EditInfo(step, ctx.num_steps, ctx.layout, ctx.tokens)
        return [_bound(e, name, info) for e in self.rec.edits if e.applies(name, step, ctx.num_steps, is_cross)]

    def observe(self, name, step, query, key, scale, mask, probs) -> None:
        if name not in self.record_names or not (self._every_step or step in self._slots):
            return
        sel = self._rows
        if probs is None:
            p = attention_probs(query[sel], key[sel], scale, mask[sel] if mask is not None else None)
        else:
            p = probs[sel].float()  # [b', heads, Q, K]
        if self.rec.heads == "mean":
            p = p.mean(1, keepdim=True)
        p = p.to(self.rec.dtype)
        if self.rec.spill is not None:  # straight into the layer's file
            self._buf[name] = self._spill_write(name, p.cpu().numpy())
        else:  # on the device until the step ends (traceable: no graph break in a compiled UNet)
            self._buf[name] = p

    def _pinned_slot(self, name: str, p: torch.Tensor, step: int) -> torch.Tensor:
        """Step ``step``'s slot in the layer's pinned host buffer (one buffer of all recorded steps, allocated on
        the first step, so later steps allocate nothing). A slot is written once: a step taken again after a
        rewind gets a new buffer, as the dropped step's records may still be read (an earlier Run)."""
        key = (name, tuple(p.shape), p.dtype)
        slot = self._slots[step]
        pool, used = self._pinned.get(key, (None, None))
        if pool is None or slot in used:
            pool, used = torch.empty((len(self.steps), *p.shape), dtype=p.dtype, pin_memory=True), set()
            self._pinned[key] = (pool, used)
        used.add(slot)
        return pool[slot]

    def _spill_write(self, name: str, arr) -> "Spilled":
        """Write one step's probabilities into the next free slot of the layer's file. Slots are never
        reused: a rewound and re-stepped sampler gets new ones (an earlier run may still read the old), and a
        full file (more steps recorded than the run has, after rewinds) is followed by a new one."""
        mm, used = self._spill_maps[name], self._spill_used[name]
        if used == len(mm):
            path = Path(mm.filename)
            mm = self._spill_maps[name] = np.lib.format.open_memmap(
                path.with_name(f"{path.stem}+.npy"), mode="w+", dtype=mm.dtype, shape=mm.shape)
            used = 0
        mm[used] = arr
        self._spill_used[name] = used + 1
        return Spilled(used, mm.filename)

    def collect(self, step: int) -> dict:
        """This step's records: host tensors (on CUDA, slots of each layer's pinned buffer that the sampler's
        side stream fills after the step, :mod:`lab.transfer`) or :class:`Spilled` file slots."""
        out, self._buf = self._buf, {}
        host = self.ctx.host
        for name, p in out.items():
            if isinstance(p, torch.Tensor):
                out[name] = host.to_host(p, out=self._pinned_slot(name, p, step) if host.cuda and p.is_cuda else None)
        return out


@dataclass(frozen=True)
class EditInfo:
    """What an edit is told at a layer: the step, the number of steps, the batch layout (the half rule,
    row -> prompt) and the token table of the prompts."""

    step: int
    num_steps: int
    layout: BatchLayout
    tokens: dict | None


def _bound(edit, name, info):
    return lambda probs: edit(name, probs, info)


@dataclass(frozen=True)
class Spilled:
    """A step's record of a spilled layer: where it lies in the layer's file (``AttentionRecorder(spill=)``)."""

    slot: int
    path: str

    def tensor(self) -> torch.Tensor:
        """This step's probabilities ``[b, heads, Q, K]``, read from the file."""
        import numpy as np
        return torch.from_numpy(np.array(np.load(self.path, mmap_mode="r")[self.slot]))


def query_sizes(unet, layer_names, latent_hw) -> dict[str, int]:
    """Number of query positions of each attention layer for latents of ``latent_hw`` (each level of the
    UNet halves the resolution; the middle block sits at the deepest level)."""
    h, w = latent_hw
    n_down = len(unet.config.down_block_types)
    out = {}
    for name in layer_names:
        parts = name.split(".")
        if parts[1] == "down_blocks":
            level = int(parts[2])
        elif parts[1] == "mid_block":
            level = n_down - 1
        else:
            level = n_down - 1 - int(parts[2])
        hh, ww = h, w
        for _ in range(level):
            hh, ww = math.ceil(hh / 2), math.ceil(ww / 2)
        out[name] = hh * ww
    return out


def _layer_bytes(unet, layer_names, latent_hw, *, n_tokens, heads, batch, halves, dtype, steps) -> int:
    """Bytes of recorded probabilities for ``layer_names``: queries x keys (tokens for cross-attention,
    queries again for self-attention) x heads kept x batch x halves x steps."""
    mods = dict(unet.named_modules())
    total = 0
    for name, q in query_sizes(unet, layer_names, latent_hw).items():
        keys = n_tokens if name.endswith("attn2") else q
        h = 1 if heads == "mean" else mods[name.removeprefix("unet.")].heads
        total += halves * batch * h * q * keys
    return total * torch.empty((), dtype=dtype).element_size() * steps


def recording_bytes(unet, height: int, width: int, *, steps: int, n_tokens: int = 77, vae_factor: int = 8,
                    kind: str = "cross", heads: str = "mean", batch: int = 1, halves: int = 1,
                    dtype=torch.float16) -> int:
    """Bytes an :class:`AttentionRecorder` would keep for a run, from the UNet config alone (works on a
    ``meta``-device UNet, so full-size models can be sized without weights)."""
    names = [n for n in attention_layer_names(unet) if (kind in ("cross", "both") and n.endswith("attn2"))
             or (kind in ("self", "both") and n.endswith("attn1"))]
    return _layer_bytes(unet, names, (height // vae_factor, width // vae_factor), n_tokens=n_tokens, heads=heads,
                        batch=batch, halves=halves, dtype=dtype, steps=steps)


def attention_tree(steps, meta: dict):
    """Recorded attention of a run as an ``xarray.DataTree``: one child per query resolution
    (``"16x16"``, ...), each a Dataset with ``cross`` ``[step, batch, layer, head, query_y, query_x, token]``
    and/or ``self`` ``[step, batch, layer, head, query_y, query_x, key]`` (key = flattened key position)."""
    import numpy as np
    import xarray as xr

    recorded = [s for s in steps if any(k in s.records for k in meta["layers"])]
    if not recorded:
        raise ValueError("this run has no recorded attention (pass recorders=[lab.AttentionRecorder()])")
    h, w = meta["latent_hw"]
    groups: dict[tuple[str, int, int], list[str]] = {}
    for name in meta["layers"]:
        q = meta["query_sizes"][name]
        f = round(math.sqrt(h * w / q))
        hh, ww = math.ceil(h / f), math.ceil(w / f)
        kind = "cross" if name.endswith("attn2") else "self"
        groups.setdefault((kind, hh, ww), []).append(name)
    tok = meta["tokens"]
    spill = meta.get("spill")
    nodes: dict[str, dict] = {}
    for (kind, hh, ww), names in groups.items():
        if spill is None:
            arrs = []
            for s in recorded:
                per_layer = [s.records[n].float().numpy() for n in names]  # each [b, heads, Q, K]
                arrs.append(np.stack(per_layer, axis=1))  # [b, layer, heads, Q, K]
            a = np.stack(arrs)  # [step, b, layer, heads, Q, K]
        else:
            a = _spilled_stack(names, recorded)  # the same, lazily from the files (dask)
        st, b, nl, nh, q, k = a.shape
        a = a.reshape(st, b, nl, nh, hh, ww, k)
        last = "token" if kind == "cross" else "key"
        node = nodes.setdefault(f"{hh}x{ww}", {})
        node[kind] = (("step", "batch", "layer", "head", "query_y", "query_x", last), a.astype(np.float32))
        # (in memory: an array; spilled: a lazy dask array read from the files when used)
        node.setdefault("_layers", {})[kind] = names
        node["_heads"] = nh
    children = {}
    prompts = tok["prompts"]
    for res, node in nodes.items():
        layers = node.pop("_layers")
        nh = node.pop("_heads")
        ds = xr.Dataset()
        for kind, (dims, arr) in node.items():
            # cross and self layers differ (attn2 vs attn1): self-attention gets its own layer dim
            layer_dim = "layer_self" if (kind == "self" and "cross" in node) else "layer"
            dims = tuple(layer_dim if d == "layer" else d for d in dims)
            ds[kind] = xr.DataArray(arr, dims=dims)
            ds = ds.assign_coords({layer_dim: layers[kind]})
        if meta["half"] == "both" and meta["cfg"]:  # [step, 2b, ...] -> [step, half, b, ...]
            split = {}
            for kind, da in ds.data_vars.items():  # all at once: cross and self must change batch together
                b2 = da.sizes["batch"]
                split[kind] = (("step", "half", "batch", *da.dims[2:]),
                               da.data.reshape(da.shape[0], 2, b2 // 2, *da.shape[2:]))
            ds = xr.Dataset(split, coords=ds.coords).assign_coords(half=["uncond", "cond"])
        layout = BatchLayout(len(prompts), meta["per_prompt"], meta["cfg"])
        rows = [prompts[layout.prompt_of(i)] for i in range(ds.sizes["batch"])]
        ds = ds.assign_coords(
            step=[s.index for s in recorded],
            timestep=("step", [s.timestep for s in recorded]),
            head=np.arange(ds.sizes["head"]) if meta["heads_mode"] == "all" else ["mean"],
            query_y=np.arange(ds.sizes["query_y"]), query_x=np.arange(ds.sizes["query_x"]),
        )
        if "cross" in ds:
            ds = ds.assign_coords(token=np.arange(ds.sizes["token"]),
                                  token_str=(("batch", "token"), [r["tokens"] for r in rows]),
                                  word_index=(("batch", "token"), [r["word_index"] for r in rows]),
                                  word=(("batch", "token"), [r["words"] for r in rows]))
        ds.attrs.update(resolution=res, half=meta["half"], heads=meta["heads_mode"], n_heads=int(nh))
        children[res] = ds
    return xr.DataTree.from_dict({f"/{k}": v for k, v in sorted(children.items(), key=lambda kv: -int(kv[0].split("x")[0]))})


def _spilled_stack(names: list[str], recorded) -> "dask.array.Array":  # noqa: F821
    """``[step, b, layer, heads, Q, K]`` of ``names`` for the ``recorded`` steps, lazily from the spilled files
    (each step's record says which file and slot it was written to): a dask array, nothing read until used."""
    import dask.array as dsa
    import numpy as np
    files: dict[str, "dask.array.Array"] = {}  # noqa: F821

    def part(rec: Spilled):
        if rec.path not in files:
            mm = np.load(rec.path, mmap_mode="r")  # [slots, b, heads, Q, K]
            files[rec.path] = dsa.from_array(mm, chunks=(1, *mm.shape[1:]), name=f"spill-{rec.path}")
        return files[rec.path][rec.slot]
    return dsa.stack([dsa.stack([part(s.records[n]) for s in recorded]) for n in names], axis=2)
