"""A grid to look at: one row per two-object caption category, samples with the oracle's verdict.

    python scripts/shapes_grid.py --out grid.png [--model DIR] [--per 6] [--attend-and-excite]

Each cell is one held-out caption of its row's category (``lab.shapes.evaluate.category_captions``), sampled
as the eval samples (DDIM, 30 steps, guidance 5); its title is the oracle's verdict: ``ok``, ``dup`` (one object
drawn twice) or what it detected instead.
"""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import lab  # noqa: E402
from lab.shapes import evaluator, world  # noqa: E402
from lab.shapes.evaluate import CATEGORIES, category_captions, is_duplicate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--per", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attend-and-excite", action="store_true")
    args = ap.parse_args()
    pipe = lab.load(args.model)
    guides = [lab.AttendAndExcite(list(world.SHAPES))] if args.attend_and_excite else []
    fig, axs = plt.subplots(len(CATEGORIES), args.per, figsize=(1.6 * args.per, 1.75 * len(CATEGORIES)))
    for r, cat in enumerate(CATEGORIES):
        caps = category_captions(cat, args.per)
        run = pipe.sampler(caps, steps=30, guidance=5.0, scheduler="ddim", seed=args.seed, progress=False,
                           guides=guides).run()
        for c, (cap, im) in enumerate(zip(caps, run.images)):
            score = evaluator.evaluate(np.asarray(im), cap)
            verdict = ("ok" if score["all_ok"] else "dup" if is_duplicate(cap, score)
                       else "got " + ", ".join(" ".join(d[1:]) for d in score["detections"]) or "nothing")
            ax = axs[r, c]
            ax.imshow(im)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(verdict, fontsize=5.5, color="green" if score["all_ok"] else "red")
            ax.set_xlabel(cap.replace(" on a ", "\non ").replace(" and ", "\n"), fontsize=4.5)
        axs[r, 0].set_ylabel(cat.replace("+", "\n+"), fontsize=6)
    fig.suptitle(f"{args.model}{' + attend-and-excite' if guides else ''}: held-out captions per category", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
