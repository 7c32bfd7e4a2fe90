"""The explicit sampler: the seed's formulas, time travel, interruption, non-finite detection."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from components import PROMPT, tiny_sd_components

import lab


@pytest.fixture(scope="module")
def pipe():
    return lab.Pipeline.from_components(**tiny_sd_components())


def test_ddpm_step_is_the_seeds_formula(pipe):
    """z_{t-1} = (z_t - (1-a_t)/sqrt(1-abar_t) eps)/sqrt(a_t) + sigma_t eps_t, with a_t = abar_t/abar_{t-1}
    over the strided inference schedule and sigma_t^2 = (1-abar_{t-1})/(1-abar_t) (1-a_t) (DDPM's fixed small
    variance); pred_x0 = (z_t - sqrt(1-abar_t) eps)/sqrt(abar_t)."""
    s = pipe.sampler(PROMPT, steps=10, guidance=3.0, scheduler="ddpm", seed=0, height=32, width=32, progress=False)
    abar = s.scheduler.alphas_cumprod.double()
    for _ in range(4):
        rng = s.generator.get_state()
        st = s.step()
        t = int(st.timestep)
        t_prev = int(s.timesteps[st.index + 1]) if st.index + 1 < s.num_steps else -1
        ab_t = abar[t]
        ab_prev = abar[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        a_t = ab_t / ab_prev
        eps = st.noise_pred.double()
        z = st.latents.double()
        g = torch.Generator().set_state(rng)
        noise = torch.randn(st.latents.shape, generator=g, dtype=st.latents.dtype).double()
        var = (1 - ab_prev) / (1 - ab_t) * (1 - a_t)
        want = (z - (1 - a_t) / (1 - ab_t).sqrt() * eps) / a_t.sqrt() + var.clamp(min=1e-20).sqrt() * noise
        assert torch.allclose(st.prev_latents.double(), want, atol=1e-5), (st.prev_latents.double() - want).abs().max()
        x0 = (z - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
        assert torch.allclose(st.pred_x0.double(), x0, atol=1e-5)
        # classifier-free guidance: eps = eps_u + w (eps_c - eps_u)
        assert torch.allclose(st.noise_pred, st.noise_pred_uncond + 3.0 * (st.noise_pred_cond - st.noise_pred_uncond),
                              atol=1e-6)


@pytest.mark.parametrize("name", ["pndm", "dpm++2m", "euler"])
def test_pred_x0_exists_for_every_scheduler(pipe, name):
    run = pipe.sampler(PROMPT, steps=5, guidance=2.0, scheduler=name, seed=0, height=32, width=32, progress=False).run()
    for st in run.steps:
        assert st.pred_x0 is not None and st.pred_x0.shape == st.latents.shape
        assert torch.isfinite(st.pred_x0).all()
    if name == "euler":
        assert all(not math.isnan(st.sigma) for st in run.steps)
        # Euler works in sigma space: x0 = x - sigma * eps
        st = run.steps[2]
        assert torch.allclose(st.pred_x0, st.latents - st.sigma * st.noise_pred, atol=1e-5)


@pytest.mark.parametrize("name", ["euler_a", "dpm++2m", "pndm", "ddpm"])
def test_rewind_and_replay_are_bit_exact(pipe, name):
    s = pipe.sampler(PROMPT, steps=8, guidance=4.0, scheduler=name, seed=7, height=32, width=32, progress=False)
    first = s.run()
    s.rewind(3)
    assert s.position == 3 and len(s.history) == 3
    again = s.run()
    assert torch.equal(first.final_latents, again.final_latents)
    for a, b in zip(first.steps, again.steps):
        assert torch.equal(a.prev_latents, b.prev_latents)
    replayed = s.replay()
    assert torch.equal(first.final_latents, replayed.final_latents)


def test_fork_shares_earlier_steps_and_differs_after(pipe):
    s = pipe.sampler(PROMPT, steps=8, guidance=4.0, scheduler="euler_a", seed=1, height=32, width=32, progress=False)
    for _ in range(4):
        s.step()
    f = s.fork(prompt="a small green triangle on a white background")
    base = s.run()
    forked = f.run()
    for k in range(4):
        assert torch.equal(base.steps[k].prev_latents, forked.steps[k].prev_latents)
    assert not torch.equal(base.steps[4].noise_pred, forked.steps[4].noise_pred)
    assert (base.final_latents - forked.final_latents).abs().max() > 1e-3
    # the fork replays exactly, prompt change included, and records it in its provenance
    assert torch.equal(f.replay().final_latents, forked.final_latents)
    assert forked.settings["forks"] == [{"step": 4, "prompt": "a small green triangle on a white background"}]
    # a fork with a new seed changes only the fresh noise of stochastic steps
    g = s.fork(at=4, seed=99).run()
    assert torch.equal(g.steps[3].prev_latents, base.steps[3].prev_latents)
    assert not torch.equal(g.final_latents, base.final_latents)


def test_fork_rejects_trajectory_changes(pipe):
    s = pipe.sampler(PROMPT, steps=3, guidance=4.0, seed=0, height=32, width=32, progress=False)
    s.step()
    with pytest.raises(ValueError, match="steps"):
        s.fork(steps=10)
    with pytest.raises(IndexError):
        s.rewind(5)


def test_iteration_and_finished_sampler(pipe):
    s = pipe.sampler(PROMPT, steps=4, guidance=2.0, seed=0, height=32, width=32, progress=False)
    states = list(s)
    assert [st.index for st in states] == [0, 1, 2, 3]
    assert s.done
    with pytest.raises(RuntimeError, match="finished"):
        s.step()
    for a, b in zip(states, states[1:]):
        assert torch.equal(a.prev_latents, b.latents)


def test_keyboard_interrupt_keeps_partial_run(pipe, monkeypatch):
    s = pipe.sampler(PROMPT, steps=6, guidance=2.0, scheduler="dpm++2m", seed=0, height=32, width=32, progress=False)
    full = pipe.sampler(PROMPT, steps=6, guidance=2.0, scheduler="dpm++2m", seed=0, height=32, width=32,
                        progress=False).run()
    real_forward = pipe.unet.forward
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_forward(*a, **k)

    monkeypatch.setattr(pipe.unet, "forward", flaky)
    with pytest.warns(UserWarning, match="interrupted"):
        run = s.run()
    assert run.interrupted and len(run) == 3
    monkeypatch.setattr(pipe.unet, "forward", real_forward)
    rest = s.run()  # continues from the step boundary, exactly
    assert torch.equal(rest.final_latents, full.final_latents)


def test_stop_from_another_thread(pipe):
    import threading
    s = pipe.sampler(PROMPT, steps=50, guidance=2.0, seed=0, height=32, width=32, progress=False)
    orig = s.step

    def step_and_stop():
        st = orig()
        if st.index == 2:
            threading.Thread(target=s.stop).start()
            threading.Event().wait(0.05)
        return st

    s.step = step_and_stop
    run = s.run()
    assert run.interrupted and 3 <= len(run) < 50


def test_nan_is_detected_at_its_step(pipe, monkeypatch):
    real_forward = pipe.unet.forward
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real_forward(*a, **k)
        if calls["n"] == 3:
            out = (out[0] * float("nan"),) if isinstance(out, tuple) else out
        return out

    monkeypatch.setattr(pipe.unet, "forward", poisoned)
    s = pipe.sampler(PROMPT, steps=6, guidance=2.0, seed=0, height=32, width=32, progress=False)
    with pytest.raises(lab.NonFiniteError) as err:
        s.run()
    assert err.value.step == 2 and "noise_pred" in str(err.value)
    assert len(err.value.run) == 2


@pytest.mark.parametrize("mode", ["step", "end"])
def test_nonfinite_detection_modes(pipe, monkeypatch, mode):
    """"step" raises at the bad step; "end" (the CUDA default: no sync in the loop) keeps device flags and
    raises once at the end of the run, rewound to just before the first bad step. Both say the same."""
    real_forward = pipe.unet.forward
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real_forward(*a, **k)
        return (out[0] * float("nan"),) if calls["n"] == 3 and isinstance(out, tuple) else out

    monkeypatch.setattr(pipe.unet, "forward", poisoned)
    s = pipe.sampler(PROMPT, steps=6, guidance=2.0, seed=0, height=32, width=32, progress=False, check_finite=mode)
    with pytest.raises(lab.NonFiniteError, match="noise_pred") as err:
        s.run()
    assert err.value.step == 2 and len(err.value.run) == 2 and s.position == 2
    assert calls["n"] == (3 if mode == "step" else 6), "'end' ran on without syncing"
    with pytest.raises(ValueError, match="check_finite"):
        pipe.sampler(PROMPT, steps=1, check_finite="always")


def test_end_mode_checks_manual_steps_and_iteration(pipe):
    s = pipe.sampler(PROMPT, steps=3, guidance=2.0, seed=0, height=32, width=32, progress=False, check_finite="end")
    s.step()
    assert len(s._finite.flags) == 1
    s.check_finite_now()  # all finite: nothing raised, flags consumed
    assert not s._finite.flags
    states = list(s)
    assert len(states) == 2 and s.done and not s._finite.flags


def test_long_prompt_truncation_is_reported(pipe):
    long = " ".join(["a large red circle"] * 12) + " and a purple triangle"
    with pytest.warns(UserWarning, match="dropped") as rec:
        s = pipe.sampler(long, steps=1, guidance=2.0, seed=0, height=32, width=32, progress=False)
    assert "purple triangle" in s.truncated[long]
    assert "purple triangle" in str(rec[0].message)
    run = s.run()
    assert "purple triangle" in run.to_xarray().attrs["truncated"]


def test_empty_prompt_is_allowed(pipe):
    run = pipe.sampler("", steps=2, guidance=3.0, seed=0, height=32, width=32, progress=False).run()
    assert len(run) == 2


@pytest.mark.parametrize("kw,match", [
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(guidance=float("nan")), "guidance"),
    (dict(guidance=-1.0), "guidance"), (dict(height=31), "nearest valid: 32"), (dict(width=71), "nearest valid: 72"),
    (dict(batch=0), "batch"), (dict(seed=-3), "seed"), (dict(seed=2 ** 64), r"2\*\*64"),
    (dict(guidance_rescale=1.5), "guidance_rescale"),
])
def test_bad_settings_fail_before_model_work(pipe, monkeypatch, kw, match):
    def boom(*a, **k):
        raise AssertionError("model work happened before validation")
    monkeypatch.setattr(pipe.unet, "forward", boom)
    monkeypatch.setattr(pipe.text_encoder, "forward", boom)
    args = dict(steps=3, guidance=2.0, seed=0, height=32, width=32, progress=False)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        pipe.sampler(PROMPT, **args)


def test_prompt_none_is_a_clear_error_before_model_work(pipe, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("model work happened before validation")
    monkeypatch.setattr(pipe.text_encoder, "forward", boom)
    with pytest.raises(TypeError, match="prompt must be a string or a non-empty list of strings, not NoneType"):
        pipe.sampler(None, steps=2, height=32, width=32)
    with pytest.raises(TypeError, match="non-empty list"):
        pipe.sampler([], steps=2, height=32, width=32)


def test_a_run_resumed_to_its_end_is_not_interrupted(pipe):
    s = pipe.sampler(PROMPT, steps=4, guidance=2.0, seed=0, height=32, width=32, progress=False)
    first = s.run(callback=lambda st: s.stop() if st.index == 1 else None)
    assert first.interrupted and len(first.steps) == 2
    rest = s.run()
    assert not rest.interrupted and len(rest.steps) == 4 and not s.to_run().interrupted


def test_the_lectures_full_ddpm_chain_runs(pipe):
    """T = 1000 steps of the DDPM update, the lecture's chain. SD's scheduler config ("leading" spacing,
    steps_offset=1) would put t = 1000 past the schedule (diffusers' pipelines raise IndexError); the lab drops
    the offset there and runs t = 999, ..., 0. More steps than T is a clear error."""
    s = pipe.sampler(PROMPT, steps=1000, guidance=1.0, scheduler="ddpm", seed=0, height=16, width=16, progress=False)
    assert int(s.timesteps[0]) == 999 and int(s.timesteps[-1]) == 0 and len(set(s.timesteps.tolist())) == 1000
    run = s.run()
    assert len(run.steps) == 1000 and bool(torch.isfinite(run.final_latents).all())
    with pytest.raises(ValueError, match="at most 1000"):
        pipe.sampler(PROMPT, steps=1001, scheduler="ddpm", height=16, width=16)
    assert int(pipe.sampler(PROMPT, steps=10, scheduler="ddpm", height=16, width=16).timesteps[0]) == 901  # offset kept


@pytest.mark.parametrize("steps", [1000, 999, 700])
def test_dpm_solver_near_T_steps_gets_distinct_timesteps(pipe, steps):
    """dpm++2m's "linspace" grid rounded to a repeated t=500 at 1000 steps: its second-order update divided by
    the zero step and the run turned NaN at step 500. The lab gives it distinct timesteps over 999..0."""
    s = pipe.sampler(PROMPT, steps=steps, guidance=1.0, scheduler="dpm++2m", seed=0, height=16, width=16,
                     progress=False)
    t = s.timesteps.tolist()
    assert len(set(t)) == steps and t[0] == 999 and t == sorted(t, reverse=True)
    if steps == 1000:
        run = s.run()
        assert bool(torch.isfinite(run.final_latents).all())


def test_provenance_names_the_sigma_schedule_and_keeps_the_scheduler_config(pipe):
    """Issue 17: an Euler scheduler with Karras sigmas was recorded as "euler"; the run now says "euler+karras"
    and keeps the scheduler's whole config."""
    from diffusers import EulerDiscreteScheduler
    karras = EulerDiscreteScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    run = pipe.sampler(PROMPT, steps=2, scheduler=karras, height=32, width=32, progress=False).run()
    assert run.settings["scheduler"] == "euler+karras" and run.settings["scheduler_config"]["use_karras_sigmas"]
    plain = pipe.sampler(PROMPT, steps=2, scheduler="euler", height=32, width=32, progress=False).run()
    assert plain.settings["scheduler"] == "euler" and not plain.settings["scheduler_config"]["use_karras_sigmas"]
    assert plain.settings["scheduler_config"]["beta_schedule"] == pipe.scheduler.config.beta_schedule


def test_unknown_scheduler_lists_close_matches(pipe):
    with pytest.raises(KeyError, match="did you mean.*euler"):
        pipe.sampler(PROMPT, steps=2, scheduler="eulr", height=32, width=32)


def test_cpu_generator_is_the_default_and_portable(pipe):
    s = pipe.sampler(PROMPT, steps=1, seed=11, height=32, width=32, progress=False)
    assert s.generator.device.type == "cpu"
    want = torch.randn(s.latents.shape, generator=torch.Generator().manual_seed(11))
    assert torch.equal(s.latents, want * s.scheduler.init_noise_sigma)


def test_out_of_memory_leaves_the_sampler_usable(shapes_pipe):
    """An OOM in a step (simulated on CPU: the UNet raises torch's OutOfMemoryError at step 2) is reported with
    what to do, leaves no trace, keeps the partial run, restores the processors, and sampling can go on."""
    import lab
    prompt = "a large red circle on a gray background"
    kw = dict(steps=5, guidance=5.0, seed=6, progress=False)
    clean = shapes_pipe.sampler(prompt, **kw).run()
    unet = shapes_pipe.unet
    before = dict(unet.attn_processors)
    forward = unet.forward
    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*a, **k)

    s = shapes_pipe.sampler(prompt, **kw, recorders=[lab.AttentionRecorder()])
    unet.forward = failing
    try:
        with pytest.raises(lab.SamplingOutOfMemory, match="out of memory at step 2.*Tried to allocate") as info:
            s.run()
    finally:
        unet.forward = forward
    err = info.value
    assert isinstance(err, torch.cuda.OutOfMemoryError) and err.step == 2 and len(err.run.steps) == 2
    assert "spill=" in str(err) and s.position == 2
    assert {k: type(v) for k, v in unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}
    run = s.run()
    assert torch.equal(run.final_latents, clean.final_latents)
    assert len(run.steps) == 5 and "16x16" in run.attention.children


