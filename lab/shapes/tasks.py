"""The lecture's task table on the shapes world (issue 19): one latent diffusion design, other conditions.

Each task model is the text model's UNet fine-tuned to take its task's condition, sharing the shipped VAE (and
the text encoder where it serves). So far:

=========  =========================================  ============================================================
task       condition                                  how it enters
=========  =========================================  ============================================================
inpaint    a mask and the masked image (and a         concat, SD's 9-channel layout: ``[z_t, mask, E(masked)]``;
           caption)                                   ``conv_in`` widened with zero-initialised channels
sr         a 16x16 image (and a caption), noised to   concat, SD's x4 upscaler layout: ``[z_t, noised low-res]``
           a random level, the level as class label   (7 channels), the level through a zero-initialised class
                                                      embedding (``num_class_embeds = max_noise_level + 1``)
segmap     the segmentation map (background, circle,  concat: the one-hot map area-averaged to the 16x16 latent
           square, triangle) and a caption            grid (4 channels, :class:`lab.conditioning.SemanticMap`)
=========  =========================================  ============================================================

The inpainting UNet is a plain diffusers ``UNet2DConditionModel`` with ``in_channels=9`` (the layout of
``runwayml/stable-diffusion-inpainting``), so the lab's sampler drives it through its ``Inpainting`` plug-in
and diffusers' ``StableDiffusionInpaintPipeline`` loads it with the bundled VAE, text encoder and scheduler::

    unet = UNet2DConditionModel.from_pretrained("lab/models/shapes", subfolder="unet-inpaint")
    pipe = StableDiffusionInpaintPipeline.from_pretrained("lab/models/shapes", unet=unet, safety_checker=None)

The upscaler is ``StableDiffusionUpscalePipeline``'s layout (f=4 makes the shapes VAE's latent grid the 16x16
low-res image's, as SD's upscaler VAE does for its x4): diffusers loads it with the ``low_res_scheduler``
folder, then the VAE's own scaling factor must be put back (that pipeline's constructor sets SD upscaler's
0.08333, which our VAE's latents do not need)::

    unet = UNet2DConditionModel.from_pretrained("lab/models/shapes", subfolder="unet-sr")
    lrs = DDPMScheduler.from_pretrained("lab/models/shapes", subfolder="low_res_scheduler")
    pipe = StableDiffusionUpscalePipeline.from_pretrained("lab/models/shapes", unet=unet, low_res_scheduler=lrs)
    pipe.vae.register_to_config(scaling_factor=AutoencoderKL.load_config("lab/models/shapes/vae")["scaling_factor"])

The low-res training images are the scenes area-averaged to 16x16 and noised by the low-res scheduler to a
level drawn uniformly from [0, 350] (SD's ``max_noise_level``); sampling uses 20, the pipeline's default.

The semantic-map model is driven with ``conditioning=[lab.conditioning.SemanticMap(segmap_onehot(seg))]``;
its caption is dropped three times in ten in training, so that it also learns the map alone (``prompt=""``; the
eval measures it with captions only).

Training masks follow SD's inpainting recipe on this world: an object's box grown by 2-6 px (the eval's
case: redraw what the caption says there), a random rectangle, or, one time in six, the whole image (so the
model keeps text-to-image); the masked image is the image with the mask's pixels set to 0 (mid-gray in
[-1, 1]), encoded by the VAE like the latents (``StableDiffusionInpaintPipeline.prepare_mask_latents``).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from . import world

TASKS = ("inpaint", "sr", "segmap")
SEG_CLASSES = tuple(world.SEG_PALETTE)  # background, circle, square, triangle: the semantic map's channels
EXTRA_CHANNELS = {"inpaint": 5, "sr": 3, "segmap": len(SEG_CLASSES)}  # concat tasks: channels appended to the 4 latent channels
MAX_NOISE_LEVEL = 350  # the upscaler's noise augmentation levels (StableDiffusionUpscalePipeline's default)
LOW_RES_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
SR_FACTOR = 4  # 64x64 from 16x16


def check_task(task: str) -> str:
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; expected one of {TASKS}")
    return task


def object_boxes(object_masks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``[n, MAX_OBJECTS, H, W]`` bool -> ``[n, MAX_OBJECTS, 4]`` int16 boxes ``(x0, y0, x1, y1)``, exclusive
    ends; ``-1`` rows for a missing object."""
    m = torch.as_tensor(object_masks)
    rows = m.any(3)  # [n, k, H]: rows with pixels
    cols = m.any(2)  # [n, k, W]
    ar = torch.arange(m.shape[-1])

    def first_last(v):
        has = v.any(-1)
        first = torch.where(v, ar, m.shape[-1]).amin(-1)
        last = torch.where(v, ar, -1).amax(-1) + 1
        return first, last, has

    y0, y1, has = first_last(rows)
    x0, x1, _ = first_last(cols)
    out = torch.stack([x0, y0, x1, y1], -1).to(torch.int16)
    out[~has] = -1
    return out


