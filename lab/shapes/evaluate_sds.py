"""``python -m lab eval sds``: score distillation (:mod:`lab.foundation.sds`) under the bundled text model, scored
by the world's oracle.

Prompts: one-object captions of the held-out split, one per (colour, shape) pair (18), each with the size
and background the world drew for it. Each prompt is optimised from ``seeds`` random starts of the soft shapes
renderer (:class:`lab.foundation.render.SoftShapes`, one object; the starts' seeds are fixed), run together as
one batch of independent runs (every prompt's starts in one batch). Keys:

* ``n``: prompts x seeds;
* ``sds_fidelity``: the fraction of optimised renders in which the oracle reads the caption's colour and shape
  (``evaluate(...)["shape_ok"]``; ``sds_all_ok``: size too, and nothing else; ``sds_background_ok``);
  ``random_init_fidelity``: the same on the starting renders;
* ``vsd_fidelity``: the same for VSD, the ``seeds`` starts of a prompt being one set of particles;
* ``sds_diversity``, ``vsd_diversity``, ``sample_diversity``: :data:`DIVERSITY_SEEDS` (16) runs of each of
  :data:`DIVERSITY_PROMPTS` (SDS: 16 seeds; VSD: 16 particles; sampling: 16 seeds of the ordinary sampler,
  DDIM 30 steps, guidance 5). Each result's object (the oracle's largest detection) gives a descriptor
  (centre x / 64, centre y / 64, median R / 255, G / 255, B / 255); diversity is the mean pairwise
  Euclidean distance between the descriptors of a prompt's runs, averaged over the prompts.
  ``*_diversity_position_px`` and ``*_diversity_colour`` are the position (pixels) and colour (RGB 0..255)
  parts alone. A result without a detected object is left out (``*_detected``: the share kept);
* ``seconds_per_run``: wall time of one SDS run alone (batch 1) on this machine, the median of three;
  ``vsd_seconds_per_run`` likewise for VSD with :data:`VSD_PARTICLES_TIMED` particles, divided by them.
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np

from ..foundation import render, sds
from . import world
from .evaluator import evaluate

SDS = dict(iterations=500, guidance=100.0, lr=0.1, t_range=(0.02, 0.98), weighting="sds", consistency=1.0)
# VSD at ProlificDreamer's guidance 7.5 drew the prompt's colour but often another shape, or a faint object (the
# ablation ``vsd_guidance_7_5``); 100, as SDS, holds the prompt (18 prompts, one start each: 7.5 -> 30 -> 100 gave
# about 0.3 -> 0.78 -> 0.83 in the exploration before this eval)
VSD = dict(iterations=200, guidance=100.0, lr=0.1, t_range=(0.02, 0.98), weighting="sds", consistency=1.0, method="vsd")
SAMPLE = dict(steps=30, guidance=5.0, scheduler="ddim")
DIVERSITY_PROMPTS = ("a large red circle on a gray background", "a small blue square on a white background")
DIVERSITY_SEEDS = 16
VSD_PARTICLES_TIMED = 4


def eval_prompts(seed: int = 11) -> list[str]:
    """One one-object caption per (colour, shape): size and background as the world draws them (held-out
    split's random stream, ``seed``)."""
    rng = np.random.default_rng(seed)
    out = []
    for colour, shape in itertools.product(world.COLOURS, world.SHAPES):
        size = ("small", "large")[int(rng.integers(2))]
        bg = list(world.BACKGROUNDS)[int(rng.integers(len(world.BACKGROUNDS)))]
        out.append(f"a {size} {colour} {shape} on a {bg} background")
    return out


def descriptor(image: np.ndarray) -> np.ndarray | None:
    """(centre x / 64, centre y / 64, R, G, B / 255) of the oracle's largest object, or None."""
    res = evaluate(image, "")
    if not res["objects"]:
        return None
    obj = max(res["objects"], key=lambda d: d.area)
    ys, xs = np.nonzero(obj.mask)
    rgb = np.median(np.asarray(image, np.float32)[ys, xs], axis=0)
    size = image.shape[0]
    return np.concatenate([[xs.mean() / size, ys.mean() / size], rgb / 255.0])


def diversity(groups: list[list[np.ndarray]]) -> dict:
    """Mean pairwise descriptor distance within each group of images, averaged over groups (see module doc)."""
    total, pos, col, kept, n = [], [], [], 0, 0
    for images in groups:
        ds = [descriptor(im) for im in images]
        n += len(ds)
        ds = [d for d in ds if d is not None]
        kept += len(ds)
        if len(ds) < 2:
            continue
        d = np.stack(ds)
        i, j = np.triu_indices(len(d), 1)
        total.append(np.linalg.norm(d[i] - d[j], axis=1).mean())
        pos.append(np.linalg.norm((d[i, :2] - d[j, :2]) * 64, axis=1).mean())
        col.append(np.linalg.norm((d[i, 2:] - d[j, 2:]) * 255, axis=1).mean())
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {"diversity": mean(total), "diversity_position_px": mean(pos), "diversity_colour": mean(col),
            "detected": kept / max(n, 1)}


def _distil(pipe, prompts, seeds: list[int], settings: dict, seed: int = 0, *, with_start: bool = False):
    """Optimise the starts ``seeds`` (:func:`_start`) for ``prompts`` (one, or one per start): the final renders,
    the wall time and, with ``with_start``, the starting renders."""
    target = _start(seeds)
    start = sds._uint8(target()) if with_start else None
    d = sds.distill(pipe, prompts, target, seed=seed, record=False, **settings)
    return d.images(), d.seconds, start


ABLATIONS = {  # SDS's or VSD's settings with one thing changed; all prompts x ABLATION_SEEDS starts in one batch
    "sds_fidelity_no_consistency": dict(SDS, consistency=0.0),
    "sds_fidelity_guidance_7_5": dict(SDS, guidance=7.5),
    "sds_fidelity_through_unet": dict(SDS, through_unet=True),
    "sds_fidelity_image_space": dict(SDS, space="image", consistency=0.0),
    "vsd_fidelity_guidance_7_5": dict(VSD, guidance=7.5),
}
ABLATION_SEEDS = 1


def _start(seeds: list[int]):
    """A :class:`SoftShapes` batch whose item ``b`` starts as ``SoftShapes(1, 1, seed=seeds[b])`` would."""
    target = render.SoftShapes(len(seeds), 1, seed=seeds[0])
    for b, s in enumerate(seeds):
        one = render.SoftShapes(1, 1, seed=s)
        for p_all, p_one in zip(target.parameters(), one.parameters()):
            p_all.data[b] = p_one.data[0]
    return target


def _items(prompts, seeds: int) -> tuple[list[str], list[int]]:
    """Every prompt (default :func:`eval_prompts`) ``seeds`` times, with its starts' seeds ``1000 k + s``."""
    prompts = list(prompts or eval_prompts())
    pairs = [(p, 1000 * k + s) for k, p in enumerate(prompts) for s in range(seeds)]
    return [p for p, _ in pairs], [s for _, s in pairs]


def run_sds_ablations(*, json_path=None, model: str = "shapes", prompts=None, seeds: int = ABLATION_SEEDS,
                      which=None, progress=print) -> dict:
    """The fidelity keys of :data:`ABLATIONS` (``which``: a subset of its names), over every prompt of
    :func:`eval_prompts` x ``seeds`` starts (the first of the main eval's starts), merged into ``json_path``
    when it exists. Also ``sds_fidelity_reference``: the unchanged settings on the same starts."""
    import lab
    pipe = lab.load(model)
    prompts, starts = _items(prompts, seeds)
    out = {}
    for name, settings in [("sds_fidelity_reference", SDS)] + [(n, ABLATIONS[n]) for n in (which or ABLATIONS)]:
        images, seconds, _ = _distil(pipe, prompts, starts, settings)
        ok = [evaluate(im, p)["shape_ok"] for im, p in zip(images, prompts)]
        out[name] = float(np.mean(ok))
        out[f"seconds_{name}"] = round(seconds, 1)
        progress(f"[sds ablation] {name}: {sum(ok)}/{len(ok)} ({seconds:.0f} s)")
    out["ablation_n"] = len(prompts)
    if json_path:
        path = Path(json_path)
        res = json.loads(path.read_text()) if path.exists() else {}
        res.update(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2))
    return out