def test_compiled_unet_does_not_recompile_per_step():
    """pipe.compile(): the UNet and ControlNet stay diffusers modules; recording and control work; the loop
    compiles once (a counting torch.compile backend) and gives the eager results."""
    import lab
    from lab.shapes import world
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ex = world.make_example(5, 1, split="heldout")
    kw = dict(steps=5, progress=False, control=lab.Control("scribble", ex["scribble"]))
    eager = lab.load("shapes", controlnet="scribble").sampler(
        ex["caption"], **kw, recorders=[lab.AttentionRecorder(), lab.ResidualRecorder()]).run()
    torch._dynamo.reset()
    pipe = lab.load("shapes", controlnet="scribble").compile(backend=backend, dynamic=False)
    s = pipe.sampler(ex["caption"], **kw, recorders=[lab.AttentionRecorder(), lab.ResidualRecorder()])
    after_each = [len(graphs) for _ in s]
    assert after_each[0] >= 1 and len(set(after_each)) == 1, f"recompiled during the loop: {after_each}"
    run = s.to_run()
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    torch.testing.assert_close(run.final_latents, eager.final_latents, rtol=0, atol=1e-6)
    np.testing.assert_allclose(run.attention["16x16"]["cross"].values, eager.attention["16x16"]["cross"].values,
                               atol=1e-6)
    np.testing.assert_allclose(run.residuals["norm"].values, eager.residuals["norm"].values, rtol=1e-6)
    torch._dynamo.reset()


