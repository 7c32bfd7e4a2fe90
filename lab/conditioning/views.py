"""Novel-view conditioning, Zero-1-to-3's two paths (a view model: :mod:`lab.shapes.view_model`).

    InputView    the input view's VAE latents, concatenated to the latents ("concat"; Zero-1-to-3's c_concat)
    CameraToken  the relative camera as one more cross-attention token after the caption's ("CA"; its
                 c_crossattn, made by the model's ``camera_embedder``)

Guidance drops both, as Zero-1-to-3 does: the unconditional half gets zero input latents, and the camera token
of the null camera (zeros) after the negative prompt's states. :func:`novel_view` gives the pair.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import Conditioning, Setup, StepInfo, UNetInputs
from .concat import Concat


def _per_prompt(x: torch.Tensor, layout, what: str) -> torch.Tensor:
    if len(x) not in (1, layout.n_prompts):
        raise ValueError(f"{len(x)} {what} for {layout.n_prompts} prompts: give one, or one per prompt")
    return x.expand(layout.n_prompts, *x.shape[1:]).repeat_interleave(layout.per_prompt, 0)


class InputView(Concat):
    """The input view as concat channels: its VAE posterior mean, scaled by the VAE's factor (how the model
    trained), the size of the sample's latents; all zeros in guidance's unconditional half. ``image``: a PIL
    image, an ``[H, W, 3]`` uint8 array or a list of them (one for all prompts, or one per prompt) at the
    sample's size."""

    kind = "input-view"

    def __init__(self, image):
        super().__init__()
        self.image = image

    def setup(self, s: Setup) -> None:
        pipe, layout = s.pipe, s.layout
        images = self.image if isinstance(self.image, (list, tuple)) else [self.image]
        if not images:
            raise ValueError("InputView needs an image")
        arrays = []
        for im in images:
            a = np.asarray(im)
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
                raise ValueError(f"an input view is an RGB uint8 image [H, W, 3], got {a.dtype} {a.shape}")
            if a.shape[:2] != (s.settings["height"], s.settings["width"]):
                raise ValueError(f"the input view is {a.shape[1]}x{a.shape[0]}; this sample is "
                                 f"{s.settings['width']}x{s.settings['height']}: the view model takes the input "
                                 "at the size it makes")
            arrays.append(a)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        vae = pipe.vae
        with torch.no_grad():
            z = vae.encode(x.to(s.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        z = _per_prompt(z.to(s.dtype), layout, "input views")
        self.channels = (torch.cat([torch.zeros_like(z), z]) if layout.cfg else z,)

    def describe(self) -> dict:
        n = len(self.image) if isinstance(self.image, (list, tuple)) else 1
        return {**super().describe(), "views": n}


class CameraToken(Conditioning):
    """The relative camera (:data:`lab.shapes.views.CAMERA_FEATURES`: ``dx, dy, dlog zoom, sin droll, cos
    droll``, :func:`lab.shapes.views.camera_change` makes them) as one more cross-attention token after the
    text's, made by the pipeline's ``camera_embedder`` from the text's states and the camera; the null camera
    (zeros) in guidance's unconditional half. ``camera``: five numbers, or one row per prompt. Its token table
    labels the new token ``<camera>``, so recorders give its attention map like a word's."""

    kind, enters = "camera", "CA"

    def __init__(self, camera):
        c = torch.as_tensor(np.asarray(camera, dtype=np.float32))
        if c.ndim == 1:
            c = c[None]
        if c.ndim != 2 or c.shape[1] != 5 or not torch.isfinite(c).all():
            raise ValueError(f"a relative camera is 5 finite numbers (dx, dy, dlog_zoom, sin_droll, cos_droll), or "
                             f"one row of them per prompt; got shape {tuple(c.shape)}")
        self.camera = c
        self.tokens: dict | None = None
        self._cams = self._enc = self._ctx = None

    def setup(self, s: Setup) -> None:
        from .text import token_table
        enc = s.pipe.components.get("camera_embedder")
        if enc is None:
            raise ValueError("a camera token needs a view model (a camera_embedder component): "
                             "lab.load('shapes', task='views')")
        if self.camera.shape[1] != enc.config.features:
            raise ValueError(f"this model reads {enc.config.features} camera numbers, got {self.camera.shape[1]}")
        layout = s.layout
        cams = _per_prompt(self.camera, layout, "cameras").to(s.device)
        self._cams = torch.cat([torch.zeros_like(cams), cams]) if layout.cfg else cams
        table = token_table(s.pipe.tokenizer, s.settings.get("prompt", ""))
        if len(table["prompts"]) == 1 and layout.n_prompts > 1:
            table["prompts"] = table["prompts"] * layout.n_prompts
        for row in table["prompts"]:
            w = max(row["word_index"]) + 1
            row["tokens"].append("<camera>")
            row["word_index"].append(w)
            row["words"].append("<camera>")
        table["n_tokens"] += 1
        self.tokens = table
        self._enc, self._ctx = enc, None

    def apply(self, x: UNetInputs, step: StepInfo) -> None:
        states = x.encoder_hidden_states  # the text's (Text applies first): the same tensor every step
        if self._ctx is None or self._ctx[0] is not states:  # the token once per context, not once per step
            self._ctx = (states, self._enc(states, self._cams.to(states.dtype)))
        x.encoder_hidden_states = self._ctx[1]

    def describe(self) -> dict:
        return {**super().describe(), "camera": [[round(float(v), 5) for v in row] for row in self.camera]}


def novel_view(image, camera) -> list[Conditioning]:
    """The conditioning of a view model (``lab.load("shapes", task="views")``): ``conditioning=novel_view(image,
    camera)`` for its sampler; ``camera`` as :func:`lab.shapes.views.camera_change` makes it."""
    return [InputView(image), CameraToken(camera)]
