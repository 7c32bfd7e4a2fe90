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
* ``weights_mb``: every bundled weight file, in MB.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import world
from .evaluator import evaluate
from .tasks import SEG_CLASSES, TASKS, box_masks, check_task, low_res, segmap_onehot

GROW = 3  # px the masked object's box is grown by


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


def inpaint_eval(pipe, n: int, *, steps: int = 30, guidance: float = 5.0, seed: int = 0, chunk: int = 50) -> dict:
    """``inpaint_fidelity`` and ``inpaint_outside_psnr_db`` (module docstring) of an inpainting ``pipe``."""
    import cv2
    from PIL import Image
    cases = [inpaint_case(400, i) for i in range(n)]
    samples = []
    for a in range(0, n, chunk):
        part = cases[a:a + chunk]
        run = pipe.sampler([c["caption"] for c in part], image=[Image.fromarray(c["image"]) for c in part],
                           mask_image=[Image.fromarray(c["mask"].astype(np.uint8) * 255) for c in part],
                           steps=steps, guidance=guidance, scheduler="ddim", seed=seed + a, progress=False).run()
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


def weights_mb(root: Path | None = None) -> float:
    """Every weight file of the bundled models (``*.safetensors`` under ``lab/models``), in MB."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1] / "models"
    return round(sum(f.stat().st_size for f in root.rglob("*.safetensors")) / 1e6, 2)


def run_task_eval(n: int = 200, *, tasks=TASKS, steps: int = 30, guidance: float = 5.0, seed: int = 0,
                  model="shapes", json_path=None, progress=print) -> dict:
    """The keys of the module docstring for ``tasks`` of ``model`` (the bundled ``"shapes"`` or a pipeline
    directory with ``unet-TASK`` subfolders)."""
    import lab
    t0 = time.time()
    res: dict = {"model": str(model), "n": n, "steps": steps, "guidance": guidance, "scheduler": "ddim",
                 "seed": seed, "tasks": list(tasks)}
    for task in tasks:
        check_task(task)
        t = time.time()
        pipe = lab.load(model, task=task)
        if task == "inpaint":
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
