"""Choose a guide's step size on the shapes model without touching the eval's captions or seeds.

    python scripts/tune_guide_step.py --per 8 plain sb:0.05 sb:0.1 sb:0.2 sb:0.5 ae:20 --json runs/tune.json

Captions: ``per`` of each two-object category whose objects differ (``category_captions(..., seed=7)``; the eval
uses seed 0), sampled at seed 100 (the eval: 0), 30 DDIM steps, guidance 5. Each setting (``plain``,
``sb:STEP`` for :class:`lab.SyntaxBinding`, ``ae:STEP`` for :class:`lab.AttendAndExcite`, on the shape words)
reports the oracle's fidelity, the duplicate rate (:func:`lab.shapes.evaluate.is_duplicate`), fidelity per
category and seconds. ``lab.shapes.evaluate.SYNTAX_BINDING_STEP`` was chosen with it.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

import lab
from lab.shapes import world
from lab.shapes.evaluate import CATEGORIES, _sample_images, category_captions, is_duplicate
from lab.shapes.evaluator import evaluate

GUIDES = {"sb": lab.SyntaxBinding, "ae": lab.AttendAndExcite}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("settings", nargs="+", help="plain, sb:STEP, ae:STEP")
    ap.add_argument("--per", type=int, default=8, help="captions per category")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    pipe = lab.load("shapes")
    cats = [c for c in CATEGORIES if "same_shape+same_colour" not in c]
    caps = [c for cat in cats for c in category_captions(cat, args.per, seed=7)]
    res = {}
    for name in args.settings:
        kind, _, size = name.partition(":")
        if kind != "plain" and kind not in GUIDES:
            raise SystemExit(f"unknown setting {name!r}: plain, sb:STEP or ae:STEP")
        guides = [] if kind == "plain" else [GUIDES[kind](list(world.SHAPES), step_size=float(size))]
        t = time.time()
        imgs = _sample_images(pipe, caps, steps=30, guidance=5.0, seed=100, guides=guides)
        scores = [evaluate(im, c) for im, c in zip(imgs, caps)]
        ok = [s["all_ok"] for s in scores]
        res[name] = {"fidelity": float(np.mean(ok)),
                     "duplicate_rate": float(np.mean([is_duplicate(c, s) for c, s in zip(caps, scores)])),
                     "per_category": {cat: float(np.mean(ok[k * args.per:(k + 1) * args.per]))
                                      for k, cat in enumerate(cats)},
                     "seconds": round(time.time() - t, 1)}
        print(name, json.dumps(res[name]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"captions": len(caps), **res}, f, indent=1)


if __name__ == "__main__":
    main()
