"""Concat conditioning: channels appended to the latents at every step (the lecture's "concat" rows).

:class:`Concat` is the kind: tensors made once at set-up, ``[rows, c, h, w]`` at the latent resolution
(both CFG halves), appended to the UNet's input with ``torch.cat([z_t, *channels], dim=1)``. Inpainting
(:class:`Inpainting`) is SD's 9-channel layout: the mask (1 channel) and the VAE latents of the masked image
(4); a low-res image, a semantic map or an input view are further subclasses that make their own channels.
"""
from __future__ import annotations

import torch

from .base import Conditioning, Setup, StepInfo, UNetInputs


class Concat(Conditioning):
    """Channels concatenated to the latents. Subclasses make :attr:`channels` in :meth:`setup`."""

    enters = "concat"

    def __init__(self):
        self.channels: tuple[torch.Tensor, ...] = ()

    def apply(self, x: UNetInputs, step: StepInfo) -> None:
        x.concat.extend(self.channels)

    def describe(self) -> dict:
        return {**super().describe(), "channels": [int(c.shape[1]) for c in self.channels]}


class Inpainting(Concat):
    """SD's inpainting conditioning (``StableDiffusionInpaintPipeline``): the masked image's latents and the
    mask as 5 extra input channels. ``strength`` < 1 starts from the noised image latents at the matching
    timestep (img2img), so it also chooses the timesteps and the initial latents."""

    kind = "inpaint"

    def __init__(self, image, mask_image, strength: float = 1.0):
        super().__init__()
        self.image, self.mask_image, self.strength = image, mask_image, strength

    def setup(self, s: Setup) -> None:
        pipe, dp = s.pipe, s.helper
        h, w = s.settings["height"], s.settings["width"]
        rows = s.layout.batch
        timesteps, n = dp.get_timesteps(num_inference_steps=s.settings["steps"], strength=self.strength,
                                        device=s.device)
        if n < 1:
            raise ValueError(f"strength={self.strength} leaves no steps out of {s.settings['steps']}")
        init = dp.image_processor.preprocess(self.image, height=h, width=w).to(torch.float32)
        s.latents, _noise = dp.prepare_latents(
            rows, pipe.vae.config.latent_channels, h, w, s.dtype, s.device, s.generator, None, image=init,
            timestep=timesteps[:1].repeat(rows), is_strength_max=self.strength == 1.0, return_noise=True,
            return_image_latents=False)
        s.timesteps = timesteps
        mask_cond = dp.mask_processor.preprocess(self.mask_image, height=h, width=w)
        masked = init * (mask_cond < 0.5)
        mask, masked_latents = dp.prepare_mask_latents(mask_cond, masked, rows, h, w, s.dtype, s.device, s.generator,
                                                       s.layout.cfg)
        self.channels = (mask, masked_latents)

    def describe(self) -> dict:
        return {**super().describe(), "strength": self.strength}