def test_records_wait_for_their_copies_on_first_read_only():
    """lab.transfer.Records: names, len and `in` never wait; the first read of a value waits for the step's copy
    event once (a stand-in event here; on CUDA a torch.cuda.Event); copies and pickles carry finished values."""
    import copy
    import pickle

    from lab.transfer import HostCopies, Records

    class Event:
        waits = 0

        def synchronize(self):
            Event.waits += 1

    r = Records({"a": torch.ones(2), "b": torch.zeros(3)}, Event())
    assert len(r) == 2 and "a" in r and "c" not in r and sorted(r) == ["a", "b"]
    assert Event.waits == 0 and "copies in flight" in repr(r)
    assert torch.equal(r["a"], torch.ones(2)) and Event.waits == 1
    assert r.get("b").shape == (3,) and dict(r).keys() == {"a", "b"} and Event.waits == 1
    late = Records({"x": torch.ones(1)}, Event())
    again = pickle.loads(pickle.dumps(late))
    assert Event.waits == 2 and torch.equal(again["x"], torch.ones(1)) and isinstance(copy.deepcopy(again), Records)
    host = HostCopies("cpu")  # on CPU a copy is made at once and nothing is in flight
    src = torch.arange(4.0)
    out = host.to_host(src)
    src += 1
    assert torch.equal(out, torch.arange(4.0)) and host.flush() is None


