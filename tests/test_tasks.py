"""The lecture's task table on the shapes world (issue 19): task models as real diffusers UNets on the text
model's, trained by ``python -m lab train shapes --task NAME``, loaded by ``lab.load(..., task=NAME)`` and by
plain diffusers, driven by the lab's sampler."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lab
from lab.errors import ModelNotFound
from lab.loading import BUNDLED
from lab.shapes import tasks, train, world
from lab.shapes.evaluate_tasks import inpaint_case


def _ddim_cfg_by_hand(unet, ctx, scheduler_config, *, steps, seed, n, guidance, concat=None):
    """DDIM with classifier-free guidance written out on ``unet``: ``ctx`` is ``[uncond; cond]`` contexts for
    ``n`` images, ``concat`` channels go to both halves. Returns the final latents."""
    from diffusers import DDIMScheduler
    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    lat = torch.randn((n, 4, 16, 16), generator=torch.Generator().manual_seed(seed)) * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([lat] * 2), t)
        if concat is not None:
            inp = torch.cat([inp, torch.cat([concat] * 2)], 1)
        eu, ec = unet(inp, t, encoder_hidden_states=ctx).sample.chunk(2)
        lat = sched.step(eu + guidance * (ec - eu), t, lat).prev_sample
    return lat


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


def test_split_conv_in_is_the_same_convolution_with_its_own_parameters():
    conv = torch.nn.Conv2d(9, 16, 3, padding=1)
    split = tasks.SplitConvIn(conv, 4)
    x = torch.randn(2, 9, 8, 8)
    assert torch.allclose(split(x), conv(x), atol=1e-6)
    # the new channels' kernel is its own parameter: an optimiser step on it leaves the old channels alone
    opt = torch.optim.SGD([split.new_weight], lr=1.0)
    split(x).square().mean().backward()
    opt.step()
    assert torch.equal(split.old_weight, conv.weight[:, :4]) and not torch.equal(split.new_weight, conv.weight[:, 4:])
    merged = split.merged()
    assert isinstance(merged, torch.nn.Conv2d) and merged.weight.shape == conv.weight.shape
    with torch.no_grad():
        assert torch.allclose(merged(x), split(x), atol=1e-6)


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
        cond, uncond = pipe.diffusers.encode_prompt(ex["caption"], "cpu", 1, True, None)
        lat = _ddim_cfg_by_hand(pipe.unet, torch.cat([uncond, cond]), pipe.scheduler.config, steps=4, seed=2, n=1,
                                guidance=5.0, concat=torch.nn.functional.avg_pool2d(onehot, 4))
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


def test_a_task_model_continues_from_the_bundled_one(tmp_path):
    """``--init base`` for a concat task starts from the base's trained ``unet-TASK`` (its learnt mask and
    masked-image kernels), not from the text UNet with zero new channels."""
    from safetensors.torch import load_file
    rows = train.train("task-inpaint", tmp_path / "work", preset="smoke", base=BUNDLED["shapes"], init="base",
                       progress=False)
    assert rows[0]["stage"] == "task-inpaint" and rows[0]["steps"] == 3
    weights = Path("unet-inpaint") / "diffusion_pytorch_model.safetensors"
    start = load_file(Path(BUNDLED["shapes"]) / weights)["conv_in.weight"]
    ours = load_file(tmp_path / "work" / weights)["conv_in.weight"]
    new = slice(4, None)  # the mask and masked-image channels: zero in a fresh widening
    assert start[:, new].float().abs().mean() > 1e-3
    # three steps in the cosine's warm-up leave the bundled weights all but unchanged
    assert torch.allclose(ours[:, new].float(), start[:, new].float(), atol=1e-3)
    # its record counts the run it continued (the task table's iterations and time)
    before = json.loads((Path(BUNDLED["shapes"]) / "unet-inpaint" / tasks.TRAINING_RECORD).read_text())
    assert rows[0]["init"] == "base"
    assert rows[0]["before"]["steps"] == before["steps"] + before.get("before", {}).get("steps", 0)
    assert rows[0]["before"]["runs"][-1]["steps"] == before["steps"]  # and the record of the run it continued


def test_task_init_errors_say_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="needs a sr UNet to start from"):
        train.train("task-sr", "/tmp/unused", preset="smoke", base=BUNDLED["shapes"], init="base", progress=False)
    with pytest.raises(ValueError, match="unknown init 'gaussian' for a task model"):
        train.train("task-inpaint", "/tmp/unused", preset="smoke", base=BUNDLED["shapes"], init="gaussian",
                    progress=False)
    with pytest.raises(ValueError, match="concat task models"):
        train.train("task-class", "/tmp/unused", preset="smoke", base=BUNDLED["shapes"], init="base", progress=False)
    # checked before any stage of the command trains: the ControlNet before it does not run and is not lost
    with pytest.raises(ValueError, match="unknown init 'gaussian' for a task model"):
        train.train("controlnet-depth,task-inpaint", tmp_path / "work", preset="smoke", base=BUNDLED["shapes"],
                    init="gaussian", progress=False)
    assert not (tmp_path / "work").exists()
    # stages that take no init refuse one rather than train from something else than asked (the UNet, the VAE)
    for stage in ("unet", "vae", "preview"):
        with pytest.raises(ValueError, match=f"{stage!r} takes none"):
            train.train(f"controlnet-depth,{stage}", tmp_path / "work", preset="smoke", base=BUNDLED["shapes"],
                        init="base", progress=False)
    assert not (tmp_path / "work").exists()


def test_bundled_adapters_name_the_weights_they_go_over():
    """Every bundled model stored as weights over another UNet folder says which, and that folder's weights are
    the ones it was trained or measured over (else ``lab.load`` warns that its numbers may not hold)."""
    from lab.token_encoders import ADAPTER_FILE, PARTIAL_FILE, weights_digest
    partials = sorted(p.parent for p in Path(BUNDLED["shapes"]).glob(f"unet-*/{PARTIAL_FILE}"))
    assert {p.name for p in partials} >= {"unet-class", "unet-layout", "unet-uncond", "unet-views"}
    for folder in partials:
        adapter = json.loads((folder / ADAPTER_FILE).read_text())
        assert adapter["base_digest"] == weights_digest(folder.parent / adapter["base"]), folder.name


def test_task_errors_name_what_exists():
    with pytest.raises(KeyError, match="unknown task 'zebra'"):
        tasks.check_task("zebra")
    with pytest.raises(KeyError, match="unknown stage"):
        train.train("task-zebra", "/tmp/unused", preset="smoke", progress=False)
    with pytest.raises(ModelNotFound, match="no 'zebra' task model"):
        lab.load("shapes", task="zebra")


def test_class_task_trains_loads_and_matches_a_hand_written_loop(tmp_path, monkeypatch):
    """The class model (class tokens by cross-attention over the text UNet with its K/V fine-tuned) against the
    loop written out by hand from the files on disk: the text UNet, the K/V over it, the class tokens."""
    import json

    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from analysis import word_heatmap
    # the class token's map pulled onto its object (off in the shipped recipe, tasks.GROUNDING): both grounding
    # terms logged beside L_LDM, and in the loss
    monkeypatch.setitem(tasks.GROUNDING, "class", (0.2, 0.04))
    rows = train.train("task-class", tmp_path / "work", preset="smoke", base=BUNDLED["shapes"],
                       export_to=tmp_path / "model", progress=False)
    assert rows[0]["stage"] == "task-class" and rows[0]["steps"] == 3
    logged = [json.loads(line) for line in (tmp_path / "work" / "logs" / "task-class.jsonl").read_text().splitlines()]
    w_token, w_pixel = tasks.GROUNDING["class"]
    assert logged
    for row in logged:
        assert row["grounding"] > 0 and row["pixel"] > 0
        assert row["loss"] == pytest.approx(row["mse"] + w_token * row["grounding"] + w_pixel * row["pixel"], rel=1e-4)
    model = tmp_path / "model"
    # it names the text UNet's weights it went over (lab.load warns if those change under it)
    from lab.token_encoders import ADAPTER_FILE, weights_digest
    adapter = json.loads((model / "unet-class" / ADAPTER_FILE).read_text())
    assert adapter == {"base": "unet", "base_digest": weights_digest(BUNDLED["shapes"] / "unet")}
    kv = load_file(str(model / "unet-class" / tasks.PARTIAL_FILE))
    assert kv and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in kv)
    assert all(v.dtype == torch.float16 for v in kv.values())
    cfg = json.loads((model / "class_embedder" / "config.json").read_text())
    assert cfg["num_classes"] == len(tasks.CLASSES) == 2 * 6 * 3 and cfg["class_names"][0] == "small red circle"
    pipe = lab.load(model, task="class")
    assert pipe.kind == "class"
    labels = [tasks.class_index("large", "blue", "triangle"), tasks.class_index("small", "green", "square")]
    rec = lab.AttentionRecorder()
    run = pipe.sampler(class_labels=labels, steps=3, guidance=4.0, scheduler="ddim", seed=5, recorders=[rec],
                       progress=False).run()
    with torch.no_grad():  # by hand, from the files
        unet = UNet2DConditionModel.from_pretrained(model / "unet")
        unet.load_state_dict(kv, strict=False)
        enc = load_file(str(model / "class_embedder" / "diffusion_pytorch_model.safetensors"))
        table, frame = enc["table.weight"].float(), enc["frame"].float()

        def context(label):
            return torch.cat([frame[:1], table[label][None], frame[2:]])[None]

        ctx = torch.cat([context(cfg["num_classes"])] * 2 + [context(v) for v in labels])
        lat = _ddim_cfg_by_hand(unet, ctx, pipe.scheduler.config, steps=3, seed=5, n=2, guidance=4.0)
    assert torch.allclose(run.steps[-1].prev_latents, lat, atol=1e-5)
    # the class token is a word of the run's attention record: its map is a heat map like a caption word's
    heat = word_heatmap(run, "large blue triangle", batch=0)
    assert heat.shape == (64, 64) and float(heat.max()) == 1.0
    with pytest.raises(KeyError, match="small green square"):
        word_heatmap(run, "large blue triangle", batch=1)  # the second image is a small green square
    # and a saved run replays
    again = lab.replay(run.save(tmp_path / "class.zarr"), pipe)
    assert torch.equal(again.steps[-1].latents, run.steps[-1].latents)
    # bad inputs: named, before any step
    with pytest.raises(ValueError, match="needs class_labels"):
        pipe.sampler(progress=False)
    with pytest.raises(ValueError, match="takes class_labels= only"):
        pipe.sampler("a red circle", class_labels=1, progress=False)
    with pytest.raises(ValueError, match="outside the model's 36 classes"):
        pipe.sampler(class_labels=[36], progress=False)
    with pytest.raises(TypeError, match="list of ints"):
        pipe.sampler(class_labels=["large red circle"], progress=False)
    with pytest.raises(ValueError, match="need a class model"):
        lab.load(model).sampler("a red circle", conditioning=[lab.conditioning.ClassTokens(1)], progress=False)
    assert tasks.hyperparameter_table(model).loc["conditioning", "class"] == "CA"


def test_layout_task_trains_loads_and_matches_a_hand_written_loop(tmp_path):
    """The layout model (box tokens by cross-attention, the UNet's transformer blocks fine-tuned) against the
    loop written out by hand from the files on disk, box tokens computed from the saved weights."""
    import json

    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from analysis import word_heatmap
    from lab.conditioning import Layout
    rows = train.train("task-layout", tmp_path / "work", preset="smoke", base=BUNDLED["shapes"],
                       export_to=tmp_path / "model", progress=False)
    assert rows[0]["stage"] == "task-layout" and rows[0]["steps"] == 3
    model = tmp_path / "model"
    part = load_file(str(model / "unet-layout" / tasks.PARTIAL_FILE))
    assert part and all(".attentions." in k or k.startswith("conv_in.") for k in part)
    assert any(".attn1.to_q." in k for k in part)
    # conv_in takes the two coordinate channels after the latents; training has given them weight
    assert part["conv_in.weight"].shape[1] == 6 and part["conv_in.weight"][:, 4:].abs().sum() > 0
    cfg = json.loads((model / "layout_embedder" / "config.json").read_text())
    assert cfg["label_names"] == list(tasks.LAYOUT_LABELS) and len(cfg["label_names"]) == 18 and cfg["coordinates"]
    pipe = lab.load(model, task="layout")
    assert pipe.kind == "layout"
    layouts = [[("red circle", (4, 6, 32, 34)), ("blue square", (40, 40, 56, 56))], [("green triangle", (10, 30, 38, 58))]]
    run = pipe.sampler(conditioning=[Layout(layouts)], steps=3, guidance=4.0, scheduler="ddim", seed=6,
                       recorders=[lab.AttentionRecorder()], progress=False).run()
    assert pipe.unet.config.in_channels == 6
    with torch.no_grad():  # by hand, from the files: plain diffusers, the text UNet's config with 6 inputs
        unet = UNet2DConditionModel.from_pretrained(model / "unet", in_channels=6, low_cpu_mem_usage=False,
                                                    ignore_mismatched_sizes=True)
        unet.load_state_dict(part, strict=False)
        centres = (torch.arange(16) + 0.5) / 16 * 2 - 1  # each latent cell's centre, -1 .. 1
        coords = torch.stack([centres[None, :].expand(16, 16), centres[:, None].expand(16, 16)])[None].expand(2, -1, -1, -1)
        w = {k: v.float() for k, v in load_file(str(model / "layout_embedder" / "diffusion_pytorch_model.safetensors")).items()}

        def token(label, box):
            x = torch.tensor(box, dtype=torch.float32) / 64
            ang = x[:, None] * (2.0 ** torch.arange(8) * torch.pi)
            f = torch.cat([ang.sin(), ang.cos()], -1).flatten()
            hidden = torch.nn.functional.silu(f @ w["box.0.weight"].T + w["box.0.bias"])
            return w["labels.weight"][tasks.LAYOUT_LABELS.index(label)] + hidden @ w["box.2.weight"].T + w["box.2.bias"]

        def context(lay):
            ctx = w["frame"].clone()
            for j, (label, box) in enumerate(lay):
                ctx[1 + j] = token(label, box)
            return ctx[None]

        ctx = torch.cat([context([]), context([]), context(layouts[0]), context(layouts[1])])
        lat = _ddim_cfg_by_hand(unet, ctx, pipe.scheduler.config, steps=3, seed=6, n=2, guidance=4.0, concat=coords)
    assert torch.allclose(run.steps[-1].prev_latents, lat, atol=1e-4)
    assert word_heatmap(run, "blue square", batch=0).shape == (64, 64)  # each box token has its map
    again = lab.replay(run.save(tmp_path / "layout.zarr"), pipe)
    assert torch.equal(again.steps[-1].latents, run.steps[-1].latents)
    # bad inputs: named, before any step
    for boxes, err, match in [([("red zebra", (0, 0, 8, 8))], ValueError, "unknown box label 'red zebra'"),
                              ([("red circle", (0, 0, 80, 8))], ValueError, "outside the 64x64 sample"),
                              ([("red circle", (9, 0, 8, 8))], ValueError, "x0 < x1"),
                              ([("red circle", (0, 0, 8, 8))] * 3, ValueError, "at most 2"),
                              ([("red circle", (0, 0, float("nan"), 8))], ValueError, "x0 < x1"),
                              ([("red circle", "box")], TypeError, "a box is")]:
        with pytest.raises(err, match=match):
            pipe.sampler(conditioning=[Layout(boxes)], progress=False)
    with pytest.raises(ValueError, match="needs one conditioning"):
        pipe.sampler(progress=False)
    with pytest.raises(ValueError, match="no prompt"):
        pipe.sampler("a red circle", conditioning=[Layout(layouts[1])], progress=False)


def test_attribute_histograms_and_their_distance_read_the_world():
    """The unconditional row's measure: the oracle's attribute histograms of world scenes are the world's own
    (read back exactly), two samples of one world are close, and a one-object world is far on the count."""
    from lab.shapes.evaluate_tasks import UNCOND_ATTRIBUTES, attribute_histograms, total_variation
    exs = [world.make_example(11, i, two_share=0.75) for i in range(120)]
    h = attribute_histograms(e["image"] for e in exs)
    assert set(h) == set(UNCOND_ATTRIBUTES)
    assert all(abs(sum(v.values()) - 1) < 1e-9 for v in h.values())
    n_two = sum(len(e["scene"].objects) == 2 for e in exs)
    assert abs(h["count"].get("2", 0) - n_two / len(exs)) < 0.02  # the oracle counts objects right
    other = attribute_histograms(world.make_example(12, i, two_share=0.75)["image"] for i in range(120))
    ones = attribute_histograms(world.make_example(13, i, n_objects=1)["image"] for i in range(120))
    assert np.mean([total_variation(h[a], other[a]) for a in UNCOND_ATTRIBUTES]) < 0.1
    assert total_variation(h["count"], ones["count"]) > 0.6
    assert total_variation({"a": 1.0}, {"b": 1.0}) == 1.0 and total_variation({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == 0


def test_hyperparameter_table_reads_the_bundled_models():
    table = tasks.hyperparameter_table()
    assert list(table.index) == list(tasks.TABLE_ROWS)
    assert {"text", "uncond", "segmap"} <= set(table.columns)
    assert table.loc["f", "text"] == 4 and table.loc["z-shape", "text"] == "16x16x4"
    assert table.loc["conditioning", "segmap"].startswith("concat") and table.loc["conditioning", "text"] == "CA"
    assert table.loc["channel multiplier", "text"] == "1,1.5,2" and table.loc["diffusion steps", "text"] == 1000
    assert isinstance(table.loc["iterations", "segmap"], int) and table.loc["iterations", "segmap"] > 0


def test_uncond_task_trains_and_runs_in_plain_diffusers(tmp_path):
    """The unconditional model: the text UNet's transformer blocks fine-tuned on the empty caption only; plain
    StableDiffusionPipeline with that UNet and prompt "" draws what the lab's sampler draws."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file
    rows = train.train("task-uncond", tmp_path / "work", preset="smoke", base=BUNDLED["shapes"],
                       export_to=tmp_path / "model", progress=False)
    assert rows[0]["stage"] == "task-uncond" and rows[0]["trained_params"] == sum(
        v.numel() for v in load_file(str(tmp_path / "model" / "unet-uncond" / tasks.PARTIAL_FILE)).values())
    pipe = lab.load(tmp_path / "model", task="uncond")
    assert pipe.kind == "sd"
    run = pipe.sampler(["", ""], steps=3, guidance=1.0, scheduler="ddim", seed=4, progress=False).run()
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "model", subfolder="unet")
    unet.load_state_dict(load_file(str(tmp_path / "model" / "unet-uncond" / tasks.PARTIAL_FILE)), strict=False)
    sd = StableDiffusionPipeline.from_pretrained(tmp_path / "model", unet=unet)
    sd.scheduler = DDIMScheduler.from_config(sd.scheduler.config)
    sd.set_progress_bar_config(disable=True)
    ref = sd(["", ""], num_inference_steps=3, guidance_scale=1.0, output_type="latent",
             generator=torch.Generator().manual_seed(4)).images
    assert torch.allclose(run.steps[-1].prev_latents, ref, atol=1e-5)
    with pytest.raises(KeyError, match="whole UNet"):
        tasks.trained_subset(unet, "inpaint")


