"""Real SD 1.5 / 2.1 / SDXL / ControlNet architectures (shrunk, random weights) through the lab sampler,
checked against diffusers' own pipelines."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lab.architectures import random_pipeline, unet_config


def test_full_size_configs_have_the_published_sizes():
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        n15 = sum(p.numel() for p in UNet2DConditionModel(**unet_config("sd15")).parameters())
        nxl = sum(p.numel() for p in UNet2DConditionModel(**unet_config("sdxl")).parameters())
    assert 855e6 < n15 < 865e6  # SD 1.5 UNet: 859.5 M parameters
    assert 2.5e9 < nxl < 2.6e9  # SDXL base UNet: 2.567 B


@pytest.mark.parametrize("arch,scheduler", [("sd15", "pndm"), ("sd21", "ddim"), ("sdxl", "euler")])
def test_real_architecture_matches_diffusers(arch, scheduler):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from lab.schedulers import make_scheduler
    pipe = random_pipeline(arch, width=10 if arch != "sdxl" else 20, max_depth=1, layers=2)
    size = 64
    run = pipe.sampler("a red circle", "blue", steps=3, guidance=6.0, scheduler=scheduler, seed=0, height=size,
                       width=size, progress=False).run()
    comps = dict(pipe.components)
    comps["scheduler"] = make_scheduler(scheduler, pipe.scheduler.config)
    if arch == "sdxl":
        ref = StableDiffusionXLPipeline(**comps)
    else:
        ref = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    want = ref("a red circle", negative_prompt="blue", num_inference_steps=3, guidance_scale=6.0, height=size,
               width=size, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert run.final_latents.shape == (1, 4, size // 8, size // 8)
    assert (run.final_latents - want).abs().max().item() < 1e-4
    if arch == "sd21":
        assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_controlnet_for_sd15_architecture():
    import lab
    pipe = random_pipeline("sd15", width=10, max_depth=1, layers=2, controlnet=True)
    net = pipe.controlnets["controlnet"]
    assert len(net.controlnet_down_blocks) == 12  # the 12 encoder residuals + middle block of SD 1.5
    cond = np.zeros((64, 64, 3), np.uint8)
    cond[10:50, 30:34] = 255
    run = pipe.sampler("a red circle", steps=2, guidance=5.0, seed=0, height=64, width=64,
                       control=lab.Control("controlnet", cond), progress=False).run()
    assert torch.isfinite(run.final_latents).all()
