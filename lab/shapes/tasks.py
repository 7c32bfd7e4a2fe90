"""The lecture's task table on the shapes world (issue 19): one latent diffusion design, other conditions.

Each task model is the text model's UNet fine-tuned to take its task's condition, sharing the shipped VAE (and
the text encoder where it serves). So far:

=========  =========================================  ============================================================
task       condition                                  how it enters
=========  =========================================  ============================================================
class      a class: (size, colour, shape) of a        CA: a learned class token in a frame of 32
           one-object scene; a null class             (:class:`ClassTokenEncoder`); the UNet's cross-attention K/V
                                                      fine-tuned, the rest of the text UNet as it is
uncond     none                                       - (the text UNet's transformer blocks fine-tuned on the
                                                      empty caption's context)
layout     up to two boxes, each labelled with a      CA: a token per box, label embedding + MLP of the box's
           colour and shape ("red circle")            Fourier features (:class:`LayoutTokenEncoder`); the UNet's
                                                      transformer blocks fine-tuned
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

The class model is the text UNet with its cross-attention key and value projections replaced (Custom
Diffusion's choice of weights: the only ones that read the context; 0.3 MB in fp16) and a class token encoder;
the layout model replaces every transformer block (2.6 MB) and reads box tokens (:class:`LayoutTokenEncoder`), its
``conv_in`` widened by two coordinate channels (:func:`lab.token_encoders.coordinate_channels`);
``lab.load("shapes", task="class")`` puts them together, ``pipe.sampler(class_labels=[...])`` samples (guidance
against the null class). Plain diffusers and safetensors::

    unet = UNet2DConditionModel.from_pretrained("lab/models/shapes", subfolder="unet")
    unet.load_state_dict(load_file("lab/models/shapes/unet-class/unet_partial.safetensors"), strict=False)
    enc = load_file("lab/models/shapes/class_embedder/diffusion_pytorch_model.safetensors")
    context = torch.cat([enc["frame"][:1], enc["table.weight"][label][None], enc["frame"][2:]])[None]

The unconditional model is the text UNet with its transformer blocks fine-tuned on the empty caption alone
(``unet-uncond``, a partial file like the class model's; sampled with ``prompt=""`` and no guidance). The text
model's own empty caption is an unconditional model too (caption dropout trains it), but a biased one; ``eval
tasks`` measures both.

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

from ..token_encoders import PARTIAL_FILE, ClassTokenEncoder, LayoutTokenEncoder
from . import world

TASKS = ("inpaint", "sr", "segmap", "class", "layout", "uncond")
CONCAT_TASKS = ("inpaint", "sr", "segmap")
SEG_CLASSES = tuple(world.SEG_PALETTE)  # background, circle, square, triangle: the semantic map's channels
EXTRA_CHANNELS = {"inpaint": 5, "sr": 3, "segmap": len(SEG_CLASSES)}  # concat tasks: channels appended to the 4 latent channels
MAX_NOISE_LEVEL = 350  # the upscaler's noise augmentation levels (StableDiffusionUpscalePipeline's default)
LOW_RES_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
SR_FACTOR = 4  # 64x64 from 16x16
CAPTION_DROP = {"inpaint": 0.1, "sr": 0.3, "segmap": 0.3}  # training: the caption's drop rate (guidance, and the
# condition alone: the low-res image and the map say most of what the caption does)
NEW_LR_MULT = 10.0  # training: the new zero-initialised inputs (conv_in's extra channels, the noise-level
# embedding) learn at this multiple of the UNet's rate; at 1x they moved 0.002-0.01 in 400-500 steps against the
# pretrained channels' 0.08 mean weight, and the inpainting and upscaling models barely used their conditions


#: the class model's classes: every one-object scene's (size, colour, shape); index len(CLASSES) is the null class
CLASSES = tuple((size, colour, shape) for size in world.SIZES for colour in world.COLOURS for shape in world.SHAPES)
CLASS_SLOT = 1  # the class token's place in its context (after the start token, where a caption's first word goes)
TOKEN_LR_MULT = 3.0  # training: a CA task's token encoder's rate against the UNet's
TRAINING_RECORD = "lab_training.json"  # in each exported model folder: its last training (steps, seconds, batch, lr)


def continued_record(folder) -> dict:
    """The training record of a run that goes on from the model in ``folder`` (``--init base``): ``init`` and
    ``before``, the steps and seconds of every run behind that model (its own :data:`TRAINING_RECORD` and the runs
    it counted), so the task table counts them all (:func:`hyperparameter_table`), and ``before["runs"]``, each of
    those runs' own record, oldest first (what a recipe changed between them, e.g. the view model's
    ``left_weight``)."""
    import json
    from pathlib import Path
    path = Path(folder) / TRAINING_RECORD
    prev = json.loads(path.read_text()) if path.exists() else {}
    before = prev.get("before", {"steps": 0, "seconds": 0.0})
    runs = list(before.get("runs", [])) + ([{k: v for k, v in prev.items() if k != "before"}] if prev else [])
    return {"init": "base", "before": {"steps": before["steps"] + prev.get("steps", 0),
                                       "seconds": round(before["seconds"] + prev.get("seconds", 0.0), 1),
                                       "runs": runs}}

# the CA task models' grounding loss weights (token, pixel: lab.shapes.train.grounding_losses), each condition
# token's cross-attention map pulled onto its object. layout: 4x the text model's; where a box token's attention
# falls is the condition itself, and without it 40 CPU minutes of L_LDM alone left objects wherever
# (layout_box_iou50 0.10, with or without coordinate channels). class: off. The class token pulled onto its one
# object at the layout's weights (against the text UNet's prior of drawing two) measured class_accuracy 0.890 after
# 1419 steps in 40 min, against 0.915 without (2918 steps; the maps' gradients halve the step rate)
GROUNDING = {"layout": (0.2, 0.04), "class": (0.0, 0.0)}
TOKEN_TASKS = {"class": "class_embedder", "layout": "layout_embedder"}  # CA tasks: where their token encoder lives
LAYOUT_LABELS = tuple(f"{colour} {shape}" for colour in world.COLOURS for shape in world.SHAPES)  # a box's label


def class_name(index: int) -> str:
    """``"large red circle"`` for a class index (``"null"`` for the null class)."""
    return " ".join(CLASSES[index]) if index < len(CLASSES) else "null"


def class_index(size: str, colour: str, shape: str) -> int:
    return CLASSES.index((size, colour, shape))


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


#: how the class token's frame starts (:meth:`lab.token_encoders.ClassTokenEncoder.from_text_encoder`): the
#: bundled model's "empty". 40-minute runs with "phrases" measured class_accuracy 0.865 (1460 steps on a slow day,
#: two-object share 0.5) and 0.885 (2641 steps, the bundled recipe's share 0.75) against the bundled 0.915 (2918
#: steps); docs/shapes-training/tasks-10, tasks-11, eval-tasks.json
CLASS_FRAME = "empty"


def class_encoder(text_encoder, tokenizer) -> ClassTokenEncoder:
    """The class model's tokens, started from the text encoder (:class:`lab.token_encoders.ClassTokenEncoder`)."""
    return ClassTokenEncoder.from_text_encoder(text_encoder, tokenizer, [class_name(i) for i in range(len(CLASSES))],
                                               slot=CLASS_SLOT, frame=CLASS_FRAME)


