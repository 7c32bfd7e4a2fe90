"""Cheap latent -> RGB previews: a per-pixel quadratic map fitted per model.

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
