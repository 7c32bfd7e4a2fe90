"""Stage 1 as the lecture teaches it: perceptual compression, and why diffusion runs in its latent space.

**The VQ-regularised autoencoder** (``python -m lab train shapes --stage vq``): a diffusers ``VQModel`` with
the bundled KL autoencoder's encoder and decoder (f=4, 16x16 positions) and a codebook of
:data:`CODEBOOK_SIZE` 4-dimensional codes, trained with the seed's L_VQGAN,

    min_{E,G,Z} max_D  L_rec(x, G(z_q(E(x)))) + ||sg[E(x)] - z_q||^2 + beta ||E(x) - sg[z_q]||^2
                       + lambda (log D(x) + log(1 - D(G(z_q))))                           (hinge form)

* ``L_rec``: MSE + 0.5 L1 + :data:`PERCEPTUAL` (1 - SSIM). The seed's perceptual term is LPIPS, a VGG16 whose
  weights would need a download; SSIM (local means, variances and covariance in a Gaussian window) is the
  weight-free perceptual-style measure that, like LPIPS, scores structure rather than per-pixel error;
* the codebook and commitment terms (VQ-VAE, beta = :data:`VQ_BETA`), with the straight-through gradient;
* the patch discriminator :class:`PatchDiscriminator` (taming-transformers' ``NLayerDiscriminator``: each of
  its 14x14 outputs judges a 34-pixel patch), hinge losses, switched on after :data:`DISC_START` of the
  budget, with VQGAN's adaptive weight lambda = ||grad_{G_L} L_rec|| / ||grad_{G_L} L_GAN|| at the decoder's
  last layer (times :data:`DISC_WEIGHT`);
* dead codes (no use over the last :data:`RESTART_EVERY` steps) are restarted at encoder outputs of the
  current batch until :data:`RESTART_UNTIL` of the budget, so the codebook is used (Jukebox's and
  SoundStream's remedy for codebook collapse). The codes start at encoder outputs of the first batch.

The nearest-code rule is diffusers' own (``torch.cdist`` argmin), so the saved model encodes and decodes with
plain ``VQModel``: ``VQModel.from_pretrained("lab/models/shapes", subfolder="vqvae")``.

**Rate-distortion** (stages ``ae-kl-f2`` ... ``ae-vq-f8``): KL and VQ autoencoders at f = 2, 4, 8 (one more
down/up level per factor of 2; 4 latent channels each), trained on the same loss without the discriminator for
a short budget each. **Pixel vs latent** (stages ``diffusion-pixel`` and ``diffusion-latent``): a text-
conditioned UNet on 64x64x3 pixels and one on the bundled VAE's 16x16x4 latents, of about the same size, both
from scratch under the bundled (frozen) text encoder, with the same wall-clock budget, batch and learning rate.
:mod:`lab.shapes.evaluate_stage1` measures them all.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import configs
from .tasks import float_images

KINDS = ("kl", "vq")
FACTORS = (2, 4, 8)
CODEBOOK_SIZE = 1024  # |Z|: the seed's models use 8192 and 16384 for natural images; this world has few parts
VQ_EMBED_DIM = 4
VQ_BETA = 0.25
PERCEPTUAL = 0.2  # weight of (1 - SSIM) in L_rec
KL_WEIGHT = 1e-4  # per latent element, as the bundled VAE
DISC_START = 0.3  # share of the budget before the discriminator joins
DISC_WEIGHT = 0.8  # VQGAN's disc_weight
DISC_LR = 2e-4
RESTART_EVERY = 100
RESTART_UNTIL = 0.8
LR = 5e-4
# On 2 CPU cores a 64-pixel f=4 autoencoder step takes ~65 ms per image. They train as the seed's do, on random
# crops (CROP pixels, CROP_BATCH of them), then on whole scenes for the last 1 - CROP_UNTIL of the budget, so the
# mid-block attention and the group norms see whole scenes again before the end.
CROP, CROP_BATCH, CROP_UNTIL = 32, 16, 0.75
BATCH = 4  # whole scenes: as many pixels as CROP_BATCH crops

VQ_DIR = "vqvae"  # the shipped VQ autoencoder's folder in the bundled model's directory

SWEEP_STAGES = tuple(f"ae-{k}-f{f}" for k in KINDS for f in FACTORS)
DIFFUSION_SPACES = ("pixel", "latent")
STAGES = ("vq", "vq-nogan", *SWEEP_STAGES, *(f"diffusion-{s}" for s in DIFFUSION_SPACES))

# A pixel-space UNet of about the latent UNet's size (configs.UNET, 16x16x4 latents): two cheap levels at 64
# and 32 pixels stand in for the autoencoder, then cross-attention at 16 and 8 pixels and in the middle, as the
# latent UNet has at 16 and 8 latent pixels.
PIXEL_UNET = dict(
    sample_size=configs.IMAGE_SIZE, in_channels=3, out_channels=3,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 96, 128),
    layers_per_block=1,
    cross_attention_dim=configs.UNET["cross_attention_dim"],
    attention_head_dim=configs.UNET["attention_head_dim"],
    norm_num_groups=16,
)
# Each space's usual schedule: DDPM's linear betas in pixel space, LDM's scaled-linear ones for latents.
PIXEL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                       prediction_type="epsilon", clip_sample=True)
LATENT_SCHEDULER = {**configs.TRAIN_SCHEDULER}
DIFFUSION_BATCH = 8
DIFFUSION_LR = 3e-4


# ------------------------------------------------------------------ models
def autoencoder_config(kind: str, f: int) -> dict:
    """diffusers config of the ``kind`` ("kl" or "vq") autoencoder with downsampling factor ``f``; f=4 is
    the bundled VAE's architecture (:data:`configs.VAE`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown autoencoder kind {kind!r}; expected one of {KINDS}")
    if f not in FACTORS:
        raise ValueError(f"unsupported factor f={f}; expected one of {FACTORS}")
    levels = int(math.log2(f)) + 1
    cfg = {**configs.VAE, "block_out_channels": (32, 64, 64, 64)[:levels],
           "down_block_types": ("DownEncoderBlock2D",) * levels, "up_block_types": ("UpDecoderBlock2D",) * levels}
    if kind == "vq":
        cfg.update(num_vq_embeddings=CODEBOOK_SIZE, vq_embed_dim=VQ_EMBED_DIM)
    return cfg


