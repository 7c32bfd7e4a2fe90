"""The recorder contract: what a recorder or edit is told when it is bound to a sampler, and what it may do.

A recorder (:class:`lab.AttentionRecorder`, :class:`lab.ResidualRecorder`, or your own) is a description;
``recorder.bind(ctx)`` makes a :class:`Binding` that holds everything it keeps for that one sampler. The
sampler calls the binding's hooks during each step and :meth:`Binding.collect` at its end; two samplers
using the same recorder object each get their own binding, so they never share buffers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..batch import BatchLayout
from ..transfer import HostCopies


@dataclass(frozen=True)
class RecordingContext:
    """What a sampler tells its recorders and edits when they are bound (all public, read-only):

    ``pipe``; ``num_steps``; ``layout`` (guidance on/off, batch, the cond/uncond half rule, batch row ->
    prompt: :class:`lab.batch.BatchLayout`); ``latent_hw``; ``tokens`` (how the text encoder split each
    prompt, :func:`lab.conditioning.token_table`, or ``None`` without text); ``host`` (device -> host copies,
    a side stream on CUDA: :mod:`lab.transfer`); ``controlnets`` (the sampler's
    :class:`lab.conditioning.ControlNet` plug-ins: ``.control``, ``.heights``, ``.names``, ``.grid``)."""

    pipe: Any
    num_steps: int
    layout: BatchLayout
    latent_hw: tuple[int, int]
    tokens: dict | None
    host: HostCopies
    controlnets: tuple = ()

    @property
    def cfg(self) -> bool:
        return self.layout.cfg

    @property
    def device(self) -> torch.device:
        return self.pipe.device


class Binding:
    """A recorder bound to one sampler. ``key`` names its description in ``run.recording_meta``;
    ``attention_layers`` are the attention layers (module paths) it observes or edits."""

    key: str = ""
    meta: dict | None = None
    attention_layers: frozenset = frozenset()

    def edits_for(self, name: str, is_cross: bool, step: int) -> list:
        """Functions ``probs -> probs`` to apply at layer ``name`` in step ``step`` (none by default)."""
        return []

    def kv_for(self, name: str, is_cross: bool, step: int) -> list:
        """Functions ``(key, value) -> (key, value)`` (``[rows, heads, K, d]``) to apply at layer ``name`` in
        step ``step`` before the attention is computed, e.g. Text2Video-Zero's cross-frame attention
        (none by default)."""
        return []

    def observe(self, name, step, query, key, scale, mask, probs) -> None:
        """An attention layer's queries/keys ``[rows, heads, *, d]`` (and its probabilities when computed)."""

    def observe_residuals(self, net: str, step: int, down: list, mid: torch.Tensor) -> None:
        """One ControlNet's weighted residuals at one step (what the UNet receives from it)."""

    def collect(self, step: int) -> dict:
        """This step's records by name (called once at the end of each step)."""
        return {}

    def memory_bytes(self) -> int:
        """Memory its records will hold over the run (:mod:`lab.memory`; 0 by default)."""
        return 0