def layout_encoder(text_encoder, tokenizer) -> LayoutTokenEncoder:
    """The layout model's tokens, started from the text encoder (:class:`lab.token_encoders.LayoutTokenEncoder`)."""
    return LayoutTokenEncoder.from_text_encoder(text_encoder, tokenizer, LAYOUT_LABELS, max_objects=world.MAX_OBJECTS,
                                                image_size=world.SIZE, coordinates=True)


def trained_subset(unet, task: str) -> dict[str, torch.Tensor]:
    """The UNet weights a task fine-tunes over the text UNet, by name: the class model its cross-attention key
    and value projections (the only weights that read the context: Custom Diffusion's choice); the layout model
    every transformer block (queries too: where a box is must be read off the latents' positions) and
    ``conv_in``, widened for the coordinate channels that tell it those positions; the unconditional model the
    transformer blocks, with the empty caption's context only."""
    def keep(k):
        if task == "class":
            return ".attn2.to_k." in k or ".attn2.to_v." in k
        return ".attentions." in k or (task == "layout" and k.startswith("conv_in."))
    if task not in (*TOKEN_TASKS, "uncond"):
        raise KeyError(f"{task!r} fine-tunes the whole UNet; a subset is for 'class', 'layout' and 'uncond'")
    return {k: v for k, v in unet.state_dict().items() if keep(k)}


