"""The lecture's task table on the shapes world (issue 19): task models as real diffusers UNets on the text
model's, trained by ``python -m lab train shapes --task NAME``, loaded by ``lab.load(..., task=NAME)`` and by
plain diffusers, driven by the lab's sampler."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lab
from lab.errors import ModelNotFound
from lab.loading import BUNDLED
from lab.shapes import tasks, train, world
from lab.shapes.evaluate_tasks import inpaint_case


def test_object_boxes_and_training_masks():
    d = world.generate(16, seed=0)
    boxes = tasks.object_boxes(d["object_masks"])
    for i in range(16):
        for k in range(world.MAX_OBJECTS):
            m = d["object_masks"][i, k]
            if not m.any():
                assert boxes[i, k].tolist() == [-1, -1, -1, -1]
                continue
            ys, xs = np.nonzero(m)
            assert boxes[i, k].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    g = torch.Generator().manual_seed(0)
    masks = tasks.inpaint_masks(boxes.repeat(40, 1, 1), g)
    share = masks.mean((1, 2, 3))
    assert masks.shape == (640, 1, 64, 64) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert 0.1 < float((share == 1).float().mean()) < 0.25  # the whole image one time in six
    # an object's mask covers that object: for the masks that are neither full nor random, some object is inside
    covered = [any(bool((masks[i, 0][d["object_masks"][i % 16, k]] == 1).all())
                   for k in range(2) if d["object_masks"][i % 16, k].any()) for i in range(640)]
    assert np.mean(covered) > 0.6


def test_widened_conv_in_computes_what_the_text_unet_did():
    from diffusers import UNet2DConditionModel
    base = UNet2DConditionModel.from_pretrained(BUNDLED["shapes"], subfolder="unet")
    wide = tasks.widen_conv_in(base, 5)
    assert wide.config.in_channels == 9 and wide.conv_in.weight.shape[1] == 9
    z, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 32, 128)
    extra = torch.randn(2, 5, 16, 16)
    with torch.no_grad():
        ref = base(z, t, encoder_hidden_states=ctx).sample
        out = wide(torch.cat([z, extra], 1), t, encoder_hidden_states=ctx).sample
    assert torch.allclose(out, ref, atol=1e-5)


def test_inpaint_task_trains_exports_and_loads_both_ways(tmp_path):
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
    rows = train.train("task-inpaint", tmp_path / "work", preset="smoke", base=BUNDLED["shapes"],
                       export_to=tmp_path / "model", progress=False)
    assert rows[0]["stage"] == "task-inpaint" and rows[0]["steps"] == 3
    assert rows[0]["final_loss"] < 0.5  # a fine-tune of the converged text UNet, not a fresh one (~1)
    model = tmp_path / "model"
    assert (model / "unet-inpaint" / "diffusion_pytorch_model.safetensors").exists()
    pipe = lab.load(model, task="inpaint")
    assert pipe.kind == "inpaint" and pipe.unet.config.in_channels == 9
    case = inpaint_case(400, 1)
    from PIL import Image
    image, mask = Image.fromarray(case["image"]), Image.fromarray(case["mask"].astype(np.uint8) * 255)
    run = pipe.sampler(case["caption"], image=image, mask_image=mask, steps=4, guidance=5.0, scheduler="ddim",
                       seed=0, progress=False).run()
    # the documented plain-diffusers line loads the same UNet beside the bundled components and samples the
    # same image from the same noise
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet-inpaint")
    sd = StableDiffusionInpaintPipeline.from_pretrained(model, unet=unet, safety_checker=None,
                                                       requires_safety_checker=False)
    sd.scheduler = type(pipe.scheduler).from_config(sd.scheduler.config)
    ref = sd(case["caption"], image=image, mask_image=mask, num_inference_steps=4, guidance_scale=5.0,
             generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    ours = np.asarray(run.image).astype(np.float32) / 255
    assert np.abs(ours - ref).max() < 2 / 255
    # the CLI names it too
    from lab.cli import build_parser
    args = build_parser().parse_args(["train", "shapes", "--task", "inpaint", "--base", str(model)])
    assert args.task == "inpaint"


def test_sr_task_trains_exports_and_loads_both_ways(tmp_path):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel
    from PIL import Image
    rows = train.train("task-sr", tmp_path / "work", preset="smoke", base=BUNDLED["shapes"],
                       export_to=tmp_path / "model", progress=False)
    assert rows[0]["stage"] == "task-sr" and rows[0]["final_loss"] < 0.5
    model = tmp_path / "model"
    pipe = lab.load(model, task="sr")
    assert pipe.kind == "upscale" and pipe.unet.config.in_channels == 7
    assert pipe.unet.config.num_class_embeds == tasks.MAX_NOISE_LEVEL + 1
    own_scale = AutoencoderKL.load_config(model / "vae")["scaling_factor"]
    assert pipe.vae.config.scaling_factor == own_scale  # not the SD upscaler's 0.08333
    ex = world.make_example(500, 2, split="heldout")
    low = tasks.low_res(torch.from_numpy(ex["image"][None]))
    low = Image.fromarray(((low[0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
    run = pipe.sampler(ex["caption"], image=low, noise_level=30, steps=4, guidance=5.0, scheduler="ddim", seed=1,
                       progress=False).run()
    assert run.image.size == (64, 64) and run.settings["conditioning"][-1]["noise_level"] == 30
    # the documented plain-diffusers lines: the same sample from the same seed
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet-sr")
    lrs = DDPMScheduler.from_pretrained(model, subfolder="low_res_scheduler")
    sd = StableDiffusionUpscalePipeline.from_pretrained(model, unet=unet, low_res_scheduler=lrs)
    sd.vae.register_to_config(scaling_factor=own_scale)
    sd.scheduler = type(pipe.scheduler).from_config(sd.scheduler.config)
    ref = sd(ex["caption"], image=low, noise_level=30, num_inference_steps=4, guidance_scale=5.0,
             generator=torch.Generator().manual_seed(1), output_type="np").images[0]
    assert np.abs(np.asarray(run.image).astype(np.float32) / 255 - ref).max() < 2 / 255
    # what an upscaler cannot take is refused before any step
    with pytest.raises(ValueError, match="upscales a 16x16 image"):
        pipe.sampler(ex["caption"], image=Image.fromarray(ex["image"]), progress=False)
    with pytest.raises(ValueError, match="noise_level must be an integer in"):
        pipe.sampler(ex["caption"], image=low, noise_level=351, progress=False)
    with pytest.raises(ValueError, match="needs image="):
        pipe.sampler(ex["caption"], progress=False)


def test_segmap_task_trains_and_matches_a_hand_written_loop(tmp_path):
    """No diffusers pipeline takes a semantic map by concat: the lab's sampler is checked against the loop
    written out by hand on the same modules (DDIM, classifier-free guidance, the map in both halves)."""
    from diffusers import DDIMScheduler
    from lab.conditioning import SemanticMap
    rows = train.train("task-segmap", tmp_path / "work", preset="smoke", base=BUNDLED["shapes"],
                       export_to=tmp_path / "model", progress=False)
    assert rows[0]["stage"] == "task-segmap" and rows[0]["final_loss"] < 0.5
    pipe = lab.load(tmp_path / "model", task="segmap")
    assert pipe.unet.config.in_channels == 4 + len(tasks.SEG_CLASSES)
    ex = world.make_example(600, 3, split="heldout")
    onehot = tasks.segmap_onehot(ex["segmentation"])
    assert onehot.shape == (1, 4, 64, 64) and torch.equal(onehot.sum(1), torch.ones(1, 64, 64))
    assert bool((onehot[0, 0] == 1).equal(torch.from_numpy(~ex["masks"].any(0))))  # background where no object
    run = pipe.sampler(ex["caption"], conditioning=[SemanticMap(onehot)], steps=4, guidance=5.0, scheduler="ddim",
                       seed=2, progress=False).run()
    with torch.no_grad():
        sched = DDIMScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(4)
        cond, uncond = pipe.diffusers.encode_prompt(ex["caption"], "cpu", 1, True, None)
        ctx = torch.cat([uncond, cond])
        lat = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(2)) * sched.init_noise_sigma
        m = torch.nn.functional.avg_pool2d(onehot, 4)
        for t in sched.timesteps:
            inp = torch.cat([sched.scale_model_input(torch.cat([lat] * 2), t), torch.cat([m] * 2)], 1)
            eu, ec = pipe.unet(inp, t, encoder_hidden_states=ctx).sample.chunk(2)
            lat = sched.step(eu + 5.0 * (ec - eu), t, lat).prev_sample
        ref = (pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(run.steps[-1].prev_latents, lat, atol=1e-5)
    ours = np.asarray(run.image).astype(np.float32) / 255
    assert np.abs(ours - ref[0].permute(1, 2, 0).numpy()).max() < 2 / 255
    # the map is part of the run's recipe: a saved run replays exactly
    again = lab.replay(run.save(tmp_path / "seg.zarr"), pipe)
    assert torch.equal(again.steps[-1].latents, run.steps[-1].latents)
    # bad inputs: named, before any step
    with pytest.raises(ValueError, match="takes 8 input channels"):
        pipe.sampler(ex["caption"], progress=False)
    with pytest.raises(ValueError, match="latent grid is 16x16"):
        pipe.sampler(ex["caption"], conditioning=[SemanticMap(onehot[..., :60, :60])], progress=False)
    with pytest.raises(TypeError, match="class probabilities"):
        pipe.sampler(ex["caption"], conditioning=[SemanticMap(onehot.long())], progress=False)
    with pytest.raises(ValueError, match="2 semantic maps for 3 prompts"):
        pipe.sampler([ex["caption"]] * 3, conditioning=[SemanticMap(onehot.repeat(2, 1, 1, 1))], progress=False)


def test_task_errors_name_what_exists():
    with pytest.raises(KeyError, match="unknown task 'class'"):
        tasks.check_task("class")
    with pytest.raises(KeyError, match="unknown stage"):
        train.train("task-zebra", "/tmp/unused", preset="smoke", progress=False)
    with pytest.raises(ModelNotFound, match="no 'zebra' task model"):
        lab.load("shapes", task="zebra")
