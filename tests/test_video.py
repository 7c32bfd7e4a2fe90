"""Text2Video-Zero (lab.video): equivalence with diffusers' TextToVideoZeroPipeline, the plug-ins, the record,
background smoothing, the bad-input table and the eval's measures."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from components import tiny_sd_components, tiny_sdxl_components

import lab
from lab.foundation.video import (CrossFrameAttention, StartAt, content_motion, diffusers_strength,
                                  foreground_masks)
from lab.schedulers import make_scheduler
from lab.shapes.evaluate_video import flicker, identity, motion_fit, track

TOL = 1e-5
PROMPT = "a large red circle on a gray background"


def _diffusers_video(comps, *, seed, **kw):
    from diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_zero import (
        TextToVideoZeroPipeline)
    ref = TextToVideoZeroPipeline(**{**comps, "scheduler": make_scheduler("ddim", comps["scheduler"].config)},
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref(generator=torch.Generator().manual_seed(seed), output_type="latent", **kw).images


@pytest.fixture(scope="module")
def sd15():
    """SD 1.5's architecture (channels / 8, two text-encoder layers) with random weights: real layer names,
    four resolutions, eight attn1 layers per direction."""
    from lab.architectures import random_pipeline
    return random_pipeline("sd15", width=8, layers=2, seed=0)


def _components(pipe) -> dict:
    return {k: v for k, v in pipe.components.items() if k in ("vae", "unet", "text_encoder", "tokenizer", "scheduler")}


@pytest.mark.parametrize("motion", [(-12.0, -12.0), (6.0, -3.0)])
def test_video_equivalence_sd15_architecture(sd15, motion):
    """lab.video on SD 1.5's architecture equals diffusers' pipeline: same modules, seed, DDIM schedule, t0/t1,
    cross-frame attention and the motion field (the content motion in px per frame, converted)."""
    size, frames, steps = 128, 3, 10
    v = lab.video(sd15, PROMPT, frames=frames, motion=motion, steps=steps, t0=5, t1=7, guidance=7.5, seed=4,
                  height=size, width=size, negative_prompt="a black background")
    sx, sy = diffusers_strength(motion, size, size)
    want = _diffusers_video(_components(sd15), seed=4, prompt=PROMPT, negative_prompt="a black background",
                            video_length=frames, height=size, width=size, num_inference_steps=steps,
                            guidance_scale=7.5, motion_field_strength_x=sx, motion_field_strength_y=sy, t0=5, t1=7)
    got = v.frames.final_latents
    assert got.shape == want.shape == (frames, 4, size // 8, size // 8)
    diff = (got - want).abs().max().item()
    assert diff < TOL, f"max abs diff {diff:.3g}"
    # the comparison can fail: without cross-frame attention the lab's frames are not diffusers'
    plain = lab.video(sd15, PROMPT, frames=frames, motion=motion, steps=steps, t0=5, t1=7, guidance=7.5, seed=4,
                      height=size, width=size, negative_prompt="a black background", cross_frame=False)
    assert (plain.frames.final_latents[1:] - want[1:]).abs().max().item() > 1e-3
    # the processors diffusers set and restored are the UNet's own again, and lab set none
    assert {type(p).__name__ for p in sd15.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert v.start_step == steps - 7 - 1 and len(v.frames) == 8 and len(v.first) == steps - 5 - 1


def test_video_equivalence_default_motion_and_tiny_unet():
    """diffusers' default motion (strength 12) on another UNet layout (the tests' tiny SD components)."""
    comps = tiny_sd_components()
    pipe = lab.Pipeline.from_components(**comps)
    v = lab.video(pipe, PROMPT, frames=4, steps=6, t0=2, t1=4, guidance=6.0, seed=1, height=32, width=32)
    want = _diffusers_video(comps, seed=1, prompt=PROMPT, video_length=4, height=32, width=32, num_inference_steps=6,
                            guidance_scale=6.0, t0=2, t1=4)
    diff = (v.frames.final_latents - want).abs().max().item()
    assert diff < TOL, f"max abs diff {diff:.3g}"


def test_video_runs_on_an_sdxl_layout():
    """The same procedure on SDXL's layout (two text encoders, micro-conditioning): frame 0 as sampled alone, the
    others moved and different."""
    pipe = lab.Pipeline.from_components(**tiny_sdxl_components())
    v = lab.video(pipe, PROMPT, frames=3, motion=(8, 0), steps=6, t0=2, t1=4, guidance=5.0, seed=0, height=32, width=32)
    alone = pipe.sampler(PROMPT, steps=6, guidance=5.0, scheduler="ddim", seed=0, height=32, width=32,
                         progress=False).run().final_latents
    assert v.frames.final_latents.shape == (3, *alone.shape[1:]) and torch.isfinite(v.frames.final_latents).all()
    assert torch.allclose(v.frames.final_latents[:1], alone, atol=1e-4)
    assert (v.frames.final_latents[1] - v.frames.final_latents[0]).abs().max() > 1e-3


def test_motion_conventions():
    assert diffusers_strength(None, 64, 64) == (12.0, 12.0)
    assert diffusers_strength((4, -2), 64, 64) == (-32.0, 16.0)
    assert content_motion(diffusers_strength((4, -2), 64, 128), 64, 128) == (4.0, -2.0)
    assert content_motion((12.0, 12.0), 512, 512) == (-12.0, -12.0)


@pytest.fixture(scope="module")
def shapes_video(shapes_pipe):
    rec = lab.AttentionRecorder()
    return lab.video(shapes_pipe, PROMPT, frames=4, motion=(4, 0), steps=20, t0=15, t1=18, guidance=5.0, seed=0,
                     recorders=[rec])


def test_video_record_has_frames_and_global_steps(shapes_video):
    v = shapes_video
    ds = v.to_xarray()
    assert ds["latents"].dims == ("step", "frame", "channel", "y", "x")
    assert ds.sizes["frame"] == 4 and list(ds["step"].values) == list(range(1, 20))  # from t1 = step 20 - 18 - 1
    assert ds["pred_x0"].shape == ds["latents"].shape
    # the frames' run: cross-frame attention is described; the first frame's early steps are their own run
    n_self = sum(n.endswith("attn1") for n in lab.attention_layer_names(v.frames.pipe.unet))
    assert v.frames.recording_meta["cross_frame"] == {"frame": 0, "frames": 4, "layers": n_self}
    assert v.first.final_latents.shape[0] == 1 and len(v.first) == 20 - 15 - 1
    # per-frame heat maps: the attention record has one row per frame
    from analysis.attention import word_heatmap
    maps = [word_heatmap(v.frames, "circle", batch=k) for k in range(4)]
    assert all(m.shape == maps[0].shape and np.isfinite(m.values).all() for m in maps)
    from analysis import frame_heatmaps
    stacked = frame_heatmaps(v, "circle")
    assert stacked.dims == ("frame", "y", "x") and stacked.sizes["frame"] == 4
    np.testing.assert_array_equal(stacked.sel(frame=2).values, maps[2].values)
    # the map follows the object: its peak column moves right with the content (4 px per frame asked)
    cols = [int(np.argmax(m.values.sum(0))) for m in maps]
    assert cols[-1] > cols[0]
    assert len(v.images) == 4 and v.array().shape == (4, 64, 64, 3)
    assert "frames" in repr(v)


def test_frame_zero_attends_to_itself_and_cross_frame_changes_the_others(shapes_pipe, shapes_video):
    """Frame 0 is the same with and without cross-frame attention (its keys are its own); the others change."""
    plain = lab.video(shapes_pipe, PROMPT, frames=4, motion=(4, 0), steps=20, t0=15, t1=18, guidance=5.0, seed=0,
                      cross_frame=False)
    a, b = shapes_video.frames.final_latents, plain.frames.final_latents
    assert torch.allclose(a[0], b[0], atol=1e-4)
    assert (a[1:] - b[1:]).abs().max() > 1e-2
    assert "cross_frame" not in plain.frames.recording_meta


def test_cross_frame_is_bound_to_its_sampler(shapes_pipe):
    """While a cross-frame sampler is half-way, a plain sampler on the same pipeline samples exactly as alone."""
    alone = shapes_pipe.sampler(PROMPT, steps=4, guidance=5.0, seed=2, progress=False).run().final_latents
    s = shapes_pipe.sampler(PROMPT, steps=4, guidance=5.0, seed=0, batch=3, progress=False,
                            recorders=[CrossFrameAttention(3)])
    s.step()
    other = shapes_pipe.sampler(PROMPT, steps=4, guidance=5.0, seed=2, progress=False).run().final_latents
    s.run()
    assert torch.equal(alone, other)


def test_motion_dynamics_off_starts_every_frame_from_its_own_noise(shapes_pipe):
    v = lab.video(shapes_pipe, PROMPT, frames=3, steps=8, t0=3, t1=5, guidance=5.0, seed=0, motion_dynamics=False)
    assert v.first is None and v.start_step == 0 and len(v.frames) == 8
    x_t = v.frames.steps[0].latents
    assert (x_t[1] - x_t[0]).abs().max() > 0.5


def test_background_smoothing_blends_the_background_only(shapes_pipe):
    frames = 3
    masks = np.zeros((frames, 64, 64), bool)
    masks[:, 16:48, 16:48] = True
    v = lab.video(shapes_pipe, PROMPT, frames=frames, motion=(0, 0), steps=10, t0=5, t1=7, guidance=5.0, seed=0,
                  background_smoothing=True, masks=masks)
    assert v.unsmoothed is not None and v.masks.shape == (frames, 64, 64)
    x_s, x_u = v.frames.steps[0].latents, v.unsmoothed.steps[0].latents
    assert torch.allclose(x_s[0], x_u[0], atol=1e-6)  # frame 0 blended with its own background: a x + (1 - a) x
    diff = (x_s - x_u).abs().amax(dim=(0, 1))  # [h, w]
    assert diff[6:10, 6:10].max() == 0  # inside the (dilated) foreground: untouched
    assert diff[0, :].max() > 0  # the background corners moved toward frame 0's
    # with the automatic masks (the saliency proxy) it runs too
    auto = lab.video(shapes_pipe, PROMPT, frames=frames, motion=(4, 0), steps=10, t0=5, t1=7, guidance=5.0, seed=0,
                     background_smoothing=True)
    assert auto.masks.dtype == bool and auto.masks.any() and not auto.masks.all()


def test_foreground_masks_find_an_object():
    im = np.full((2, 32, 32, 3), 128, np.uint8)
    im[:, 8:16, 10:20] = (220, 30, 30)
    m = foreground_masks(im)
    assert m[:, 8:16, 10:20].all() and m.sum() == 2 * 8 * 10
    with pytest.raises(ValueError, match="frames, H, W, 3"):
        foreground_masks(im[0])


@pytest.mark.parametrize("kw,match", [
    (dict(frames=1), "frames must be an int >= 2"),
    (dict(frames=2.5), "frames must be an int >= 2"),
    (dict(t0=5, t1=5), "0 <= t0 < t1"),
    (dict(t0=2, t1=20, steps=10), "0 <= t0 < t1"),
    (dict(motion=(float("nan"), 0)), "motion must be"),
    (dict(motion=(1, 2, 3)), "motion must be"),
    (dict(motion=(40, 0), frames=4), "more than the whole image"),
    (dict(smoothing_strength=1.5), "smoothing_strength"),
    (dict(masks=np.zeros((2, 64, 64), bool), frames=3), "masks must be"),
    (dict(prompt=""), "prompt must be a non-empty string"),
])
def test_video_bad_input(shapes_pipe, kw, match):
    args = dict(prompt=PROMPT, frames=3, steps=10, t0=5, t1=7)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        lab.video(shapes_pipe, args.pop("prompt"), **args)


def test_plugins_bad_input(shapes_pipe):
    with pytest.raises(ValueError, match="frames must be a positive int"):
        CrossFrameAttention(0)
    with pytest.raises(ValueError, match="frame must be within"):
        CrossFrameAttention(2, frame=2)
    s = shapes_pipe.sampler(PROMPT, steps=3, seed=0, batch=2, progress=False, recorders=[CrossFrameAttention(3)])
    with pytest.raises(ValueError, match="needs a sampler with batch=3"):
        s.step()
    with pytest.raises(ValueError, match="StartAt latents have shape"):
        shapes_pipe.sampler(PROMPT, steps=3, progress=False, conditioning=[StartAt(torch.zeros(2, 4, 16, 16), 1)])
    with pytest.raises(ValueError, match="StartAt step"):
        shapes_pipe.sampler(PROMPT, steps=3, progress=False, conditioning=[StartAt(torch.zeros(1, 4, 16, 16), 3)])
    with pytest.raises(ValueError, match="NaN"):
        StartAt(torch.full((1, 4, 16, 16), float("nan")), 0)


def test_eval_measures_on_drawn_tracks():
    """The eval's measures on frames drawn by hand: a square moving 4 px per frame."""
    frames = np.full((5, 64, 64, 3), 128, np.uint8)
    for k in range(5):
        frames[k, 20:36, 8 + 4 * k:24 + 4 * k] = (220, 30, 30)
    tr = track(frames)
    slope, r2 = motion_fit(np.array([t["x"] for t in tr]))
    assert abs(slope - 4.0) < 1e-6 and r2 > 0.999
    assert identity(tr) == 1.0
    assert flicker(frames, tr) == 0.0
    noisy = frames.copy()
    noisy[3, :4, :4] = 0  # a background change
    assert flicker(noisy, track(noisy)) > 0
    frames[4, 20:36] = 128
    frames[4, 40:50, 40:50] = (30, 30, 220)  # a different object in the last frame
    assert identity(track(frames)) == 0.75


