"""Zero-1-to-3 on the shapes world through a 2D camera (issue 24): the camera, the pairs, the view model's
conditioning plug-ins, its LoRA adapter as diffusers loads it, training, the eval's scoring, and the shipped model."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import lab
from lab.conditioning import CameraToken, InputView, keep_seen, novel_view
from lab.conditioning.views import SEEN, warp_views
from lab.loading import BUNDLED
from lab.shapes import evaluate_views, train, views, world
from lab.token_encoders import ADAPTER_FILE, LORA_FILE, PARTIAL_FILE, CameraTokenEncoder, merge_lora, weights_digest


def test_the_canonical_camera_sees_the_world_as_it_renders():
    for i in range(10):
        ex = world.make_example(4, i)
        image, masks = views.render_view(ex["scene"], views.Camera())
        # the same scene; a circle is a 192-gon here, and PIL's rectangle covers its end pixel: edges may differ
        for m, want in zip(masks, ex["masks"]):
            assert evaluate_views.mask_iou(m, want) > 0.93, i
        assert np.abs(image.astype(int) - ex["image"]).mean() < 1.0


def test_relative_cameras_compose_and_invert():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = views.Camera(*rng.uniform(20, 44, 2), float(rng.uniform(0.7, 1.5)), float(rng.uniform(-1, 1)))
        rel = views.random_change(rng)
        b = views.apply_relative(a, rel)
        assert np.allclose(views.relative(a, b), rel, atol=1e-5)
        pts = rng.uniform(0, 64, (5, 2))
        assert np.allclose(a.to_image(a.to_world(pts)), pts)
    # a pan right by a quarter frame puts what was 16 px right of the centre at the centre
    a = views.Camera(30, 30, 1.0, 0.0)
    b = views.apply_relative(a, views.camera_change(dx=0.25))
    assert np.allclose(b.to_image(a.to_world(np.array([[48.0, 32.0]]))), [[32.0, 32.0]])
    # zoom 2 doubles distances from the centre; a camera rolled by +90 degrees sees the world turned by -90
    z = views.apply_relative(a, views.camera_change(zoom=2.0))
    assert np.allclose(z.to_image(a.to_world(np.array([[40.0, 32.0]]))), [[48.0, 32.0]])
    r = views.apply_relative(a, views.camera_change(roll_degrees=90))
    assert np.allclose(r.to_image(a.to_world(np.array([[40.0, 32.0]]))), [[32.0, 24.0]], atol=1e-6)
    for bad in [(0.0, 0.0, 0.0, 0.0), (float("nan"), 0, 1, 0)]:
        with pytest.raises(ValueError):
            views.camera_change(*bad)
    with pytest.raises(ValueError, match="5 finite numbers"):
        views.apply_relative(a, [0.1, 0.2])


def test_pairs_are_deterministic_show_every_object_and_roll_the_shapes():
    a, b = views.make_pair(3, 7), views.make_pair(3, 7)
    assert np.array_equal(a["input"], b["input"]) and np.array_equal(a["target"], b["target"])
    assert np.allclose(a["camera"], views.relative(a["camera_in"], a["camera_out"]))
    left = 0
    for i in range(60):
        p = views.make_pair(3, i)
        for obj, m in zip(p["scene"].objects, p["input_masks"]):
            assert m.sum() >= views.MIN_INPUT_SHARE * views.full_area(obj, p["camera_in"]) - 1
        left += int(p["left"].any())
    assert 0 < left < 30  # some objects leave the target frame, most stay
    # a rolled camera turns a triangle: its apex is no longer straight above its centre
    tri = world.Scene((world.ShapeObject("triangle", "red", "large", 32.0, 32.0),), "gray")
    for roll, centred in ((0.0, True), (40.0, False)):
        _, (m,) = views.render_view(tri, views.Camera(roll=math.radians(roll)))
        top = np.nonzero(m.any(1))[0].min()
        apex_x = np.nonzero(m[top])[0].mean()  # the top row's pixels: the apex when upright
        assert (abs(apex_x - 31.5) < 2) == centred, (roll, apex_x)


def test_warp_moves_the_pixels_it_has_and_the_identity_keeps_them():
    p = views.make_pair(1, 2)
    same = views.warp(p["input"], p["camera_in"], p["camera_in"])
    assert np.abs(same.astype(int) - p["input"]).max() <= 1
    w = views.warp(p["input"], p["camera_in"], p["camera_out"])
    # where the input saw an object whole, its warp lands on the target's object
    ious = [evaluate_views.mask_iou(
        views.warp(m.astype(np.uint8) * 255, p["camera_in"], p["camera_out"], background=0) >= 128, t)
        for m, t in zip(p["input_masks"], p["target_masks"]) if t.sum() > 50 and m.sum() > 50]
    assert w.shape == (64, 64, 3) and all(iou > 0.5 for iou in ious)


def test_keep_seen_puts_back_the_pixels_the_warp_saw_and_nothing_else():
    p = views.make_pair(evaluate_views.EVAL_SEED, 3)
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    same, pan = keep_seen(np.stack(noise), p["input"], [views.camera_change(), views.camera_change(0.5)])
    assert np.array_equal(same, p["input"])  # the identity sees everything: the input comes back exactly
    assert np.array_equal(pan[:, 33:], noise[1][:, 33:])  # half a frame to the right: the right half unseen
    assert np.abs(pan[:, :31].astype(int) - p["input"][:, 32:63]).max() <= 1  # the left half is the input's
    kept = keep_seen(noise[0], p["input"], p["camera"])[0]  # on a pair: the warp where it saw, else the sample
    _, unseen = warp_views(torch.tensor(p["input"]).permute(2, 0, 1)[None].float() / 127.5 - 1,
                           torch.from_numpy(p["camera"])[None])
    hole = unseen[0, 0].numpy() > 0.5
    assert hole.any() and (~hole).any() and np.array_equal(kept[hole], noise[0][hole])
    w = views.warp(p["input"], p["camera_in"], p["camera_out"])
    assert np.abs(kept[~hole].astype(int) - w[~hole]).mean() < 2
    with pytest.raises(ValueError, match="one each"):
        keep_seen(noise, [p["input"]] * 3, p["camera"])
    with pytest.raises(ValueError, match="one size"):
        keep_seen(noise, p["input"][:32, :32], p["camera"])
    with pytest.raises(ValueError, match="null camera"):
        keep_seen(noise, p["input"], np.zeros(5))


def test_the_models_warp_from_the_relative_camera_alone_is_the_cameras_warp():
    """:func:`warp_views` (torch, from the five relative numbers, any square size) moves pixels where
    :func:`views.warp` (OpenCV, from the two absolute cameras) does, and its mask is what the input did not see."""
    for i in range(12):
        p = views.make_pair(evaluate_views.EVAL_SEED, i)
        x = torch.from_numpy(p["input"].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        warped, unseen = warp_views(x, torch.from_numpy(p["camera"])[None])
        ref = views.warp(p["input"], p["camera_in"], p["camera_out"]).astype(np.float32)
        seen = unseen[0, 0].numpy() == 0
        got = (warped[0].permute(1, 2, 0).numpy() + 1) * 127.5
        assert np.abs(got[seen] - ref[seen]).mean() < 2.0, i
        assert (warped[0][:, ~torch.from_numpy(seen)] == 0).all()
        cover = views.warp(np.full((64, 64), 255, np.uint8), p["camera_in"], p["camera_out"], background=0)
        assert evaluate_views.mask_iou(seen, cover >= 255 * SEEN) > 0.97, i
    # the identity keeps every pixel, at any size; a pan right by half a frame leaves the right half unseen
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    same, unseen = warp_views(x, torch.from_numpy(np.stack([views.camera_change()] * 2)))
    assert torch.allclose(same, x, atol=1e-5) and unseen.sum() == 0
    _, unseen = warp_views(x[:1], torch.from_numpy(views.camera_change(dx=0.5))[None])
    assert unseen[0, 0, :, 21:].all() and not unseen[0, 0, :, :19].any()


def test_camera_token_starts_as_the_context_mean_and_reads_the_camera_after_training():
    enc = CameraTokenEncoder(16, 5)
    ctx = torch.randn(3, 7, 16)
    out = enc(ctx, torch.randn(3, 5))
    assert out.shape == (3, 8, 16)
    assert torch.allclose(out[:, :7], ctx) and torch.allclose(out[:, 7], ctx.mean(1), atol=1e-6)
    with torch.no_grad():
        enc.proj.weight[:, 16:].normal_()
    a, b = enc(ctx, torch.zeros(3, 5)), enc(ctx, torch.ones(3, 5))
    assert not torch.allclose(a[:, 7], b[:, 7])


def _smoke_pipeline(root, stage):
    import shutil
    rows = train.train(stage, root / "work", preset="smoke", base=BUNDLED["shapes"], progress=False)
    pipe_dir = root / "pipe"
    shutil.copytree(BUNDLED["shapes"], pipe_dir, ignore=shutil.ignore_patterns(
        "controlnet-*", "unet-[!i]*", "unet-views", "camera_embedder"))  # the text and inpainting UNets stay
    for name in ("unet-views", "camera_embedder"):
        shutil.copytree(root / "work" / name, pipe_dir / name)
    return rows[0], pipe_dir


@pytest.fixture(scope="module")
def smoke_views(tmp_path_factory):
    """A view model (the warped layout, over the bundled inpainting UNet) trained for 3 steps (smoke preset),
    with its pipeline folder."""
    return _smoke_pipeline(tmp_path_factory.mktemp("views"), "task-views")


@pytest.fixture(scope="module")
def smoke_zero123(tmp_path_factory):
    """Zero-1-to-3's own layout (8 channels, over the text UNet), 3 steps."""
    return _smoke_pipeline(tmp_path_factory.mktemp("zero123"), "task-views-zero123")


