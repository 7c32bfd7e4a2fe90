"""Novel-view conditioning, Zero-1-to-3's two paths (a view model: :mod:`lab.shapes.view_model`).

    InputView    the input view as concat channels ("concat"; Zero-1-to-3's c_concat), in one of two layouts
                 that the UNet's input width tells apart:
                   "view"    8 channels ``[z_t, E(input)]``, Zero-1-to-3's own: the model must learn the camera's
                             geometry from the token alone;
                   "warped"  9 channels ``[z_t, mask, E(warped input)]``, SD's inpainting layout: the input view
                             moved to the target camera with the pixels it has (:func:`warp_views`, a similarity
                             transform the relative camera defines), and the mask of what it did not see, which
                             the model fills (generative warping, as GenWarp and the warp-then-inpaint methods do)
    CameraToken  the relative camera as one more cross-attention token after the caption's ("CA"; its
                 c_crossattn, made by the model's ``camera_embedder``)

Guidance drops both, as Zero-1-to-3 does: the unconditional half gets the input view of nothing seen (zero
latents; in the warped layout the all-ones mask and the latents of the blank image), and the camera token of
the null camera (zeros) after the negative prompt's states. :func:`novel_view` gives the pair.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import Conditioning, Setup, StepInfo, UNetInputs
from .concat import Concat


def _for_prompts(x: torch.Tensor, layout, what: str) -> torch.Tensor:
    """One row per prompt (``x`` has one, or one per prompt)."""
    if len(x) not in (1, layout.n_prompts):
        raise ValueError(f"{len(x)} {what} for {layout.n_prompts} prompts: give one, or one per prompt")
    return x.expand(layout.n_prompts, *x.shape[1:])


def _per_prompt(x: torch.Tensor, layout, what: str) -> torch.Tensor:
    """One row per sample of the batch (each prompt's row repeated for its samples)."""
    return _for_prompts(x, layout, what).repeat_interleave(layout.per_prompt, 0)


#: a target pixel counts as seen where the bilinear warp of an all-ones image gives at least this much: pixels
#: the input frame's edge cuts are blends with what lies outside it, so they are repainted
SEEN = 0.98


def check_cameras(camera) -> torch.Tensor:
    """Relative cameras as ``float32 [n, 5]`` (one row, or one per prompt); a clear error otherwise."""
    c = torch.as_tensor(np.asarray(camera, dtype=np.float32))
    if c.ndim == 1:
        c = c[None]
    if c.ndim != 2 or c.shape[1] != 5 or not torch.isfinite(c).all():
        raise ValueError(f"a relative camera is 5 finite numbers (dx, dy, dlog_zoom, sin_droll, cos_droll), or "
                         f"one row of them per prompt; got shape {tuple(c.shape)}")
    if (c[:, 3] ** 2 + c[:, 4] ** 2 < 1e-6).any():
        raise ValueError("a relative camera's roll is (sin, cos) of an angle; (0, 0) is the null camera, which only "
                         "guidance's unconditional half uses")
    return c


def warp_views(images: torch.Tensor, cameras: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The input views ``[n, c, H, W]`` (any values; images in [-1, 1]) seen from the target cameras: the relative
    cameras ``[n, 5]`` (:data:`lab.shapes.views.CAMERA_FEATURES`) as the similarity transform they define, the
    target pixel ``u`` taking the input's ``R(droll) (u - centre) / zoom + centre + (dx, dy) * size`` (bilinear,
    ``torch.nn.functional.grid_sample``). Returns the warped views with 0 where the input saw nothing, and the
    mask of those pixels ``[n, 1, H, W]`` (1: unseen, :data:`SEEN`), SD's inpainting convention."""
    cams = cameras.to(images.device, torch.float32)
    scale = torch.exp(-cams[:, 2])
    norm = torch.sqrt(cams[:, 3] ** 2 + cams[:, 4] ** 2)
    sin, cos = cams[:, 3] / norm, cams[:, 4] / norm
    theta = torch.stack([torch.stack([cos * scale, -sin * scale, 2 * cams[:, 0]], 1),
                         torch.stack([sin * scale, cos * scale, 2 * cams[:, 1]], 1)], 1)  # normalised coordinates
    n, _, h, w = images.shape
    if h != w:
        raise ValueError(f"the camera's pan is a fraction of a square frame; got {w}x{h}")
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    x = torch.cat([images.float(), torch.ones(n, 1, h, w, device=images.device)], 1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    unseen = (out[:, -1:] < SEEN).float()
    return out[:, :-1] * (1 - unseen), unseen


def input_layout(unet, vae) -> str:
    """``"view"`` (8 input channels) or ``"warped"`` (9, SD's inpainting layout) from the UNet's input width."""
    c = vae.config.latent_channels
    extra = unet.config.in_channels - unet.config.out_channels
    layouts = {c: "view", c + 1: "warped"}
    if extra not in layouts:
        raise ValueError(f"this UNet takes {unet.config.in_channels} input channels; a view model takes "
                         f"{2 * c} (the input view's latents) or {2 * c + 1} (a mask and the warped view's)")
    return layouts[extra]


def _unit(arrays: list[np.ndarray]) -> torch.Tensor:
    """``uint8 [H, W, 3]`` images as one ``[n, 3, H, W]`` float tensor in [-1, 1]."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def _as_images(image) -> list[np.ndarray]:
    images = image if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise ValueError("InputView needs an image")
    out = []
    for im in images:
        a = np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"an input view is an RGB uint8 image [H, W, 3], got {a.dtype} {a.shape}")
        out.append(a)
    return out


class InputView(Concat):
    """The input view as concat channels, the size of the sample's latents; in the layout the model's UNet takes
    (:func:`input_layout`): its VAE posterior mean, scaled by the VAE's factor (how the model trained), or the
    mask and scaled posterior mean of the view warped to the target camera (:func:`warp_views`; ``camera``
    needed). Guidance's unconditional half gets the view of nothing seen. ``image``: a PIL image, an ``[H, W,
    3]`` uint8 array or a list of them (one for all prompts, or one per prompt) at the sample's size; ``camera``:
    the relative camera(s) as :class:`CameraToken` takes them (:func:`novel_view` gives both the same)."""

    kind = "input-view"

    def __init__(self, image, camera=None):
        super().__init__()
        self.image = image
        self.camera = None if camera is None else check_cameras(camera)
        self.layout: str | None = None

    def setup(self, s: Setup) -> None:
        pipe, layout = s.pipe, s.layout
        arrays = _as_images(self.image)
        for a in arrays:
            if a.shape[:2] != (s.settings["height"], s.settings["width"]):
                raise ValueError(f"the input view is {a.shape[1]}x{a.shape[0]}; this sample is "
                                 f"{s.settings['width']}x{s.settings['height']}: the view model takes the input "
                                 "at the size it makes")
        vae = pipe.vae
        self.layout = input_layout(pipe.unet, vae)
        x = _unit(arrays)
        if self.layout == "view":
            with torch.no_grad():
                z = vae.encode(x.to(s.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
            z = _per_prompt(z.to(s.dtype), layout, "input views")
            self.channels = (torch.cat([torch.zeros_like(z), z]) if layout.cfg else z,)
            return
        if self.camera is None:
            raise ValueError("this view model warps the input view to the target camera: InputView(image, camera) "
                             "(novel_view(image, camera) gives both)")
        k = layout.n_prompts
        x, cams = _for_prompts(x, layout, "input views"), _for_prompts(self.camera, layout, "cameras")  # a warp each
        mask, z = warped_latents(vae, x.to(s.device), cams.to(s.device))
        rep = (lambda t: t.repeat_interleave(layout.per_prompt, 0).to(s.dtype))
        if layout.cfg:
            null_mask, null_z = nothing_seen(vae, k, x.shape[-1], s.device)
            mask, z = torch.cat([null_mask, mask]), torch.cat([null_z, z])
        self.channels = (rep(mask), rep(z))

    def describe(self) -> dict:
        n = len(self.image) if isinstance(self.image, (list, tuple)) else 1
        return {**super().describe(), "views": n, "layout": self.layout}


def warped_latents(vae, images: torch.Tensor, cameras: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The warped layout's channels for views ``[n, 3, H, W]`` in [-1, 1] and relative cameras ``[n, 5]``: the
    unseen mask at the latent size (nearest, as ``prepare_mask_latents``) and the scaled VAE posterior mean of
    the warped view, unseen pixels at 0."""
    warped, unseen = warp_views(images, cameras)
    with torch.no_grad():
        z = vae.encode(warped.to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    return F.interpolate(unseen, size=z.shape[-2:]).to(z.dtype), z


def nothing_seen(vae, n: int, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The warped layout's null input (guidance's unconditional half): all unseen, the blank view's latents."""
    blank = torch.zeros(1, 3, size, size, device=device, dtype=vae.dtype)
    with torch.no_grad():
        z = vae.encode(blank).latent_dist.mean * vae.config.scaling_factor
    return torch.ones(n, 1, *z.shape[-2:], device=device, dtype=z.dtype), z.expand(n, -1, -1, -1)


class CameraToken(Conditioning):
    """The relative camera (:data:`lab.shapes.views.CAMERA_FEATURES`: ``dx, dy, dlog zoom, sin droll, cos
    droll``, :func:`lab.shapes.views.camera_change` makes them) as one more cross-attention token after the
    text's, made by the pipeline's ``camera_embedder`` from the text's states and the camera; the null camera
    (zeros) in guidance's unconditional half. ``camera``: five numbers, or one row per prompt. Its token table
    labels the new token ``<camera>``, so recorders give its attention map like a word's."""

    kind, enters = "camera", "CA"
    forkable = ("prompt",)  # its token table is the prompt's plus <camera>: a fork with a new prompt makes it again

    def __init__(self, camera):
        self.camera = check_cameras(camera)
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

    def changed(self, s: Setup, **changes) -> "CameraToken":
        new = CameraToken(self.camera)  # the same camera, set up on the fork's prompt (``s.settings``)
        new.setup(s)
        return new

    def describe(self) -> dict:
        return {**super().describe(), "camera": [[round(float(v), 5) for v in row] for row in self.camera]}


def keep_seen(samples, image, camera) -> list[np.ndarray]:
    """Generative warping's last step: each sample with the input view's own pixels put back where the warp to the
    target camera saw them (:func:`warp_views`, coverage >= :data:`SEEN`), so the model's pixels remain only where
    the input saw nothing. In a flat world through a 2D camera the seen pixels *are* the target's (up to the
    bilinear resampling), so nothing the model draws there can be better; it is what SD inpainting's
    ``VaeImageProcessor.apply_overlay`` does outside the mask, and what warp-then-inpaint methods return.
    ``samples``: PIL images or ``[H, W, 3]`` uint8 arrays (e.g. ``run.images``), or one ``[n, H, W, 3]`` array;
    ``image``, ``camera``: as :func:`novel_view` took them (one, or one per sample). Returns ``uint8 [H, W, 3]``
    arrays."""
    batch = isinstance(samples, (list, tuple)) or (isinstance(samples, np.ndarray) and samples.ndim == 4)
    outs = _as_images(list(samples) if batch else samples)
    views_ = _as_images(image)
    cams = check_cameras(camera)
    n = len(outs)
    if len(views_) not in (1, n) or len(cams) not in (1, n):
        raise ValueError(f"{len(views_)} input views and {len(cams)} cameras for {n} samples: give one, or one each")
    if any(v.shape != outs[0].shape for v in views_ + outs):
        raise ValueError("the input views and the samples must have one size: "
                         f"{sorted({v.shape for v in views_ + outs})}")
    k = max(len(views_), len(cams))  # one warp per distinct (view, camera), not one per sample
    x = _unit(views_)
    warped, unseen = warp_views(x.expand(k, -1, -1, -1), cams.expand(k, -1))
    warped = ((warped.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    seen = (unseen[:, 0] < 0.5).numpy()[..., None]
    return [np.where(seen[i % k], warped[i % k], o) for i, o in enumerate(outs)]


def novel_view(image, camera) -> list[Conditioning]:
    """The conditioning of a view model (``lab.load("shapes", task="views")``): ``conditioning=novel_view(image,
    camera)`` for its sampler; ``camera`` as :func:`lab.shapes.views.camera_change` makes it."""
    return [InputView(image, camera), CameraToken(camera)]