def test_task_eval_runs_each_bundled_task(tmp_path):
    """``python -m lab eval tasks`` end to end on the bundled models, at a size that only proves the plumbing:
    each task's keys, in range, in the JSON; the unconditional row sampled as LDM samples (DDIM, eta 1) beside
    deterministic DDIM."""
    from lab.shapes.evaluate_tasks import UNCOND_ETA, UNCOND_STEPS, run_task_eval
    res = run_task_eval(2, tasks=("uncond", "class", "inpaint", "segmap"), steps=2, json_path=tmp_path / "t.json",
                        progress=lambda line: None, n_world=40)
    assert json.loads((tmp_path / "t.json").read_text())["class_accuracy"] == res["class_accuracy"]
    for key in ("uncond_attribute_tv", "uncond_text_attribute_tv", "uncond_eta0_attribute_tv", "class_accuracy",
                "inpaint_fidelity", "segmap_miou"):
        assert 0.0 <= res[key] <= 1.0, key
    assert res["uncond_sampler"] == {"scheduler": "ddim", "steps": UNCOND_STEPS, "eta": UNCOND_ETA}
    assert res["uncond_eta0_sampler"] == {"scheduler": "ddim", "steps": 2, "eta": 0.0}
    assert res["uncond_model"] == "unet-uncond" and res["inpaint_outside_psnr_db"] > 10
    assert 0 < res["weights_mb"] <= 64


