"""``python -m lab eval shapes``: measure the bundled model against the world's oracle.

All numbers come from held-out scenes (``split="heldout"``: other seeds than training, and the
two-object captions are combinations training never saw) sampled with fixed seeds:

* ``vae_psnr_db``: mean PSNR of VAE reconstructions (posterior mean) of n held-out images;
* ``fidelity_single``: fraction of one-object captions whose sample shows exactly that colour and shape;
* ``fidelity_double``: fraction of two-object captions whose sample shows both objects with every
  attribute (size, colour, shape) right and nothing else (captions as the world draws them);
* ``fidelity_double_per_category``: the same per caption category (:func:`lab.shapes.world.caption_category`:
  two large / large and small / two small objects, each with different attributes, the same shape, the same
  colour, or both), ``ceil(n / 12)`` captions each; ``fidelity_double_all``: their mean (category-balanced over
  the grammar); ``fidelity_double_per_background`` over the same captions;
* ``fidelity_double_two_large``: on ``n`` captions of two large objects (any relation, as the world draws them);
* ``duplicate_rate``: fraction of the category captions whose two objects differ in colour or shape where the
  sample shows one of them twice (same colour and shape; "a small purple square and a small blue circle" drawn
  as two purple squares);
* ``controlnet_iou[kind]``: mean IoU between the sample's foreground and the condition's object regions;
* ``controlnet_fidelity``: fraction of controlled samples whose object colours match the caption
  (all kinds together; per kind in ``controlnet_fidelity_per_kind``);
* ``composition_fidelity``: pose and depth of one scene of two overlapping objects, both ControlNets at once
  (diffusers' multi-ControlNet sum, the lecture's Figure 6), scored by :func:`composition_score`: each object
  where it should be and the nearer one in front; ``composition_placed``, ``composition_order`` its two parts;
  ``composition_pose_only`` / ``composition_depth_only``: the same scenes under one of the two nets;
* ``preprocessor_segmentation_miou``, ``preprocessor_depth_order_accuracy``, ``preprocessor_pose_pck``: the
  conditions read back from world images (:mod:`lab.shapes.preprocess`, :func:`lab.shapes.preprocess.score` on
  ``max(n, 500)`` scenes of each kind), with their other keys under ``preprocessors``;
* ``evaluator_accuracy``: the oracle itself on 1,000 held-out ground-truth images; ``_touching``: on 1,000
  scenes of two touching objects of different colours; ``_vae``: after a VAE round trip (:func:`oracle_accuracy`);
* ``attend_and_excite`` (with ``--attend-and-excite``): the two-object keys again, sampled with
  :class:`lab.AttendAndExcite` on the shape words; ``syntax_binding`` (with ``--syntax-binding``): the same with
  :class:`lab.SyntaxBinding` (SynGen) on the shape words, at :data:`SYNTAX_BINDING_STEP`;
* ``sample_seconds_50_steps``: one 50-step DDIM sample with classifier-free guidance at 64x64 (median of 3).
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..guidance import AttendAndExcite, SyntaxBinding
from . import evaluator, world
from .evaluator import evaluate, mask_iou


def _sample_images(pipe, captions, *, steps, guidance, seed, control=None, chunk=50, guides=()) -> list[np.ndarray]:
    """``control``: ``(kind, images)``, or a list of them (several ControlNets at once)."""
    import lab
    controls = [control] if isinstance(control, tuple) else list(control or [])
    out = []
    for a in range(0, len(captions), chunk):
        ctl = [lab.Control(kind, list(images[a:a + chunk])) for kind, images in controls] or None
        run = pipe.sampler(captions[a:a + chunk], steps=steps, guidance=guidance, scheduler="ddim", seed=seed + a,
                           control=ctl, progress=False, guides=guides).run()
        out.extend(np.asarray(im) for im in run.images)
    return out


def vae_psnr(vae, n: int, *, workers: int = 1, batch: int = 100) -> float:
    """Mean PSNR (dB, images in [0, 1]) of ``vae`` reconstructions (posterior mean) of ``n`` held-out scenes."""
    d = world.generate(n, seed=1, split="heldout", workers=workers)
    x = torch.from_numpy(d["image"]).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(vae.device, vae.dtype)
    vals = []
    with torch.no_grad():
        for i in range(0, n, batch):
            xb = x[i:i + batch]
            rec = vae.decode(vae.encode(xb).latent_dist.mean).sample.float().clamp(-1, 1)
            mse = ((rec - xb.float()) / 2).pow(2).flatten(1).mean(1)
            vals.append(10 * torch.log10(1 / mse))
    return float(torch.cat(vals).mean())


def oracle_accuracy(n: int = 1000, *, touching: bool = False, vae=None, seed: int = 1) -> float:
    """The oracle on ``n`` held-out ground-truth scenes (``touching``: two objects of different colours whose
    bounding boxes abut), as drawn or after a round trip through ``vae`` (posterior mean, decoded)."""
    exs = [world.make_example(seed, i, split="heldout", n_objects=2 if touching else None, touching=touching)
           for i in range(n)]
    images = [e["image"] for e in exs]
    if vae is not None:
        images = []
        for k in range(0, n, 100):
            x = torch.from_numpy(np.stack([e["image"] for e in exs[k:k + 100]])).permute(0, 3, 1, 2).float()
            with torch.no_grad():
                z = vae.encode(x.to(vae.device, vae.dtype) / 127.5 - 1).latent_dist.mean
                y = vae.decode(z, return_dict=False)[0].float().cpu()
            images += list(((y / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
    ok = [evaluate(im, e["caption"]) for im, e in zip(images, exs)]
    return float(np.mean([bool(r["all_ok"] and r["background_ok"]) for r in ok]))


CATEGORIES = tuple(f"{sizes}{rel}" for sizes in ("two_large", "large_small", "two_small")
                   for rel in ("", "+same_shape", "+same_colour", "+same_shape+same_colour"))


def category_captions(category: str, n: int, *, seed: int = 300, split: str = "heldout") -> list[str]:
    """``n`` two-object captions of one :func:`lab.shapes.world.caption_category`, or of ``"two_large"``
    captions of any relation (held-out combinations by default), drawn from the world in order of scene index
    (fixed for a seed)."""
    if category not in CATEGORIES and category != "two_large":
        raise ValueError(f"unknown caption category {category!r}; expected 'two_large' or one of {CATEGORIES}")
    out, i = [], 0
    while len(out) < n:
        attrs, background = world.sample_attributes(np.random.default_rng([seed, i, 1]), split=split, n_objects=2)
        cat = world.caption_category(attrs)
        if cat == category or (category == "two_large" and cat.split("+")[0] == "two_large"):
            out.append(world.Scene.make_caption([world.ShapeObject(*a, 0.0, 0.0) for a in attrs], background))
        i += 1
        if i > 2_000_000:
            raise RuntimeError(f"the world draws no {category!r} captions on split {split!r}")
    return out


def is_duplicate(caption: str, score: dict) -> bool:
    """The sample shows one of the caption's two (different) objects twice: two detections of the same colour
    and shape, which the caption names once."""
    want = [(c, s) for _, c, s in evaluator.parse_caption(caption)[0]]
    if len(want) != 2 or want[0] == want[1]:
        return False
    got = Counter((c, s) for _, c, s in score["detections"])
    return any(got[w] >= 2 for w in want)


def binding_eval(pipe, n: int, *, steps: int, guidance: float, seed: int = 0, guides=(), progress=print) -> dict:
    """The two-object keys over the grammar: ``fidelity_double_per_category``, ``fidelity_double_all``,
    ``fidelity_double_per_background``, ``duplicate_rate`` and ``fidelity_double_two_large`` (module docstring),
    sampled with ``guides`` (e.g. Attend-and-Excite on the shape words)."""
    res: dict = {}
    per_cat = -(-n // len(CATEGORIES))
    caps = [c for cat in CATEGORIES for c in category_captions(cat, per_cat)]
    imgs = _sample_images(pipe, caps, steps=steps, guidance=guidance, seed=seed, guides=guides)
    scores = [evaluate(im, c) for im, c in zip(imgs, caps)]
    ok = np.array([s["all_ok"] for s in scores])
    res["fidelity_double_per_category"] = {cat: float(ok[k * per_cat:(k + 1) * per_cat].mean())
                                           for k, cat in enumerate(CATEGORIES)}
    res["fidelity_double_all"] = float(np.mean(list(res["fidelity_double_per_category"].values())))
    backgrounds = [evaluator.parse_caption(c)[1] for c in caps]
    res["fidelity_double_per_background"] = {bg: float(ok[[b == bg for b in backgrounds]].mean())
                                             for bg in world.BACKGROUNDS}
    distinct = [k for k, c in enumerate(caps) if "same_shape+same_colour" not in CATEGORIES[k // per_cat]]
    res["duplicate_rate"] = float(np.mean([is_duplicate(caps[k], scores[k]) for k in distinct]))
    tag = "".join(f" ({g.kind})" for g in guides)
    progress(f"fidelity_double_all {res['fidelity_double_all']:.3f} duplicate_rate {res['duplicate_rate']:.3f}{tag}")
    two_large = category_captions("two_large", n, seed=301)
    imgs = _sample_images(pipe, two_large, steps=steps, guidance=guidance, seed=seed, guides=guides)
    res["fidelity_double_two_large"] = float(np.mean([evaluate(im, c)["all_ok"] for im, c in zip(imgs, two_large)]))
    progress(f"fidelity_double_two_large {res['fidelity_double_two_large']:.3f}{tag}")
    return res


def composition_score(image: np.ndarray, example: dict) -> dict:
    """How a sample made from the pose and depth of ``example`` (two overlapping objects of different colours)
    composes them. Each pixel takes the nearest of the scene's background colour and the caption's two object
    colours; ``placed``: each object's pixels have IoU >= 0.5 with what of it should be in view; ``order``:
    where the two objects overlap (10 pixels or more), more of the nearer one's colour shows than of the other's
    (True where they do not overlap); ``ok``: both."""
    objs = example["scene"].objects
    pal = np.asarray([world.BACKGROUNDS[example["scene"].background]] + [world.COLOURS[o.colour] for o in objs],
                     np.float32)
    label = np.linalg.norm(np.asarray(image, np.float32)[:, :, None] - pal[None, None], axis=3).argmin(2)
    placed = all(mask_iou(label == i + 1, example["visible"][i]) >= 0.5 for i in range(len(objs)))
    both = example["masks"].all(0)
    order = True
    if len(objs) == 2 and both.sum() >= 10:
        order = bool((label[both] == 2).sum() > (label[both] == 1).sum())
    return {"placed": placed, "order": order, "ok": placed and order}


def composition_eval(pipe, n: int, *, steps: int, guidance: float, seed: int = 0, progress=print) -> dict:
    """``composition_*`` keys (module docstring) on ``n`` held-out scenes of two overlapping objects."""
    exs = [world.make_example(210, i, split="heldout", overlap=True) for i in range(n)]
    caps = [e["caption"] for e in exs]
    res = {}
    for key, kinds in (("composition", ("pose", "depth")), ("composition_pose_only", ("pose",)),
                       ("composition_depth_only", ("depth",))):
        imgs = _sample_images(pipe, caps, steps=steps, guidance=guidance, seed=seed,
                              control=[(k, [e[k] for e in exs]) for k in kinds])
        scores = [composition_score(im, e) for im, e in zip(imgs, exs)]
        if key == "composition":
            res["composition_fidelity"] = float(np.mean([s["ok"] for s in scores]))
            res["composition_placed"] = float(np.mean([s["placed"] for s in scores]))
            res["composition_order"] = float(np.mean([s["order"] for s in scores]))
            progress(f"composition_fidelity {res['composition_fidelity']:.3f} (placed {res['composition_placed']:.3f},"
                     f" order {res['composition_order']:.3f})")
        else:
            res[key] = {part: float(np.mean([s[part] for s in scores])) for part in ("ok", "placed", "order")}
            progress(f"{key} {res[key]}")
    return res


#: SyntaxBinding's step size on this model: the paper's 20 (and 2) wreck the samples (fidelity 0.06, 0.61 against
#: plain 0.875); 0.1 was the best of 0.05-20 on 72 captions and seeds the eval does not use (scripts/tune_guide_step.py)
SYNTAX_BINDING_STEP = 0.1
PARTS = ("vae", "oracle", "fidelity", "binding", "controlnet", "composition", "preprocessors", "speed")


def run_eval(n: int = 200, *, steps: int = 30, guidance: float = 5.0, seed: int = 0, json_path=None,
             kinds=world.CONDITION_KINDS, progress=print, model="shapes", attend_and_excite: bool = False,
             syntax_binding: bool = False, parts=PARTS) -> dict:
    """Every key of the module docstring for ``model`` (the bundled ``"shapes"`` or a pipeline directory
    holding ``controlnet-KIND`` subfolders); ``attend_and_excite``: the two-object keys again, sampled with
    Attend-and-Excite on the shape words (:class:`lab.AttendAndExcite`), under ``"attend_and_excite"``.
    ``parts``: which of :data:`PARTS` to measure; with fewer than all, the keys measured are merged into an
    existing ``json_path`` (its other keys kept, ``updated_parts`` saying which were measured again)."""
    import lab
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown eval parts {unknown}; expected some of {PARTS}")
    t0 = time.time()
    need = list(kinds) if "controlnet" in parts else []
    need += [k for k in world.OVERLAP_KINDS if "composition" in parts and k not in need]
    pipe = lab.load(model, controlnet=need or None)
    res: dict = {"model": str(model), "n": n, "steps": steps, "guidance": guidance, "scheduler": "ddim",
                 "seed": seed}
    if "vae" in parts:
        res["vae_psnr_db"] = vae_psnr(pipe.vae, n)
        progress(f"vae_psnr_db {res['vae_psnr_db']:.2f}")
    if "oracle" in parts:
        _oracle_keys(res, pipe, progress)
    if "fidelity" in parts:
        _fidelity_keys(res, pipe, n, steps, guidance, seed, progress)
    if "binding" in parts:
        res.update(binding_eval(pipe, n, steps=steps, guidance=guidance, seed=seed, progress=progress))
        guided = {"attend_and_excite": attend_and_excite and AttendAndExcite(list(world.SHAPES)),
                  "syntax_binding": syntax_binding and SyntaxBinding(list(world.SHAPES), step_size=SYNTAX_BINDING_STEP)}
        for key, guide in guided.items():
            if guide:  # the two-object keys again with the guide, and its settings
                res[key] = {**binding_eval(pipe, n, steps=steps, guidance=guidance, seed=seed, progress=progress,
                                           guides=[guide]), "guide": guide.describe()}
    if "controlnet" in parts:
        _controlnet_keys(res, pipe, n, steps, guidance, seed, kinds, progress)
    if "composition" in parts:
        res.update(composition_eval(pipe, n, steps=steps, guidance=guidance, seed=seed, progress=progress))
    if "preprocessors" in parts:
        from .preprocess import score
        pre = score(max(n, 500))
        res["preprocessor_segmentation_miou"] = pre["segmentation_miou"]
        res["preprocessor_depth_order_accuracy"] = pre["depth_order_accuracy"]
        res["preprocessor_pose_pck"] = pre["pose_pck"]
        res["preprocessors"] = pre
        progress(f"preprocessors: segmentation mIoU {pre['segmentation_miou']:.3f}, depth order "
                 f"{pre['depth_order_accuracy']:.3f}, pose PCK {pre['pose_pck']:.3f}")
    if "speed" in parts:
        _speed_keys(res, pipe)
    res["torch_threads"] = torch.get_num_threads()
    res["eval_seconds"] = round(time.time() - t0, 1)
    if json_path:
        path = Path(json_path)
        if set(parts) != set(PARTS) and path.exists():
            old = json.loads(path.read_text())
            for key in ("controlnet_iou", "controlnet_fidelity_per_kind"):  # per kind: kinds not measured stay
                if key in res and key in old:
                    res[key] = {**old[key], **res[key]}
            if "controlnet_fidelity_per_kind" in res:  # equal n per kind: the mean over kinds
                res["controlnet_fidelity"] = float(np.mean(list(res["controlnet_fidelity_per_kind"].values())))
            res = {**old, **res, "updated_parts": {**old.get("updated_parts", {}),
                                                   **{p: time.strftime("%Y-%m-%d") for p in parts}},
                   "eval_seconds": old.get("eval_seconds")}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2))
    return res


def _oracle_keys(res, pipe, progress) -> None:
    for key, touching, vae in (("evaluator_accuracy", False, None), ("evaluator_accuracy_touching", True, None),
                               ("evaluator_accuracy_vae", False, pipe.vae),
                               ("evaluator_accuracy_touching_vae", True, pipe.vae)):
        res[key] = oracle_accuracy(1000, touching=touching, vae=vae)
        progress(f"{key} {res[key]:.3f}")


def _fidelity_keys(res, pipe, n, steps, guidance, seed, progress) -> None:
    for name, k in (("single", 1), ("double", 2)):
        exs = [world.make_example(100 + k, i, split="heldout", n_objects=k) for i in range(n)]
        caps = [e["caption"] for e in exs]
        imgs = _sample_images(pipe, caps, steps=steps, guidance=guidance, seed=seed)
        scores = [evaluate(im, c) for im, c in zip(imgs, caps)]
        if k == 1:
            res["fidelity_single"] = float(np.mean([s["shape_ok"] for s in scores]))
            res["fidelity_single_with_size"] = float(np.mean([s["all_ok"] for s in scores]))
        else:
            res["fidelity_double"] = float(np.mean([s["all_ok"] for s in scores]))
            res["fidelity_double_colours"] = float(np.mean([s["colour_ok"] for s in scores]))
        res[f"background_ok_{name}"] = float(np.mean([s["background_ok"] for s in scores]))
        progress(f"fidelity_{name} {res['fidelity_' + name]:.3f}")


def _controlnet_keys(res, pipe, n, steps, guidance, seed, kinds, progress) -> None:
    res["controlnet_iou"], per_kind_fid, all_fid = {}, {}, []
    for kind in kinds:
        exs = [world.make_example(200, i, split="heldout") for i in range(n)]
        caps = [e["caption"] for e in exs]
        imgs = _sample_images(pipe, caps, steps=steps, guidance=guidance, seed=seed,
                              control=(kind, [e[kind] for e in exs]))
        scores = [evaluate(im, c) for im, c in zip(imgs, caps)]
        ious = [mask_iou(s["foreground"], e["masks"].any(0)) for s, e in zip(scores, exs)]
        res["controlnet_iou"][kind] = float(np.mean(ious))
        per_kind_fid[kind] = float(np.mean([s["colour_ok"] for s in scores]))
        all_fid += [s["colour_ok"] for s in scores]
        progress(f"controlnet {kind}: iou {res['controlnet_iou'][kind]:.3f} colour {per_kind_fid[kind]:.3f}")
    res["controlnet_fidelity"] = float(np.mean(all_fid)) if all_fid else None
    res["controlnet_fidelity_per_kind"] = per_kind_fid


def _speed_keys(res, pipe) -> None:
    times = []
    for _ in range(3):
        t = time.perf_counter()
        pipe.sampler("a large red circle and a small blue square on a gray background", steps=50, guidance=5.0,
                     scheduler="ddim", seed=0, progress=False).run().image
        times.append(time.perf_counter() - t)
    res["sample_seconds_50_steps"] = float(np.median(times))
