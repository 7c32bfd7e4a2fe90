"""``python -m lab eval attention``: how well word heat maps find the objects in the shapes world.

For n held-out captions sampled with fixed seeds (cross-attention recorded, head mean, cond half),
the oracle (:mod:`lab.shapes.evaluator`) finds the objects in each generated image; for every noun
of the caption (circle, square, triangle) whose object the oracle found (matched by colour and shape),
the noun's :func:`analysis.word_heatmap` (all layers, all steps), min-max normalised and thresholded at
0.4 as DAAM does (:func:`analysis.heatmap_iou`), is compared with that object's mask. ``noun_miou`` is
the mean IoU over those (caption, noun) pairs; ``coverage`` the fraction of nouns whose object was found.
The same for colour words (``colour_miou``), and a reference: the IoU a map would get that lights up
every object (``all_objects_miou``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .attention import heatmap_iou, word_heatmap


def attention_eval(n: int = 100, *, steps: int = 30, guidance: float = 5.0, seed: int = 0, threshold: float = 0.4,
                   json_path=None, chunk: int = 25, progress=print, model="shapes") -> dict:
    import lab
    from lab.shapes import evaluator, world
    t0 = time.time()
    pipe = lab.load(model)
    exs = [world.make_example(300, i, split="heldout") for i in range(n)]
    noun_ious, colour_ious, all_ious, found, total = [], [], [], 0, 0
    for a in range(0, n, chunk):
        caps = [e["caption"] for e in exs[a:a + chunk]]
        rec = lab.AttentionRecorder()
        run = pipe.sampler(caps, steps=steps, guidance=guidance, scheduler="ddim", seed=seed + a, recorders=[rec],
                           progress=False).run()
        for b, cap in enumerate(caps):
            image = np.asarray(run.images[b])
            _, dets, fg = evaluator.detect(image)
            want, _ = evaluator.parse_caption(cap)
            for size, colour, shape in want:
                total += 1
                hits = [d for d in dets if d.colour == colour and d.shape == shape]
                if not hits:
                    continue
                found += 1
                mask = np.logical_or.reduce([d.mask for d in hits])
                same_shape = np.logical_or.reduce([d.mask for d in dets if d.shape == shape])
                same_colour = np.logical_or.reduce([d.mask for d in dets if d.colour == colour])
                noun_ious.append(heatmap_iou(word_heatmap(run, shape, batch=b), same_shape, threshold))
                colour_ious.append(heatmap_iou(word_heatmap(run, colour, batch=b), same_colour, threshold))
                all_ious.append(heatmap_iou(fg.astype(np.float32), mask, threshold))
        progress(f"{min(a + chunk, n)}/{n}: noun mIoU so far {np.mean(noun_ious) if noun_ious else float('nan'):.3f}")
    res = {"model": str(model), "n": n, "nouns_evaluated": len(noun_ious), "coverage": found / max(1, total),
           "noun_miou": float(np.mean(noun_ious)) if noun_ious else None,
           "colour_miou": float(np.mean(colour_ious)) if colour_ious else None,
           "all_objects_miou": float(np.mean(all_ious)) if all_ious else None,
           "threshold": threshold, "steps": steps, "guidance": guidance, "seconds": round(time.time() - t0, 1)}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(res, indent=2))
    return res