def run_sds_eval(*, seeds: int = 3, json_path=None, model: str = "shapes", prompts=None, diversity_seeds: int = DIVERSITY_SEEDS,
                 diversity_prompts=DIVERSITY_PROMPTS, timing_runs: int = 3, progress=print) -> dict:
    import lab
    t_start = time.time()
    pipe = lab.load(model)
    res: dict = {"model": model, "sds_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in SDS.items()},
                 "vsd_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in VSD.items()},
                 "renderer": "SoftShapes, one object", "prompts": list(prompts or eval_prompts()), "seeds": seeds}
    # every prompt x seed in one batch per method: independent runs for SDS (each its own parameters, its own
    # noise; only t is shared per iteration), and for VSD one LoRA conditioned on each particle's prompt, so a
    # prompt's starts are the particles of its distribution
    item_prompts, starts = _items(prompts, seeds)
    scores = {}
    for name, settings in (("sds", SDS), ("vsd", VSD)):
        images, seconds, start = _distil(pipe, item_prompts, starts, settings, with_start=name == "sds")
        if start is not None:
            scores["init"] = [evaluate(im, p) for im, p in zip(start, item_prompts)]
        scores[name] = [evaluate(im, p) for im, p in zip(images, item_prompts)]
        res[f"{name}_batch_seconds"] = round(seconds, 1)
        progress(f"[sds eval] {name}: {sum(r['shape_ok'] for r in scores[name])}/{len(starts)} ({seconds:.0f} s)")
    mean = lambda name, key: float(np.mean([r[key] for r in scores[name]]))  # noqa: E731
    res.update(n=len(starts), sds_fidelity=mean("sds", "shape_ok"), sds_all_ok=mean("sds", "all_ok"),
               sds_background_ok=mean("sds", "background_ok"), random_init_fidelity=mean("init", "shape_ok"),
               vsd_fidelity=mean("vsd", "shape_ok"), vsd_all_ok=mean("vsd", "all_ok"),
               vsd_background_ok=mean("vsd", "background_ok"), vsd_n=len(starts))
    per_prompt = [{"prompt": p, "seed": seed, **{k: scores[k][i]["detections"] for k in ("init", "sds", "vsd")}}
                  for i, (p, seed) in enumerate(zip(item_prompts, starts))]

    groups = {"sds": [], "vsd": [], "sample": []}
    div_fid = {"sds": [], "vsd": [], "sample": []}
    for k, prompt in enumerate(diversity_prompts):
        run_seeds = [50_000 + 1000 * k + s for s in range(diversity_seeds)]
        for name, settings in (("sds", SDS), ("vsd", VSD)):
            imgs, _, _ = _distil(pipe, prompt, run_seeds, settings, seed=100 + k)
            groups[name].append(list(imgs))
            div_fid[name] += [evaluate(im, prompt)["shape_ok"] for im in imgs]
        run = pipe.sampler([prompt] * diversity_seeds, seed=200 + k, progress=False, **SAMPLE).run()
        imgs = [np.asarray(im) for im in run.images]
        groups["sample"].append(imgs)
        div_fid["sample"] += [evaluate(im, prompt)["shape_ok"] for im in imgs]
        progress(f"[sds eval] diversity {k + 1}/{len(diversity_prompts)} {prompt!r}")
    for name, imgs in groups.items():
        d = diversity(imgs)
        res[f"{name}_diversity"] = d["diversity"]
        for key in ("diversity_position_px", "diversity_colour", "detected"):
            res[f"{name}_{key}"] = d[key]
        res[f"{name}_diversity_fidelity"] = float(np.mean(div_fid[name]))
    res["diversity_prompts"] = list(diversity_prompts)
    res["diversity_seeds"] = diversity_seeds

    distinct = res["prompts"]
    times = [_distil(pipe, distinct[k % len(distinct)], [7 + k], SDS, seed=k)[1] for k in range(timing_runs)]
    res["seconds_per_run"] = float(np.median(times))
    vt = _distil(pipe, distinct[0], list(range(VSD_PARTICLES_TIMED)), VSD)[1]
    res["vsd_seconds_per_run"] = vt / VSD_PARTICLES_TIMED
    res["per_prompt"] = per_prompt
    res["eval_seconds"] = round(time.time() - t_start, 1)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(res, indent=2))
    return res
