"""The one explicit-probabilities attention path, and how recording is bound to one sampler.

:func:`attend` is diffusers' ``AttnProcessor2_0`` written out with its core step left open: recording,
editing (prompt-to-prompt, cross-frame attention) and training (the grounding losses) all go through it. Its core is either SDPA
(the layer's output unchanged) with the probabilities ``softmax(Q K^T / sqrt(d))`` computed beside it for
the recorder, or ``probs @ V`` on explicit (possibly edited) probabilities.

Recording belongs to a sampler, not to the UNet. While a sampler that records runs, every attention
layer of the UNet carries a :class:`LayerDispatch` around its own processor (reference-counted: installed
by the first such sampler, removed with the last, under a lock). The sampler passes its
:class:`AttentionHooks` with each UNet call (``cross_attention_kwargs={"lab_hooks": hooks}``, the way
diffusers hands per-call state to processors); a call that carries no hooks, or hooks that do not cover
the layer, goes to the layer's own processor unchanged. So samplers that share a pipeline (interleaved,
one stepped from another's callback, or in threads) each see exactly their own recorders and edits, and
layers not recorded keep their processor (SDPA, or a user's own).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

#: processors whose computation :func:`attend` reproduces; recording another one is refused
SUPPORTED = (AttnProcessor2_0, AttnProcessor)
_LOCK = threading.Lock()
_STATE = "_latent_lab_dispatch"


def attention_probs(query: torch.Tensor, key: torch.Tensor, scale: float, mask=None) -> torch.Tensor:
    """``softmax(Q K^T * scale + mask)`` in float32: ``[B, heads, Q, K]`` from ``[B, heads, Q|K, d]``."""
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask.float()
    return scores.softmax(-1)


def attend(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *, core):
    """``AttnProcessor2_0.__call__`` with its attention step given by
    ``core(query, key, value, mask) -> [B, heads, Q, d]`` (query/key/value ``[B, heads, *, d]``)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [B, heads, Q, d]
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [B, heads, K, d]
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    hidden_states = core(query, key, value, attention_mask)  # [B, heads, Q, d]
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    hidden_states = hidden_states.to(query.dtype)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear, dropout
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def sdpa(query, key, value, mask=None):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)


class ProbsAttnProcessor:
    """The explicit path as a plain processor: output ``probs @ V``, each call's probabilities
    ``[B, heads, Q, K]`` handed to ``on_probs`` (e.g. appended to a list for a training loss; they stay in
    the autograd graph)."""

    def __init__(self, on_probs):
        self.on_probs = on_probs

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        def core(q, k, v, mask):
            probs = attention_probs(q, k, attn.scale, mask)
            self.on_probs(probs)
            return probs.to(v.dtype) @ v
        return attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb, core=core)


class AttentionHooks:
    """One sampler's attention recorders and edits (their bindings), handed to the layers with each UNet
    call. ``layers``: the module paths they need; ``step``: the step being taken (set by the sampler)."""

    def __init__(self, bindings):
        self.bindings = [b for b in bindings if b.attention_layers]
        self.layers = frozenset().union(*(b.attention_layers for b in self.bindings))
        self.step = 0

    def core(self, name: str, attn, is_cross: bool):
        def run(query, key, value, mask):
            for b in self.bindings:  # keys/values first (cross-frame attention), then what is observed of them
                for kv in b.kv_for(name, is_cross, self.step):
                    key, value = kv(key, value)
            edits = [e for b in self.bindings for e in b.edits_for(name, is_cross, self.step)]
            if not edits:  # the layer's output exactly as SDPA gives it; probabilities beside it
                out = sdpa(query, key, value, mask)
                for b in self.bindings:
                    b.observe(name, self.step, query, key, attn.scale, mask, None)
                return out
            probs = attention_probs(query, key, attn.scale, mask)
            for edit in edits:
                probs = edit(probs)
            for b in self.bindings:
                b.observe(name, self.step, query, key, attn.scale, mask, probs)
            return probs.to(value.dtype) @ value
        return run


class LayerDispatch:
    """A layer's own processor (``inner``), or the explicit path for the sampler whose hooks the call
    carries. (diffusers' ``Attention.forward`` passes a processor only the cross-attention kwargs its
    signature names: here ``lab_hooks``; the lab's samplers pass no others.)"""

    def __init__(self, name: str, inner):
        self.name, self.inner = name, inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 lab_hooks: AttentionHooks | None = None, **kwargs):
        if lab_hooks is None or self.name not in lab_hooks.layers:
            if temb is not None:
                kwargs["temb"] = temb
            return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, **kwargs)
        core = lab_hooks.core(self.name, attn, encoder_hidden_states is not None)
        return attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb, core=core)

    def __repr__(self) -> str:
        return f"LayerDispatch({self.name!r}, {type(self.inner).__name__})"


@dataclass
class _Installed:
    originals: dict
    users: int = 0


def layer_name(processor_key: str, prefix: str = "unet") -> str:
    return f"{prefix}.{processor_key.removesuffix('.processor')}"


@contextlib.contextmanager
def dispatching(unet, layers):
    """Keep a :class:`LayerDispatch` on every attention layer of ``unet`` while the block runs (shared by all
    samplers recording on it at once; the last one out restores the original processors). ``layers``: the
    module paths this sampler will hook; each must have a processor :func:`attend` reproduces, else
    TypeError, before anything changes."""
    with _LOCK:
        state = unet.__dict__.get(_STATE)
        originals = state.originals if state is not None else unet.attn_processors
        by_name = {layer_name(k): p for k, p in originals.items()}
        bad = {n: type(by_name[n]).__name__ for n in sorted(layers) if type(by_name[n]) not in SUPPORTED}
        if bad:
            raise TypeError(f"cannot record or edit layers whose attention processor is not one of diffusers' "
                            f"defaults ({', '.join(c.__name__ for c in SUPPORTED)}): {bad}. Leave these layers out "
                            f"(AttentionRecorder(layers=...)) or restore them with unet.set_default_attn_processor()")
        if state is None:
            procs = {k: LayerDispatch(layer_name(k), p) for k, p in originals.items()}
            try:
                unet.set_attn_processor(procs)
            except BaseException:
                unet.set_attn_processor(dict(originals))
                raise
            state = unet.__dict__[_STATE] = _Installed(dict(originals))
        state.users += 1
    try:
        yield
    finally:
        with _LOCK:
            state.users -= 1
            if state.users == 0:
                unet.__dict__.pop(_STATE, None)
                unet.set_attn_processor(dict(state.originals))
