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


class Upscale(Concat):
    """SD's x4 upscaler conditioning (``StableDiffusionUpscalePipeline``): the low-res image, noised to
    ``noise_level`` by the model's own ``low_res_scheduler``, as 3 extra input channels at the latent size, and
    the noise level as the UNet's class label (both guidance halves). The low-res image is the latent size:
    a ``height`` x ``width`` sample takes a ``height / f`` x ``width / f`` image (f the VAE factor, 4 for SD's
    upscaler and for the shapes world)."""

    kind = "upscale"

    def __init__(self, image, noise_level: int = 20):
        super().__init__()
        self.image, self.noise_level = image, noise_level
        self._labels = None

    def setup(self, s: Setup) -> None:
        pipe, dp, layout = s.pipe, s.helper, s.layout
        top = dp.config.max_noise_level
        if isinstance(self.noise_level, bool) or not isinstance(self.noise_level, int) or \
                not 0 <= self.noise_level <= top:
            raise ValueError(f"noise_level must be an integer in [0, {top}] (the model's max_noise_level), "
                             f"got {self.noise_level!r}")
        f = pipe.vae_scale_factor
        h, w = s.settings["height"] // f, s.settings["width"] // f
        low = dp.image_processor.preprocess(self.image).to(s.device, s.dtype)
        if tuple(low.shape[-2:]) != (h, w):
            raise ValueError(f"the low-res image is {low.shape[-1]}x{low.shape[-2]}; a {s.settings['width']}x"
                             f"{s.settings['height']} sample upscales a {w}x{h} image (the latent size, 1/{f})")
        if len(low) not in (1, layout.n_prompts):
            raise ValueError(f"{len(low)} low-res images for {layout.n_prompts} prompts: give one, or one per prompt")
        from diffusers.utils.torch_utils import randn_tensor
        level = torch.tensor([self.noise_level], dtype=torch.long, device=s.device)
        noise = randn_tensor(low.shape, generator=s.generator, device=s.device, dtype=s.dtype)
        low = pipe.components["low_res_scheduler"].add_noise(low, noise, level)  # as the pipeline, before latents
        low = low.expand(layout.n_prompts, -1, -1, -1).repeat_interleave(layout.per_prompt, 0)
        self.channels = (torch.cat([low] * 2) if layout.cfg else low,)
        self._labels = level.repeat(self.channels[0].shape[0])
        s.latents = dp.prepare_latents(layout.batch, pipe.vae.config.latent_channels, h, w, s.dtype, s.device,
                                       s.generator)

    def apply(self, x: UNetInputs, step: StepInfo) -> None:
        super().apply(x, step)
        x.class_labels = self._labels

    def describe(self) -> dict:
        return {**super().describe(), "noise_level": self.noise_level}


class SemanticMap(Concat):
    """A semantic map as concat channels (LDM's semantic synthesis, the lecture's "concat" row): ``maps``
    ``[classes, H, W]`` or ``[n, classes, H, W]`` class probabilities (one-hot, or soft), one for all prompts
    or one per prompt, at the latent size or a whole multiple of it (area-averaged down to the latent grid);
    both guidance halves get it (only the text is dropped for guidance, as SD's inpainting does with its
    mask). The model decides the classes and their order (the shapes world's: :func:`lab.shapes.tasks.segmap_onehot`)."""

    kind = "segmap"

    def __init__(self, maps):
        super().__init__()
        self.maps = maps

    def setup(self, s: Setup) -> None:
        import numpy as np
        layout, f = s.layout, s.pipe.vae_scale_factor
        m = self.maps if isinstance(self.maps, torch.Tensor) else torch.from_numpy(np.asarray(self.maps))
        if not m.is_floating_point():
            raise TypeError(f"a semantic map is class probabilities (float), got {m.dtype}")
        if m.ndim == 3:
            m = m[None]
        if m.ndim != 4:
            raise ValueError(f"a semantic map is [classes, H, W] or [n, classes, H, W], got shape {tuple(m.shape)}")
        h, w = s.settings["height"] // f, s.settings["width"] // f
        H, W = m.shape[-2:]
        if H % h or W % w or H // h != W // w:
            raise ValueError(f"the semantic map is {W}x{H}; this sample's latent grid is {w}x{h}: give it at that "
                             "size or a whole multiple of it")
        if len(m) not in (1, layout.n_prompts):
            raise ValueError(f"{len(m)} semantic maps for {layout.n_prompts} prompts: give one, or one per prompt")
        m = torch.nn.functional.avg_pool2d(m.float(), H // h).to(s.device, s.dtype)
        m = m.expand(layout.n_prompts, -1, -1, -1).repeat_interleave(layout.per_prompt, 0)
        self.channels = (torch.cat([m] * 2) if layout.cfg else m,)

    def describe(self) -> dict:
        return {**super().describe(), "classes": int(self.channels[0].shape[1]) if self.channels else None}


class Coordinates(Concat):
    """The latent grid's x and y as two channels (:func:`lab.token_encoders.coordinate_channels`), the same for
    every row: what a layout model whose ``layout_embedder`` says ``coordinates`` reads beside its latents, so
    its cross-attention queries know where they are and box tokens can be matched by position. The sampler adds
    it for such a model; nothing to pass."""

    kind = "coordinates"

    def setup(self, s: Setup) -> None:
        from ..token_encoders import coordinate_channels
        f = s.pipe.vae_scale_factor
        self.channels = (coordinate_channels(s.layout.rows, s.settings["height"] // f, s.settings["width"] // f,
                                             device=s.device, dtype=s.dtype),)