def make_autoencoder(kind: str, f: int):
    from diffusers import AutoencoderKL, VQModel
    return (AutoencoderKL if kind == "kl" else VQModel)(**autoencoder_config(kind, f))


class PatchDiscriminator(nn.Module):
    """taming-transformers' ``NLayerDiscriminator`` (pix2pix's PatchGAN) sized for 64-pixel images: with
    ``n_layers=2`` its 14x14 logits each see a 34x34 patch."""

    def __init__(self, ndf: int = 32, n_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


# ------------------------------------------------------------------ losses
def _gaussian_window(size: int = 7, sigma: float = 1.5, channels: int = 3, device=None) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-ax ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004; 7x7 Gaussian window, sigma 1.5) of images in [-1, 1], ``[B, C, H, W]``."""
    a, b = (a.float() + 1) / 2, (b.float() + 1) / 2
    w = _gaussian_window(channels=a.shape[1], device=a.device)
    mu_a = F.conv2d(a, w, groups=a.shape[1])
    mu_b = F.conv2d(b, w, groups=a.shape[1])
    var_a = F.conv2d(a * a, w, groups=a.shape[1]) - mu_a ** 2
    var_b = F.conv2d(b * b, w, groups=a.shape[1]) - mu_b ** 2
    cov = F.conv2d(a * b, w, groups=a.shape[1]) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean()


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """L_rec: MSE + 0.5 L1 + PERCEPTUAL (1 - SSIM); also the batch's PSNR (images in [-1, 1])."""
    rec = rec.float()
    mse = F.mse_loss(rec, x)
    s = ssim(rec, x)
    loss = mse + 0.5 * (rec - x).abs().mean() + PERCEPTUAL * (1 - s)
    return loss, {"psnr": -10 * torch.log10(mse.detach() / 4), "ssim": s.detach()}


