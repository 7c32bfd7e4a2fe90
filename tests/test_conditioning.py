"""Conditioning plug-ins (issue 16): the kinds the lecture's table names enter through one loop, and forks
build new samplers from snapshots that share no mutable state with their parent."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from components import PROMPT, controlnet, tiny_sd_components, unet
from PIL import Image

import lab
from lab.conditioning import Concat, Conditioning, ControlNet, Inpainting, Text
from lab.schedulers import make_scheduler

KW = dict(steps=5, guidance=4.0, scheduler="ddim", seed=3, height=32, width=32, progress=False)


@pytest.fixture(scope="module")
def pipe():
    comps = tiny_sd_components()
    return lab.Pipeline.from_components(**comps, controlnets={"a": controlnet(comps["unet"], seed=1)})


def _bar(horizontal: bool) -> Image.Image:
    img = np.zeros((32, 32, 3), np.uint8)
    if horizontal:
        img[14:18, 4:28] = 255
    else:
        img[4:28, 14:18] = 255
    return Image.fromarray(img)


def test_plugins_and_provenance(pipe):
    s = pipe.sampler(PROMPT, control=lab.Control("a", _bar(True)), **KW)
    assert [type(p) for p in s.conditioning] == [Text, ControlNet]
    assert [(p.kind, p.enters) for p in s.conditioning] == [("text", "CA"), ("controlnet[a]", "residuals")]
    run = s.run()
    assert run.settings["conditioning"] == [{"kind": "text", "enters": "CA", "prompt": PROMPT}]
    assert run.settings["controls"][0]["net"] == "a"


def test_class_label_equals_a_hand_written_loop():
    """A UNet with a class embedding: class_labels for the conditional half, null_class for the unconditional
    one; the lab's loop equals the loop written out with the diffusers modules."""
    comps = tiny_sd_components()
    torch.manual_seed(0)
    u = unet()
    u = type(u)(**{**u.config, "num_class_embeds": 5}).eval()
    comps["unet"] = u
    pipe = lab.Pipeline.from_components(**comps)
    run = pipe.sampler(PROMPT, class_labels=[2], null_class=4, **KW).run()
    sched = make_scheduler("ddim", comps["scheduler"].config)
    sched.set_timesteps(5)
    with torch.no_grad():
        pe, npe = pipe.diffusers.encode_prompt(PROMPT, "cpu", 1, True, None)
        emb = torch.cat([npe, pe])
        x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(3)) * sched.init_noise_sigma
        labels = torch.tensor([4, 2])
        for t in sched.timesteps:
            out = u(sched.scale_model_input(torch.cat([x, x]), t), t, encoder_hidden_states=emb,
                    class_labels=labels).sample
            uncond, cond = out.chunk(2)
            x = sched.step(uncond + 4.0 * (cond - uncond), t, x).prev_sample
    assert torch.equal(run.final_latents, x)
    other = pipe.sampler(PROMPT, class_labels=[1], null_class=4, **KW).run()
    assert not torch.equal(other.final_latents, run.final_latents)
    with pytest.raises(ValueError, match="null_class"):
        pipe.sampler(PROMPT, class_labels=[1], **KW)
    with pytest.raises(ValueError, match="outside"):
        pipe.sampler(PROMPT, class_labels=[7], null_class=4, **KW)
    with pytest.raises(ValueError, match="class embedding"):
        lab.Pipeline.from_components(**tiny_sd_components()).sampler(PROMPT, class_labels=1, null_class=0, **KW)


class ConstantChannel(Concat):
    """A new concat kind, written outside the lab: one constant channel appended to the latents."""

    kind = "constant"

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def setup(self, s):
        h, w = s.latent_hw
        self.channels = (torch.full((s.layout.rows, 1, h, w), self.value, dtype=s.dtype),)


def test_a_new_concat_kind_plugs_in_without_touching_the_loop(monkeypatch):
    comps = tiny_sd_components(in_channels=5)
    pipe = lab.Pipeline.from_components(**comps)
    seen = []
    real = pipe.unet.forward

    def spy(sample, *a, **k):
        seen.append(sample[:, 4:].clone())
        return real(sample, *a, **k)
    monkeypatch.setattr(pipe.unet, "forward", spy)
    run = pipe.sampler(PROMPT, conditioning=[ConstantChannel(0.5)], **KW).run()
    assert len(seen) == 5 and all(s.shape == (2, 1, 16, 16) and bool((s == 0.5).all()) for s in seen)
    assert run.final_latents.shape == (1, 4, 16, 16)  # latents keep the VAE's 4 channels
    assert run.settings["conditioning"][1] == {"kind": "constant", "enters": "concat", "channels": [1]}
    zero = pipe.sampler(PROMPT, conditioning=[ConstantChannel(0.0)], **KW).run()
    assert not torch.equal(zero.final_latents, run.final_latents)
    with pytest.raises(TypeError, match="Conditioning"):
        pipe.sampler(PROMPT, conditioning=["not a plug-in"], **KW)
    assert issubclass(Inpainting, Concat) and issubclass(Concat, Conditioning)


