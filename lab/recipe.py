"""What a run was made from, as data a file can hold, so that :func:`lab.replay` can make it again.

A :class:`Recipe` is the sampler's arguments (the root of the fork tree: its prompt, settings, scheduler,
control images, inpainting image and mask, recorders with their edits) and the forks' changes in order, each
at its step. :func:`encode` turns it into JSON and a dict of arrays (images, masks, tensors), :func:`decode`
back; a run file keeps the JSON in its ``recipe`` attribute and the arrays in its ``/inputs`` group, under the
checksum manifest (:mod:`lab.runfile`).

The encoding names what it holds with a ``"$"`` tag (``tuple``, ``dict``, ``array``, ``control``,
``scheduler``, ``recorder``, ``edit``, ...) and only ever rebuilds lab's and diffusers' own classes: a file
never imports code. What cannot be stored (an external ``torch.Generator``, a plug-in or recorder class of the
user's own) makes the recipe not replayable, with the reason in :attr:`Recipe.why_not`.

A :class:`~lab.ReplaceAttention` edit keeps its source run's recipe, so replaying it replays the source first.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .conditioning.classes import Layout
from .conditioning.concat import SemanticMap
from .conditioning.controlnet import Control
from .guidance import GUIDES
from .recording import AttentionRecorder, ReplaceAttention, ResidualRecorder, Reweight

VERSION = 1
RECORDERS = {"AttentionRecorder": AttentionRecorder, "ResidualRecorder": ResidualRecorder}
PLUGINS = {"SemanticMap": (SemanticMap, ("maps",)), "Layout": (Layout, ("boxes",))}  # lab's plug-ins for conditioning=, and their arguments
PIL_MODES = ("RGB", "RGBA", "L", "LA", "1", "I", "F")  # modes Image.fromarray gives back from their arrays


class NotStorable(ValueError):
    """A value a recipe cannot hold (the message says which and why)."""


@dataclass(frozen=True)
class Recipe:
    """``args``: the sampler's keyword arguments; ``plan``: ``((step, changes), ...)`` the forks' changes in
    order; ``why_not``: why it cannot be replayed (``None``: it can)."""

    args: dict
    plan: tuple = ()
    why_not: str | None = None

    def encode(self) -> tuple[dict, dict[str, np.ndarray]]:
        return encode(self)


# ---------------------------------------------------------------------------- encoding
class _Encoder:
    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}
        self.problems: list[str] = []

    def array(self, a: np.ndarray, **how) -> dict:
        ref = f"a{len(self.arrays)}"
        self.arrays[ref] = np.ascontiguousarray(a)
        return {"$": "array", "ref": ref, **how}

    def __call__(self, v, where: str):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, tuple):
            return {"$": "tuple", "items": [self(x, where) for x in v]}
        if isinstance(v, list):
            return [self(x, where) for x in v]
        if isinstance(v, (set, frozenset)):
            return {"$": "set", "items": [self(x, where) for x in sorted(v)]}
        if isinstance(v, range):
            return {"$": "range", "args": [v.start, v.stop, v.step]}
        if isinstance(v, slice):
            return {"$": "slice", "args": [v.start, v.stop, v.step]}
        if isinstance(v, dict):
            if not all(isinstance(k, str) for k in v):
                return self.refuse(f"{where}: a dict with keys other than strings")
            return {"$": "dict", "items": {k: self(x, f"{where}.{k}") for k, x in v.items()}}
        if isinstance(v, torch.dtype):
            return {"$": "dtype", "name": str(v).removeprefix("torch.")}
        if isinstance(v, np.ndarray):
            return self.array(v, kind="numpy")
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu()
            return self.array((t.float() if t.dtype == torch.bfloat16 else t).numpy(), kind="torch",
                              dtype=str(t.dtype).removeprefix("torch."))
        if isinstance(v, Image.Image):
            if v.mode not in PIL_MODES:
                return self.refuse(f"{where}: a PIL image in mode {v.mode!r} (store it as RGB or an array)")
            return self.array(np.asarray(v), kind="pil", mode=v.mode)
        if type(v).__name__ in PLUGINS and type(v) is PLUGINS[type(v).__name__][0]:
            return {"$": "conditioning", "class": type(v).__name__,
                    "args": {a: self(getattr(v, a), f"{where}.{a}") for a in PLUGINS[type(v).__name__][1]}}
        if isinstance(v, Control):
            return {"$": "control", **{f.name: self(getattr(v, f.name), f"{where}.{f.name}") for f in fields(v)}}
        from diffusers.schedulers.scheduling_utils import SchedulerMixin
        if isinstance(v, SchedulerMixin):
            config = {k: x for k, x in v.config.items() if not k.startswith("_")}
            return {"$": "scheduler", "class": type(v).__name__, "config": self(config, f"{where}.config")}
        if type(v) in RECORDERS.values():
            return {"$": "recorder", "class": type(v).__name__,
                    "fields": {f.name: self(getattr(v, f.name), f"{where}.{f.name}") for f in fields(v) if f.init}}
        if type(v) in GUIDES.values():
            return {"$": "guide", "class": type(v).__name__,
                    "fields": {f.name: self(getattr(v, f.name), f"{where}.{f.name}") for f in fields(v) if f.init}}
        if type(v) is Reweight:
            return {"$": "edit", "class": "Reweight", "words": self(v.words, where), "steps": self(v.steps, where),
                    "layers": v.layers}
        if type(v) is ReplaceAttention:
            source = getattr(v.source, "recipe", None)
            if source is None:
                return self.refuse(f"{where}: ReplaceAttention's source run has no recipe")
            if source.why_not:
                return self.refuse(f"{where}: ReplaceAttention's source run cannot be replayed ({source.why_not})")
            spec, arrays = encode(source)
            return {"$": "edit", "class": "ReplaceAttention", "steps": self(v.steps, where), "layers": v.layers,
                    "source": spec, "source_arrays": {k: self.array(a, kind="numpy") for k, a in arrays.items()}}
        return self.refuse(f"{where}: a {type(v).__module__}.{type(v).__qualname__} (only lab's and diffusers' "
                           "own classes are stored)")

    def refuse(self, why: str):
        self.problems.append(why)
        return {"$": "missing", "why": why}


def encode(recipe: Recipe) -> tuple[dict, dict[str, np.ndarray]]:
    """``(spec, arrays)``: JSON-able ``spec`` and the arrays it refers to by name."""
    enc = _Encoder()
    args = {k: enc(v, k) for k, v in recipe.args.items()}
    plan = [{"step": int(step), "changes": {k: enc(v, f"fork at {step}: {k}") for k, v in changes.items()}}
            for step, changes in recipe.plan]
    why = "; ".join([*([recipe.why_not] if recipe.why_not else []), *enc.problems]) or None
    return {"version": VERSION, "args": args, "plan": plan, "why_not": why}, enc.arrays


# ---------------------------------------------------------------------------- decoding
def decode(spec: dict, arrays: dict[str, np.ndarray]) -> Recipe:
    """The :class:`Recipe` of :func:`encode`'s output. Unknown tags or classes are a ``ValueError``."""
    if int(spec.get("version", 0)) > VERSION:
        raise ValueError(f"recipe version {spec['version']} is newer than this latent-lab ({VERSION})")
    def dec(v):
        if isinstance(v, list):
            return [dec(x) for x in v]
        if not isinstance(v, dict):
            return v
        tag = v.get("$")
        if tag == "tuple":
            return tuple(dec(x) for x in v["items"])
        if tag == "set":
            return {dec(x) for x in v["items"]}
        if tag == "range":
            return range(*v["args"])
        if tag == "slice":
            return slice(*v["args"])
        if tag == "dict":
            return {k: dec(x) for k, x in v["items"].items()}
        if tag == "dtype":
            return getattr(torch, v["name"])
        if tag == "array":
            a = arrays[v["ref"]]
            if v["kind"] == "pil":
                return Image.fromarray(a, mode=v["mode"]) if v["mode"] in ("I", "F", "LA") else Image.fromarray(a)
            if v["kind"] == "torch":
                return torch.from_numpy(a.copy()).to(getattr(torch, v["dtype"]))
            return a.copy()
        if tag == "conditioning" and v["class"] in PLUGINS:
            return PLUGINS[v["class"]][0](**{k: dec(x) for k, x in v["args"].items()})
        if tag == "control":
            return Control(**{k: dec(x) for k, x in v.items() if k != "$"})
        if tag == "scheduler":
            import diffusers
            cls = getattr(diffusers, v["class"], None)
            if cls is None:
                raise ValueError(f"this diffusers has no scheduler {v['class']!r}")
            return cls.from_config(dec(v["config"]))
        if tag == "recorder":
            return RECORDERS[v["class"]](**{k: dec(x) for k, x in v["fields"].items()})
        if tag == "guide" and v["class"] in GUIDES:
            return GUIDES[v["class"]](**{k: dec(x) for k, x in v["fields"].items()})
        if tag == "edit" and v["class"] == "Reweight":
            return Reweight(dec(v["words"]), steps=dec(v["steps"]), layers=v["layers"])
        if tag == "edit" and v["class"] == "ReplaceAttention":
            inner = decode(v["source"], {k: dec(a) for k, a in v["source_arrays"].items()})
            return _PendingReplace(inner, dec(v["steps"]), v["layers"])
        if tag == "missing":
            return None
        raise ValueError(f"unknown recipe entry {v.get('$')!r}")

    args = {k: dec(v) for k, v in spec["args"].items()}
    plan = tuple((int(p["step"]), {k: dec(v) for k, v in p["changes"].items()}) for p in spec["plan"])
    return Recipe(args, plan, spec.get("why_not"))


@dataclass(frozen=True)
class _PendingReplace:
    """A ReplaceAttention edit whose source run is made when the recipe is replayed (:func:`lab.replay`)."""

    source: Recipe
    steps: object
    layers: str
