"""Cheap latent -> RGB previews: a tiny decoder distilled from the VAE's, or a per-pixel quadratic map.

**The preview decoder** (TAESD's idea, :class:`PreviewDecoder`): diffusers' ``DecoderTiny`` (the decoder
of ``AutoencoderTiny``) with a few channels, trained to reproduce the model's VAE decoder from its scaled
latents (the sampler's space: what ``StepState.pred_x0`` holds). It draws the full-resolution image a
user recognises, at a fraction of the VAE's cost. The shapes model ships one (``preview_decoder/``,
trained by ``python -m lab train shapes --stage preview``; measured by ``benchmarks/widgets.py``).

**The map**, the fallback for models without a decoder (e.g. random-weight SD architectures):

Stable Diffusion UIs show progress with a fixed 4x3 matrix from latent channels to RGB. The lab fits
such a map for whatever VAE it has, with quadratic terms added (a small VAE's latents are less
linear in colour than SD's): for scaled latents z at one latent pixel,

    rgb ~= W^T phi(z),   phi(z) = [1, z_1..z_C, z_i z_j (i <= j)]

solved by least squares against the image average-pooled to latent resolution. The fitting images
are the model's own data where it has some (the shapes model ships ``lab_preview.json``, fitted on
shapes scenes), else synthetic colour images (flat colours, two-colour splits, gradients) encoded
by the model's VAE. A preview is one small matmul: ~0.1 ms for a 16x16 latent, well under 5 ms
for 64x64, on CPU. ``r2`` is the fraction of RGB variance explained on the fitting set.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FILENAME = "lab_preview.json"
DECODER_DIR = "preview_decoder"
# 16x16 latents -> 64x64 RGB: two upsamplings; 32 channels throughout (DecoderTiny keeps one width). About
# 0.1 GMAC per 64-px image: a few ms on one CPU core, where the shapes VAE decoder takes ~15 ms.
DECODER_CONFIG = dict(in_channels=4, out_channels=3, num_blocks=[2, 1, 0], block_out_channels=[32, 32, 32],
                      upsampling_scaling_factor=2, act_fn="relu", upsample_fn="nearest")


def _features(z: np.ndarray) -> np.ndarray:
    """``[..., C]`` -> ``[..., 1 + C + C(C+1)/2]``."""
    c = z.shape[-1]
    iu, ju = np.triu_indices(c)
    return np.concatenate([np.ones(z.shape[:-1] + (1,), z.dtype), z, z[..., iu] * z[..., ju]], axis=-1)


@dataclass(frozen=True)
class PreviewMap:
    weight: np.ndarray  # [features, 3]
    r2: float
    source: str = "synthetic"

    def __call__(self, latents) -> np.ndarray:
        """``[C, h, w]`` (or ``[B, C, h, w]``) latents -> ``uint8`` RGB ``[h, w, 3]`` (or ``[B, h, w, 3]``)."""
        z = latents.detach().float().cpu().numpy() if isinstance(latents, torch.Tensor) else np.asarray(latents, np.float32)
        z = np.moveaxis(z, -3, -1)
        rgb = _features(z) @ self.weight
        return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps({"weight": self.weight.tolist(), "r2": self.r2, "source": self.source}))

    @classmethod
    def load(cls, path) -> "PreviewMap":
        d = json.loads(Path(path).read_text())
        return cls(np.asarray(d["weight"], np.float32), float(d["r2"]), d.get("source", "file"))


def synthetic_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``[n, 3, size, size]`` in [0, 1]: flat colours, two-colour splits and gradients."""
    g = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    for i in range(n):
        a, b = g.uniform(0, 1, 3), g.uniform(0, 1, 3)
        if i % 3 == 0:
            img = np.broadcast_to(a, (size, size, 3))
        elif i % 3 == 1:
            cut = (xx * g.uniform(-1, 1) + yy * g.uniform(-1, 1)) > g.uniform(-0.5, 0.5)
            img = np.where(cut[..., None], a, b)
        else:
            w = (xx if g.uniform() < 0.5 else yy)[..., None]
            img = a * (1 - w) + b * w
        out[i] = img
    return torch.from_numpy(out).permute(0, 3, 1, 2)