def test_fork_changes_the_control_from_its_step(pipe):
    vertical = lab.Control("a", _bar(False), scale=1.5)
    horizontal = lab.Control("a", _bar(True), scale=1.5)
    s = pipe.sampler(PROMPT, control=vertical, **KW)
    fresh = pipe.sampler(PROMPT, control=horizontal, **KW).run()
    assert torch.equal(s.fork(at=0, control=horizontal).run().final_latents, fresh.final_latents)
    for _ in range(2):
        s.step()
    f = s.fork(control=horizontal)
    a, b = s.run(), f.run()
    assert all(torch.equal(a.steps[k].prev_latents, b.steps[k].prev_latents) for k in range(2))
    assert not torch.equal(a.final_latents, b.final_latents)
    assert b.settings["forks"][0]["step"] == 2 and "control" in b.settings["forks"][0]
    assert torch.equal(f.replay().final_latents, b.final_latents)
    off = s.fork(at=2, control=None).run()  # no control from step 2 on
    assert off.settings["controls"] == [] and not torch.equal(off.final_latents, a.final_latents)


def test_fork_changes_the_scheduler_from_its_step(pipe):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler
    ddim = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    kw = {**KW, "guidance": 1.0, "scheduler": ddim}
    euler = pipe.sampler(PROMPT, **{**kw, "scheduler": EulerDiscreteScheduler.from_config(ddim.config)}).run()
    # at step 0 the switch only moves the latents into Euler's sigma-scaled space: the same run
    forked = pipe.sampler(PROMPT, **kw).fork(at=0, scheduler="euler").run()
    torch.testing.assert_close(forked.final_latents, euler.final_latents, rtol=1e-5, atol=1e-5)
    assert forked.settings["scheduler"] == "euler"
    s = pipe.sampler(PROMPT, **kw)
    for _ in range(3):
        s.step()
    mid = s.fork(scheduler="euler")
    assert mid.scheduler is not s.scheduler and mid.run().settings["forks"] == [{"step": 3, "scheduler": "euler"}]
    with pytest.raises(ValueError, match="same timesteps"):
        s.fork(scheduler="pndm")  # PNDM repeats its first timestep: another grid
    with pytest.raises(ValueError, match="same timesteps"):  # "linspace" spacing: 999, 749.25, ...
        s.fork(scheduler=EulerDiscreteScheduler.from_config(ddim.config, timestep_spacing="linspace"))


def test_parent_and_fork_share_no_mutable_state(pipe):
    long = " ".join(["a large red circle and a small blue square on a gray background"] * 12)
    s = pipe.sampler(PROMPT, control=lab.Control("a", _bar(True)), **KW)
    s.step()
    with pytest.warns(UserWarning, match="dropped"):
        f = s.fork(prompt=long)
    assert long in f.truncated and long not in s.truncated  # a fork's note stays in the fork
    assert f.generator is not s.generator and f.scheduler is not s.scheduler
    assert f.settings is not s.settings and f.history is not s.history and f._snaps is not s._snaps
    text_s, text_f = s.conditioning[0], f.conditioning[0]
    assert text_s is not text_f and text_s.prompts["prompt"] == PROMPT
    s.run()
    assert f.position == 1 and len(f.history) == 1  # the parent going on changes nothing in the fork
    g = s.fork(at=1, guidance=6.0)
    assert g.settings["guidance"] == 6.0 and s.settings["guidance"] == 4.0
    with pytest.raises(ValueError, match="guidance across 1.0"):
        s.fork(at=1, guidance=1.0)
    with pytest.raises(ValueError, match="forkable"):
        s.fork(at=1, height=64)


def test_steps_has_one_meaning():
    from lab.steps import select_steps
    assert select_steps(None, 4) == [0, 1, 2, 3]
    assert select_steps([3, 1], 10) == [1, 3] and select_steps(range(2, 5), 10) == [2, 3, 4]
    assert select_steps((2, 4), 10) == [2, 3, 4]  # indices, both ends included
    assert select_steps((0.0, 0.5), 10) == [0, 1, 2, 3, 4]  # fractions: the ControlNet start/end rule
    assert select_steps(-1, 10) == [9] and select_steps(slice(8, None), 10) == [8, 9]
    c = lab.Control("x", None, start=0.2, end=0.7)
    assert [i for i in range(10) if c.keep(i, 10)] == select_steps((0.2, 0.7), 10)
    for bad in [(0, 0.5), [0.5], (5, 2), 11, "all"]:
        with pytest.raises(ValueError):
            select_steps(bad, 10)
    assert select_steps((2, -1), 6) == [2, 3, 4, 5] and select_steps([-1, 0], 4) == [0, 3]
    with pytest.raises(ValueError, match="mixes"):
        lab.Reweight({"red": 2.0}, steps=(0, 0.8))
    lab.AttentionRecorder(steps=(2, -1))  # valid on any trajectory of more than 2 steps: accepted up front
    with pytest.raises(ValueError):
        lab.ResidualRecorder(steps=(-1, -3))  # last before first on every trajectory
    with pytest.raises(ValueError):
        lab.AttentionRecorder(steps=[0.5])