def test_the_view_model_goes_on_from_the_bundled_one(tmp_path):
    """``--init base`` for the view model starts from the base's adapter, ``conv_in`` and camera token (a fresh
    adapter's LoRA B is zero) and its record counts the runs it continues; a bad init is refused before any
    stage of the command trains."""
    import json
    from safetensors.torch import load_file
    from lab.shapes import tasks
    bundled = Path(BUNDLED["shapes"])
    rows = train.train("task-views", tmp_path / "work", preset="smoke", base=bundled, init="base", progress=False,
                       left_weight=5)
    assert rows[0]["stage"] == "task-views" and rows[0]["steps"] == 3 and rows[0]["init"] == "base"
    assert rows[0]["left_weight"] == 5.0
    before = json.loads((bundled / "unet-views" / tasks.TRAINING_RECORD).read_text())
    assert rows[0]["before"]["steps"] == before["steps"] + before.get("before", {}).get("steps", 0)
    runs = rows[0]["before"]["runs"]  # each run behind it, with its own recipe, oldest first
    assert [r["steps"] for r in runs] == [r["steps"] for r in before["before"].get("runs", [])] + [before["steps"]]
    assert runs[-1]["left_weight"] == before["left_weight"] and "before" not in runs[-1]
    assert sum(r["steps"] for r in runs) == rows[0]["before"]["steps"]
    for name in (LORA_FILE, PARTIAL_FILE):
        start, ours = load_file(bundled / "unet-views" / name), load_file(tmp_path / "work" / "unet-views" / name)
        assert set(start) == set(ours)
        moved = [k for k in start if "lora_B" in k or k.startswith("conv_in")]
        assert sum(start[k].float().abs().mean() for k in moved) / len(moved) > 1e-3  # trained, not a fresh start
        for k in start:  # three steps in the warm-up leave them all but unchanged
            assert torch.allclose(ours[k].float(), start[k].float(), atol=2e-3), k
    start = CameraTokenEncoder.from_pretrained(bundled / "camera_embedder").state_dict()
    ours = CameraTokenEncoder.from_pretrained(tmp_path / "work" / "camera_embedder").state_dict()
    fresh = CameraTokenEncoder(128, len(views.CAMERA_FEATURES), list(views.CAMERA_FEATURES)).state_dict()
    for k in start:  # the token learns at a few times the LoRA's rate
        assert (ours[k].float() - start[k].float()).abs().max() < 5e-3, k
        assert (start[k].float() - fresh[k].float()).abs().max() > 5e-2, k
    with pytest.raises(FileNotFoundError, match="needs a view model to go on from"):
        train.train("task-views", tmp_path / "none", preset="smoke", base=tmp_path / "empty", init="base",
                    progress=False)
    with pytest.raises(ValueError, match="unknown init 'gaussian' for the view model"):
        train.train("task-views", tmp_path / "none", preset="smoke", base=bundled, init="gaussian", progress=False)
    with pytest.raises(ValueError, match="of layout 'warped'"):  # the bundled one is not Zero-1-to-3's layout
        train.train("controlnet-depth,task-views-zero123", tmp_path / "none", preset="smoke", base=bundled,
                    init="base", progress=False)
    for bad in (0.5, float("nan"), float("inf"), "3"):  # a weight below 1 would draw leaving pairs less often
        with pytest.raises(ValueError, match="left_weight must be"):
            train.train("controlnet-depth,task-views", tmp_path / "none", preset="smoke", base=bundled,
                        left_weight=bad, progress=False)
    with pytest.raises(ValueError, match="left_weight is the view model's"):
        train.train("controlnet-depth", tmp_path / "none", preset="smoke", base=bundled, left_weight=5,
                    progress=False)
    assert not (tmp_path / "none").exists()
    # an adapter that does not cover this model's LoRA (here: one module's pair missing) is refused, not half-loaded
    import shutil
    from safetensors import safe_open
    from safetensors.torch import save_file
    broken = tmp_path / "broken"
    shutil.copytree(bundled, broken, ignore=shutil.ignore_patterns("controlnet-*"))
    with safe_open(str(broken / "unet-views" / LORA_FILE), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    gone = sorted(state)[0].rsplit(".lora_", 1)[0]
    save_file({k: v for k, v in state.items() if not k.startswith(gone + ".lora_")},
              str(broken / "unet-views" / LORA_FILE), metadata=meta)
    with pytest.raises(ValueError, match="does not fit this view model"):
        train.train("task-views", tmp_path / "none", preset="smoke", base=broken, init="base", progress=False)


def test_training_writes_an_adapter_that_diffusers_loads_as_the_lab_merges_it(smoke_views):
    from diffusers import UNet2DConditionModel
    from lab.token_encoders import load_partial
    import json
    row, pipe_dir = smoke_views
    assert row["stage"] == "task-views" and row["steps"] == 3 and row["lora_rank"] == 8 and row["layout"] == "warped"
    folder = pipe_dir / "unet-views"
    assert (folder / LORA_FILE).exists() and (folder / PARTIAL_FILE).exists()
    adapter = json.loads((folder / ADAPTER_FILE).read_text())
    base = adapter["base"]
    assert base == "unet-inpaint"
    # the weights it was trained over (the bundled model's, fp32 in training), by value, as the export has them (fp16)
    assert adapter["base_digest"] == weights_digest(BUNDLED["shapes"] / base) == weights_digest(pipe_dir / base)
    # give the adapter weight (3 steps leave LoRA's B near zero): the merge must be the same computation
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(folder / LORA_FILE), "pt") as f:
        meta = f.metadata()
        state = {k: (f.get_tensor(k) + 0.05 * torch.randn_like(f.get_tensor(k)) if "lora_B" in k else f.get_tensor(k))
                 for k in f.keys()}
    save_file(state, str(folder / LORA_FILE), metadata=meta)
    ours = UNet2DConditionModel.from_pretrained(pipe_dir / base)
    load_partial(ours, folder / PARTIAL_FILE)
    assert ours.config.in_channels == 9
    assert merge_lora(ours, folder / LORA_FILE) == len({k.rsplit(".lora_", 1)[0] for k in state})
    theirs = UNet2DConditionModel.from_pretrained(pipe_dir / base)
    load_partial(theirs, folder / PARTIAL_FILE)
    theirs.load_lora_adapter(str(folder), weight_name=LORA_FILE, adapter_name="views", prefix=None)
    x, t, ctx = torch.randn(2, 9, 16, 16), torch.tensor([500, 20]), torch.randn(2, 33, 128)
    with torch.no_grad():
        a, b = ours(x, t, ctx).sample, theirs(x, t, ctx).sample
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        merge_lora(ours, folder / PARTIAL_FILE)


