"""Score distillation (lab.sds): the gradient, the renderer, a short optimisation, records and bad inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lab
from lab.foundation import render, sds


@pytest.fixture(scope="module")
def pipe():
    return lab.load("shapes")


def test_surrogate_gradient_is_the_sds_gradient(pipe):
    """Autograd on the surrogate equals w(t) (eps_hat - eps) to 1e-6, on the real UNet's guided output."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 16, 16, generator=g, requires_grad=True)
    eps = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([300, 700])
    abar = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = abar.sqrt() * z.detach() + (1 - abar).sqrt() * eps
    cond, uncond = pipe.diffusers.encode_prompt(["a large red circle on a gray background"] * 2, "cpu", 1, True, [""] * 2)
    with torch.no_grad():
        e_u, e_c = pipe.unet(torch.cat([z_t, z_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
    eps_hat = e_u + 100 * (e_c - e_u)
    w = sds.weight(pipe.scheduler.alphas_cumprod, t, "sds")
    assert torch.allclose(w, 1 - pipe.scheduler.alphas_cumprod[t])
    grad = sds.sds_gradient(eps_hat, eps, w)
    sds.surrogate_loss(z, grad).backward()
    expected = (1 - abar) * (eps_hat - eps)
    assert (z.grad - expected).abs().max() < 1e-6
    assert expected.abs().max() > 1e-2  # not a vacuous comparison


def test_distill_applies_exactly_the_recorded_gradient(pipe):
    """One iteration on a raw latent: the latent's gradient is w(t) times the recorded eps_hat - eps."""
    target = render.RawLatent(2, seed=3)
    d = sds.distill(pipe, "a small blue square on a white background", target, iterations=1, seed=5)
    expected = d.weight[0] * torch.from_numpy(d.arrays["eps_diff"][0])
    assert (target.latent.grad - expected).abs().max() < 1e-6
    assert np.isclose(d.weight[0], 1 - d.alpha_bar[0])
    assert pipe.scheduler.config.num_train_timesteps * 0.02 <= d.t[0] <= pipe.scheduler.config.num_train_timesteps * 0.98


def _renderer_params(r):
    names = [n for n, _ in r.named_parameters()]
    return names, tuple(p.detach().clone().requires_grad_(True) for p in r.parameters())


@pytest.mark.parametrize("objects", [1, 2])
def test_soft_renderer_gradients_match_finite_differences(objects):
    r = render.SoftShapes(1, objects, size=20, size_range=(4, 12), seed=7).double()
    names, params = _renderer_params(r)

    def f(*ps):
        return torch.func.functional_call(r, dict(zip(names, ps)), ())

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6, rtol=1e-4)
    # and every parameter moves the image (no dead parameter)
    out = f(*params)
    grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), params)
    for n, gr in zip(names, grads):
        assert gr.abs().max() > 1e-6, n


def test_soft_renderer_draws_the_worlds_shapes():
    """Hard edges (softness -> its minimum) and one-hot shape weights draw what the world draws: the oracle
    reads colour, shape and size back."""
    from lab.shapes.evaluator import evaluate
    r = render.SoftShapes(3, 1, seed=0, min_softness=0.05)
    with torch.no_grad():
        r.centre.fill_(0.0)                          # the image centre
        r.size.copy_(render._logit(torch.full((3, 1), (28 - 12) / 20)))  # 28 px: "large"
        r.colour.copy_(render._logit(torch.tensor([220, 40, 40]) / 255).expand(3, 1, 3))
        r.shape.copy_(torch.eye(3)[:, None] * 20)
        r.softness.fill_(-10.0)
        r.background.copy_(render._logit(torch.full((3, 3), 128 / 255)))
        imgs = sds._uint8(r())
    for img, shape in zip(imgs, render.SHAPES):
        res = evaluate(img, f"a large red {shape} on a gray background")
        assert res["all_ok"] and res["background_ok"], (shape, res["detections"])


def test_sds_run_improves_the_oracle_score_and_records_like_a_run(pipe):
    from lab.shapes.evaluator import evaluate
    prompt = "a large blue square on a white background"
    target = render.SoftShapes(4, 1, seed=1)
    start = target.table().detach().clone()
    start_render = sds._uint8(target())
    score = lambda imgs: np.mean([evaluate(im, prompt)["shape_ok"] for im in imgs])  # noqa: E731
    before = score(sds._uint8(target()))
    d = sds.distill(pipe, prompt, target, iterations=120, lr=0.1, seed=0, record_every=10)
    after = score(d.images())
    assert after > before and after >= 0.5, (before, after)

    ds = d.to_xarray()
    assert list(ds["params"].dims) == ["step", "batch", "object", "param"]
    assert list(ds["param"].values) == list(render.PARAMS)
    assert ds.sizes["step"] == 12 and ds["render"].shape == (12, 4, 64, 64, 3)
    assert ds["eps_diff"].dims == ("step", "batch", "channel", "y", "x")
    assert np.all((ds["t"] >= 20) & (ds["t"] <= 980))
    assert np.all(ds["grad_norm"] > 0)
    # iteration 0 recorded the starting scene: its parameters and what they drew, before the first update
    assert np.allclose(ds["params"].isel(step=0).values, start.numpy())
    assert np.array_equal(ds["render"].isel(step=0).values, start_render)
    assert not np.allclose(ds["params"].isel(step=-1).values, start.numpy())

    run = d.to_run(pipe)
    assert isinstance(run, lab.Run) and len(run) == 12
    assert [s.timestep for s in run.steps] == [float(t) for t in ds["t"].values]
    assert run.image.size == (64, 64)
    xr_run = run.to_xarray()
    assert xr_run.sizes["step"] == 12 and "pred_x0" in xr_run


