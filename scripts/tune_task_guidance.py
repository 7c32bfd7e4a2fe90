"""Guidance scale of the class and inpainting models, chosen without the eval's cases or seeds.

    python scripts/tune_task_guidance.py class:3,5,7.5 inpaint:3,5,7.5 inpaint-sb:5 --n 200 --json runs/tune-tasks.json

``class``: the classes in turn, sampled at seed 1000 (the eval: 0); ``inpaint``: the held-out cases of seed 401
(the eval: 400), sampled at seed 1000; ``inpaint-sb``: the same with :class:`lab.SyntaxBinding` on the shape
words at the text model's step (``lab.shapes.evaluate.SYNTAX_BINDING_STEP``). 30 DDIM steps; the keys are the
eval's (``lab.shapes.evaluate_tasks``).
"""
from __future__ import annotations

import argparse
import json
import time

import lab
from lab.shapes import world
from lab.shapes.evaluate import SYNTAX_BINDING_STEP
from lab.shapes.evaluate_tasks import class_eval, inpaint_eval

SEED = 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("settings", nargs="+", help="TASK:G1,G2,... with TASK class or inpaint")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = {}
    for setting in args.settings:
        task, _, scales = setting.partition(":")
        if task not in ("class", "inpaint", "inpaint-sb") or not scales:
            raise SystemExit(f"expected class:G,..., inpaint:G,... or inpaint-sb:G,..., got {setting!r}")
        pipe = lab.load("shapes", task=task.removesuffix("-sb"))
        guides = [lab.SyntaxBinding(list(world.SHAPES), step_size=SYNTAX_BINDING_STEP)] if task == "inpaint-sb" else []
        for g in (float(v) for v in scales.split(",")):
            t = time.time()
            if task == "class":
                r = class_eval(pipe, args.n, guidance=g, seed=SEED)
            else:
                r = inpaint_eval(pipe, args.n, guidance=g, seed=SEED, case_seed=401, guides=guides)
            res[f"{task}:{g}"] = {**r, "seconds": round(time.time() - t, 1)}
            print(f"{task}:{g}", json.dumps(res[f"{task}:{g}"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "seed": SEED, **res}, f, indent=1)


if __name__ == "__main__":
    main()