def test_an_adapter_over_retrained_base_weights_loads_with_a_warning(smoke_views, tmp_path):
    """The view adapter goes over the inpainting UNet: if that UNet is retrained under it, the adapter is no
    longer the model that was measured, and loading says so (and still loads)."""
    import shutil
    import warnings

    from safetensors.torch import load_file, save_file
    _, pipe_dir = smoke_views
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lab.load(pipe_dir, task="views")
    assert not [w for w in seen if "over other weights" in str(w.message)]
    copy = tmp_path / "model"
    shutil.copytree(pipe_dir, copy)
    weights = copy / "unet-inpaint" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["conv_in.bias"] = state["conv_in.bias"] + 0.01
    save_file(state, str(weights))
    with pytest.warns(UserWarning, match="adapter .* was trained and measured over other weights of"):
        pipe = lab.load(copy, task="views")
    assert pipe.kind == "views"


def test_the_view_decoder_trains_a_lora_over_the_decoder_alone_that_lab_load_merges(tmp_path):
    """``--task views-decoder``: a LoRA over the VAE's decoder (the encoder, so the latent space every UNet was
    trained in, stays as it is), exported in fp16 and merged by ``lab.load(..., task="views")`` into the VAE as
    diffusers' ``load_lora_adapter`` computes it; its record names the VAE's weights, and a missing or retrained
    base is said so."""
    import json
    import shutil
    import warnings

    from diffusers import AutoencoderKL
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from lab.errors import IncompleteModel
    from lab.shapes.view_model import DECODER, export_view_model
    bundled = Path(BUNDLED["shapes"])
    rows = train.train("task-views-decoder", tmp_path / "work", preset="smoke", base=bundled, progress=False)
    assert rows[0]["stage"] == DECODER and rows[0]["steps"] == 3 and rows[0]["base_vae"] == "vae"
    work = tmp_path / "work" / DECODER
    adapter = json.loads((work / ADAPTER_FILE).read_text())
    assert adapter == {"base": "vae", "base_digest": weights_digest(bundled / "vae")}
    state = load_file(work / LORA_FILE)
    assert state and all(k.startswith("decoder.") for k in state)  # nothing of the encoder
    pipe_dir = tmp_path / "pipe"
    shutil.copytree(bundled, pipe_dir, ignore=shutil.ignore_patterns("controlnet-*", DECODER))
    export_view_model(tmp_path / "work", pipe_dir, part="decoder")
    with pytest.raises(ValueError, match="unknown part 'encoder'"):
        export_view_model(tmp_path / "work", pipe_dir, part="encoder")
    with safe_open(str(pipe_dir / DECODER / LORA_FILE), "pt") as f:
        meta = f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16} and "lora_adapter_metadata" in meta
        # give the adapter weight (3 steps leave LoRA's B near zero): the merge must be the same computation
        state = {k: (f.get_tensor(k) + 0.05 * torch.randn_like(f.get_tensor(k)) if "lora_B" in k else f.get_tensor(k))
                 for k in f.keys()}
    save_file(state, str(pipe_dir / DECODER / LORA_FILE), metadata=meta)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe = lab.load(pipe_dir, task="views")
    assert not [w for w in seen if "over other weights" in str(w.message)]
    plain = AutoencoderKL.from_pretrained(pipe_dir / "vae")
    theirs = AutoencoderKL.from_pretrained(pipe_dir / "vae")
    theirs.load_lora_adapter(str(pipe_dir / DECODER), weight_name=LORA_FILE, adapter_name="views", prefix=None)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = plain.encode(x).latent_dist.mean
        assert torch.equal(pipe.vae.encode(x).latent_dist.mean, z)  # the same latent space
        ours, want, before = pipe.vae.decode(z).sample, theirs.decode(z).sample, plain.decode(z).sample
    assert torch.allclose(ours, want, atol=1e-4), (ours - want).abs().max()
    assert (ours - before).abs().max() > 1e-2
    assert lab.load(pipe_dir, task="inpaint").vae.state_dict()["decoder.conv_out.weight"].equal(
        plain.state_dict()["decoder.conv_out.weight"])  # other tasks keep the plain VAE
    # the VAE under it retrained: it loads, with a warning; the VAE it names missing: a clear error
    weights = pipe_dir / "vae" / "diffusion_pytorch_model.safetensors"
    vae_state = load_file(str(weights))
    vae_state["decoder.conv_out.bias"] = vae_state["decoder.conv_out.bias"] + 0.01
    save_file(vae_state, str(weights))
    with pytest.warns(UserWarning, match="adapter .*vae-views.* over other weights of .*--task views-decoder"):
        lab.load(pipe_dir, task="views")
    (pipe_dir / DECODER / ADAPTER_FILE).write_text(json.dumps({"base": "vae-gone"}))
    with pytest.raises(IncompleteModel, match="adapter over .*vae-gone, which is missing"):
        lab.load(pipe_dir, task="views")
    with pytest.raises(ValueError, match="the view decoder starts from the VAE"):
        train.train("task-views-decoder", tmp_path / "none", preset="smoke", base=bundled, init="base",
                    progress=False)
    with pytest.raises(ValueError, match="left_weight is the view model's"):
        train.train("task-views-decoder", tmp_path / "none", preset="smoke", base=bundled, left_weight=5,
                    progress=False)
    assert not (tmp_path / "none").exists()


