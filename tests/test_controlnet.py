"""ControlNet lab: modes and weight grids equal to diffusers, per-net residual recording, conditions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from components import PROMPT, controlnet, tiny_sd_components
from PIL import Image

import lab
from lab import conditions
from lab.shapes.world import SEG_PALETTE
from lab.schedulers import make_scheduler

KW = dict(steps=6, guidance=5.0, scheduler="ddim", seed=4, height=32, width=32, progress=False)


@pytest.fixture(scope="module")
def setup():
    comps = tiny_sd_components()
    a, b = controlnet(comps["unet"], seed=1), controlnet(comps["unet"], seed=2)
    pipe = lab.Pipeline.from_components(**comps, controlnets={"a": a, "b": b})
    img_a = np.zeros((32, 32, 3), np.uint8)
    img_a[6:26, 6:9] = 255
    img_b = np.zeros((32, 32, 3), np.uint8)
    img_b[20:23, 4:28] = 255
    return comps, pipe, a, b, Image.fromarray(img_a), Image.fromarray(img_b)


def _diffusers(comps, nets, **kw):
    from diffusers import StableDiffusionControlNetPipeline
    ref = StableDiffusionControlNetPipeline(**{**comps, "scheduler": make_scheduler("ddim", comps["scheduler"].config)},
                                            controlnet=nets, safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref(PROMPT, num_inference_steps=6, guidance_scale=5.0, height=32, width=32, output_type="latent",
               generator=torch.Generator().manual_seed(4), **kw).images


def test_equivalence_guess_mode(setup):
    comps, pipe, a, _, img_a, _ = setup
    run = pipe.sampler(PROMPT, control=lab.Control("a", img_a, scale=0.8, mode="control"), **KW).run()
    want = _diffusers(comps, a, image=img_a, controlnet_conditioning_scale=0.8, guess_mode=True)
    assert (run.final_latents - want).abs().max().item() < 1e-5


def test_equivalence_two_nets(setup):
    comps, pipe, a, b, img_a, img_b = setup
    run = pipe.sampler(PROMPT, control=[lab.Control("a", img_a, scale=0.7, end=0.8),
                                        lab.Control("b", img_b, scale=1.2, start=0.2)], **KW).run()
    want = _diffusers(comps, [a, b], image=[img_a, img_b], controlnet_conditioning_scale=[0.7, 1.2],
                      control_guidance_start=[0.0, 0.2], control_guidance_end=[0.8, 1.0])
    assert (run.final_latents - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("mode", ["balanced", "prompt", "control", "cfg_rw"])
def test_weight_grid_reproduces_each_mode(setup, mode):
    _, pipe, _, _, img_a, _ = setup
    named = lab.Control("a", img_a, scale=0.9, start=0.1, end=0.9, mode=mode)
    s = pipe.sampler(PROMPT, control=named, **KW)
    grid = s.control_grid(named)
    assert grid.shape == (len(pipe.controlnets["a"].controlnet_down_blocks) + 1, 6)
    by_name = s.run()
    explicit = lab.Control("a", img_a, weights=grid, halves="cond" if mode in ("control", "cfg_rw") else "both")
    by_grid = pipe.sampler(PROMPT, control=explicit, **KW).run()
    assert torch.equal(by_name.final_latents, by_grid.final_latents)


def test_mode_weights():
    c = lab.Control("x", None, scale=2.0, mode="prompt")
    w = c.block_weights([64] * 13)
    np.testing.assert_allclose(w, [2.0 * 0.825 ** (12 - i) for i in range(13)], rtol=0.01)
    rw = lab.Control("x", None, mode="cfg_rw").block_weights([64, 64, 64, 32, 32, 32, 16, 16, 16, 8, 8, 8, 8])
    assert rw[0] == pytest.approx(1 / 8) and rw[-1] == 1.0 and rw[3] == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="did you mean"):
        lab.Control("x", None, mode="ballanced").validate({"x": None})


def test_residuals_per_net_sum_to_what_the_unet_receives(setup, monkeypatch):
    _, pipe, _, _, img_a, img_b = setup
    rec = lab.ResidualRecorder(half="both", full=True, maps=True)
    seen = {}
    real = pipe.unet.forward

    def spy(*a, **k):
        if k.get("down_block_additional_residuals") is not None and "down" not in seen:
            seen["down"] = [r.clone() for r in k["down_block_additional_residuals"]]
            seen["mid"] = k["mid_block_additional_residual"].clone()
        return real(*a, **k)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    run = pipe.sampler(PROMPT, control=[lab.Control("a", img_a), lab.Control("b", img_b, scale=0.5)],
                       recorders=[rec], **KW).run()
    rec0 = run.steps[0].records
    for i, want in enumerate(seen["down"]):
        got = rec0[f"controlnet[a].down_block_res_samples.{i}"].tensor + rec0[f"controlnet[b].down_block_res_samples.{i}"].tensor
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(rec0["controlnet[a].mid_block_res_sample"].tensor + rec0["controlnet[b].mid_block_res_sample"].tensor,
                          seen["mid"], atol=1e-6)
    ds = run.residuals
    assert ds["norm"].dims == ("step", "net", "block", "batch") and list(ds["net"].values) == ["a", "b"]
    assert ds["block_name"].values[-1] == "mid_block_res_sample"
    assert np.isclose(float(ds["norm"].sel(net="a", block=0).isel(step=0, batch=1)),
                      float(rec0["controlnet[a].down_block_res_samples.0"].tensor[1].norm()), rtol=1e-5)


def test_residual_steps_line_up_with_the_run_and_windows_read_nan(setup):
    _, pipe, _, _, img_a, img_b = setup
    # "a" only in the second half of the steps, "b" only in the first 30% (diffusers' rule: step i of n is
    # kept when i/n >= start and (i+1)/n <= end, so of 6 steps only step 0); both CFG halves
    run = pipe.sampler(PROMPT, control=[lab.Control("a", img_a, start=0.5), lab.Control("b", img_b, end=0.3)],
                       recorders=[lab.ResidualRecorder(half="both")], **KW).run()
    norm = run.residuals["norm"]
    assert list(norm["step"].values) == list(range(KW["steps"])) and norm.sizes["batch"] == 2
    active = {n: [f"controlnet[{n}].mid_block_res_sample" in s.records for s in run.steps] for n in ("a", "b")}
    assert active["a"] == [False] * 3 + [True] * 3 and active["b"] == [True] + [False] * 5
    for n in ("a", "b"):
        on = np.array(active[n])
        assert np.isnan(norm.sel(net=n).values[~on]).all() and (norm.sel(net=n).values[on] > 0).all()
    # steps 1 and 2 have no net at all: rows of NaN, not missing rows
    assert np.isnan(norm.isel(step=[1, 2]).values).all()
    # a recorder's own step choice is what the rows are
    some = pipe.sampler(PROMPT, control=lab.Control("a", img_a, start=0.5),
                        recorders=[lab.ResidualRecorder(steps=[1, 4])], **KW).run()
    assert list(some.residuals["step"].values) == [1, 4]
    assert np.isnan(some.residuals["norm"].sel(step=1).values).all()
    assert not np.isnan(some.residuals["norm"].sel(step=4).values).any()


def test_recording_residuals_does_not_change_the_output(setup):
    _, pipe, _, _, img_a, _ = setup
    plain = pipe.sampler(PROMPT, control=lab.Control("a", img_a), **KW).run()
    rec = pipe.sampler(PROMPT, control=lab.Control("a", img_a), recorders=[lab.ResidualRecorder(maps=True)], **KW).run()
    assert torch.equal(plain.final_latents, rec.final_latents)


def test_residuals_saved_with_the_run(setup, tmp_path):
    import xarray as xr
    _, pipe, _, _, img_a, _ = setup
    run = pipe.sampler(PROMPT, control=lab.Control("a", img_a), recorders=[lab.ResidualRecorder()], **KW).run()
    back = lab.Run.load(run.save(tmp_path / "r.zarr"))
    xr.testing.assert_identical(run.residuals, back.residuals)


def test_shapes_scribble_places_the_object_and_residuals_follow_it(shapes_pipe):
    import analysis as an
    from lab.shapes import evaluator, world
    exs = [world.make_example(0, i, split="heldout", n_objects=1) for i in range(6)]
    run = shapes_pipe.sampler([e["caption"] for e in exs], steps=20, guidance=5.0, seed=0, progress=False,
                              control=lab.Control("scribble", [e["scribble"] for e in exs]),
                              recorders=[lab.ResidualRecorder(maps=True)]).run()
    ious = [evaluator.mask_iou(evaluator.detect(np.asarray(im))[2], e["masks"].any(0)) for im, e in zip(run.images, exs)]
    assert np.mean(ious) > 0.6, ious
    norms = an.residual_norms(run)
    assert (norms.values > 0).all()
    # the spatial maps are strongest on and near the scribble's strokes: at every block, and clearly so in
    # the first encoder block at the first step (measured: 2.1-2.4x on these six scenes)
    def ratio(block, step, b, e):
        m = an.residual_map(run, "scribble", block, step, batch=b).values
        near = np.asarray(Image.fromarray(e["scribble"][..., 0]).resize(m.shape[::-1], Image.BOX)) > 0
        return m[near].mean() / m[~near].mean()

    for b, e in enumerate(exs):
        assert ratio(1, 0, b, e) > 1.5
    for block in range(norms.sizes["block"]):
        assert np.mean([ratio(block, 10, b, e) for b, e in enumerate(exs)]) > 1.2, block


def test_sdxl_controlnet_architecture_runs_and_records():
    from diffusers import ControlNetModel

    from lab.architectures import random_pipeline
    pipe = random_pipeline("sdxl", width=20, max_depth=1, layers=2)
    net = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32, 48, 64)).eval()
    pipe.controlnets["xl"] = net
    cond = np.zeros((64, 64, 3), np.uint8)
    cond[8:56, 30:34] = 255
    run = pipe.sampler("a red circle", steps=2, guidance=5.0, height=64, width=64, progress=False,
                       control=lab.Control("xl", cond), recorders=[lab.ResidualRecorder()]).run()
    assert run.residuals.sizes["block"] == len(net.controlnet_down_blocks) + 1
    assert torch.isfinite(run.final_latents).all()


def test_conditions():
    from lab.shapes import world
    ex = world.make_example(0, 1, split="heldout")
    img = ex["image"]
    for fn in (conditions.canny, conditions.scribble, conditions.hough):
        out = fn(img)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and set(np.unique(out)) <= {0, 255}
        assert np.array_equal(out, fn(Image.fromarray(img)))  # deterministic, PIL or array
    assert conditions.canny(img).any() and conditions.scribble(img).sum() > conditions.canny(img).sum()
    square = np.full((64, 64, 3), 128, np.uint8)
    square[16:48, 16:48] = (200, 30, 30)
    assert conditions.hough(square).any()
    classes, names = conditions.segmentation_to_classes(ex["segmentation"], SEG_PALETTE)
    assert np.array_equal(conditions.classes_to_segmentation(classes, names, SEG_PALETTE), ex["segmentation"])
    with pytest.raises(TypeError):
        conditions.canny(img.astype(np.float32))
    with pytest.raises(TypeError):
        conditions.canny("image.png")
    with pytest.raises(ValueError, match="empty"):
        conditions.canny(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(ValueError, match="palette"):
        conditions.segmentation_to_classes(np.full((8, 8, 3), 77, np.uint8), SEG_PALETTE)


def test_one_canny_for_users_and_the_edges_controlnet():
    """The world's edges condition (the edges ControlNet's training data) is lab.conditions.canny: Canny on the
    colour image, as ControlNet's annotator runs cv2.Canny on the RGB array. An edge between two colours of
    equal brightness is found (a grayscale Canny misses it)."""
    import cv2

    from lab.shapes import world
    for seed in range(6):
        ex = world.make_example(seed, 2, split="heldout")
        assert np.array_equal(ex["edges"], conditions.canny(ex["image"]))
        assert np.array_equal(world.edges(ex["image"]), conditions.canny(Image.fromarray(ex["image"])))
    two = np.zeros((32, 32, 3), np.uint8)
    two[:, :16] = (196, 0, 0)  # luma 58.6
    two[:, 16:] = (0, 100, 0)  # luma 58.7
    assert conditions.canny(two)[:, 14:18].any()
    assert not cv2.Canny(cv2.cvtColor(two, cv2.COLOR_RGB2GRAY), 100, 200).any()


def test_ablation_of_a_block(setup):
    _, pipe, _, _, img_a, _ = setup
    s = pipe.sampler(PROMPT, control=lab.Control("a", img_a), **KW)
    s.step()
    s.step()
    ab = lab.ablate(s, "a", "mid_block_res_sample", at=2, steps=(2, 4))
    assert s.position == 2  # the sampler is left where it was
    assert len(ab.base) == len(ab.ablated) == 6
    for k in range(2):  # shared history
        assert torch.equal(ab.base.steps[k].prev_latents, ab.ablated.steps[k].prev_latents)
    assert float(ab.latent_distance[1]) == 0.0 and float(ab.latent_distance[-1]) > 0
    assert (ab.grid[-1, 2:5] == 0).all() and (ab.grid[-1, 5:] == 1).all() and (ab.grid[:-1] == 1).all()
    same = lab.ablate(s, "a", 3, at=2, scale=1.0)
    assert float(same.latent_distance.max()) == 0.0 and same.image_delta == 0.0
    with pytest.raises(KeyError, match="blocks"):
        lab.ablate(s, "a", "mid_block")
    with pytest.raises(KeyError):
        lab.ablate(s, "zzz", 0)