def test_through_unet_and_vsd_run(pipe):
    digest = lab.pipeline.weights_digest(pipe.unet)
    prompt = "a small red circle on a gray background"
    a = sds.distill(pipe, prompt, render.SoftShapes(2, 1, seed=2), iterations=3, through_unet=True, seed=1)
    b = sds.distill(pipe, prompt, render.SoftShapes(2, 1, seed=2), iterations=3, seed=1)
    assert a.settings["through_unet"] and not b.settings["through_unet"]
    assert not np.allclose(a.arrays["params"][-1], b.arrays["params"][-1])  # a different gradient moved it
    v = sds.distill(pipe, prompt, render.SoftShapes(3, 1, seed=2), iterations=3, method="vsd", seed=1)
    assert v.settings["guidance"] == 7.5 and v.lora_loss is not None and np.all(np.isfinite(v.lora_loss))
    assert lab.pipeline.weights_digest(pipe.unet) == digest  # the prior stays frozen and untouched
    assert all(p.requires_grad for p in pipe.unet.parameters())  # and its flags are left alone
    assert all(p.grad is None for m in (pipe.unet, pipe.vae) for p in m.parameters())  # nothing accumulated there


@pytest.mark.parametrize("kwargs, match", [
    ({"guidance": float("nan")}, "guidance"),
    ({"guidance": -1.0}, "guidance"),
    ({"t_range": (0.0, 0.5)}, "t_range"),
    ({"t_range": (0.5, 1.0)}, "t_range"),
    ({"t_range": (0.6, 0.4)}, "t_range"),
    ({"iterations": 0}, "iterations"),
    ({"weighting": "nope"}, "weighting"),
    ({"method": "nope"}, "method"),
    ({"lr": math.inf}, "lr"),
])
def test_bad_settings_fail_before_any_model_work(kwargs, match):
    class NoModel:  # any attribute access would be model work
        def __getattr__(self, name):
            raise AssertionError(f"touched the pipeline ({name}) before checking the settings")

    with pytest.raises(ValueError, match=match):
        sds.distill(NoModel(), "a red circle", render.SoftShapes(1, 1), **kwargs)


def test_bad_targets_and_prompts(pipe):
    with pytest.raises(ValueError, match="size"):
        sds.distill(pipe, "a red circle", render.SoftShapes(1, 1, size=32), iterations=1)
    with pytest.raises(ValueError, match="prompts"):
        sds.distill(pipe, ["a", "b", "c"], render.SoftShapes(2, 1), iterations=1)
    with pytest.raises(ValueError, match="batch and objects"):
        render.SoftShapes(0, 1)


def test_the_trajectory_viewer_plays_an_optimisation(pipe):
    widgets = pytest.importorskip("widgets")
    d = sds.distill(pipe, "a large green square on a black background", render.SoftShapes(1, 1, seed=0),
                    iterations=6, lr=0.1, seed=0, record_every=2)
    viewer = widgets.TrajectoryViewer(d.to_run(pipe), raise_errors=True)
    assert viewer.n_frames == 3
    viewer.show(2)
    assert viewer.step == 2


def test_eval_sds_writes_its_keys(tmp_path, monkeypatch):
    """The eval command's code path end to end, with a few iterations (the numbers are the committed JSON's)."""
    from lab.shapes import evaluate_sds as ev
    for name in ("SDS", "VSD"):
        monkeypatch.setattr(ev, name, dict(getattr(ev, name), iterations=2))
    monkeypatch.setattr(ev, "ABLATIONS", {"sds_fidelity_no_consistency": dict(ev.SDS, consistency=0.0)})
    path = tmp_path / "sds.json"
    prompts = ev.eval_prompts()[:2]
    res = ev.run_sds_eval(seeds=2, json_path=path, prompts=prompts, diversity_seeds=3,
                          diversity_prompts=prompts[:1], timing_runs=1, progress=lambda *_: None)
    ev.run_sds_ablations(json_path=path, prompts=prompts, progress=lambda *_: None)
    saved = __import__("json").loads(path.read_text())
    assert saved["n"] == 4 and len(saved["per_prompt"]) == 4 and res["n"] == 4
    assert [r["seed"] for r in saved["per_prompt"]] == [0, 1, 1000, 1001]
    for key in ("sds_fidelity", "random_init_fidelity", "vsd_fidelity", "sds_diversity", "vsd_diversity",
                "sample_diversity", "seconds_per_run", "sds_fidelity_reference", "sds_fidelity_no_consistency"):
        assert 0 <= saved[key] < float("inf"), key
    assert saved["ablation_n"] == 2
