"""``python -m lab``: info, sample, train, eval."""
from __future__ import annotations

import argparse
import sys


def _train(args) -> int:
    from .shapes import train
    if args.model != "shapes":
        print(f"only the bundled 'shapes' model can be trained here, not {args.model!r}", file=sys.stderr)
        return 2
    rows = train.train(args.stage, args.out, preset=args.preset, device=args.device,
                       export_to=args.export, init=args.init)
    for r in rows:
        print(r)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lab", description="latent-lab command line")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the bundled shapes model (resumable)")
    t.add_argument("model", choices=["shapes"])
    t.add_argument("--stage", default="all",
                   help="vae | unet | controlnet-scribble | controlnet-segmentation | controlnet-edges | all")
    t.add_argument("--out", default="runs/train-shapes", help="working directory (checkpoints, logs)")
    t.add_argument("--preset", default="cpu", choices=["cpu", "gpu", "smoke"])
    t.add_argument("--device", default=None)
    t.add_argument("--init", default="zero", choices=["zero", "gaussian"],
                   help="ControlNet zero-convolution initialisation (gaussian: the ablation)")
    t.add_argument("--export", default=None, help="write the fp16 diffusers directory here when done")
    t.set_defaults(func=_train)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