def test_coordinate_channels_and_a_widening_partial_file(tmp_path):
    """The layout model's coordinate channels are each latent cell's centre; a partial file that widens conv_in
    widens the UNet it is loaded into, and one without the new conv_in's bias is refused by name."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from lab.token_encoders import coordinate_channels, load_partial
    c = coordinate_channels(3, 4, 8)
    assert c.shape == (3, 2, 4, 8)
    assert c[0, 0, 0].tolist() == [-0.875, -0.625, -0.375, -0.125, 0.125, 0.375, 0.625, 0.875]  # x, left to right
    assert c[0, 1, :, 0].tolist() == [-0.75, -0.25, 0.25, 0.75] and torch.equal(c[0], c[2])  # y, top to bottom
    unet = UNet2DConditionModel.from_pretrained(BUNDLED["shapes"], subfolder="unet")
    w = torch.randn(unet.conv_in.out_channels, 6, 3, 3)
    save_file({"conv_in.weight": w}, str(tmp_path / "no_bias.safetensors"))
    with pytest.raises(ValueError, match="no conv_in.bias"):
        load_partial(unet, tmp_path / "no_bias.safetensors")
    assert unet.config.in_channels == 4  # nothing changed
    save_file({"conv_in.weight": w, "conv_in.bias": torch.zeros(w.shape[0])}, str(tmp_path / "wide.safetensors"))
    load_partial(unet, tmp_path / "wide.safetensors")
    assert unet.config.in_channels == 6 and torch.equal(unet.conv_in.weight, w)
    assert unet(torch.randn(1, 6, 16, 16), 10, encoder_hidden_states=torch.randn(1, 32, 128)).sample.shape == (1, 4, 16, 16)


def test_class_token_frame_starts_from_the_text_encoder():
    """The class encoder's frame starts as the text encoder's states: of the empty caption, or (``"phrases"``)
    the mean of the one-phrase captions' ("a large red circle"); each class token as its words' mean state."""
    from transformers import CLIPTextModel, CLIPTokenizer
    from lab.token_encoders import ClassTokenEncoder
    folder = Path(BUNDLED["shapes"])
    text = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    names = ["large red circle", "small blue square"]

    def states(texts):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            return text(ids).last_hidden_state.float()

    empty = ClassTokenEncoder.from_text_encoder(text, tok, names, frame="empty")
    phrases = ClassTokenEncoder.from_text_encoder(text, tok, names, frame="phrases")
    torch.testing.assert_close(empty.frame.data, states([""])[0])
    torch.testing.assert_close(phrases.frame.data, states([f"a {n}" for n in names]).mean(0))
    assert (phrases.frame.data - empty.frame.data).abs().max() > 1e-2
    torch.testing.assert_close(phrases.table.weight.data, empty.table.weight.data)  # the tokens start alike
    with pytest.raises(ValueError, match="unknown frame init 'zeros'"):
        ClassTokenEncoder.from_text_encoder(text, tok, names, frame="zeros")