def test_view_model_samples_with_recording_and_refuses_bad_conditioning(smoke_views):
    _, pipe_dir = smoke_views
    pipe = lab.load(pipe_dir, task="views")
    assert pipe.kind == "views" and pipe.unet.config.in_channels == 9
    p = views.make_pair(evaluate_views.EVAL_SEED, 0)
    rec = lab.AttentionRecorder(kind="cross", heads="mean", half="cond")
    run = pipe.sampler([p["caption"], ""], steps=3, guidance=3.0, seed=0, progress=False, recorders=[rec],
                       conditioning=novel_view([p["input"], p["input"]], np.stack([p["camera"]] * 2))).run()
    assert len(run.images) == 2
    assert [c["layout"] for c in run.settings["conditioning"] if c["kind"] == "input-view"] == ["warped"]
    cross = run.attention["16x16"].ds
    assert cross.sizes["token"] == 33 and str(cross["word"].values[0, -1]) == "<camera>"
    s = pipe.sampler(p["caption"], steps=3, guidance=3.0, seed=0, progress=False,
                     recorders=[lab.AttentionRecorder(kind="cross", heads="mean", half="cond")],
                     conditioning=novel_view(p["input"], p["camera"]))
    s.step()  # a fork with a new prompt labels the camera token's table with the new prompt's words
    words = [str(w) for w in s.fork(prompt="a large blue square").run().attention["16x16"].ds["word"].values[0]]
    assert words[1:5] == ["a", "large", "blue", "square"] and words[5] == "" and words[-1] == "<camera>"
    with pytest.raises(ValueError, match="novel_view"):
        pipe.sampler(p["caption"], steps=2, conditioning=[InputView(p["input"])])
    with pytest.raises(ValueError, match="warps the input view"):  # the camera given to the token only
        pipe.sampler(p["caption"], steps=2, conditioning=[InputView(p["input"]), CameraToken(p["camera"])])
    with pytest.raises(ValueError, match="null camera"):
        novel_view(p["input"], np.zeros(5))
    with pytest.raises(ValueError, match="5 finite numbers"):
        CameraToken([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="RGB uint8"):
        pipe.sampler(p["caption"], steps=2, conditioning=novel_view(p["input"].astype(np.float32), p["camera"]))
    with pytest.raises(ValueError, match="the input view is 32x32"):
        pipe.sampler(p["caption"], steps=2, conditioning=novel_view(p["input"][:32, :32], p["camera"]))
    with pytest.raises(ValueError, match="cameras for 3 prompts"):
        pipe.sampler(["a", "b", "c"], steps=2, conditioning=novel_view(p["input"], np.stack([p["camera"]] * 2)))
    text = lab.load("shapes")
    with pytest.raises(ValueError, match="camera_embedder"):
        text.sampler("a red circle", steps=2, conditioning=[CameraToken(p["camera"])])


def test_zero123s_own_layout_trains_and_samples(smoke_zero123):
    row, pipe_dir = smoke_zero123
    assert row["stage"] == "task-views-zero123" and row["layout"] == "view" and row["base_unet"] == "unet"
    pipe = lab.load(pipe_dir, task="views")
    assert pipe.kind == "views" and pipe.unet.config.in_channels == 8
    p = views.make_pair(evaluate_views.EVAL_SEED, 0)
    run = pipe.sampler(p["caption"], steps=2, guidance=3.0, seed=0, progress=False,
                       conditioning=novel_view(p["input"], p["camera"])).run()
    assert run.images[0].size == (64, 64)
    assert [c["layout"] for c in run.settings["conditioning"] if c["kind"] == "input-view"] == ["view"]


def test_scoring_a_view_against_its_target():
    p = next(q for q in (views.make_pair(evaluate_views.EVAL_SEED, i) for i in range(100)) if q["left"].any())
    truth = evaluate_views.score_view(p["target"], p)
    inside = [r for r in truth if r["status"] == "in"]
    assert inside and all(r["found"] and r["iou"] > 0.9 and r["center_error"] < 0.5 for r in inside)
    assert all(r["absent"] for r in truth if r["status"] == "left")
    blank = np.full_like(p["target"], world.BACKGROUNDS[p["scene"].background])
    s = evaluate_views.summarise(evaluate_views.score_view(blank, p))
    assert s["view_iou"] == 0.0 and s["view_found"] == 0.0 and s["view_left_frame_absent"] == 1.0
    ps = [views.make_pair(evaluate_views.EVAL_SEED, i) for i in range(12)]  # the seen / revealed split
    t = evaluate_views.summarise([r for q in ps for r in evaluate_views.score_view(q["target"], q)])
    w = evaluate_views.summarise([r for q in ps for r in evaluate_views.score_view(
        views.warp(q["input"], q["camera_in"], q["camera_out"]), q)], "warp")
    assert t["view_iou_seen"] > 0.9 and t["view_iou_revealed"] > 0.9
    assert w["warp_iou_seen"] > 0.7 > w["warp_iou_revealed"]  # a warp keeps what it saw and lacks what it did not


def test_the_views_eval_takes_another_held_out_set_and_refuses_the_training_one(tmp_path):
    """``--pairs-seed``: another set of held-out pairs, recorded as ``eval_seed``; the training set's seed (0) and
    seeds that are not ints are refused before any model loads."""
    for bad in (0, -1, 2.5, True, "2500"):
        with pytest.raises(ValueError, match="pairs_seed"):
            evaluate_views.run_views_eval(2, pairs_seed=bad, model=tmp_path / "no-model")
    res = evaluate_views.run_views_eval(2, steps=2, pairs_seed=np.int64(2500), json_path=tmp_path / "e.json",
                                        progress=lambda m: None)
    assert res["eval_seed"] == 2500 and res["n"] == 2
    # the ceiling: the true targets through the pipeline's VAE (with the bundled decoder adapter) and the plain one
    assert res["decoder"] == "vae-views" and 0 < res["ceiling_iou"] <= 1 and 0 < res["ceiling_plain_vae_iou"] <= 1
    ours = [views.make_pair(2500, i) for i in range(2)]
    assert res["copy_baseline_iou"] == evaluate_views.summarise(
        [r for q in ours for r in evaluate_views.score_view(q["input"], q)], "copy")["copy_iou"]


@pytest.mark.parametrize("layout", ["view", "warped"])
def test_on_sd15s_architecture_the_sampler_is_zero123s_loop(layout):
    """Zero-1-to-3's design over SD 1.5's architecture (random weights, channels / 8): the lab's sampler with
    ``novel_view`` computes what a hand-written loop does (input latents concatenated, zeros in the
    unconditional half -- or the warped layout's mask and warped view's latents, nothing seen there; the camera
    token after the prompt's states, the null camera there; CFG; DDIM)."""
    from diffusers.utils.torch_utils import randn_tensor

    from lab.architectures import random_pipeline
    from lab.schedulers import make_scheduler
    from lab.shapes.view_model import view_pipeline
    vp = view_pipeline(random_pipeline("sd15", width=8, layers=2, seed=0), layout=layout)
    assert vp.kind == "views" and vp.unet.config.in_channels == {"view": 8, "warped": 9}[layout]
    with torch.no_grad():  # weight on the new inputs, so that both conditions matter
        vp.unet.conv_in.weight[:, 4:].normal_(0, 0.05)
        vp.components["camera_embedder"].proj.weight[:, -5:].normal_(0, 0.5)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
    cam = views.camera_change(0.1, -0.05, 1.2, 15)
    prompt, w, steps = "a red circle", 3.0, 4
    got = vp.sampler(prompt, steps=steps, guidance=w, seed=4, height=128, width=128, scheduler="ddim", progress=False,
                     conditioning=novel_view(image, cam)).run().final_latents
    sched = make_scheduler("ddim", vp.scheduler.config)
    sched.set_timesteps(steps)
    with torch.no_grad():
        pe, npe = vp.diffusers.encode_prompt(prompt, "cpu", 1, True, None)
        cams = torch.stack([torch.zeros(5), torch.from_numpy(cam)])
        ctx = vp.components["camera_embedder"](torch.cat([npe, pe]), cams)
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
        sf = vp.vae.config.scaling_factor
        if layout == "view":
            zc = vp.vae.encode(x).latent_dist.mean * sf
            cc = torch.cat([torch.zeros_like(zc), zc])
        else:
            warped, unseen = warp_views(x, torch.from_numpy(cam)[None])
            zc = vp.vae.encode(warped).latent_dist.mean * sf
            z0 = vp.vae.encode(torch.zeros_like(x)).latent_dist.mean * sf
            m = torch.nn.functional.interpolate(unseen, size=(16, 16))
            assert 0 < m.mean() < 0.5
            cc = torch.cat([torch.cat([torch.ones_like(m), m]), torch.cat([z0, zc])], 1)
        lat = randn_tensor((1, 4, 16, 16), generator=torch.Generator().manual_seed(4)) * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([lat] * 2), t)
            eps_u, eps_c = vp.unet(torch.cat([inp, cc], 1), t, encoder_hidden_states=ctx).sample.chunk(2)
            lat = sched.step(eps_u + w * (eps_c - eps_u), t, lat).prev_sample
    assert torch.allclose(got, lat, atol=1e-5), (got - lat).abs().max()
    # and the camera matters: another camera, another sample
    other = vp.sampler(prompt, steps=steps, guidance=w, seed=4, height=128, width=128, scheduler="ddim", progress=False,
                       conditioning=novel_view(image, views.camera_change(-0.2, 0.1, 0.8, -30))).run().final_latents
    assert (other - got).abs().max() > 1e-3


