"""Recording and editing, bound to one sampler (never to the UNet).

    base.py       the contract: RecordingContext (what a recorder is told), Binding (one recorder, one sampler)
    dispatch.py   the one explicit-probabilities attention path; per-layer dispatch to a sampler's hooks
    attention.py  AttentionRecorder -> run.attention (xarray DataTree), spilling to disk
    edits.py      prompt-to-prompt edits: Reweight, ReplaceAttention
    residuals.py  ResidualRecorder -> run.residuals (ControlNet residual norms, maps, tensors)
"""
from __future__ import annotations

from .attention import AttentionRecorder, EditInfo, RecordingBudgetError, attention_layer_names, recording_bytes
from .base import Binding, RecordingContext
from .dispatch import AttentionHooks, ProbsAttnProcessor, attention_probs, attend, dispatching
from .edits import ReplaceAttention, Reweight, token_alignment
from .residuals import ResidualRecord, ResidualRecorder

def bind(recorders, ctx: RecordingContext) -> tuple[list, AttentionHooks | None]:
    """Bind each recorder to one sampler (``recorder.bind(ctx)``): the bindings, and the attention hooks the
    sampler hands the UNet (None when no binding needs an attention layer)."""
    bindings = [rec.bind(ctx) for rec in recorders]
    return bindings, (AttentionHooks(bindings) if any(b.attention_layers for b in bindings) else None)


__all__ = ["bind", "AttentionHooks", "AttentionRecorder", "Binding", "EditInfo", "ProbsAttnProcessor", "RecordingBudgetError",
           "RecordingContext", "ReplaceAttention", "ResidualRecord", "ResidualRecorder", "Reweight", "attend",
           "attention_layer_names", "attention_probs", "dispatching", "recording_bytes", "token_alignment"]
