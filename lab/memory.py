"""A memory estimate before sampling, so that what cannot fit is refused before it starts allocating.

:func:`estimate` sizes what a sampler adds to the resident model, from the UNet's (and ControlNets') module
structure at the sampler's latent size:

* ``activations``: one UNet call's peak: every skip connection of the encoder (alive until the decoder takes
  it) plus the largest working set of one block (a ResNet's ``in + 3 out`` channels; a transformer block's
  ``14 c`` per query: norm, q, k, v, attention output, GEGLU's 8c projection and 4c gate), and the
  self-attention matrix ``heads x Q x Q`` wherever it is made explicitly (recorded layers; SDPA does not
  make it);
* ``controlnets``: per net its encoder's activations and its residuals;
* ``history``: what each step keeps (latents, previous latents, x0, three noise predictions, the snapshot);
* ``recordings``: the recorders' own estimates (attention probabilities; spilled ones are on disk).

The tensor count above is multiplied by :data:`WORKSPACE`, and :data:`FIXED` added: measured on the shapes
UNet on CPU at 256, 512 and 1024 px (``benchmarks/memory.py``), the peaks fit ``59 MB + 1.59 x`` the tensors
counted (allocator and kernel workspaces, temporaries the count leaves out), while explicit attention
matrices, one tensor each, matched their count to 4%.

:func:`check` compares the total with the limit (the free device memory, or ``memory_limit=`` bytes) and
raises :class:`SamplingMemoryError` naming the estimate, the limit and how to need less; ``memory_limit=False``
skips it. ``benchmarks/memory.py`` measures the estimate against the real peak.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch


WORKSPACE = 1.7  # measured peak / counted tensors of one UNet call, and what every run adds (module docstring)
FIXED = 64 * 2**20


class SamplingMemoryError(MemoryError):
    """The estimated memory of a sampler's run is over the limit (nothing was allocated for it)."""


@dataclass(frozen=True)
class Estimate:
    parts: dict  # name -> bytes

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    def __str__(self) -> str:
        return ", ".join(f"{k} {_fmt(v)}" for k, v in self.parts.items() if v)


def _fmt(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _attention_heads(transformer) -> int:
    blocks = getattr(transformer, "transformer_blocks", None) or []
    return max((b.attn1.heads for b in blocks), default=1)


def unet_activations(net, hw: tuple[int, int], rows: int, itemsize: int,
                     explicit_self: bool = False) -> tuple[int, int, int]:
    """``(skips, working, matrix)`` bytes of one call of a UNet or ControlNet on latents ``hw`` for ``rows``
    batch rows: the encoder's skip connections, the largest block's working set, and the largest explicit
    self-attention matrix (0 unless ``explicit_self``)."""
    h, w = hw
    first = net.conv_in.out_channels
    skips = first * h * w
    working = matrix = 0

    def level(block, ch, h, w):
        nonlocal working, matrix
        for r in block.resnets:
            working = max(working, (r.in_channels + 3 * r.out_channels) * h * w)
        for t in getattr(block, "attentions", None) or []:
            q = h * w
            working = max(working, 14 * ch * q)
            if explicit_self:
                matrix = max(matrix, _attention_heads(t) * q * q)

    for block in net.down_blocks:
        ch = block.resnets[-1].out_channels
        level(block, ch, h, w)
        skips += len(block.resnets) * ch * h * w
        if getattr(block, "downsamplers", None):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            skips += ch * h * w
    if getattr(net, "mid_block", None) is not None:
        level(net.mid_block, net.mid_block.resnets[-1].out_channels, h, w)
    for block in getattr(net, "up_blocks", None) or []:
        ch = block.resnets[-1].out_channels
        level(block, ch, h, w)
        if getattr(block, "upsamplers", None):
            h, w = h * 2, w * 2
    return skips * rows * itemsize, working * rows * itemsize, matrix * rows * 4  # probabilities in float32


def estimate(pipe, *, height: int, width: int, rows: int, batch: int, steps: int, nets=(), recordings: int = 0,
             explicit_self: bool = False) -> Estimate:
    """What a sampler at ``height x width`` with ``batch`` images, ``rows`` UNet batch rows (both CFG halves)
    and ``steps`` steps needs besides the model (bytes, by part)."""
    f = pipe.vae_scale_factor
    hw = (height // f, width // f)
    itemsize = torch.empty((), dtype=pipe.dtype).element_size()
    skips, working, matrix = unet_activations(pipe.unet, hw, rows, itemsize, explicit_self)
    control = 0
    for name in nets:
        s, wk, _ = unet_activations(pipe.controlnets[name], hw, rows, itemsize)
        control += 2 * s + wk
    latent = pipe.unet.config.in_channels * hw[0] * hw[1] * itemsize
    history = steps * 7 * latent * batch  # latents, prev, x0, eps cond/uncond/guided, snapshot
    return Estimate({"fixed": FIXED, "activations": int(WORKSPACE * (skips + working)) + matrix,
                     "controlnets": int(WORKSPACE * control), "history": history,
                     "recordings": int(recordings)})


def available(device: torch.device) -> int:
    """Free memory of ``device`` in bytes (CUDA: the driver's free memory; CPU: ``MemAvailable``)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check(est: Estimate, limit, device: torch.device, *, what: str) -> None:
    """Raise :class:`SamplingMemoryError` when ``est`` is over ``limit`` (``None``: :func:`available`)."""
    if limit is False:
        return
    where = "the limit you set" if limit is not None else f"free memory on {device}"
    limit = available(device) if limit is None else int(limit)
    if est.total > limit:
        raise SamplingMemoryError(
            f"{what} needs about {_fmt(est.total)} ({est}), over {where} ({_fmt(limit)}). To need less: a smaller "
            "image or batch, fewer steps, float16/bfloat16, fewer recorded layers/steps or "
            "AttentionRecorder(spill=DIR); or pass memory_limit=BYTES (or memory_limit=False) to the sampler to "
            "override this estimate")