@torch.no_grad()
def fit_preview(vae, images: torch.Tensor | None = None, *, n: int = 48, latent_size: int = 8, seed: int = 0,
                source: str | None = None) -> PreviewMap:
    """Fit the map for ``vae`` on ``images`` (``[N, 3, H, W]`` in [0, 1]) or on synthetic ones."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if images is None:
        images = synthetic_images(n, latent_size * factor, seed)
        source = source or "synthetic"
    z = vae.encode((images * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mean.float().cpu()
    z = z * vae.config.scaling_factor
    rgb = torch.nn.functional.avg_pool2d(images.float(), factor)
    Z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).numpy()
    Y = rgb.permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    A = _features(Z)
    coef, *_ = np.linalg.lstsq(A, Y, rcond=None)
    r2 = float(1 - (Y - A @ coef).var() / Y.var())
    return PreviewMap(coef.astype(np.float32), r2, source or "images")


class PreviewDecoder(torch.nn.Module):
    """Scaled latents ``[B, C, h, w]`` -> images ``[B, 3, H, W]`` in [0, 1]: diffusers' ``DecoderTiny`` (see
    the module doc). ``config``: :data:`DECODER_CONFIG`'s keys. Saved as ``config.json`` +
    ``decoder.safetensors`` (fp16) in a folder."""

    def __init__(self, **config):
        super().__init__()
        from diffusers.models.autoencoders.vae import DecoderTiny
        self.config = {**DECODER_CONFIG, **config}
        self.decoder = DecoderTiny(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.config.items()})

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        # DecoderTiny soft-clamps its input to +-3 and maps its output from [0, 1] to [-1, 1]; undo the latter
        return (self.decoder(latents) + 1) / 2

    @torch.no_grad()
    def rgb(self, latents) -> np.ndarray:
        """``[C, h, w]`` (or ``[B, C, h, w]``) latents -> ``uint8`` RGB ``[H, W, 3]`` (or ``[B, H, W, 3]``)."""
        z = torch.as_tensor(latents)
        one = z.ndim == 3
        p = next(self.parameters())
        img = self.forward((z[None] if one else z).to(p.device, p.dtype))
        out = (img.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return out[0] if one else out

    def save(self, folder) -> None:
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config, indent=2))
        save_file({k: v.detach().half().contiguous() for k, v in self.state_dict().items()},
                  str(folder / "decoder.safetensors"))

    @classmethod
    def load(cls, folder) -> "PreviewDecoder":
        from safetensors.torch import load_file
        folder = Path(folder)
        dec = cls(**json.loads((folder / "config.json").read_text()))
        dec.load_state_dict({k: v.float() for k, v in load_file(str(folder / "decoder.safetensors")).items()})
        return dec.eval().requires_grad_(False)


def preview_inputs(mean: torch.Tensor, std: torch.Tensor, scale: float, g: torch.Generator) -> torch.Tensor:
    """Scaled latents to train a preview decoder on, from VAE posteriors ``mean``/``std`` ``[N, C, h, w]``:
    what a sampler's x0 estimate looks like over a run. A quarter each: posterior samples; mixtures of two
    scenes (early steps average several); shrunk towards 0 (an early x0 estimate has less contrast);
    samples with added noise."""
    n = len(mean)
    z = (mean + std * torch.randn(mean.shape, generator=g, device=mean.device)) * scale
    kind = torch.arange(n, device=mean.device) % 4
    other = z[torch.randperm(n, generator=g, device=mean.device)]
    a = torch.rand(n, 1, 1, 1, generator=g, device=mean.device)
    z = torch.where((kind == 1)[:, None, None, None], a * z + (1 - a) * other, z)
    z = torch.where((kind == 2)[:, None, None, None], (0.3 + 0.7 * a) * z, z)
    noise = torch.randn(z.shape, generator=g, device=z.device) * 0.5 * a
    return torch.where((kind == 3)[:, None, None, None], z + noise, z)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image PSNR in dB of ``[B, 3, H, W]`` images in [0, 1]."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)
