"""Recording cross- and self-attention probabilities through diffusers attention processors.

    rec = lab.AttentionRecorder(kind="cross", layers="*attn2", heads="mean", half="cond")
    run = pipe.sampler(prompt, recorders=[rec]).run()
    run.attention          # xarray DataTree: one node per query resolution ("16x16", "8x8", ...)

Only the recorded layers get a :class:`RecordingAttnProcessor`; it computes the layer's output exactly
as diffusers' ``AttnProcessor2_0`` does (scaled-dot-product attention) and, separately, the
probabilities ``softmax(Q K^T / sqrt(d))`` of the chosen half of the batch (for cross-attention a
queries x tokens matrix, cheap). Processors are installed for one run and the previous ones restored
afterwards, also on error or interrupt (``with rec.attached(sampler): ...``).
"""
from __future__ import annotations

import contextlib
import difflib
import fnmatch
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0


class RecordingBudgetError(MemoryError):
    """The requested recording would exceed the recorder's memory budget."""


def attention_layer_names(unet, prefix: str = "unet") -> list[str]:
    """Module paths of all attention layers of ``unet`` (diffusers' processor keys without ``.processor``)."""
    return [f"{prefix}.{k.removesuffix('.processor')}" for k in unet.attn_processors]


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


class RecordingAttnProcessor(AttnProcessor2_0):
    """``AttnProcessor2_0`` plus a look at the attention probabilities.

    The layer output is computed with ``F.scaled_dot_product_attention`` on the same tensors as
    diffusers' processor, so recording does not change it. When an ``edit`` is set, the probabilities
    are computed explicitly, edited, and the output is ``probs @ V`` instead (prompt-to-prompt style)."""

    def __init__(self, name: str, recorder: "AttentionRecorder"):
        super().__init__()
        self.name = name
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [B, heads, Q, d]
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [B, heads, K, d]
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        edit = self.recorder.edit_for(self.name, is_cross)
        if edit is None:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=0.0, is_causal=False)
            self.recorder.observe(self.name, attn, query, key, is_cross, attention_mask)
        else:
            probs = _probs(query, key, attn.scale, attention_mask)  # [B, heads, Q, K]
            probs = edit(self.name, probs)
            self.recorder.observe(self.name, attn, query, key, is_cross, attention_mask, probs=probs)
            hidden_states = probs.to(value.dtype) @ value
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _probs(query, key, scale, attention_mask=None):
    """softmax(Q K^T * scale) in float32: ``[B, heads, Q, K]``."""
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale
    if attention_mask is not None:
        scores = scores + attention_mask.float()
    return scores.softmax(-1)