def test_the_shipped_view_model_is_its_adapter_and_reads_its_input_view_and_its_camera():
    """The bundled view model (its eval numbers are in docs/results/eval-views.json): the adapter it ships is what
    its training record says, over the UNet its ``lab_adapter.json`` names, and both conditions reach the samples:
    another input view, or another camera, with the same caption and seed, changes them."""
    import json

    from diffusers import UNet2DConditionModel
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe = lab.load("shapes", task="views")
    # its adapter file names the bundled inpainting UNet's weights (measured over them: eval-views.json)
    assert not [w for w in seen if "over other weights" in str(w.message)]
    folder = BUNDLED["shapes"] / "unet-views"
    rec = json.loads((folder / "lab_training.json").read_text())
    base = json.loads((folder / ADAPTER_FILE).read_text())["base"]
    assert pipe.kind == "views" and rec["lora_rank"] == 8 and rec["steps"] > 100
    assert base == rec["base_unet"] == "unet-inpaint" and rec["layout"] == "warped"
    assert pipe.unet.config.in_channels == 9
    start = UNet2DConditionModel.from_pretrained(BUNDLED["shapes"] / base)
    ours = dict(pipe.unet.named_parameters())
    moved = {n for n, q in start.named_parameters() if n in ours and not torch.equal(q, ours[n].to(q.dtype))}
    assert any(".attn1.to_q." in n for n in moved) and any(".resnets.0.conv1." in n for n in moved)
    assert not any(n.startswith("time_embedding.") or ".norm" in n for n in moved)  # no LoRA there
    a, b = views.make_pair(evaluate_views.EVAL_SEED, 0), views.make_pair(evaluate_views.EVAL_SEED, 1)
    kw = dict(steps=10, guidance=3.0, seed=0, progress=False)
    base_z = pipe.sampler(a["caption"], conditioning=novel_view(a["input"], a["camera"]), **kw).run().final_latents
    other_view = pipe.sampler(a["caption"], conditioning=novel_view(b["input"], a["camera"]), **kw).run().final_latents
    other_cam = pipe.sampler(a["caption"], conditioning=novel_view(a["input"], b["camera"]), **kw).run().final_latents
    assert (base_z - other_view).abs().mean() > 0.05
    assert (base_z - other_cam).abs().mean() > 0.05
    # its decoder adapter (vae-views): the VAE's encoder as it was (the latent space every UNet knows), the decoder
    # changed, and the true target views of held-out pairs come through it closer to themselves than through the plain
    # VAE, which pulls objects cut off by the frame in from its edge
    from diffusers import AutoencoderKL
    plain = AutoencoderKL.from_pretrained(BUNDLED["shapes"] / "vae")
    ours = dict(pipe.vae.named_parameters())
    changed = {n for n, q in plain.named_parameters() if not torch.equal(q, ours[n].to(q.dtype))}
    assert changed and all(n.startswith("decoder.") for n in changed)
    rec = json.loads((BUNDLED["shapes"] / "vae-views" / "lab_training.json").read_text())
    assert rec["stage"] == "vae-views" and rec["lora_rank"] == 8 and rec["steps"] > 100
    pairs = [views.make_pair(evaluate_views.EVAL_SEED, i) for i in range(50)]
    assert (evaluate_views.autoencoder_ceiling(pipe.vae, pairs)["ceiling_iou"]
            > evaluate_views.autoencoder_ceiling(plain, pairs)["ceiling_iou"] + 0.02)
