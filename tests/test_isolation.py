"""Recording and editing belong to one sampler, never to the UNet (issue 16).

Two samplers share one pipeline: interleaved, one stepped from the other's callback, or in two threads.
Each gets exactly its own records and edits, bit-equal to running alone, and every processor is as it was
afterwards. A failing attach changes nothing; a processor that is not diffusers' default keeps working on
the layers not recorded and is refused, clearly, on a layer asked for.
"""
from __future__ import annotations

import threading

import pytest
import torch
from components import PROMPT, tiny_sd_components
from diffusers.models.attention_processor import AttnProcessor2_0

import lab

KW = dict(steps=5, guidance=5.0, scheduler="euler_a", height=32, width=32, progress=False)
OTHER = "a small green triangle on a white background"


@pytest.fixture(scope="module")
def pipe():
    return lab.Pipeline.from_components(**tiny_sd_components())


def _a(pipe, recorder=None):
    """Sampler A: records cross-attention and reweights "red" (an edit that changes the image)."""
    rec = recorder or lab.AttentionRecorder(heads="all", dtype=torch.float32, edits=[lab.Reweight({"red": 4.0})])
    return pipe.sampler(PROMPT, seed=1, recorders=[rec], **KW)


def _b(pipe, recorder=None):
    """Sampler B: another prompt and seed, records self- and cross-attention, no edits."""
    rec = recorder or lab.AttentionRecorder(kind="both", heads="mean", dtype=torch.float32)
    return pipe.sampler(OTHER, seed=2, recorders=[rec], **KW)


def _plain(pipe):
    return pipe.sampler(PROMPT, seed=1, **KW)


def _same(run, alone):
    """Bit-equal trajectories and records."""
    assert torch.equal(run.final_latents, alone.final_latents)
    assert len(run.steps) == len(alone.steps)
    for s, t in zip(run.steps, alone.steps):
        assert torch.equal(s.noise_pred, t.noise_pred)
        assert sorted(s.records) == sorted(t.records)
        for name in s.records:
            assert torch.equal(s.records[name], t.records[name]), name


def _processors(pipe):
    return {k: (type(v), id(v)) for k, v in pipe.unet.attn_processors.items()}


@pytest.fixture(scope="module")
def alone(pipe):
    before = _processors(pipe)
    out = {"a": _a(pipe).run(), "b": _b(pipe).run(), "plain": _plain(pipe).run()}
    assert _processors(pipe) == before
    # the edit acts (else the isolation tests below could not see it leak)
    assert (out["a"].final_latents - out["plain"].final_latents).abs().max() > 1e-3
    return out


def test_interleaved_samplers_each_get_their_own(pipe, alone):
    before = _processors(pipe)
    a, b, p = _a(pipe), _b(pipe), _plain(pipe)
    while not (a.done and b.done and p.done):
        for s in (a, b, p):
            if not s.done:
                s.step()
    _same(a.to_run(), alone["a"])
    _same(b.to_run(), alone["b"])
    _same(p.to_run(), alone["plain"])
    assert _processors(pipe) == before


def test_one_recorder_object_shared_by_two_samplers(pipe, alone):
    """A recorder is a description: each sampler binds it anew, buffers are never shared."""
    rec = lab.AttentionRecorder(heads="all", dtype=torch.float32, edits=[lab.Reweight({"red": 4.0})])
    a1, a2 = _a(pipe, rec), _a(pipe, rec)
    for _ in range(KW["steps"]):
        a1.step()
        a2.step()
    _same(a1.to_run(), alone["a"])
    _same(a2.to_run(), alone["a"])


def test_sampler_stepped_from_another_samplers_callback(pipe, alone):
    """B (recording, no edits) and a plain sampler are stepped inside A's callback, while A's hooks are live:
    neither sees A's edit or recorder, and A's records hold nothing of theirs."""
    before = _processors(pipe)
    b, p = _b(pipe), _plain(pipe)

    def inner(state):
        for s in (b, p):
            if not s.done:
                s.step()
    run_a = _a(pipe).run(callback=inner)
    _same(run_a, alone["a"])
    _same(b.to_run(), alone["b"])
    _same(p.to_run(), alone["plain"])
    assert _processors(pipe) == before
    # and a whole run nested in a callback
    nested = []
    _b(pipe).run(callback=lambda st: nested.append(_a(pipe).run()) if st.index == 2 else None)
    _same(nested[0], alone["a"])


@pytest.fixture
def one_thread():
    """One intra-op thread: CPU kernels split their sums by the threads free at that moment, so two samplers
    running at once may round differently from one alone (seen once in a few runs with 2 cores). With one
    thread per call what is left to compare is the lab's own isolation."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_samplers_in_two_threads(pipe, one_thread):
    alone = {k: f(pipe).run() for k, f in (("a", _a), ("b", _b), ("plain", _plain))}
    before = _processors(pipe)
    results, errors = {}, []
    start = threading.Barrier(3)

    def work(key, make):
        try:
            s = make(pipe)
            start.wait(timeout=60)
            results[key] = s.run()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(k, f)) for k, f in (("a", _a), ("b", _b), ("plain", _plain))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for key in ("a", "b", "plain"):
        _same(results[key], alone[key])
    assert _processors(pipe) == before


def test_a_failing_attach_leaves_every_processor_as_it_was(pipe, alone):
    """A recorder with an edit, then one with a bad layer name: nothing stays installed, and the next plain
    run is not reweighted (issue 16's first finding)."""
    before = _processors(pipe)
    s = pipe.sampler(PROMPT, seed=1, recorders=[lab.AttentionRecorder(edits=[lab.Reweight({"red": 4.0})]),
                                                lab.AttentionRecorder(layers="unet.no_such_layer")], **KW)
    with pytest.raises(KeyError, match="no_such_layer"):
        s.run()
    assert _processors(pipe) == before and s.position == 0
    _same(_plain(pipe).run(), alone["plain"])
    with pytest.raises(KeyError):
        s.step()
    assert _processors(pipe) == before


class CountingProcessor(AttnProcessor2_0):
    """A user's own processor: diffusers' computation, counting its calls (not one of the defaults)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.calls += 1
        return super().__call__(attn, hidden_states, *args, **kwargs)


def test_custom_processors_keep_working_or_are_refused(alone):
    pipe = lab.Pipeline.from_components(**tiny_sd_components())
    own = {k: (CountingProcessor() if "attn1" in k else v) for k, v in pipe.unet.attn_processors.items()}
    pipe.unet.set_attn_processor(dict(own))
    before = _processors(pipe)
    # recording the cross-attention layers: the custom self-attention processors keep running
    run = _a(pipe).run()
    assert all(p.calls == KW["steps"] for k, p in own.items() if "attn1" in k)
    _same(run, alone["a"])  # CountingProcessor computes what AttnProcessor2_0 does
    assert _processors(pipe) == before
    # recording a layer that has one: refused before any step, naming the layer and the processor
    s = pipe.sampler(PROMPT, seed=1, recorders=[lab.AttentionRecorder(kind="self")], **KW)
    with pytest.raises(TypeError, match="CountingProcessor.*set_default_attn_processor|attn1"):
        s.run()
    assert _processors(pipe) == before and s.position == 0
