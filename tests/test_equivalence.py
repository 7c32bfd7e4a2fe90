"""The lab sampler equals diffusers' own pipelines on identical modules, seed and settings."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from components import PROMPT, controlnet, tiny_sd_components, tiny_sdxl_components

import lab
from lab.schedulers import make_scheduler

TOL = 1e-5
STEPS = 6


def _diffusers_latents(dpipe, **kw):
    dpipe.set_progress_bar_config(disable=True)
    return dpipe(output_type="latent", generator=torch.Generator().manual_seed(kw.pop("seed")), **kw).images


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "euler_a", "dpm++2m", "pndm"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_equivalence_sd(name, prediction_type):
    from diffusers import StableDiffusionPipeline
    comps = tiny_sd_components(prediction_type)
    pipe = lab.Pipeline.from_components(**comps)
    run = pipe.sampler(PROMPT, "a black background", steps=STEPS, guidance=6.0, scheduler=name, seed=3,
                       height=32, width=32, progress=False).run()
    ref = StableDiffusionPipeline(**{**comps, "scheduler": make_scheduler(name, comps["scheduler"].config)},
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    want = _diffusers_latents(ref, prompt=PROMPT, negative_prompt="a black background", num_inference_steps=STEPS,
                              guidance_scale=6.0, seed=3, height=32, width=32)
    diff = (run.final_latents - want).abs().max().item()
    assert run.final_latents.shape == want.shape
    assert diff < TOL, f"{name}/{prediction_type}: max abs diff {diff:.3g}"
    assert len(run) == len(ref.scheduler.timesteps)


def test_equivalence_sd_without_guidance_and_batch():
    from diffusers import StableDiffusionPipeline
    comps = tiny_sd_components()
    pipe = lab.Pipeline.from_components(**comps)
    run = pipe.sampler([PROMPT, "a small green triangle"], steps=4, guidance=1.0, scheduler="euler_a", seed=1,
                       height=32, width=32, batch=2, progress=False).run()
    ref = StableDiffusionPipeline(**{**comps, "scheduler": make_scheduler("euler_a", comps["scheduler"].config)},
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    want = _diffusers_latents(ref, prompt=[PROMPT, "a small green triangle"], num_inference_steps=4, guidance_scale=1.0,
                              seed=1, height=32, width=32, num_images_per_prompt=2)
    assert run.final_latents.shape == (4, 4, 16, 16)
    assert (run.final_latents - want).abs().max().item() < TOL
    assert run.steps[0].noise_pred_uncond is None


@pytest.mark.parametrize("name", ["euler", "ddim"])
def test_equivalence_sdxl(name):
    from diffusers import StableDiffusionXLPipeline
    comps = tiny_sdxl_components()
    pipe = lab.Pipeline.from_components(**comps)
    assert pipe.kind == "sdxl"
    run = pipe.sampler(PROMPT, "a white background", steps=STEPS, guidance=5.0, scheduler=name, seed=2,
                       height=32, width=32, progress=False).run()
    ref = StableDiffusionXLPipeline(**{**comps, "scheduler": make_scheduler(name, comps["scheduler"].config)})
    want = _diffusers_latents(ref, prompt=PROMPT, negative_prompt="a white background", num_inference_steps=STEPS,
                              guidance_scale=5.0, seed=2, height=32, width=32)
    diff = (run.final_latents - want).abs().max().item()
    assert diff < TOL, f"sdxl/{name}: {diff:.3g}"


def test_equivalence_inpaint():
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image
    comps = tiny_sd_components(in_channels=9)
    pipe = lab.Pipeline.from_components(**comps)
    assert pipe.kind == "inpaint"
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    mask = Image.fromarray(mask)
    run = pipe.sampler(PROMPT, steps=STEPS, guidance=4.0, scheduler="ddim", seed=5, height=32, width=32,
                       image=image, mask_image=mask, progress=False).run()
    ref = StableDiffusionInpaintPipeline(**{**comps, "scheduler": make_scheduler("ddim", comps["scheduler"].config)},
                                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    want = _diffusers_latents(ref, prompt=PROMPT, image=image, mask_image=mask, num_inference_steps=STEPS,
                              guidance_scale=4.0, seed=5, height=32, width=32)
    diff = (run.final_latents - want).abs().max().item()
    assert diff < TOL, f"inpaint: {diff:.3g}"


@pytest.mark.parametrize("start,end,scale", [(0.0, 1.0, 1.0), (0.2, 0.7, 0.6)])
def test_equivalence_controlnet(start, end, scale):
    from diffusers import StableDiffusionControlNetPipeline
    from PIL import Image
    comps = tiny_sd_components()
    net = controlnet(comps["unet"])
    pipe = lab.Pipeline.from_components(**comps, controlnets={"scribble": net})
    cond = np.zeros((32, 32, 3), np.uint8)
    cond[6:26, 6:9] = 255
    image = Image.fromarray(cond)
    ctl = lab.Control("scribble", image, scale=scale, start=start, end=end)
    run = pipe.sampler(PROMPT, steps=STEPS, guidance=5.0, scheduler="dpm++2m", seed=4, height=32, width=32,
                       control=ctl, progress=False).run()
    ref = StableDiffusionControlNetPipeline(
        **{**comps, "scheduler": make_scheduler("dpm++2m", comps["scheduler"].config)}, controlnet=net,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    want = _diffusers_latents(ref, prompt=PROMPT, image=image, num_inference_steps=STEPS, guidance_scale=5.0, seed=4,
                              height=32, width=32, controlnet_conditioning_scale=scale,
                              control_guidance_start=start, control_guidance_end=end)
    diff = (run.final_latents - want).abs().max().item()
    assert diff < TOL, f"controlnet: {diff:.3g}"
    # and the control really acts: without it the result differs
    plain = pipe.sampler(PROMPT, steps=STEPS, guidance=5.0, scheduler="dpm++2m", seed=4, height=32, width=32,
                         progress=False).run()
    assert (plain.final_latents - run.final_latents).abs().max().item() > 1e-3


# ---------------------------------------------------------------------------- parity (issue 17, part 3)
def test_equivalence_guidance_rescale():
    """guidance_rescale (Lin et al. 2023, for zero-SNR / v-prediction models) as StableDiffusionPipeline does."""
    from diffusers import StableDiffusionPipeline
    comps = tiny_sd_components("v_prediction")
    pipe = lab.Pipeline.from_components(**comps)
    kw = dict(steps=STEPS, guidance=6.0, scheduler="ddim", seed=3, height=32, width=32, progress=False)
    run = pipe.sampler(PROMPT, guidance_rescale=0.7, **kw).run()
    ref = StableDiffusionPipeline(**{**comps, "scheduler": make_scheduler("ddim", comps["scheduler"].config)},
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    want = _diffusers_latents(ref, prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=6.0, guidance_rescale=0.7,
                              seed=3, height=32, width=32)
    assert (run.final_latents - want).abs().max().item() < TOL
    plain = pipe.sampler(PROMPT, **kw).run()
    assert (plain.final_latents - run.final_latents).abs().max().item() > 1e-3
    assert run.settings["guidance_rescale"] == 0.7
    with pytest.raises(ValueError, match="guidance_rescale"):
        pipe.sampler(PROMPT, guidance_rescale=1.5, **kw)


def test_equivalence_sdxl_micro_conditioning():
    """SDXL's size and crop conditioning (original_size, crops_coords_top_left, target_size and the negative
    ones) enter the time ids as StableDiffusionXLPipeline makes them."""
    from diffusers import StableDiffusionXLPipeline
    comps = tiny_sdxl_components()
    pipe = lab.Pipeline.from_components(**comps)
    micro = dict(original_size=(128, 96), crops_coords_top_left=(8, 4), target_size=(32, 32),
                 negative_original_size=(16, 16), negative_crops_coords_top_left=(0, 2), negative_target_size=(32, 32))
    kw = dict(guidance=5.0, seed=2, height=32, width=32)
    run = pipe.sampler(PROMPT, steps=STEPS, scheduler="euler", progress=False, **kw, **micro).run()
    ref = StableDiffusionXLPipeline(**{**comps, "scheduler": make_scheduler("euler", comps["scheduler"].config)})
    want = _diffusers_latents(ref, prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, seed=2, height=32,
                              width=32, **micro)
    assert (run.final_latents - want).abs().max().item() < TOL
    plain = pipe.sampler(PROMPT, steps=STEPS, scheduler="euler", progress=False, **kw).run()
    assert (plain.final_latents - run.final_latents).abs().max().item() > 1e-4
    assert run.settings["conditioning"][0]["crops_coords_top_left"] == [8, 4] or \
        run.settings["conditioning"][0]["crops_coords_top_left"] == (8, 4)
    with pytest.raises(ValueError, match="pair"):
        pipe.sampler(PROMPT, steps=2, original_size=(64,), progress=False)
    with pytest.raises(ValueError, match="SDXL"):
        lab.Pipeline.from_components(**tiny_sd_components()).sampler(PROMPT, steps=2, target_size=(32, 32))


def test_equivalence_global_pool_controlnet():
    """A ControlNet with global_pool_conditions (the "shuffle" kind): diffusers forces guess mode and scales the
    residuals before pooling them to one value per channel; the lab does the same."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image
    comps = tiny_sd_components()
    base = controlnet(comps["unet"])
    pooled = ControlNetModel.from_config(base.config, global_pool_conditions=True).eval()
    pooled.load_state_dict(base.state_dict())
    assert pooled.config.global_pool_conditions
    pipe = lab.Pipeline.from_components(**comps, controlnets={"shuffle": pooled})
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    run = pipe.sampler(PROMPT, steps=STEPS, guidance=5.0, scheduler="ddim", seed=4, height=32, width=32,
                       control=lab.Control("shuffle", image, scale=0.8), progress=False,
                       recorders=[lab.ResidualRecorder(full=True, half="both")]).run()
    ref = StableDiffusionControlNetPipeline(
        **{**comps, "scheduler": make_scheduler("ddim", comps["scheduler"].config)}, controlnet=pooled,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    want = _diffusers_latents(ref, prompt=PROMPT, image=image, num_inference_steps=STEPS, guidance_scale=5.0, seed=4,
                              height=32, width=32, controlnet_conditioning_scale=0.8)
    assert (run.final_latents - want).abs().max().item() < TOL
    r = run.steps[0].records["controlnet[shuffle].down_block_res_samples.0"].tensor  # [2b, c, 1, 1]: pooled
    assert r.shape[-2:] == (1, 1) and float(r[0].abs().max()) == 0.0 and float(r[1].abs().max()) > 0
    assert run.settings["controls"][0]["halves"] == "cond" and run.settings["controls"][0]["pooled"]