@dataclass
class AttentionRecorder:
    """What to record. ``kind``: ``"cross"``, ``"self"`` or ``"both"``. ``layers``: module-path names
    or glob patterns (default: every cross-attention layer ``*attn2``; self-attention is ``*attn1``).
    ``steps``: ``None`` (all) or step indices. ``heads``: ``"mean"`` or ``"all"``. ``half``:
    ``"cond"``, ``"uncond"`` or ``"both"`` (with classifier-free guidance). ``dtype``: storage dtype.
    ``max_bytes``: budget (in memory) for the whole run; a larger request fails before sampling starts.
    ``spill``: a directory: the probabilities go to memory-mapped files there instead of memory (one per
    layer, written step by step), ``run.attention`` reads them lazily (dask), and ``max_bytes`` does not
    apply; the free disk space is checked before sampling. The files stay (the run reads them)."""

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
        if self.half not in ("cond", "uncond", "both"):
            raise ValueError(f"half must be 'cond', 'uncond' or 'both', got {self.half!r}")
        if self.layers is None:
            self.layers = {"cross": ["*attn2"], "self": ["*attn1"], "both": ["*attn1", "*attn2"]}[self.kind]
        self._buf: dict = {}
        self._pinned: dict = {}
        self.record_names: set = set()
        self._sampler = None
        self.layer_names: list[str] = []
        self.meta: dict = {}
        self._prepared_for = None  # weakref to the sampler the layers, meta and spill files were made for

    # ----------------------------------------------------------------- scope
    @contextlib.contextmanager
    def attached(self, sampler):
        unet = sampler.pipe.unet
        names = attention_layer_names(unet)
        if self._prepared_for is None or self._prepared_for() is not sampler:
            # once per sampler, not per step (a sampler stepped by hand attaches its recorders every step)
            self._prepare(sampler, names)
            self._prepared_for = weakref.ref(sampler)
        if self.record:
            sampler.recording_meta["attention"] = self.meta
        chosen = self.layer_names
        original = unet.attn_processors
        self.record_names = set(chosen) if self.record else set()
        edited = {n for n in names if any(fnmatch.fnmatchcase(n, e.layers) for e in self.edits)}
        procs = {}
        for key, proc in original.items():
            name = "unet." + key.removesuffix(".processor")
            procs[key] = RecordingAttnProcessor(name, self) if (name in self.record_names or name in edited) else proc
        unet.set_attn_processor(procs)
        self._sampler = sampler
        try:
            yield self
        finally:
            unet.set_attn_processor(original)
            self._sampler = None

    def _prepare(self, sampler, names) -> None:
        """Resolve the layers, describe them (:attr:`meta`), and check the budget or open the spill files."""
        chosen = select_layers(names, self.layers)
        if self.kind == "cross":
            chosen = [n for n in chosen if not n.endswith("attn1")]
        elif self.kind == "self":
            chosen = [n for n in chosen if not n.endswith("attn2")]
        if not chosen:
            raise KeyError(f"no {self.kind}-attention layers among {self.layers!r}")
        self.layer_names = chosen
        self._pinned = {}  # (layer, shape, dtype) -> (pinned buffer of all recorded steps, slots written)
        self._prepare_meta(sampler)
        self.meta["query_sizes"] = self.query_sizes(sampler)
        if self.record:
            if self.spill is not None:
                self._open_spill(sampler)
            else:
                self._check_budget(sampler)

    def _prepare_meta(self, sampler):
        _, _, h, w = sampler.latents.shape
        cfg = sampler.cond["cfg"]
        self.meta = {"latent_hw": (h, w), "cfg": cfg, "batch": sampler.batch_size,
                     "tokens": token_table(sampler)}
        unet = sampler.pipe.unet
        self.meta["heads"] = {}
        self.meta["half"] = self.half
        self.meta["heads_mode"] = self.heads
        self.meta["layers"] = list(self.layer_names)
        mods = dict(unet.named_modules())
        for n in self.layer_names:
            self.meta["heads"][n] = mods[n.removeprefix("unet.")].heads

    def _steps_recorded(self, sampler) -> int:
        if self.steps is None:
            return sampler.num_steps
        return len([s for s in self.steps if 0 <= s < sampler.num_steps])

    def estimate_bytes(self, sampler) -> int:
        """Bytes this recorder would store over the sampler's run (computed from shapes, before sampling)."""
        return _layer_bytes(sampler.pipe.unet, self.layer_names, self.meta["latent_hw"],
                            n_tokens=self.meta["tokens"]["n_tokens"], heads=self.heads, batch=self.meta["batch"],
                            halves=2 if (self.half == "both" and self.meta["cfg"]) else 1, dtype=self.dtype,
                            steps=self._steps_recorded(sampler))

    def query_sizes(self, sampler) -> dict[str, int]:
        """Query count per recorded layer, from the UNet's structure (block depth -> downsampling)."""
        return query_sizes(sampler.pipe.unet, self.layer_names, self.meta["latent_hw"])

    def _open_spill(self, sampler):
        """One memory-mapped file per recorded layer, ``[steps, batch x halves, heads, Q, K]``, in a new folder
        under ``spill``; refuses (before sampling) when the disk has not room for all of it."""
        import shutil
        import uuid

        import numpy as np
        if self.dtype not in (torch.float16, torch.float32):
            raise ValueError(f"spill= stores float16 or float32, not {self.dtype}")
        need = self.estimate_bytes(sampler)
        root = Path(self.spill)
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        if need > free * 0.9:
            raise RecordingBudgetError(f"spilling this recording needs {need / 2**20:.0f} MiB on disk but {root} has "
                                       f"{free / 2**20:.0f} MiB free; record fewer layers/steps or spill elsewhere")
        folder = root / f"attention-{uuid.uuid4().hex[:12]}"
        folder.mkdir()
        halves = 2 if (self.half == "both" and self.meta["cfg"]) else 1
        mods = dict(sampler.pipe.unet.named_modules())
        n_steps = self._steps_recorded(sampler)
        dtype = "float16" if self.dtype == torch.float16 else "float32"
        shapes = {}
        self._spill_maps, self._spill_used = {}, {}
        for i, name in enumerate(self.layer_names):
            q = self.meta["query_sizes"][name]
            k = self.meta["tokens"]["n_tokens"] if name.endswith("attn2") else q
            h = 1 if self.heads == "mean" else mods[name.removeprefix("unet.")].heads
            shapes[name] = (n_steps, self.meta["batch"] * halves, h, q, k)
            self._spill_maps[name] = np.lib.format.open_memmap(folder / f"layer{i:03d}.npy", mode="w+", dtype=dtype,
                                                               shape=shapes[name])
            self._spill_used[name] = 0
        self.meta["spill"] = {"dir": str(folder), "shapes": shapes, "dtype": dtype}

    def _check_budget(self, sampler):
        need = self.estimate_bytes(sampler)
        if need > self.max_bytes:
            raise RecordingBudgetError(
                f"recording {len(self.layer_names)} layers ({self.kind}, heads={self.heads}, half={self.half}) "
                f"for {self._steps_recorded(sampler)} steps needs {need / 2**20:.0f} MiB, over the budget of "
                f"{self.max_bytes / 2**20:.0f} MiB; record fewer layers/steps, heads='mean', "
                f"or raise max_bytes")

    # ----------------------------------------------------------------- capture
    def edit_for(self, name: str, is_cross: bool):
        if not self.edits or self._sampler is None:
            return None
        i = self._sampler.position
        fns = [e for e in self.edits if e.applies(name, i, self._sampler.num_steps, is_cross)]
        if not fns:
            return None

        def apply(layer, probs):
            meta = dict(self.meta, _step=i)
            for e in fns:
                probs = e(layer, probs, meta)
            return probs
        return apply

    def observe(self, name, attn, query, key, is_cross, attention_mask=None, probs=None):
        if name not in self.record_names or self._sampler is None:
            return
        i = self._sampler.position
        if self.steps is not None and i not in self.steps:
            return
        b = self.meta["batch"]
        cfg = self.meta["cfg"]
        sel = {"cond": slice(b, 2 * b) if cfg else slice(0, b), "uncond": slice(0, b) if cfg else slice(0, 0),
               "both": slice(0, 2 * b) if cfg else slice(0, b)}[self.half]
        if probs is None:
            m = attention_mask[sel] if attention_mask is not None else None
            p = _probs(query[sel], key[sel], attn.scale, m)  # [b', heads, Q, K]
        else:
            p = probs[sel].float()
        if self.heads == "mean":
            p = p.mean(1, keepdim=True)
        p = p.to(self.dtype)
        if self.spill is not None:  # straight into the layer's file
            self._buf[name] = self._spill_write(name, p.cpu().numpy())
        else:  # on the device until the step ends (traceable: no graph break in a compiled UNet)
            self._buf[name] = p

    def _pinned_slot(self, name: str, p: torch.Tensor, i: int) -> torch.Tensor:
        """Step ``i``'s slot in the layer's pinned host buffer (one buffer of all recorded steps, allocated on
        the first step, so later steps allocate nothing). A slot is written once: a step taken again after a
        rewind gets a new buffer, as the dropped step's records may still be read (a fork, an earlier Run)."""
        key = (name, tuple(p.shape), p.dtype)
        slot = self._slot(i)
        pool, used = self._pinned.get(key, (None, None))
        if pool is None or slot in used:
            pool, used = torch.empty((self._steps_recorded(self._sampler), *p.shape), dtype=p.dtype,
                                     pin_memory=True), set()
            self._pinned[key] = (pool, used)
        used.add(slot)
        return pool[slot]

    def _spill_write(self, name: str, arr) -> "Spilled":
        """Write one step's probabilities into the next free slot of the layer's file. Slots are never
        reused: a rewound and re-stepped sampler gets new ones (a fork may still read the old), and a full
        file (more steps recorded than the run has, after rewinds) is followed by a new one."""
        import numpy as np
        mm, used = self._spill_maps[name], self._spill_used[name]
        if used == len(mm):
            path = Path(mm.filename)
            mm = self._spill_maps[name] = np.lib.format.open_memmap(
                path.with_name(f"{path.stem}+.npy"), mode="w+", dtype=mm.dtype, shape=mm.shape)
            used = 0
        mm[used] = arr
        self._spill_used[name] = used + 1
        return Spilled(used, mm.filename)

    def _slot(self, i: int) -> int:
        return i if self.steps is None else sorted(s for s in self.steps).index(i)

    def collect(self, step: int) -> dict:
        """This step's records: host tensors (on CUDA, slots of each layer's pinned buffer that the sampler's
        side stream fills after the step, :mod:`lab.transfer`) or :class:`Spilled` file slots."""
        out, self._buf = self._buf, {}
        host = self._sampler._host if out else None
        for name, p in out.items():
            if isinstance(p, torch.Tensor):
                out[name] = host.to_host(p, out=self._pinned_slot(name, p, step) if host.cuda and p.is_cuda else None)
        return out


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


