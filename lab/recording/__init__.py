"""Recording and editing, bound to one sampler (never to the UNet).

    base.py       the contract: RecordingContext (what a recorder is told), Binding (one recorder, one sampler)
    dispatch.py   the one explicit-probabilities attention path; per-layer dispatch to a sampler's hooks
    attention.py  AttentionRecorder -> run.attention (xarray DataTree), spilling to disk
    edits.py      prompt-to-prompt edits: Reweight, ReplaceAttention
    residuals.py  ResidualRecorder -> run.residuals (ControlNet residual norms, maps, tensors)
"""
from __future__ import annotations

import contextlib

from .attention import AttentionRecorder, EditInfo, RecordingBudgetError, attention_layer_names, recording_bytes
from .base import Binding, RecordingContext
from .dispatch import AttentionHooks, ProbsAttnProcessor, attention_probs, attend, dispatching
from .edits import ReplaceAttention, Reweight, token_alignment
from .residuals import ResidualRecord, ResidualRecorder

class Recording:
    """The recorders of one sampler, bound to it: their bindings (made on the first step, again after a fork
    changes the recorders or the ControlNets), the attention hooks that its UNet calls carry, and what the
    bindings describe (``meta``, the run's ``recording_meta``)."""

    def __init__(self, recorders=(), meta: dict | None = None):
        if not isinstance(recorders, (list, tuple)):
            raise TypeError(f"recorders= takes a list of recorders (lab.AttentionRecorder(), lab.ResidualRecorder()), "
                            f"not {type(recorders).__name__}")
        bad = [r for r in recorders if not callable(getattr(r, "bind", None))]
        if bad:
            raise TypeError(f"recorders= takes recorders (lab.AttentionRecorder(), lab.ResidualRecorder()), not "
                            f"{bad[0]!r}")
        self.recorders = list(recorders)
        self.bindings: list | None = None
        self.hooks: AttentionHooks | None = None
        self.meta: dict = dict(meta or {})

    def bind(self, ctx: RecordingContext) -> None:
        self.bindings = [rec.bind(ctx) for rec in self.recorders]
        self.hooks = AttentionHooks(self.bindings) if any(b.attention_layers for b in self.bindings) else None
        self.meta.update({b.key: b.meta for b in self.bindings if b.key})

    def dispatching(self, unet):
        """While a step (or a run) calls the UNet: its attention layers dispatch to these hooks."""
        return dispatching(unet, self.hooks.layers) if self.hooks else contextlib.nullcontext()

    def unet_kwargs(self, step: int) -> dict:
        """What the UNet call of ``step`` carries for the hooks (nothing without them)."""
        if self.hooks is None:
            return {}
        self.hooks.step = step
        return {"cross_attention_kwargs": {"lab_hooks": self.hooks}}

    def observe_residuals(self, net: str, step: int, down: list, mid) -> None:
        for b in self.bindings:
            b.observe_residuals(net, step, down, mid)

    def collect(self, step: int) -> dict:
        records = {}
        for b in self.bindings:
            records.update(b.collect(step))
        return records


__all__ = ["AttentionHooks", "AttentionRecorder", "Binding", "EditInfo", "ProbsAttnProcessor", "Recording",
           "RecordingBudgetError", "RecordingContext", "ReplaceAttention", "ResidualRecord", "ResidualRecorder",
           "Reweight", "attend", "attention_layer_names", "attention_probs", "dispatching", "recording_bytes",
           "token_alignment"]
