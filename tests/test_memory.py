"""The memory guard (issue 17, part 4): an estimate before the first step refuses what cannot fit, naming the
estimate, the limit and how to need less; memory_limit= overrides it (benchmarks/memory.py measures it)."""
from __future__ import annotations

import pytest
from components import PROMPT, tiny_sd_components

import lab

def test_the_memory_guard_refuses_before_sampling_and_can_be_overridden():
    pipe = lab.Pipeline.from_components(**tiny_sd_components())
    kw = dict(steps=3, seed=0, height=32, width=32, progress=False)
    s = pipe.sampler(PROMPT, memory_limit=10_000, recorders=[lab.AttentionRecorder()], **kw)
    est = s.memory_estimate()
    with pytest.raises(lab.SamplingMemoryError, match=r"needs about .* over the limit you set .*memory_limit=False"):
        s.run()
    assert s.position == 0 and not s.history
    assert len(pipe.sampler(PROMPT, memory_limit=False, **kw).run().steps) == 3
    assert len(pipe.sampler(PROMPT, memory_limit=est.total * 4, **kw).run().steps) == 3
    for bad in (0, -5, 1.5, "2GB", True):
        with pytest.raises(ValueError, match="memory_limit"):
            pipe.sampler(PROMPT, memory_limit=bad, **kw)


def test_the_estimate_counts_size_batch_and_explicit_attention():
    pipe = lab.Pipeline.from_components(**tiny_sd_components())

    def est(**kw):
        s = pipe.sampler(PROMPT, **{**dict(steps=3, seed=0, height=32, width=32, progress=False), **kw})
        s._bind()
        return s.memory_estimate()
    small, big = est(), est(height=64, width=64)
    assert big.parts["activations"] > 3 * small.parts["activations"] - lab.memory.FIXED
    assert est(batch=2).parts["history"] == 2 * small.parts["history"]
    assert est(batch=2, guidance=1.0).parts["history"] == 2 * small.parts["history"]  # no CFG half: same latents
    both = est(recorders=[lab.AttentionRecorder(kind="both")])
    assert both.parts["activations"] > small.parts["activations"]  # the self-attention matrix is made
    assert both.parts["recordings"] > 0
    spilled = est(recorders=[lab.AttentionRecorder(spill=str(pytest.importorskip("tempfile").mkdtemp()))])
    assert spilled.parts["recordings"] == 0
