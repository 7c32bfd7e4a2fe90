"""``python -m lab eval tasks``: the task table's models (:mod:`lab.shapes.tasks`) against the world's oracle.

Held-out scenes, fixed seeds, DDIM with classifier-free guidance, as ``eval shapes``. Keys so far:

* ``inpaint_fidelity``: a held-out scene, one of its objects masked (its box grown by 3 px) and the caption
  asking for another object in its place (same size, another shape and colour): the fraction of samples where
  the oracle reads exactly the new caption (every object's size, colour and shape, nothing else) and the new
  object's centre lies inside the mask;
* ``inpaint_outside_psnr_db``: mean PSNR of the sample against the input image outside the mask (grown by a
  further 2 px, so the seam is not counted), what inpainting must leave alone;
* ``sr_psnr_db``: mean PSNR of the upscaler's 64x64 sample of a held-out scene's 16x16 area-average (noise
  level 20, the pipeline's default) against the scene; ``sr_bicubic_psnr_db``: the same for bicubic
  upsampling of the 16x16 image; ``sr_gain_over_bicubic_db``: their difference; ``sr_fidelity``: the fraction of
  samples where the oracle reads the scene's caption exactly (``sr_fidelity_bicubic`` for bicubic);
* ``segmap_miou``: a held-out scene's segmentation map (and its caption) in, the sample's objects as the oracle
  finds them out (each detection's mask labelled with its shape): per object class (circle, square, triangle)
  the IoU of those regions with the map's, intersections and unions summed over the ``n`` scenes, then the mean
  over the classes; ``segmap_miou_with_background`` counts the background as a fourth class;
  ``segmap_fidelity``: the fraction of samples the oracle reads as the caption says;
* ``uncond_attribute_tv``: the unconditional model (``unet-uncond``; without one, the text model's empty
  caption), ``n`` samples without guidance: the total-variation distance between the oracle's histogram of each
  attribute (objects per image, shape, colour, size, background) on the samples and on 2,000 scenes of the world
  the model was trained on (three in four with two objects), the mean over the five attributes
  (``uncond_attribute_tv_max``: the largest; ``uncond_tv_per_attribute``, both histograms); ``uncond_text_*``:
  the same for the text model's empty caption (caption dropout trains that branch jointly, as classifier-free
  guidance needs); samples are drawn as LDM draws its unconditional ones (DDIM, eta 1, 50 steps:
  :data:`UNCOND_STEPS`, :data:`UNCOND_ETA`), and ``uncond_eta0_*`` are the same keys for deterministic DDIM over
  the eval's steps (eta 0 drifts to mid-gray backgrounds, :data:`UNCOND_ETA`'s comment);
* ``class_accuracy``: the class model (:class:`~lab.shapes.tasks.ClassTokenEncoder`), the 36 classes in turn:
  the fraction of samples where the oracle reads exactly one object of the class's size, colour and shape
  (``class_colour_shape_accuracy``: size not counted; ``class_one_object``: exactly one object);
* ``layout_box_iou50``: the layout model (:class:`~lab.shapes.tasks.LayoutTokenEncoder`), a held-out scene's
  objects as labelled boxes in: the fraction of requested boxes the oracle finds drawn, an object of the box's
  colour and shape whose box has IoU >= 0.5 with it (each detection used once); ``layout_mean_iou``: the mean
  of those best IoUs (0 where none); ``layout_scene_exact``: every box found and nothing else drawn;
* ``weights_mb``: every bundled weight file, in MB.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..errors import ModelNotFound
from . import world
from .evaluator import evaluate
from .tasks import CLASSES, SEG_CLASSES, TASKS, box_masks, check_task, class_name, low_res, segmap_onehot

GROW = 3  # px the masked object's box is grown by
EVAL_TASKS = TASKS
UNCOND_TWO_SHARE = 0.75  # the bundled text model's training mix (round 4: --two-share 0.75)
# unconditional samples as LDM's scripts/sample_diffusion.py draws them: DDIM with eta = 1 (ancestral, DDPM's
# posterior variance) over 50 steps. Deterministic DDIM (eta = 0) from this schedule, whose last step still keeps
# some signal (non-zero terminal SNR), drifts toward the mean image: mid-gray backgrounds; the eval measures that
# too (``uncond_eta0_*``).
UNCOND_STEPS, UNCOND_ETA = 50, 1.0


def inpaint_case(seed: int, index: int) -> dict:
    """One inpainting case: ``image`` (the held-out scene), ``mask`` ``[H, W]`` bool, ``caption`` (the scene
    with object ``index % n`` replaced by another shape and colour of the same size, where it was)."""
    import torch
    ex = world.make_example(seed, index, split="heldout")
    scene = ex["scene"]
    rng = np.random.default_rng([seed, index, 7])
    k = index % len(scene.objects)
    old = scene.objects[k]
    shape = str(rng.choice([s for s in world.SHAPES if s != old.shape]))
    colour = str(rng.choice([c for c in world.COLOURS if c != old.colour]))
    new = world.ShapeObject(shape, colour, old.size, old.cx, old.cy)
    objects = tuple(new if j == k else o for j, o in enumerate(scene.objects))
    x0, y0, x1, y1 = old.bbox
    box = torch.tensor([[x0 - GROW, y0 - GROW, x1 + GROW, y1 + GROW]])
    mask = box_masks(box)[0, 0].numpy() > 0.5
    return {"image": ex["image"], "mask": mask, "caption": world.Scene.make_caption(objects, scene.background),
            "box": (x0, y0, x1, y1), "new": (new.size, new.colour, new.shape)}


def inpaint_eval(pipe, n: int, *, steps: int = 30, guidance: float = 5.0, seed: int = 0, chunk: int = 50,
                 case_seed: int = 400, guides=()) -> dict:
    """``inpaint_fidelity`` and ``inpaint_outside_psnr_db`` (module docstring) of an inpainting ``pipe`` on the
    held-out cases of ``case_seed`` (the eval's: 400), sampled with ``guides`` (e.g. :class:`lab.SyntaxBinding`)."""
    import cv2
    from PIL import Image
    cases = [inpaint_case(case_seed, i) for i in range(n)]
    samples = []
    for a in range(0, n, chunk):
        part = cases[a:a + chunk]
        run = pipe.sampler([c["caption"] for c in part], image=[Image.fromarray(c["image"]) for c in part],
                           mask_image=[Image.fromarray(c["mask"].astype(np.uint8) * 255) for c in part],
                           steps=steps, guidance=guidance, scheduler="ddim", seed=seed + a, progress=False,
                           guides=guides).run()
        samples += [np.asarray(im) for im in run.images]
    ok, psnr = [], []
    for c, im in zip(cases, samples):
        r = evaluate(im, c["caption"])
        inside = any(d.key == c["new"] and c["mask"][(d.bbox[1] + d.bbox[3]) // 2, (d.bbox[0] + d.bbox[2]) // 2]
                     for d in r["objects"])
        ok.append(bool(r["all_ok"] and r["background_ok"] and inside))
        outside = ~cv2.dilate(c["mask"].astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        psnr.append(_psnr(im[outside], c["image"][outside]))
    return {"inpaint_fidelity": float(np.mean(ok)), "inpaint_outside_psnr_db": float(np.mean(psnr))}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean(((a.astype(np.float64) - b.astype(np.float64)) / 255.0) ** 2)
    return float(10 * np.log10(1.0 / max(mse, 1e-10)))


def sr_eval(pipe, n: int, *, steps: int = 30, guidance: float = 5.0, seed: int = 0, noise_level: int = 20,
            chunk: int = 50) -> dict:
    """The ``sr_*`` keys (module docstring) of an upscaler ``pipe``."""
    import torch
    from PIL import Image
    exs = [world.make_example(500, i, split="heldout") for i in range(n)]
    low = low_res(torch.from_numpy(np.stack([e["image"] for e in exs])))
    low_u8 = ((low + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    lows = [Image.fromarray(a) for a in low_u8]
    samples = []
    for a in range(0, n, chunk):
        run = pipe.sampler([e["caption"] for e in exs[a:a + chunk]], image=lows[a:a + chunk], noise_level=noise_level,
                           steps=steps, guidance=guidance, scheduler="ddim", seed=seed + a, progress=False).run()
        samples += [np.asarray(im) for im in run.images]
    size = exs[0]["image"].shape[1]
    bicubic = [np.asarray(im.resize((size, size), Image.BICUBIC)) for im in lows]
    res = {"sr_psnr_db": float(np.mean([_psnr(s, e["image"]) for s, e in zip(samples, exs)])),
           "sr_bicubic_psnr_db": float(np.mean([_psnr(b, e["image"]) for b, e in zip(bicubic, exs)])),
           "sr_fidelity": float(np.mean([evaluate(s, e["caption"])["all_ok"] for s, e in zip(samples, exs)])),
           "sr_fidelity_bicubic": float(np.mean([evaluate(b, e["caption"])["all_ok"] for b, e in zip(bicubic, exs)])),
           "sr_noise_level": noise_level}
    res["sr_gain_over_bicubic_db"] = res["sr_psnr_db"] - res["sr_bicubic_psnr_db"]
    return res


def segmap_eval(pipe, n: int, *, steps: int = 30, guidance: float = 5.0, seed: int = 0, chunk: int = 50) -> dict:
    """The ``segmap_*`` keys (module docstring) of a semantic-map ``pipe``."""
    from ..conditioning import SemanticMap
    exs = [world.make_example(600, i, split="heldout") for i in range(n)]
    samples = []
    for a in range(0, n, chunk):
        part = exs[a:a + chunk]
        maps = segmap_onehot(np.stack([e["segmentation"] for e in part]))
        run = pipe.sampler([e["caption"] for e in part], conditioning=[SemanticMap(maps)], steps=steps,
                           guidance=guidance, scheduler="ddim", seed=seed + a, progress=False).run()
        samples += [np.asarray(im) for im in run.images]
    inter, union = np.zeros(len(SEG_CLASSES)), np.zeros(len(SEG_CLASSES))
    ok = []
    for e, im in zip(exs, samples):
        r = evaluate(im, e["caption"])
        ok.append(bool(r["all_ok"] and r["background_ok"]))
        pred = np.zeros(im.shape[:2], np.int64)  # background
        for d in r["objects"]:
            pred[d.mask] = SEG_CLASSES.index(d.shape)
        want = segmap_onehot(e["segmentation"])[0].argmax(0).numpy()
        for c in range(len(SEG_CLASSES)):
            inter[c] += np.logical_and(pred == c, want == c).sum()
            union[c] += np.logical_or(pred == c, want == c).sum()
    iou = inter / np.maximum(union, 1)
    return {"segmap_miou": float(iou[1:].mean()), "segmap_miou_with_background": float(iou.mean()),
            "segmap_iou_per_class": {c: float(v) for c, v in zip(SEG_CLASSES, iou)},
            "segmap_fidelity": float(np.mean(ok))}


def class_eval(pipe, n: int, *, steps: int = 30, guidance: float = 5.0, seed: int = 0, chunk: int = 50) -> dict:
    """The ``class_*`` keys (module docstring) of a class ``pipe``: the classes in turn, ``n`` samples."""
    labels = [i % len(CLASSES) for i in range(n)]
    samples = []
    for a in range(0, n, chunk):
        run = pipe.sampler(class_labels=labels[a:a + chunk], steps=steps, guidance=guidance, scheduler="ddim",
                           seed=seed + a, progress=False).run()
        samples += [np.asarray(im) for im in run.images]
    rs = [evaluate(im, f"a {class_name(v)}") for v, im in zip(labels, samples)]
    return {"class_accuracy": float(np.mean([r["all_ok"] for r in rs])),
            "class_colour_shape_accuracy": float(np.mean([r["shape_ok"] and r["n_detected"] == 1 for r in rs])),
            "class_one_object": float(np.mean([r["n_detected"] == 1 for r in rs]))}


def box_iou(a, b) -> float:
    """IoU of two boxes ``(x0, y0, x1, y1)``."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def layout_case(seed: int, index: int) -> list:
    """A held-out scene's layout: ``[(label, (x0, y0, x1, y1)), ...]``, labels ``"red circle"``."""
    scene = world.make_example(seed, index, split="heldout")["scene"]
    return [(f"{o.colour} {o.shape}", tuple(float(v) for v in o.bbox)) for o in scene.objects]


def layout_eval(pipe, n: int, *, steps: int = 30, guidance: float = 5.0, seed: int = 0, chunk: int = 50) -> dict:
    """The ``layout_*`` keys (module docstring) of a layout ``pipe``."""
    from ..conditioning import Layout
    from .evaluator import detect
    cases = [layout_case(800, i) for i in range(n)]
    samples = []
    for a in range(0, n, chunk):
        run = pipe.sampler(conditioning=[Layout(cases[a:a + chunk])], steps=steps, guidance=guidance,
                           scheduler="ddim", seed=seed + a, progress=False).run()
        samples += [np.asarray(im) for im in run.images]
    hits, ious, exact = [], [], []
    for lay, im in zip(cases, samples):
        _, dets, _ = detect(im)
        free = list(dets)
        for label, box in lay:  # each requested box: the best unused detection of its label
            cands = [(box_iou(box, d.bbox), k) for k, d in enumerate(free) if f"{d.colour} {d.shape}" == label]
            best, k = max(cands, default=(0.0, None))
            hits.append(best >= 0.5)
            ious.append(best)
            if k is not None:
                free.pop(k)
        exact.append(len(dets) == len(lay) and all(hits[-len(lay):]))
    return {"layout_box_iou50": float(np.mean(hits)), "layout_mean_iou": float(np.mean(ious)),
            "layout_scene_exact": float(np.mean(exact))}


UNCOND_ATTRIBUTES = ("count", "shape", "colour", "size", "background")


def attribute_histograms(images) -> dict[str, dict[str, float]]:
    """What the oracle reads in ``images``: for each of :data:`UNCOND_ATTRIBUTES` the share of each value
    (``count``: objects per image, 3 and more together; shape, colour, size: over all detected objects;
    background: per image)."""
    from collections import Counter

    from .evaluator import detect
    counts = {a: Counter() for a in UNCOND_ATTRIBUTES}
    for im in images:
        bg, dets, _ = detect(np.asarray(im))
        counts["count"][str(min(len(dets), 3))] += 1
        counts["background"][bg] += 1
        for d in dets:
            size, colour, shape = d.key
            counts["size"][size] += 1
            counts["colour"][colour] += 1
            counts["shape"][shape] += 1
    return {a: {k: v / max(sum(c.values()), 1) for k, v in sorted(c.items())} for a, c in counts.items()}


def total_variation(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def uncond_eval(pipe, n: int, *, steps: int = UNCOND_STEPS, eta: float = UNCOND_ETA, seed: int = 0,
                two_share: float = UNCOND_TWO_SHARE, n_world: int = 2000, chunk: int = 50) -> dict:
    """The ``uncond_*`` keys (module docstring): ``n`` samples of ``pipe`` with the empty caption and no guidance
    (DDIM, ``steps``, ``eta``) against ``n_world`` scenes of the world the model was trained on (``two_share``
    two-object scenes)."""
    samples = []
    for a in range(0, n, chunk):
        run = pipe.sampler([""] * min(chunk, n - a), steps=steps, guidance=1.0, scheduler="ddim", eta=eta,
                           seed=seed + a, progress=False).run()
        samples += [np.asarray(im) for im in run.images]
    got = attribute_histograms(samples)
    want = attribute_histograms(world.make_example(700, i, two_share=two_share)["image"] for i in range(n_world))
    tv = {a: total_variation(got[a], want[a]) for a in UNCOND_ATTRIBUTES}
    return {"uncond_attribute_tv": float(np.mean(list(tv.values()))), "uncond_attribute_tv_max": max(tv.values()),
            "uncond_tv_per_attribute": tv, "uncond_histograms": got, "uncond_world_histograms": want,
            "uncond_world_two_share": two_share, "uncond_sampler": {"scheduler": "ddim", "steps": steps, "eta": eta}}


def weights_mb(root: Path | None = None) -> float:
    """Every weight file of the bundled models (``*.safetensors`` under ``lab/models``), in MB."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1] / "models"
    return round(sum(f.stat().st_size for f in root.rglob("*.safetensors")) / 1e6, 2)


def run_task_eval(n: int = 200, *, tasks=EVAL_TASKS, steps: int = 30, guidance: float = 5.0, seed: int = 0,
                  model="shapes", json_path=None, progress=print, n_world: int = 2000) -> dict:
    """The keys of the module docstring for ``tasks`` of ``model`` (the bundled ``"shapes"`` or a pipeline
    directory with ``unet-TASK`` subfolders); ``n_world`` world scenes make the unconditional row's reference."""
    import lab
    t0 = time.time()
    res: dict = {"model": str(model), "n": n, "steps": steps, "guidance": guidance, "scheduler": "ddim",
                 "seed": seed, "tasks": list(tasks)}
    for task in tasks:
        t = time.time()
        if task == "uncond":
            # the text model's empty caption, and the unconditional model fine-tuned from it where there is one
            pipe = lab.load(model)
            text_branch = uncond_eval(pipe, n, seed=seed, n_world=n_world)
            res.update({k.replace("uncond_", "uncond_text_", 1): v for k, v in text_branch.items()})
            try:
                pipe = lab.load(model, task="uncond")
                res.update(uncond_eval(pipe, n, seed=seed, n_world=n_world), uncond_model="unet-uncond")
            except ModelNotFound:  # the text model's empty caption is the unconditional model
                res.update(text_branch, uncond_model="the text model's empty caption")
            # deterministic DDIM over the eval's steps, as the other tasks sample
            eta0 = uncond_eval(pipe, n, steps=steps, eta=0.0, seed=seed, n_world=n_world)
            res.update({k.replace("uncond_", "uncond_eta0_", 1): v for k, v in eta0.items() if "world" not in k})
        else:
            check_task(task)
            pipe = lab.load(model, task=task)
        if task == "class":
            res.update(class_eval(pipe, n, steps=steps, guidance=guidance, seed=seed))
        elif task == "layout":
            res.update(layout_eval(pipe, n, steps=steps, guidance=guidance, seed=seed))
        elif task == "inpaint":
            res.update(inpaint_eval(pipe, n, steps=steps, guidance=guidance, seed=seed))
        elif task == "sr":
            res.update(sr_eval(pipe, n, steps=steps, guidance=guidance, seed=seed))
        elif task == "segmap":
            res.update(segmap_eval(pipe, n, steps=steps, guidance=guidance, seed=seed))
        res[f"{task}_eval_seconds"] = round(time.time() - t, 1)
        progress(", ".join(f"{k} {v:.3f}" for k, v in res.items() if k.startswith(task) and isinstance(v, float)))
    res["weights_mb"] = weights_mb()
    res["eval_seconds"] = round(time.time() - t0, 1)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(res, indent=2))
    return res
