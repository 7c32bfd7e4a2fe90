"""Train the whole shapes model on one GPU inside a device lease, exporting after every stage.

    python scripts/train_shapes_gpu.py --work /tmp/work --out "$OUT"

Writes to --out: ``pipeline.tar`` (the diffusers pipeline directory, fp16), ``controlnet-KIND.tar``
per kind, ``logs.tar`` (loss curves + per-stage summaries), ``metrics.json`` (VAE PSNR on held-out
scenes, stage times) and ``grid.png`` (samples from plain diffusers pipelines loading the export).
Each file lands as soon as its stage ends, so a run cut short still returns what it finished.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from lab.shapes import train, world


def tar_dir(src: Path, dest: Path, arcname: str) -> None:
    tmp = dest.with_suffix(".part")
    with tarfile.open(tmp, "w") as tf:
        tf.add(src, arcname=arcname)
    tmp.rename(dest)


def vae_psnr(vae_dir: Path, device, n: int = 2000) -> float:
    from diffusers import AutoencoderKL

    from lab.shapes.evaluate import vae_psnr as psnr
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float16).to(device).eval()
    return psnr(vae, n, workers=8, batch=500)


def sample_grid(pipe_dir: Path, dest: Path, device) -> None:
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
    from PIL import Image
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, torch_dtype=torch.float16).to(device)
    pipe.set_progress_bar_config(disable=True)
    d = world.generate(8, seed=7, split="heldout")
    caps = d["caption"]
    g = torch.Generator(device).manual_seed(0)
    rows = [np.concatenate(list(d["image"]), 1)]
    out = pipe(caps, num_inference_steps=30, guidance_scale=5.0, generator=g, height=64, width=64,
               output_type="np").images
    rows.append(np.concatenate(list((out * 255).round().astype(np.uint8)), 1))
    for kind in world.CONDITION_KINDS:
        sub = pipe_dir / f"controlnet-{kind}"
        if not sub.exists():
            continue
        cn = ControlNetModel.from_pretrained(sub, torch_dtype=torch.float16)
        cpipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=cn).to(device)
        cpipe.set_progress_bar_config(disable=True)
        conds = [Image.fromarray(c) for c in d[kind]]
        out = cpipe(caps, image=conds, num_inference_steps=30, guidance_scale=5.0, generator=g,
                    height=64, width=64, output_type="np").images
        rows.append(np.concatenate(list(d[kind]), 1))
        rows.append(np.concatenate(list((out * 255).round().astype(np.uint8)), 1))
    Image.fromarray(np.concatenate(rows, 0)).resize((8 * 128, len(rows) * 128), Image.NEAREST).save(dest)
    return caps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/shapes-work")
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="gpu")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for the whole script: stage budgets are rescaled to fit after the data is made")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    metrics = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "preset": args.preset, "stages": {}}

    def dump():
        metrics["total_seconds"] = round(time.time() - t0, 1)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        tar_dir(work / "logs", out / "logs.tar", "logs")

    tr = train.Trainer(work, args.preset, progress=False)
    _ = tr.data
    metrics["data_seconds"] = round(time.time() - t0, 1)
    if args.deadline:
        p = tr.preset
        planned = p.vae_seconds + p.unet_seconds + len(world.CONDITION_KINDS) * p.controlnet_seconds
        left = args.deadline - (time.time() - t0) - 60  # psnr, exports, grid
        f = max(0.2, left / planned)
        tr.preset = dataclasses.replace(p, vae_seconds=p.vae_seconds * f, unet_seconds=p.unet_seconds * f,
                                        controlnet_seconds=p.controlnet_seconds * f)
        metrics["budget_scale"] = round(f, 3)
    metrics["stages"]["vae"] = tr.train_vae()
    metrics["vae_psnr_db_heldout"] = vae_psnr(work / "vae", tr.device)
    dump()
    metrics["stages"]["unet"] = tr.train_unet()
    export = work / "export"
    train.export_pipeline(work, export, kinds=())
    tar_dir(export, out / "pipeline.tar", "shapes")
    dump()
    overlap_tr = None  # the pose and depth nets train on a mix with overlapping objects (train.train's rule)
    for kind in world.CONDITION_KINDS:
        if kind in world.OVERLAP_KINDS and overlap_tr is None:
            overlap_tr = train.Trainer(work, tr.preset, progress=False, overlap_share=tr.preset.overlap_share)
        trainer = overlap_tr if kind in world.OVERLAP_KINDS else tr
        metrics["stages"][f"controlnet-{kind}"] = trainer.train_controlnet(kind)
        from diffusers import ControlNetModel
        half = work / f"fp16-controlnet-{kind}"
        ControlNetModel.from_pretrained(work / f"controlnet-{kind}").to(torch.float16).save_pretrained(half)
        tar_dir(half, out / f"controlnet-{kind}.tar", f"controlnet-{kind}")
        dump()
    train.export_pipeline(work, export)
    try:
        metrics["grid_captions"] = sample_grid(export, out / "grid.png", tr.device)
    except Exception as e:  # the weights are already out; report and go on
        metrics["grid_error"] = repr(e)
    dump()
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