def test_video_viewer_holds_every_frame_of_every_step(shapes_video):
    import io

    from PIL import Image

    import widgets
    v = widgets.VideoViewer(shapes_video, size=128, strip=48)
    n_steps, n_frames = len(shapes_video.frames), shapes_video.n_frames
    assert len(v.main.children) == n_steps and all(len(s.children) == n_frames for s in v.main.children)
    assert v.step_slider.max == n_steps - 1 and v.play.max == n_frames - 1
    assert v.step_slider.value == n_steps - 1  # opens on the last step
    # the last step's frames are the decoded x0 estimates of the frames, in frame order
    last = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in v.pngs[-1]]
    want = shapes_video.frames.pipe.decode(shapes_video.frames.steps[-1].pred_x0)
    for got, w in zip(last, want):
        assert np.array_equal(got, np.asarray(w.convert("RGB")))
    assert "step 1 " in v.step_labels.children[0].value  # numbered on the whole schedule
    x0 = widgets.VideoViewer(shapes_video, panel="x0")
    assert len(x0.pngs) == n_steps
    with pytest.raises(ValueError, match="unknown panel"):
        widgets.VideoViewer(shapes_video, panel="noise")
    with pytest.raises(TypeError, match="shows a lab.Video"):
        widgets.VideoViewer(shapes_video.frames)