class SplitConvIn(torch.nn.Module):
    """A widened UNet's ``conv_in`` while it trains: the pretrained channels' kernel and the new channels'
    kernel as two parameters (so the new ones, zero at the start, can learn at their own rate), computing exactly
    the one convolution; :meth:`merged` gives the plain ``Conv2d`` back for saving."""

    def __init__(self, conv: torch.nn.Conv2d, old_channels: int):
        super().__init__()
        w = conv.weight.detach()
        self.old_weight = torch.nn.Parameter(w[:, :old_channels].clone())
        self.new_weight = torch.nn.Parameter(w[:, old_channels:].clone())
        self.bias = torch.nn.Parameter(conv.bias.detach().clone())
        self.stride, self.padding = conv.stride, conv.padding

    def forward(self, x):
        return F.conv2d(x, torch.cat([self.old_weight, self.new_weight], 1), self.bias, self.stride, self.padding)

    def merged(self) -> torch.nn.Conv2d:
        w = torch.cat([self.old_weight, self.new_weight], 1).detach()
        conv = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], stride=self.stride, padding=self.padding)
        conv.to(w.device, w.dtype).load_state_dict({"weight": w, "bias": self.bias.detach()})
        return conv

    def load_merged(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Take a plain ``conv_in``'s weights (what :meth:`merged` gives), split at the same channel."""
        with torch.no_grad():
            k = self.old_weight.shape[1]
            self.old_weight.copy_(weight[:, :k])
            self.new_weight.copy_(weight[:, k:])
            self.bias.copy_(bias)


def float_images(u8: torch.Tensor) -> torch.Tensor:
    """``uint8 [B, H, W, 3]`` -> ``float [B, 3, H, W]`` in [-1, 1] (what the VAE takes)."""
    return u8.permute(0, 3, 1, 2).float().div(127.5).sub(1)


def low_res(images_u8: torch.Tensor) -> torch.Tensor:
    """``uint8 [B, H, W, 3]`` scenes -> ``[B, 3, H/4, W/4]`` in [-1, 1], area-averaged: the upscaler's input."""
    return F.avg_pool2d(float_images(images_u8), SR_FACTOR)


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
    masked = float_images(images_u8) * (masks < 0.5)
    with torch.no_grad():
        z = vae.encode(masked).latent_dist.sample(g) * scale
    m = F.interpolate(masks, size=z.shape[-2:])
    return m, z


TABLE_ROWS = ("condition", "f", "z-shape", "|Z|", "diffusion steps", "noise schedule", "model size", "channels",
              "depth", "channel multiplier", "number of heads", "batch size", "iterations", "learning rate",
              "conditioning", "(C)A-resolutions", "embedding dimension", "transformer depth", "trained parameters",
              "training time", "weights (fp16)")
_CONDITIONS = {"text": ("caption", "CA"), "uncond": ("none (the empty caption)", "-"),
               "class": ("class token (+ frame)", "CA"), "layout": ("boxes with labels", "CA"), "inpaint": ("mask + masked image", "concat (+ CA text)"),
               "sr": ("16x16 image + noise level", "concat (+ CA text)"),
               "segmap": ("semantic map", "concat (+ CA text)")}


def hyperparameter_table(path=None):
    """The lecture's hyper-parameter table (LDM's, task by task) for the models in ``path`` (default: the bundled
    shapes model), read from their configs and training records (:data:`TRAINING_RECORD`): a pandas DataFrame,
    rows :data:`TABLE_ROWS`, one column per model there (text, uncond (the text model's empty caption unless
    there is an unconditional model), and each task model). ``iterations``,
    ``batch size``, ``learning rate`` and ``training time`` are the model's last training (a task model's
    fine-tune from the text model, counting the runs it continued; the text model's last round)."""
    import json
    from pathlib import Path

    import pandas as pd
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..loading import resolve_path
    root = Path(resolve_path(path or "shapes"))
    vae = AutoencoderKL.load_config(root / "vae")
    sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    f = 2 ** (len(vae["block_out_channels"]) - 1)
    base_cfg = UNet2DConditionModel.load_config(root / "unet")
    n_base = sum(t.numel() for t in load_file(str(root / "unet" / "diffusion_pytorch_model.safetensors")).values())

    def mb(folder):
        return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) / 1e6

    def column(name, cfg, folder, extra_params=0, record_dir=None, weights=0.0):
        chans = list(cfg["block_out_channels"])
        size = cfg["sample_size"]
        res = [size // 2 ** i for i, b in enumerate(cfg["down_block_types"]) if "CrossAttn" in b]
        if "CrossAttn" in (cfg.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
            res.append(size // 2 ** (len(chans) - 1))
        n_unet = n_base + (cfg["in_channels"] - base_cfg["in_channels"]) * chans[0] * 9  # conv_in's new channels
        if cfg.get("num_class_embeds"):
            n_unet += cfg["num_class_embeds"] * chans[0] * 4
        rec_path = Path(record_dir or folder) / TRAINING_RECORD
        rec = json.loads(rec_path.read_text()) if rec_path.exists() else {}
        cond, how = _CONDITIONS[name]
        return {"condition": cond, "f": f, "z-shape": f"{size}x{size}x{vae['latent_channels']}",
                "|Z|": "- (KL)", "diffusion steps": sched["num_train_timesteps"],
                "noise schedule": sched["beta_schedule"].replace("_", " "),
                "model size": f"{(n_unet + extra_params) / 1e6:.2f}M", "channels": chans[0],
                "depth": cfg["layers_per_block"], "channel multiplier": ",".join(f"{c / chans[0]:g}" for c in chans),
                "number of heads": cfg["attention_head_dim"], "batch size": rec.get("batch", "?"),
                "iterations": rec["steps"] + rec.get("before", {}).get("steps", 0) if "steps" in rec else "?",
                "learning rate": rec.get("lr", "?"), "conditioning": how,
                "(C)A-resolutions": ", ".join(map(str, sorted(set(res), reverse=True))),
                "embedding dimension": cfg["cross_attention_dim"],
                "transformer depth": cfg.get("transformer_layers_per_block", 1),
                "trained parameters": f"{rec['trained_params'] / 1e6:.2f}M" if "trained_params" in rec else "?",
                "training time": (f"{(rec['seconds'] + rec.get('before', {}).get('seconds', 0)) / 60:.0f} min "
                                  f"{rec.get('device', '')}") if "seconds" in rec else "?",
                "weights (fp16)": f"{weights:.2f} MB"}

    cols = {"text": column("text", base_cfg, root / "unet", weights=mb(root / "unet") + mb(root / "text_encoder")),
            "uncond": column("uncond", base_cfg, root / "unet", weights=0.0)}
    for task in TASKS:
        folder = root / f"unet-{task}"
        if (folder / "config.json").exists():
            cols[task] = column(task, UNet2DConditionModel.load_config(folder), folder, weights=mb(folder))
        elif (folder / PARTIAL_FILE).exists() and task == "uncond":  # replaces the text model's empty caption
            cols[task] = column(task, base_cfg, folder, weights=mb(folder))
            cols[task]["condition"] = "none"
        elif (folder / PARTIAL_FILE).exists():
            enc = root / TOKEN_TASKS[task]
            n_enc = sum(t.numel() for f in enc.glob("*.safetensors") for t in load_file(str(f)).values())
            with safe_open(str(folder / PARTIAL_FILE), "pt") as part:  # the header only: conv_in's shape
                wide = "conv_in.weight" in part.keys()
                cfg = dict(base_cfg, in_channels=part.get_slice("conv_in.weight").get_shape()[1]) if wide else base_cfg
            cols[task] = column(task, cfg, folder, n_enc, weights=mb(folder) + mb(enc))
            if cfg["in_channels"] > base_cfg["in_channels"]:  # the layout model's coordinate channels
                cols[task]["conditioning"] += f" (+ {cfg['in_channels'] - base_cfg['in_channels']} coordinate channels)"
    return pd.DataFrame(cols).loc[list(TABLE_ROWS)]
