"""The plug-in contract of conditioning: what a kind does once (set-up) and at every step.

The lecture's table splits conditioning by how it enters the UNet: cross-attention ("CA": text, class
tokens, layouts, camera tokens), concatenation to the latents ("concat": inpainting's mask and masked image,
a low-res image, a semantic map, an input view), and ControlNet residuals. Each kind is a
:class:`Conditioning` with two jobs:

* :meth:`Conditioning.setup` once per sampler, on a :class:`Setup` (the plug-in that owns the batch sets its
  :class:`~lab.batch.BatchLayout`; a plug-in may choose the timesteps and the initial latents, as inpainting's
  ``strength`` does);
* :meth:`Conditioning.apply` once per step: add its part to the :class:`UNetInputs`.

The sampler's loop builds ``UNetInputs`` from the scaled latents, lets every plug-in apply itself in order,
and calls the UNet with :meth:`UNetInputs.unet_kwargs`. A new kind is a new plug-in; the loop does not change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..batch import BatchLayout


@dataclass
class Setup:
    """What plug-ins see and may set while a sampler is made (in plug-in order)."""

    pipe: Any
    settings: dict
    generator: torch.Generator
    scheduler: Any
    helper: Any  # the diffusers pipeline's helpers, bound to this sampler's scheduler
    layout: BatchLayout | None = None
    dtype: torch.dtype | None = None
    timesteps: torch.Tensor | None = None
    latents: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @property
    def latent_hw(self) -> tuple[int, int]:
        f = self.pipe.vae_scale_factor
        return self.settings["height"] // f, self.settings["width"] // f


@dataclass
class UNetInputs:
    """The arguments of ``UNet2DConditionModel.forward`` for one step, filled in by the plug-ins.

    ``latents`` is the scheduler-scaled x_t, both halves under guidance: ``[rows, C, h, w]``; ``concat``
    holds channels appended to it (concat conditioning), ``sample`` the UNet's input with them."""

    latents: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor | None = None
    added_cond_kwargs: dict | None = None
    class_labels: torch.Tensor | None = None
    concat: list = field(default_factory=list)
    down_block_additional_residuals: list | None = None
    mid_block_additional_residual: torch.Tensor | None = None

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat([self.latents, *self.concat], dim=1) if self.concat else self.latents

    def add_residuals(self, down: list, mid: torch.Tensor) -> None:
        """Add ControlNet residuals (summed across nets, as diffusers' ``MultiControlNetModel`` does)."""
        if self.down_block_additional_residuals is None:
            self.down_block_additional_residuals, self.mid_block_additional_residual = list(down), mid
        else:
            self.down_block_additional_residuals = [a + b for a, b in zip(self.down_block_additional_residuals, down)]
            self.mid_block_additional_residual = self.mid_block_additional_residual + mid

    def unet_kwargs(self) -> dict:
        """Keyword arguments of the UNet call ``unet(x.sample, x.timestep, **x.unet_kwargs())`` (sample and
        timestep positional, as the ControlNets get them: one compiled graph serves both)."""
        return dict(encoder_hidden_states=self.encoder_hidden_states,
                    class_labels=self.class_labels, timestep_cond=None, added_cond_kwargs=self.added_cond_kwargs,
                    down_block_additional_residuals=self.down_block_additional_residuals,
                    mid_block_additional_residual=self.mid_block_additional_residual, return_dict=False)


@dataclass(frozen=True)
class StepInfo:
    """What a plug-in knows at one step: its index, the UNet's (device) and the scheduler's (host)
    timestep, the scheduler, the batch layout, and where residual observers are (recorders)."""

    index: int
    timestep: torch.Tensor
    timestep_host: torch.Tensor
    scheduler: Any
    layout: BatchLayout
    observe_residuals: Callable[[str, list, torch.Tensor], None] = lambda net, down, mid: None


class Conditioning:
    """One conditioning kind. ``kind`` names it in provenance (``"text"``, ``"inpaint"``,
    ``"controlnet[scribble]"``); ``enters`` says how: ``"CA"``, ``"concat"``, ``"residuals"`` or ``"embedding"``.

    A plug-in is immutable once set up: a fork that changes it makes a new one (:meth:`changed`), so samplers
    never share mutable conditioning state."""

    kind: str = ""
    enters: str = ""
    #: names of sampler arguments a fork may change for this plug-in (see :meth:`changed`)
    forkable: tuple[str, ...] = ()

    def setup(self, s: Setup) -> None:
        """Once per sampler, before the first step."""

    def apply(self, x: UNetInputs, step: StepInfo) -> None:
        """Add this kind's part to the UNet inputs of one step."""
        raise NotImplementedError

    def changed(self, s: Setup, **changes) -> "Conditioning":
        """A new, set-up plug-in with ``changes`` (names from :attr:`forkable`), for a fork."""
        raise ValueError(f"{self.kind} cannot change {sorted(changes)} in a fork")

    def describe(self) -> dict:
        """Provenance: what this plug-in did, JSON-able."""
        return {"kind": self.kind, "enters": self.enters}
