"""Core measurements: equivalence with diffusers per scheduler, preview speed, sampling speed.

    python benchmarks/core.py [--json PATH]

Equivalence: the lab sampler vs diffusers' pipelines on identical tiny random components (the same as
tests/test_equivalence.py), max |lab - diffusers| of the final latents, fp32, CPU.
Preview: ``PreviewMap`` on a 4x16x16 (shapes) and a 4x64x64 (SD 1.5 at 512 px) latent, median of 200.
Sampling: the shapes model, one 64x64 image, 50 DDIM steps with CFG, median of 3; ``--compiled``: also after
``Pipeline.compile()`` (torch.compile, inductor), its first (compiling) run timed apart.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from _report import emit  # benchmarks/ is on sys.path when a benchmark runs as a script

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def equivalence() -> dict:
    from components import PROMPT, tiny_sd_components, tiny_sdxl_components
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    import lab
    from lab.schedulers import make_scheduler
    out = {}
    for pred in ("epsilon", "v_prediction"):
        for name in ("ddpm", "ddim", "euler", "euler_a", "dpm++2m", "pndm"):
            comps = tiny_sd_components(pred)
            run = lab.Pipeline.from_components(**comps).sampler(PROMPT, steps=6, guidance=6.0, scheduler=name, seed=3,
                                                                 height=32, width=32, progress=False).run()
            ref = StableDiffusionPipeline(**{**comps, "scheduler": make_scheduler(name, comps["scheduler"].config)},
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            ref.set_progress_bar_config(disable=True)
            want = ref(PROMPT, num_inference_steps=6, guidance_scale=6.0, height=32, width=32, output_type="latent",
                       generator=torch.Generator().manual_seed(3)).images
            out[f"sd/{pred}/{name}"] = (run.final_latents - want).abs().max().item()
    comps = tiny_sdxl_components()
    for name in ("euler", "ddim"):
        run = lab.Pipeline.from_components(**comps).sampler(PROMPT, steps=6, guidance=5.0, scheduler=name, seed=2,
                                                             height=32, width=32, progress=False).run()
        ref = StableDiffusionXLPipeline(**{**comps, "scheduler": make_scheduler(name, comps["scheduler"].config)})
        ref.set_progress_bar_config(disable=True)
        want = ref(PROMPT, num_inference_steps=6, guidance_scale=5.0, height=32, width=32, output_type="latent",
                   generator=torch.Generator().manual_seed(2)).images
        out[f"sdxl/{name}"] = (run.final_latents - want).abs().max().item()
    out.update(_equivalence_inpaint_and_controlnet())
    return out


def _equivalence_inpaint_and_controlnet() -> dict:
    """SD's inpainting layout (concat conditioning) and ControlNet (balanced with a window, guess mode)."""
    import numpy as np
    from components import PROMPT, controlnet, tiny_sd_components
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionInpaintPipeline
    from PIL import Image

    import lab
    from lab.schedulers import make_scheduler
    out = {}
    comps = tiny_sd_components(in_channels=9)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    m = np.zeros((32, 32), np.uint8)
    m[8:24, 8:24] = 255
    run = lab.Pipeline.from_components(**comps).sampler(PROMPT, steps=6, guidance=4.0, scheduler="ddim", seed=5,
                                                         height=32, width=32, image=image,
                                                         mask_image=Image.fromarray(m), progress=False).run()
    ref = StableDiffusionInpaintPipeline(**{**comps, "scheduler": make_scheduler("ddim", comps["scheduler"].config)},
                                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    want = ref(PROMPT, image=image, mask_image=Image.fromarray(m), num_inference_steps=6, guidance_scale=4.0, height=32,
               width=32, output_type="latent", generator=torch.Generator().manual_seed(5)).images
    out["inpaint/ddim"] = (run.final_latents - want).abs().max().item()
    comps = tiny_sd_components()
    net = controlnet(comps["unet"])
    cond = np.zeros((32, 32, 3), np.uint8)
    cond[6:26, 6:9] = 255
    cond = Image.fromarray(cond)
    pipe = lab.Pipeline.from_components(**comps, controlnets={"scribble": net})
    ref = StableDiffusionControlNetPipeline(
        **{**comps, "scheduler": make_scheduler("dpm++2m", comps["scheduler"].config)}, controlnet=net,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    for key, ctl, extra in (("controlnet/window", lab.Control("scribble", cond, scale=0.6, start=0.2, end=0.7),
                             dict(controlnet_conditioning_scale=0.6, control_guidance_start=0.2, control_guidance_end=0.7)),
                            ("controlnet/guess_mode", lab.Control("scribble", cond, scale=0.8, mode="control"),
                             dict(controlnet_conditioning_scale=0.8, guess_mode=True))):
        run = pipe.sampler(PROMPT, steps=6, guidance=5.0, scheduler="dpm++2m", seed=4, height=32, width=32,
                           control=ctl, progress=False).run()
        want = ref(PROMPT, image=cond, num_inference_steps=6, guidance_scale=5.0, height=32, width=32,
                   output_type="latent", generator=torch.Generator().manual_seed(4), **extra).images
        out[key] = (run.final_latents - want).abs().max().item()
    return out


def preview_ms() -> dict:
    import lab
    pm = lab.load("shapes").preview_map
    res = {}
    for name, shape in (("4x16x16", (4, 16, 16)), ("4x64x64", (4, 64, 64))):
        z = torch.randn(shape)
        ts = []
        for _ in range(200):
            t = time.perf_counter()
            pm(z)
            ts.append(time.perf_counter() - t)
        res[name] = statistics.median(ts) * 1000
    res["r2"] = pm.r2
    return res


def sample_seconds(compiled: bool = False) -> dict:
    """The shapes model's 50-step CFG sample (median of 3); ``compiled``: again after ``Pipeline.compile()``
    (torch.compile's inductor; the first compiled run, which compiles, is timed on its own)."""
    import lab
    pipe = lab.load("shapes")

    def one() -> float:
        t = time.perf_counter()
        pipe.sampler("a large red circle on a gray background", steps=50, guidance=5.0, scheduler="ddim", seed=0,
                     progress=False).run().image
        return time.perf_counter() - t

    res = {"shapes_sample_seconds_50_steps": statistics.median(one() for _ in range(3))}
    if compiled:
        pipe.compile()
        res["shapes_compile_first_run_seconds"] = one()
        res["shapes_sample_seconds_50_steps_compiled"] = statistics.median(one() for _ in range(3))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--compiled", action="store_true", help="also time sampling after Pipeline.compile()")
    ap.add_argument("--only-speed", action="store_true", help="sampling speed only (no equivalence, no preview)")
    args = ap.parse_args()
    res = {"torch_threads": torch.get_num_threads()}
    if not args.only_speed:
        res.update(equivalence_max_abs_diff=equivalence(), preview_ms=preview_ms())
    res.update(sample_seconds(args.compiled))
    emit(res, args.json)


if __name__ == "__main__":
    main()
