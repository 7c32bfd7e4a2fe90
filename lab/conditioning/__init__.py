"""Conditioning as plug-ins: one file per kind (the lecture's "CA" and "concat" split, plus ControlNet).

    text.py        Text         prompts -> cross-attention (SD, SDXL pooled embeddings and time ids)
    classes.py     ClassLabel   class label -> the UNet's class embedding, a null class for guidance
                   ClassTokens  class label -> cross-attention tokens (a class model's class_embedder)
                   Layout       labelled boxes -> cross-attention tokens (a layout model's layout_embedder)
    concat.py      Concat       channels appended to the latents; Inpainting (SD's 9-channel layout), Upscale
                                (SD's x4 upscaler: the noised low-res image, its noise level as class label),
                                SemanticMap (class probabilities at the latent grid: LDM's semantic synthesis)
    views.py       InputView    the input view's latents as concat channels (a view model: Zero-1-to-3's c_concat)
                   CameraToken  the relative camera as one more cross-attention token (its c_crossattn)
                   keep_seen    a sample with the input's pixels put back where the warp saw them (generative
                                warping's last step; after sampling, not a plug-in)
    controlnet.py  ControlNet   residuals of one ControlNet (Control: net, image, scale, window, modes)
    base.py        the contract: Setup, UNetInputs, StepInfo, Conditioning

:func:`plugins` turns a sampler's arguments into the ordered list its loop applies at every step; a
sampler also takes extra plug-ins (``conditioning=[...]``) for kinds it has no argument for.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..schedulers import set_timesteps
from .base import Conditioning, Setup, StepInfo, UNetInputs
from .classes import ClassLabel, ClassTokens, Layout
from .concat import Concat, Coordinates, Inpainting, SemanticMap, Upscale
from .controlnet import MODES, Control, ControlNet, condition_tensor, control_grid, normalise_controls
from .text import STOP_WORDS, Text, content_words, token_table, token_words
from .views import CameraToken, InputView, keep_seen, novel_view

__all__ = ["CameraToken", "InputView", "keep_seen", "novel_view", "ClassLabel", "ClassTokens", "Concat", "Conditioning", "Control", "ControlNet", "Coordinates", "Inpainting",
           "Layout", "MODES", "STOP_WORDS",
           "SemanticMap", "Setup", "StepInfo", "Text", "UNetInputs", "Upscale", "change", "condition_tensor", "content_words", "control_grid",
           "normalise_controls", "plugins", "prepare", "token_table", "token_words"]


def plugins(pipe, *, prompt, negative_prompt, prompt_2, negative_prompt_2, batch, height, width, control, image,
            mask_image, strength, class_labels=None, null_class=None, extra=(), noise_level=20,
            **micro) -> list[Conditioning]:
    """The plug-ins of a sampler, in the order they apply: text (owns the batch), class label, concat kinds,
    extra ones, then ControlNets (they read the text embeddings and the latents without concat channels).
    ``micro``: SDXL's size conditioning (:data:`lab.conditioning.text.MICRO_KEYS`)."""
    if pipe.kind == "inpaint" and (image is None or mask_image is None):
        raise ValueError("an inpainting model needs image= and mask_image=")
    if pipe.kind == "upscale" and (image is None or mask_image is not None):
        raise ValueError("an upscaler needs image= (the low-res image) and takes no mask_image=")
    if pipe.kind not in ("inpaint", "upscale") and (image is not None or mask_image is not None):
        raise ValueError(f"image=/mask_image= need an inpainting UNet (9 input channels) or an upscaler; this is "
                         f"{pipe.kind!r}")
    extra = list(extra)
    bad = [p for p in extra if not isinstance(p, Conditioning)]
    if bad:
        raise TypeError(f"conditioning= takes lab.conditioning.Conditioning plug-ins, not {type(bad[0]).__name__}")
    if pipe.kind == "class":  # class tokens replace the text: the prompts only count the images
        if class_labels is None:
            raise ValueError("a class model needs class_labels= (one class index per image, or one for all)")
        if prompt != "" or negative_prompt is not None or null_class is not None:
            raise ValueError("a class model takes class_labels= only: no prompt, negative_prompt or null_class "
                             "(its class_embedder has the null class)")
        if not isinstance(class_labels, int):
            prompt = [""] * len(class_labels)
    if pipe.kind == "layout":  # box tokens replace the text: the prompts only count the images
        layouts = [p for p in extra if isinstance(p, Layout)]
        if len(layouts) != 1:
            raise ValueError("a layout model needs one conditioning=[lab.conditioning.Layout(boxes)]")
        if prompt != "" or negative_prompt is not None:
            raise ValueError("a layout model takes its boxes only (conditioning=[Layout(...)]): no prompt or "
                             "negative_prompt")
        prompt = [""] * layouts[0].n_layouts
    if pipe.kind == "views":  # Zero-1-to-3's two conditions: the input view (concat) and the camera (CA)
        n_in = sum(isinstance(p, InputView) for p in extra)
        n_cam = sum(isinstance(p, CameraToken) for p in extra)
        if (n_in, n_cam) != (1, 1):
            raise ValueError("a view model needs conditioning=lab.conditioning.novel_view(image, camera): one "
                             f"InputView and one CameraToken (got {n_in} and {n_cam})")
    out: list[Conditioning] = [Text(prompt, negative_prompt, prompt_2, negative_prompt_2, per_prompt=batch,
                                    micro=micro)]
    if class_labels is not None:
        out.append(ClassTokens(class_labels) if pipe.kind == "class" else ClassLabel(class_labels, null_class))
    if pipe.kind == "inpaint":
        out.append(Inpainting(image, mask_image, strength))
    if pipe.kind == "upscale":
        out.append(Upscale(image, noise_level))
    out += extra
    if pipe.kind == "layout" and pipe.components["layout_embedder"].config.get("coordinates", False):
        out.append(Coordinates())  # the model reads where each latent position is beside the latents
    if pipe.kind == "views" and pipe.components["camera_embedder"].config.get("coordinates", False):
        out.append(Coordinates())  # after the input view's channels, as the view model trained
    nets = [ControlNet(c) for c in normalise_controls(control, pipe)]
    for p in nets:  # the condition images are checked now, before the text encoder runs
        p.condition(height, width)
    return out + nets


