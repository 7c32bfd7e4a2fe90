"""What one denoising step saw and produced (:class:`StepState`, shared by the sampler and runs), and what the
sampler keeps before each step to go back to it (:class:`Snapshot`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .transfer import Records


@dataclass(frozen=True)
class StepState:
    """What one denoising step saw and produced. Tensors are ``[batch, channels, h, w]``.

    ``latents`` is x_t before the step (diffusers' ``sample``), ``prev_latents`` x_{t-1}
    (``prev_sample``), ``pred_x0`` the model's estimate of x_0 (``pred_original_sample``),
    ``noise_pred_cond``/``noise_pred_uncond`` the two halves of the UNet output (uncond is ``None``
    without guidance) and ``noise_pred`` the guided output the scheduler used."""

    index: int
    timestep: float
    sigma: float
    latents: torch.Tensor
    prev_latents: torch.Tensor
    pred_x0: torch.Tensor
    noise_pred_cond: torch.Tensor
    noise_pred_uncond: torch.Tensor | None
    noise_pred: torch.Tensor
    records: Mapping[str, Any] = field(default_factory=Records)

    @property
    def prev_sample(self) -> torch.Tensor:
        return self.prev_latents

    @property
    def pred_original_sample(self) -> torch.Tensor:
        return self.pred_x0

    def __repr__(self) -> str:
        return (f"StepState(index={self.index}, timestep={self.timestep:g}, sigma={self.sigma:.4g}, "
                f"latents={tuple(self.latents.shape)}, records={sorted(self.records)})")


@dataclass(frozen=True)
class Snapshot:
    """A sampler's full state before a step: x_t, a deep copy of the scheduler, the RNG state, the conditioning
    plug-ins (immutable) and the settings. ``rewind``, ``fork`` and ``replay`` start from these."""

    latents: torch.Tensor
    scheduler: Any
    rng_state: torch.Tensor
    plugins: tuple
    settings: dict