def inpaint_masks(boxes: torch.Tensor, g: torch.Generator, *, size: int = world.SIZE,
                  p_object: float = 0.6, p_full: float = 1 / 6) -> torch.Tensor:
    """One training mask per scene, ``[b, 1, size, size]`` float (1: repaint): with ``p_object`` an object's
    box grown by 2-6 px, with ``p_full`` the whole image, else a random rectangle of 12-44 px a side."""
    b = len(boxes)
    dev = boxes.device
    u = torch.rand(b, generator=g, device=dev)
    pick = torch.randint(0, 2, (b,), generator=g, device=dev)
    present = boxes[:, :, 0] >= 0  # [b, k]
    pick = torch.where(present[torch.arange(b, device=dev), pick], pick, 0)
    box = boxes[torch.arange(b, device=dev), pick].float()  # [b, 4]
    grow = torch.randint(2, 7, (b, 1), generator=g, device=dev).float()
    obj = torch.cat([box[:, :2] - grow, box[:, 2:] + grow], 1)
    side = torch.randint(12, 45, (b, 2), generator=g, device=dev).float()
    corner = torch.rand(b, 2, generator=g, device=dev) * (size - side)
    rect = torch.cat([corner, corner + side], 1)
    full = torch.tensor([0.0, 0.0, size, size], device=dev).expand(b, 4)
    chosen = torch.where((u < p_object)[:, None], obj, torch.where((u < p_object + p_full)[:, None], full, rect))
    return box_masks(chosen, size)


def box_masks(boxes: torch.Tensor, size: int = world.SIZE) -> torch.Tensor:
    """``[b, 4]`` boxes ``(x0, y0, x1, y1)`` in pixels -> ``[b, 1, size, size]`` float masks (clipped)."""
    ar = torch.arange(size, device=boxes.device, dtype=torch.float32) + 0.5
    inx = (ar[None] >= boxes[:, 0:1]) & (ar[None] < boxes[:, 2:3])  # [b, W]
    iny = (ar[None] >= boxes[:, 1:2]) & (ar[None] < boxes[:, 3:4])  # [b, H]
    return (iny[:, :, None] & inx[:, None, :]).float()[:, None]


def widen_conv_in(unet, extra: int, num_class_embeds: int | None = None):
    """A copy of ``unet`` whose ``conv_in`` takes ``extra`` more input channels, zero-initialised, so the new
    model computes exactly what ``unet`` did until training gives the new channels weight (how SD's
    inpainting and x4 upscaler UNets were started from SD). ``num_class_embeds``: also a class embedding
    (added to the time embedding), zero-initialised for the same reason."""
    from diffusers import UNet2DConditionModel
    cfg = dict(unet.config)
    cfg["in_channels"] = unet.config.in_channels + extra
    if num_class_embeds is not None:
        cfg["num_class_embeds"] = num_class_embeds
    new = UNet2DConditionModel.from_config(cfg).to(unet.device, unet.dtype)
    state = copy.deepcopy(unet.state_dict())
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, w.new_zeros(w.shape[0], extra, *w.shape[2:])], 1)
    if num_class_embeds is not None:
        state["class_embedding.weight"] = torch.zeros_like(new.class_embedding.weight)
    new.load_state_dict(state)
    return new


def low_res(images_u8: torch.Tensor) -> torch.Tensor:
    """``uint8 [B, H, W, 3]`` scenes -> ``[B, 3, H/4, W/4]`` in [-1, 1], area-averaged: the upscaler's input."""
    x = images_u8.permute(0, 3, 1, 2).float().div(127.5).sub(1)
    return F.avg_pool2d(x, SR_FACTOR)


def segmap_onehot(seg_u8) -> torch.Tensor:
    """The world's segmentation images (``uint8 [H, W, 3]`` or ``[B, H, W, 3]``, :data:`world.SEG_PALETTE`
    colours) -> one-hot ``float [B, classes, H, W]`` in :data:`SEG_CLASSES` order (each pixel its nearest
    palette colour)."""
    x = torch.as_tensor(np.asarray(seg_u8)).float()
    if x.ndim == 3:
        x = x[None]
    pal = torch.tensor([world.SEG_PALETTE[c] for c in SEG_CLASSES], dtype=torch.float32, device=x.device)
    idx = torch.cdist(x.reshape(-1, 3), pal).argmin(1).reshape(x.shape[:3])
    return F.one_hot(idx, len(SEG_CLASSES)).permute(0, 3, 1, 2).float()


def low_res_scheduler():
    from diffusers import DDPMScheduler
    return DDPMScheduler(**LOW_RES_SCHEDULER)


def inpaint_inputs(vae, images_u8: torch.Tensor, masks: torch.Tensor, scale: float,
                   g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5 concat channels of SD's inpainting UNet for a batch: the mask at latent resolution (nearest, as
    ``prepare_mask_latents``) and the VAE latents (sampled, scaled) of the image with the mask's pixels at 0."""
    x = images_u8.permute(0, 3, 1, 2).float().div(127.5).sub(1)
    masked = x * (masks < 0.5)
    with torch.no_grad():
        z = vae.encode(masked).latent_dist.sample(g) * scale
    m = F.interpolate(masks, size=z.shape[-2:])
    return m, z