def test_step_records_are_a_records_mapping(shapes_pipe):
    import lab
    from lab.transfer import Records
    s = shapes_pipe.sampler("a large red circle on a gray background", steps=3, guidance=5.0, seed=0,
                            progress=False, recorders=[lab.AttentionRecorder()])
    st = s.step()
    assert isinstance(st.records, Records) and len(st.records) == 7
    with pytest.raises(TypeError):
        st.records["x"] = 1


def test_records_are_only_read_through_their_copy_event(shapes_pipe):
    """The CUDA copy path emulated on CPU: host copies that complete only when their step's event is waited
    for (until then the host tensors hold NaN). A sampler whose recorders go through it must give exactly the
    records of a plain CPU run, so nothing reads a record before its copies are done, and every tensor handed
    to the copier is flushed with its step."""
    import lab
    from lab.shapes import world
    from lab.transfer import HostCopies

    class Deferred(HostCopies):
        def __init__(self):
            super().__init__("cpu")
            self.events = 0

        def to_host(self, src, out=None):
            out = torch.full_like(src, float("nan")) if out is None else out
            self._queue.append((src.detach().clone(), out))
            return out

        def flush(self):
            queue, self._queue = self._queue, []
            if not queue:
                return None
            self.events += 1

            class Done:
                def synchronize(self):
                    for s, d in queue:
                        d.copy_(s)
            return Done()

    ex = world.make_example(5, 1, split="heldout")

    def sampler():
        return shapes_pipe.sampler(ex["caption"], steps=4, guidance=5.0, seed=0, progress=False,
                                   control=lab.Control("scribble", ex["scribble"]),
                                   recorders=[lab.AttentionRecorder(), lab.ResidualRecorder(maps=True, full=True)])

    want = sampler().run()
    s = sampler()
    s._host = Deferred()
    first = s.step()
    assert "copies in flight" in repr(first.records)
    run = s.run()
    assert s._host.events == 4 and not s._host._queue
    np.testing.assert_array_equal(run.attention["16x16"]["cross"].values, want.attention["16x16"]["cross"].values)
    for st, ref in zip(run.steps, want.steps):
        for name, r in ref.records.items():
            got = st.records[name]
            if isinstance(r, torch.Tensor):
                assert torch.equal(got, r), name
            else:
                assert torch.equal(got.map, r.map) and torch.equal(got.tensor, r.tensor), name


def test_recorders_that_are_not_recorders_are_refused_before_sampling(shapes_pipe):
    for bad, what in ((["attention"], "'attention'"), (lambda: None, "function")):
        with pytest.raises(TypeError, match=f"recorders= takes .*{what}"):
            shapes_pipe.sampler("a red circle", steps=2, progress=False, recorders=bad)