def token_words(tok, ids) -> dict:
    """How ``tok`` split a prompt into token ``ids``: ``tokens`` (strings), ``word_index`` (the word of the
    prompt each token belongs to; -1 for special and padding tokens) and ``words`` (that word's text)."""
    toks = tok.convert_ids_to_tokens(list(ids))
    words, word_idx, w, current = [], [], 0, ""
    for t in toks:
        if t in (tok.bos_token, tok.eos_token, tok.pad_token):
            word_idx.append(-1)
            words.append("")
            continue
        word_idx.append(w)
        current += t.removesuffix("</w>")
        words.append(None)
        if t.endswith("</w>"):
            for j in range(len(words)):
                if words[j] is None:
                    words[j] = current
            current, w = "", w + 1
    words = [x if x is not None else current for x in words]
    return {"tokens": [t.removesuffix("</w>") for t in toks], "word_index": word_idx, "words": words}


def token_table(sampler) -> dict:
    """Token strings and word indices of the (first) prompt of a sampler, as the text encoder saw it."""
    tok = sampler.pipe.tokenizer
    prompt = sampler.settings["prompt"]
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    n = tok.model_max_length
    ids = tok(prompts, padding="max_length", max_length=n, truncation=True).input_ids
    return {"n_tokens": n, "prompts": [token_words(tok, row) for row in ids]}


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
        b = ds.sizes["batch"]
        per_prompt = max(1, b // len(prompts))
        rows = [prompts[min(i // per_prompt, len(prompts) - 1)] for i in range(b)]
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
