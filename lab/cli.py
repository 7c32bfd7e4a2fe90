"""``python -m lab`` (and the ``latent-lab`` console command): info, sample, train here; the layers above add
their commands (``demo`` and ``eval`` come from :mod:`analysis.commands`).

``lab`` never imports the layers above it. A package that adds commands names a function
``register(subparsers)`` under the entry-point group ``latent_lab.commands`` in its packaging metadata
(this project's ``pyproject.toml`` does so for ``analysis``); the parser calls each one it finds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import ModelNotAvailable

COMMANDS = "latent_lab.commands"


def _info(args) -> int:
    import platform

    import diffusers
    import torch
    import transformers
    import xarray

    import lab
    from lab.loading import BUNDLED, _hf_cache_dir
    print(f"latent-lab {lab.__version__}  python {platform.python_version()}")
    print(f"torch {torch.__version__}  diffusers {diffusers.__version__}  transformers {transformers.__version__}  "
          f"xarray {xarray.__version__}")
    cuda = torch.cuda.is_available()
    print(f"device: {'cuda: ' + torch.cuda.get_device_name() if cuda else 'cpu'} ({torch.get_num_threads()} threads)")
    print("models found:")
    for name, path in BUNDLED.items():
        ok = (path / "model_index.json").exists()
        nets = sorted(p.name.removeprefix("controlnet-") for p in path.glob("controlnet-*"))
        print(f"  {name:<10} bundled  {path}  {'ok' if ok else 'MISSING'}  controlnets: {', '.join(nets) or '-'}")
        tasks = sorted(p.name.removeprefix("unet-") for p in path.glob("unet-*"))
        print(f"  {'':<10} task models (lab.load(..., task=NAME)): {', '.join(tasks) or '-'}")
    cache = Path(_hf_cache_dir())
    repos = sorted(p.name.removeprefix("models--").replace("--", "/") for p in cache.glob("models--*")) if cache.exists() else []
    print(f"  Hugging Face cache {cache}: {', '.join(repos) if repos else 'no models'}")
    return 0


def _condition_from(pipe, kind: str, prompt_seed: int):
    """A condition image of the shapes world for ``kind`` (from scene ``prompt_seed`` of the held-out split);
    other models need ``--control-image``."""
    import numpy as np

    from lab.shapes import world
    ex = world.make_example(prompt_seed, 0, split="heldout")
    if pipe.name != "shapes" or kind not in ex or not isinstance(ex[kind], np.ndarray):
        raise ValueError(f"--control {kind} needs --control-image PATH (a condition image at the model's size, "
                         f"{pipe.default_size}x{pipe.default_size}): only the bundled shapes model makes its own "
                         "conditions")
    return ex[kind]


def _sample(args) -> int:
    import numpy as np
    from PIL import Image

    import lab
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cond = None
    if args.control and args.control_image:  # read before the model loads: a bad path fails at once
        try:
            cond = Image.open(args.control_image)
            cond.load()
        except OSError as e:
            raise ValueError(f"--control-image {args.control_image}: {e}") from e
    pipe = lab.load(args.model, controlnet=args.control or None, device=args.device)
    control = None
    if args.control:
        if cond is None:
            cond = _condition_from(pipe, args.control, args.seed)
            Image.fromarray(cond).save(out / f"condition-{args.control}.png")
        control = lab.Control(args.control, cond, scale=args.control_scale)
    run = pipe.sampler(args.prompt, args.negative, steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
                       seed=args.seed, control=control, progress=not args.quiet).run()
    run.image.save(out / "image.png")
    strip = np.concatenate([run.preview(i) for i in range(len(run))], axis=1)
    zoom = max(1, 64 // strip.shape[0])  # a latent-resolution map preview is scaled up to be seen
    Image.fromarray(strip).resize((strip.shape[1] * zoom, strip.shape[0] * zoom), Image.NEAREST).save(out / "previews.png")
    run.save(out / "run.zarr")
    (out / "settings.json").write_text(json.dumps(run.settings, indent=2, default=str))
    print(f"wrote {out / 'image.png'}, {out / 'previews.png'}, {out / 'run.zarr'} in {time.time() - t0:.1f}s")
    return 0


def _train(args) -> int:
    from .shapes import train
    stage = args.stage
    if args.task is not None:
        stage = ",".join(f"task-{t}" for t in args.task.split(",")) if args.stage == "all" else \
            f"{args.stage},{','.join(f'task-{t}' for t in args.task.split(','))}"
    rows = train.train(stage, args.out, preset=args.preset, device=args.device,
                       export_to=args.export, init=args.init, base=args.base, grounding=args.grounding,
                       seconds=args.seconds, pixel=args.pixel, two_share=args.two_share, drop=args.drop,
                       probe_every=args.probe_every, left_weight=args.left_weight)
    for r in rows:
        print(r)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lab", description="latent-lab command line")
    sub = p.add_subparsers(dest="command", required=True)

    i = sub.add_parser("info", help="versions, device, models found")
    i.set_defaults(func=_info)

    s = sub.add_parser("sample", help="sample one image and save the run")
    s.add_argument("prompt")
    s.add_argument("--negative", default=None)
    s.add_argument("--out", required=True)
    s.add_argument("--model", default="shapes")
    s.add_argument("--control", default=None, help="ControlNet kind of the model (e.g. scribble)")
    s.add_argument("--control-image", default=None, help="condition image (default: a shapes-world condition)")
    s.add_argument("--control-scale", type=float, default=1.0)
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--guidance", type=float, default=5.0)
    s.add_argument("--scheduler", default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_sample)

    t = sub.add_parser("train", help="train the bundled shapes model (resumable)")
    t.add_argument("model", choices=["shapes"])
    t.add_argument("--stage", default="all",
                   help="vae | preview | unet | controlnet-scribble | controlnet-segmentation | controlnet-edges | all, "
                        "or several, comma-separated; stage 1's studies (lab.shapes.stage1, not in all): vq "
                        "(VQGAN f=4), vq-nogan, ae-kl-f2 ... ae-vq-f8 (rate-distortion), diffusion-pixel, "
                        "diffusion-latent (the race)")
    t.add_argument("--task", default=None,
                   help="models of the lecture's task table (lab.shapes.tasks), comma-separated: inpaint, sr, "
                        "segmap (concat), class, layout (tokens by cross-attention), uncond; views (Zero-1-to-3 with a 2D "
                        "camera, lab.shapes.view_model: the warped layout over the inpainting UNet), views-zero123 "
                        "(Zero-1-to-3's own 8-channel layout), views-coords, views-decoder (the view model's decoder "
                        "adapter: a LoRA over the VAE's decoder, on the views' targets); fine-tunes the UNet "
                        "of --base (or of --out) for each; with --stage, after those stages")
    t.add_argument("--out", default="runs/train-shapes", help="working directory (checkpoints, logs)")
    t.add_argument("--preset", default="cpu", choices=["cpu", "gpu", "smoke"])
    t.add_argument("--device", default=None)
    t.add_argument("--init", default="zero", choices=["zero", "gaussian", "base"],
                   help="ControlNet start: a copy of the UNet's encoder with zero convolutions (zero), the same "
                        "with Gaussian ones (gaussian: the ablation), or the --base model's ControlNet (base); "
                        "for --task inpaint, sr, segmap: base starts from the --base model's trained unet-TASK; "
                        "for --task views: base goes on training the --base model's view model")
    t.add_argument("--export", default=None, help="write the fp16 diffusers directory here when done")
    t.add_argument("--base", default=None,
                   help="start from this pipeline directory (e.g. lab/models/shapes): its VAE, text encoder "
                        "and UNet; --stage unet then fine-tunes them, --init base its ControlNets")
    t.add_argument("--grounding", type=float, default=None,
                   help="weight of the token grounding loss on cross-attention (default: the preset's)")
    t.add_argument("--pixel", type=float, default=None,
                   help="weight of the pixel grounding loss (each word's map should cover its region; "
                        "default: the preset's)")
    t.add_argument("--seconds", type=float, default=None, help="wall-clock budget per stage (default: the preset's)")
    t.add_argument("--two-share", type=float, default=None,
                   help="share of two-object scenes in the training set (default 0.5, as the world draws; "
                        "a harder mix for binding: 0.75)")
    t.add_argument("--drop", type=float, default=None,
                   help="ControlNets: share of prompts dropped to \"\" (default 0.5, as the ControlNet paper)")
    t.add_argument("--probe-every", type=int, default=None,
                   help="ControlNets: log the condition IoU of fresh samples (with and without the prompt) every "
                        "N steps, off the clock: training as it happens (default: off)")
    t.add_argument("--left-weight", type=float, default=None,
                   help="--task views: how many times as often a pair with an object that left the target frame "
                        "is drawn (default: lab.shapes.view_model.LEFT_WEIGHT)")
    t.set_defaults(func=_train)
    _add_registered(sub, p)
    return p


def _add_registered(sub, parser) -> None:
    """Commands registered by installed packages (entry-point group ``latent_lab.commands``)."""
    from importlib.metadata import entry_points
    missing = []
    for ep in entry_points(group=COMMANDS):
        try:
            ep.load()(sub)
        except ImportError as e:  # the layer is not installed (or its extra's packages are missing)
            missing.append(f"{ep.name} ({e})")
    if missing:
        parser.epilog = "commands not available: " + "; ".join(missing)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, TypeError, FileExistsError, FileNotFoundError, MemoryError, ModelNotAvailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