def quantize(vq, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``VQModel``'s nearest-code lookup of encoder outputs ``h`` ``[B, D, h, w]`` with the VQ-VAE losses:
    ``(z_q with the straight-through gradient, codebook + beta commitment loss, code indices [B*h*w])``."""
    emb = vq.quantize.embedding.weight
    z = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    idx = torch.cdist(z.float(), emb.float()).argmin(1)
    zq = emb[idx]
    loss = F.mse_loss(zq, z.detach()) + VQ_BETA * F.mse_loss(z, zq.detach())
    zq = z + (zq - z).detach()
    return zq.view(h.shape[0], h.shape[2], h.shape[3], -1).permute(0, 3, 1, 2), loss, idx


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's lambda: the ratio of the gradient norms of L_rec and L_GAN at the decoder's last layer."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach() * DISC_WEIGHT


# ------------------------------------------------------------------ training (a Trainer's stages)
def train_autoencoder(tr, kind: str, f: int, *, name: str, gan: bool, seconds: float) -> dict:
    """Train one autoencoder on ``tr``'s scenes for ``seconds`` and save it as ``tr.out / name``."""
    torch.manual_seed(tr.seed + 20)
    model = make_autoencoder(kind, f).to(tr.device)
    images = tr.data["image"]
    g = tr._generator(tr.seed + 21)
    disc = PatchDiscriminator().to(tr.device) if gan else None
    d_opt = torch.optim.Adam(disc.parameters(), lr=DISC_LR, betas=(0.5, 0.9)) if gan else None
    usage = torch.zeros(CODEBOOK_SIZE, device=tr.device)
    state = {"step": 0, "codes_started": False, "restarts": 0}
    last_layer = model.decoder.conv_out.weight

    def step_fn():
        if tr._progress < CROP_UNTIL:
            x = _crops(float_images(images[tr._batch_idx(g, CROP_BATCH)]), g)
        else:
            x = float_images(images[tr._batch_idx(g, BATCH)])
        with tr.autocast():
            if kind == "kl":
                post = model.encode(x).latent_dist
                z = post.sample(generator=g)
                rec = model.decode(z).sample
                reg = KL_WEIGHT * post.kl().mean() / z[0].numel()
            else:
                h = model.encode(x).latents
                if not state["codes_started"]:  # the codes start at encoder outputs
                    _reset_codes(model, h, torch.ones(CODEBOOK_SIZE, dtype=torch.bool, device=h.device), g)
                    state["codes_started"] = True
                zq, reg, idx = quantize(model, h)
                rec = model.decode(zq, force_not_quantize=True).sample
        rec_loss, extra = reconstruction_loss(rec, x)
        loss = rec_loss + reg
        extra["reg"] = reg.detach()
        if kind == "vq":
            usage.add_(torch.bincount(idx, minlength=CODEBOOK_SIZE).float())
            state["step"] += 1
            if state["step"] % RESTART_EVERY == 0:
                dead = usage == 0
                extra["dead_codes"] = dead.float().sum()
                if tr._progress < RESTART_UNTIL and dead.any():
                    _reset_codes(model, h.detach(), dead, g)
                    state["restarts"] += int(dead.sum())
                usage.zero_()
        if gan and tr._progress >= DISC_START:
            d_real, d_fake = disc(x), disc(rec.detach().float())
            d_loss = 0.5 * (F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean())  # hinge
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
            g_loss = -disc(rec.float()).mean()
            w = adaptive_weight(rec_loss, g_loss, last_layer)
            loss = loss + w * g_loss
            extra.update(d_loss=d_loss.detach(), g_loss=g_loss.detach(), disc_weight=w)
        return loss, extra

    def state_fn():
        ck = {"model": model.state_dict(), "usage": usage, "aux": dict(state)}
        if gan:
            ck.update(disc=disc.state_dict(), d_opt=d_opt.state_dict())
        return ck

    def load_fn(ck):
        model.load_state_dict(ck["model"])
        usage.copy_(ck["usage"])
        state.update(ck["aux"])
        if gan:
            disc.load_state_dict(ck["disc"])
            d_opt.load_state_dict(ck["d_opt"])

    summary = tr._loop(name, list(model.parameters()), seconds, LR, step_fn, state_fn, load_fn, g, BATCH)
    summary.update(kind=kind, f=f, gan=gan, code_restarts=state["restarts"], crop=CROP, crop_batch=CROP_BATCH,
                   crop_until=CROP_UNTIL, parameters=sum(p.numel() for p in model.parameters()))
    _write_summary(tr, name, summary)
    if kind == "kl":  # SD's scaling factor: scaled latents of unit variance
        with torch.no_grad():
            z = torch.cat([model.encode(float_images(images[i:i + 512])).latent_dist.sample(generator=g)
                           for i in range(0, min(len(images), 1024), 512)])
        model.register_to_config(scaling_factor=float(1.0 / z.float().std()))
    model.save_pretrained(tr.out / name)
    return summary


def _write_summary(tr, name: str, summary: dict) -> None:
    import json
    (tr.out / "logs" / f"{name}.summary.json").write_text(json.dumps(summary, indent=2))


def export_vq(work: str | Path, dest: str | Path, name: str = VQ_DIR) -> Path:
    """Write the VQ autoencoder trained in ``work`` (``work / name``) to ``dest / VQ_DIR`` in fp16, with its
    training record (``lab_training.json``); ``dest`` is a pipeline directory such as the bundled model's."""
    import json
    import shutil

    from diffusers import VQModel

    from .tasks import TRAINING_RECORD
    work, out = Path(work), Path(dest) / VQ_DIR
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    VQModel.from_pretrained(work / name, dtype=torch.float32).to(torch.float16).save_pretrained(tmp)
    record = json.loads((work / "logs" / f"{name}.summary.json").read_text())
    record.pop("ema_decay", None)  # the loop's default; autoencoders keep no EMA
    record.setdefault("kind", "vq")
    record.setdefault("f", 4)
    record.setdefault("gan", name == VQ_DIR)
    record.update(crop=record.get("crop", CROP), crop_batch=record.get("crop_batch", CROP_BATCH),
                  crop_until=record.get("crop_until", CROP_UNTIL), codebook_size=CODEBOOK_SIZE,
                  loss="MSE + 0.5 L1 + 0.2 (1 - SSIM) + codebook + 0.25 commitment"
                       + (" + adaptive-weighted hinge patch GAN" if record["gan"] else ""))
    (tmp / TRAINING_RECORD).write_text(json.dumps(record, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _crops(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random CROP x CROP window of each image, on the 8-pixel grid (so crops keep the latent grid's phase)."""
    n = (x.shape[-1] - CROP) // 8 + 1
    off = torch.randint(0, n, (len(x), 2), generator=g, device=x.device).mul(8).tolist()
    return torch.stack([xi[:, oy:oy + CROP, ox:ox + CROP] for xi, (oy, ox) in zip(x, off)])


def _reset_codes(vq, h: torch.Tensor, which: torch.Tensor, g: torch.Generator) -> None:
    """Move the codes ``which`` (bool ``[K]``) to encoder outputs of ``h`` picked at random (plus a little noise,
    so two codes restarted at one vector part)."""
    z = h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1]).float()
    n = int(which.sum())
    pick = torch.randint(0, len(z), (n,), generator=g, device=z.device)
    noise = 0.01 * z.std() * torch.randn((n, z.shape[1]), generator=g, device=z.device)
    with torch.no_grad():
        vq.quantize.embedding.weight[which] = (z[pick] + noise).to(vq.quantize.embedding.weight.dtype)


def make_diffusion_unet(space: str):
    from diffusers import UNet2DConditionModel
    if space not in DIFFUSION_SPACES:
        raise ValueError(f"unknown space {space!r}; expected one of {DIFFUSION_SPACES}")
    return UNet2DConditionModel(**(PIXEL_UNET if space == "pixel" else configs.UNET))


def diffusion_scheduler(space: str, kind: str = "ddpm"):
    from diffusers import DDIMScheduler, DDPMScheduler
    cfg = PIXEL_SCHEDULER if space == "pixel" else LATENT_SCHEDULER
    if kind == "ddim":
        return DDIMScheduler(**cfg, set_alpha_to_one=False, steps_offset=1)
    return DDPMScheduler(**cfg)


class DiffusionData:
    """What a race model trains on: the batch's clean inputs (pixels in [-1, 1], or the bundled VAE's scaled
    latent samples, encoded once as LDM does) and its caption embeddings under the frozen text encoder."""

    def __init__(self, tr, space: str):
        from transformers import CLIPTextModel
        self.tr, self.space = tr, space
        self.ids = tr._token_ids(tr.data["caption"])
        self.empty = tr._token_ids([""])[0]
        self.text = CLIPTextModel.from_pretrained(tr._component("text_encoder"), dtype=torch.float32) \
            .to(tr.device).eval().requires_grad_(False)
        if space == "latent":
            self.scale, self.mean, self.std = tr._latent_stats(tr._component("vae"))

    def batch(self, g: torch.Generator, size: int, drop: float = 0.1):
        idx = self.tr._batch_idx(g, size)
        if self.space == "pixel":
            x0 = float_images(self.tr.data["image"][idx])
        else:
            m, s = self.mean[idx], self.std[idx]
            x0 = (m + s * torch.randn(m.shape, generator=g, device=m.device)) * self.scale
        tok = self.ids[idx].clone()
        tok[torch.rand(len(idx), generator=g, device=tok.device) < drop] = self.empty
        with torch.no_grad():
            cond = self.text(tok).last_hidden_state
        return x0, cond


def train_diffusion(tr, space: str, *, seconds: float) -> dict:
    """The pixel-vs-latent race: a UNet from scratch on ``space`` ("pixel" or "latent") for ``seconds``, plain
    epsilon-prediction loss, 10% of captions dropped; saved as ``tr.out / "diffusion-SPACE"``."""
    torch.manual_seed(tr.seed + 30)
    unet = make_diffusion_unet(space).to(tr.device).train()
    data = DiffusionData(tr, space)
    abar = diffusion_scheduler(space).alphas_cumprod.to(tr.device)
    g = tr._generator(tr.seed + 31)

    def step_fn():
        x0, cond = data.batch(g, DIFFUSION_BATCH)
        xt, t, eps = tr.forward_process(x0, abar, g)
        with tr.autocast():
            pred = unet(xt, t, encoder_hidden_states=cond).sample
        return F.mse_loss(pred.float(), eps), {}

    name = f"diffusion-{space}"
    summary = tr._loop(name, list(unet.parameters()), seconds, DIFFUSION_LR, step_fn,
                       lambda: {"model": unet.state_dict()}, lambda ck: unet.load_state_dict(ck["model"]), g,
                       DIFFUSION_BATCH)
    summary.update(space=space, parameters=sum(p.numel() for p in unet.parameters()))
    _write_summary(tr, name, summary)
    unet.save_pretrained(tr.out / name)
    return summary


def train_stage(tr, stage: str, seconds: float | None) -> dict:
    """Dispatch one of :data:`STAGES` (``seconds``: its budget; default 900 s for ``vq``/``vq-nogan``, 240 s for
    a sweep model, 900 s for a race model)."""
    if stage == "vq" or stage == "vq-nogan":
        return train_autoencoder(tr, "vq", 4, name=VQ_DIR if stage == "vq" else f"{VQ_DIR}-nogan",
                                 gan=stage == "vq", seconds=seconds or 900.0)
    if stage in SWEEP_STAGES:
        _, kind, f = stage.split("-")
        return train_autoencoder(tr, kind, int(f[1:]), name=stage, gan=False, seconds=seconds or 240.0)
    if stage.startswith("diffusion-"):
        return train_diffusion(tr, stage.removeprefix("diffusion-"), seconds=seconds or 900.0)
    raise KeyError(f"unknown stage-1 stage {stage!r}; expected one of {STAGES}")


# ------------------------------------------------------------------ using them
def _decode_u8(y: torch.Tensor) -> np.ndarray:
    return ((y.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def encode(model, images_u8: np.ndarray) -> torch.Tensor:
    """The latent a diffusion model would see: a KL model's posterior mean, a VQ model's quantised codes."""
    p = next(model.parameters())
    x = float_images(torch.from_numpy(np.asarray(images_u8))).to(p.device, p.dtype)
    if hasattr(model, "quantize"):
        return model.quantize(model.encode(x).latents)[0]
    return model.encode(x).latent_dist.mean


@torch.no_grad()
def reconstruct(model, images_u8: np.ndarray, batch: int = 100) -> np.ndarray:
    """Round trip of ``uint8 [N, H, W, 3]`` scenes through an autoencoder (KL: posterior mean; VQ: nearest codes)."""
    out = []
    for i in range(0, len(images_u8), batch):
        z = encode(model, images_u8[i:i + batch])
        dec = model.decode(z, force_not_quantize=True) if hasattr(model, "quantize") else model.decode(z)
        out.append(_decode_u8(dec.sample))
    return np.concatenate(out)


@torch.no_grad()
def code_indices(vq, images_u8: np.ndarray, batch: int = 100) -> np.ndarray:
    """The codebook index of every latent position, ``[N, h, w]``."""
    p = next(vq.parameters())
    out = []
    for i in range(0, len(images_u8), batch):
        h = vq.encode(float_images(torch.from_numpy(np.asarray(images_u8[i:i + batch]))).to(p.device, p.dtype)).latents
        _, _, idx = quantize(vq, h)
        out.append(idx.view(h.shape[0], h.shape[2], h.shape[3]).cpu().numpy())
    return np.concatenate(out)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of ``uint8`` image stacks."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) / 255) ** 2
    return 10 * np.log10(1 / np.maximum(mse.reshape(len(a), -1).mean(1), 1e-10))


@torch.no_grad()
def sample(unet, text_encoder, token_ids: torch.Tensor, empty_ids: torch.Tensor, space: str, *, vae=None,
           steps: int = 50, guidance: float = 5.0, seed: int = 0) -> np.ndarray:
    """DDIM sampling with classifier-free guidance, the same loop for both spaces (latents decoded by ``vae``):
    ``uint8 [B, 64, 64, 3]``."""
    p = next(unet.parameters())
    sched = diffusion_scheduler(space, "ddim")
    sched.set_timesteps(steps)
    n = len(token_ids)
    cond = text_encoder(token_ids.to(p.device)).last_hidden_state.to(p.dtype)
    uncond = text_encoder(empty_ids.to(p.device).expand(n, -1)).last_hidden_state.to(p.dtype)
    size = unet.config.sample_size
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((n, unet.config.in_channels, size, size), generator=g).to(p.device, p.dtype)
    emb = torch.cat([uncond, cond])
    for t in sched.timesteps:
        e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample.chunk(2)
        x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
    if space == "latent":
        x = vae.decode(x.to(next(vae.parameters()).dtype) / vae.config.scaling_factor).sample
    return _decode_u8(x)


def load_race_models(work: str | Path, base: str | Path, device: str = "cpu") -> dict:
    """The race's two UNets from a training directory, with the bundled text encoder, tokenizer and VAE."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    work, base = Path(work), Path(base)
    out = {"tokenizer": CLIPTokenizer.from_pretrained(base / "tokenizer"),
           "text_encoder": CLIPTextModel.from_pretrained(base / "text_encoder", dtype=torch.float32).to(device).eval(),
           "vae": AutoencoderKL.from_pretrained(base / "vae", dtype=torch.float32).to(device).eval()}
    for space in DIFFUSION_SPACES:
        d = work / f"diffusion-{space}"
        if (d / "config.json").exists():
            out[space] = UNet2DConditionModel.from_pretrained(d, dtype=torch.float32).to(device).eval()
    return out


def timed(fn, repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))
