"""lab.replay: a run made again from its file, bit for bit on CPU (latents of every step), for plain, forked,
ControlNet and inpainting runs; refused on other weights (issue 17, part 2)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from components import PROMPT, controlnet, tiny_sd_components
from PIL import Image

import lab
from lab import Run


def _max_diff(a: Run, b: Run) -> float:
    assert [s.index for s in a.steps] == [s.index for s in b.steps]
    assert [s.timestep for s in a.steps] == [s.timestep for s in b.steps]
    d = max(float((x.latents - y.latents).abs().max()) for x, y in zip(a.steps, b.steps))
    return max(d, float((a.final_latents - b.final_latents).abs().max()))


def _from_file(run, tmp_path, pipe, name="r.zarr"):
    return lab.replay(run.save(tmp_path / name), pipe)


@pytest.fixture(scope="module")
def pipe():
    comps = tiny_sd_components()
    return lab.Pipeline.from_components(**comps, controlnets={"a": controlnet(comps["unet"], seed=1),
                                                              "b": controlnet(comps["unet"], seed=2)})


def _image(seed, size=32):
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


KW = dict(steps=5, seed=3, height=32, width=32, progress=False)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++2m", "pndm", "euler_a"])
def test_plain_runs_replay_exactly(pipe, tmp_path, scheduler):
    run = pipe.sampler(PROMPT, "gray", guidance=4.0, scheduler=scheduler, **KW).run()
    assert _max_diff(run, _from_file(run, tmp_path, pipe)) == 0.0


def test_a_fork_tree_replays_and_keeps_the_original_prompt(pipe, tmp_path):
    s = pipe.sampler(PROMPT, guidance=4.0, scheduler="ddim", **KW)
    for _ in range(2):
        s.step()
    a = s.fork(prompt="a small blue square", seed=11)
    a.step()
    b = a.fork(guidance=6.0, scheduler="ddpm", recorders=[lab.AttentionRecorder()])
    run = b.run()
    back = Run.load(run.save(tmp_path / "f.zarr"))
    assert back.settings["prompt"] == "a small blue square"
    assert back.recipe.args["prompt"] == PROMPT  # the root of the tree is kept
    assert [(k, sorted(c)) for k, c in back.recipe.plan] == [(2, ["prompt", "seed"]),
                                                            (3, ["guidance", "recorders", "scheduler"])]
    again = lab.replay(back, pipe)
    assert _max_diff(run, again) == 0.0
    assert again.has_attention() and again.settings["forks"][1]["step"] == 3


@pytest.mark.parametrize("image", ["pil", "uint8", "float", "tensor", "two nets"])
def test_controlnet_runs_replay_exactly(pipe, tmp_path, image):
    img = _image(0)
    cond = {"pil": Image.fromarray(img), "uint8": img, "float": img / 255.0,
            "tensor": torch.from_numpy(img).permute(2, 0, 1).float() / 255}.get(image)
    if image == "two nets":
        control = [lab.Control("a", img, scale=0.7, start=0.2, end=0.8, mode="prompt"),
                   lab.Control("b", _image(1), weights=np.linspace(0, 1, 5 * 5).reshape(5, 5))]
    else:
        control = lab.Control("a", cond, scale=0.8, mode="cfg_rw")
    run = pipe.sampler(PROMPT, guidance=4.0, scheduler="euler", control=control,
                       recorders=[lab.ResidualRecorder(maps=True)], **KW).run()
    back = Run.load(run.save(tmp_path / "c.zarr"))
    assert _max_diff(run, lab.replay(back, pipe)) == 0.0
    # residual maps are saved with the norms
    np.testing.assert_array_equal(back.residual_map("a", 3, 2), run.residual_map("a", 3, 2))


def test_a_fork_that_changes_the_control_replays(pipe, tmp_path):
    s = pipe.sampler(PROMPT, guidance=4.0, scheduler="ddim", control=lab.Control("a", _image(0)), **KW)
    s.step(), s.step()
    run = s.fork(control=lab.Control("b", _image(5), scale=0.5)).run()
    assert _max_diff(run, _from_file(run, tmp_path, pipe)) == 0.0


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_runs_replay_exactly(tmp_path, strength):
    comps = tiny_sd_components(in_channels=9)
    pipe = lab.Pipeline.from_components(**comps)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    run = pipe.sampler(PROMPT, guidance=4.0, scheduler="ddim", image=Image.fromarray(_image(4)),
                       mask_image=Image.fromarray(mask), strength=strength, **KW).run()
    assert _max_diff(run, _from_file(run, tmp_path, pipe)) == 0.0


def test_prompt_to_prompt_edits_replay_with_their_source(pipe, tmp_path):
    src = pipe.sampler(PROMPT, guidance=4.0, scheduler="ddim", recorders=[lab.AttentionRecorder(heads="all")],
                       **KW).run()
    edits = [lab.ReplaceAttention(src, steps=(0.0, 0.6)), lab.Reweight({"green": 3.0}, steps=(1, 3))]
    run = pipe.sampler(PROMPT.replace("red", "green"), guidance=4.0, scheduler="ddim",
                       recorders=[lab.AttentionRecorder(edits=edits, record=False)], **KW).run()
    plain = pipe.sampler(PROMPT.replace("red", "green"), guidance=4.0, scheduler="ddim", **KW).run()
    assert _max_diff(run, plain) > 0  # the edits changed the trajectory ...
    assert _max_diff(run, _from_file(run, tmp_path, pipe)) == 0.0  # ... and the replay makes them again


def test_other_weights_are_refused(pipe, tmp_path):
    run = pipe.sampler(PROMPT, guidance=4.0, control=lab.Control("a", _image(0)), **KW).run()
    path = run.save(tmp_path / "r.zarr")
    comps = tiny_sd_components()
    comps["unet"] = type(comps["unet"]).from_config(comps["unet"].config)  # other random weights
    other = lab.Pipeline.from_components(**comps, controlnets={"a": pipe.controlnets["a"]})
    with pytest.raises(lab.WeightsMismatch, match="unet differs"):
        lab.replay(path, other)
    no_net = lab.Pipeline.from_components(**tiny_sd_components())
    with pytest.raises(lab.WeightsMismatch, match=r"ControlNet\(s\) \['a'\].*not loaded"):
        lab.replay(path, no_net)
    half = lab.Pipeline.from_components(**tiny_sd_components(), controlnets={"a": controlnet(
        tiny_sd_components()["unet"], seed=1)}).to(dtype=torch.bfloat16)
    with pytest.raises(lab.WeightsMismatch, match="bfloat16"):
        lab.replay(path, half)


def test_weights_changed_in_place_are_seen(pipe):
    before = pipe.weights()
    with torch.no_grad():
        p = next(pipe.vae.parameters())
        kept = p.clone()
        p.add_(1.0)
        assert pipe.weights()["vae"] != before["vae"]
        p.copy_(kept)
    assert pipe.weights() == before


def test_what_cannot_be_replayed_says_why(pipe, tmp_path):
    g = torch.Generator().manual_seed(0)
    run = pipe.sampler(PROMPT, generator=g, steps=2, height=32, width=32, progress=False).run()
    with pytest.raises(ValueError, match="external torch.Generator"):
        lab.replay(Run.load(run.save(tmp_path / "g.zarr")), pipe)

    class Mine(lab.conditioning.Conditioning):
        kind, enters = "mine", "nothing"

        def apply(self, x, step):
            pass
    run = pipe.sampler(PROMPT, conditioning=[Mine()], steps=2, height=32, width=32, progress=False).run()
    with pytest.raises(ValueError, match="only lab's and diffusers' own classes are stored"):
        lab.replay(run.save(tmp_path / "m.zarr"), pipe)


def test_the_file_holds_settings_versions_and_weights(pipe, tmp_path):
    run = pipe.sampler(PROMPT, guidance=4.0, scheduler="euler", control=lab.Control("a", _image(0)), **KW).run()
    import xarray as xr
    attrs = xr.open_zarr(run.save(tmp_path / "r.zarr"), consolidated=False).attrs
    config = json.loads(attrs["config"])
    assert config["scheduler_config"]["num_train_timesteps"] == 1000
    assert set(config["weights"]) == {"unet", "text_encoder", "vae", "controlnet[a]"}  # the nets it used
    assert set(config["versions"]) >= {"latent-lab", "torch", "diffusers", "transformers"}
    recipe = json.loads(attrs["recipe"])
    assert recipe["args"]["scheduler"]["class"] == "EulerDiscreteScheduler"
    assert recipe["args"]["control"]["$"] == "control"