def prepare(pipe, settings: dict, plugins: list, generator, scheduler) -> Setup:
    """Set the plug-ins up for a new sampler: the first (it owns the batch: layout, dtype), the scheduler's
    timesteps, the others in order (one may choose timesteps and initial latents), then plain initial latents
    (diffusers' ``prepare_latents``) when none did. Returns the :class:`Setup` (layout, timesteps, latents)."""
    s = Setup(pipe, settings, generator, scheduler, pipe.helper(scheduler))
    with torch.no_grad():
        plugins[0].setup(s)
        s.timesteps = set_timesteps(scheduler, settings["steps"], device=pipe.device)
        for p in plugins[1:]:
            p.setup(s)
        extra = sum(int(c.shape[1]) for p in plugins if isinstance(p, Concat) for c in p.channels)
        latent_channels = pipe.vae.config.latent_channels
        if latent_channels + extra != pipe.unet.config.in_channels:
            kinds = [p.kind for p in plugins if isinstance(p, Concat)]
            raise ValueError(f"this UNet takes {pipe.unet.config.in_channels} input channels: {latent_channels} "
                             f"latent channels and {pipe.unet.config.in_channels - latent_channels} concatenated "
                             f"ones, but the conditioning gives {extra} ({kinds or 'no concat plug-in'}); pass the "
                             "model's concat conditioning (e.g. conditioning=[lab.conditioning.SemanticMap(...)])")
        if s.latents is None:
            s.latents = s.helper.prepare_latents(s.layout.batch, latent_channels, settings["height"],
                                                 settings["width"], s.dtype, pipe.device, generator, None)
    if pipe.kind == "sdxl" and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)  # as StableDiffusionXLPipeline does
    return s


def change(plugins: tuple, s: Setup, changes: dict) -> tuple:
    """The plug-ins of a fork: new ``Text`` for changed prompts, new ``ControlNet`` s for ``control=`` (``None``:
    none from here on); the others as they are (plug-ins are immutable, so parent and fork share them safely)."""
    plugins = list(plugins)
    prompts = {k: v for k, v in changes.items() if k in Text.forkable}
    if prompts:  # every plug-in that forks on a prompt: the text, and those whose tokens are labelled by its words
        s_new = replace(s, settings={**s.settings, **prompts})
        plugins = [p.changed(s_new, **{k: v for k, v in prompts.items() if k in p.forkable})
                   if prompts.keys() & set(p.forkable) else p for p in plugins]
    if "control" in changes:
        nets = [ControlNet(c) for c in normalise_controls(changes["control"], s.pipe)]
        with torch.no_grad():
            for p in nets:
                p.setup(s)
        plugins = [p for p in plugins if not isinstance(p, ControlNet)] + nets
    return tuple(plugins)
