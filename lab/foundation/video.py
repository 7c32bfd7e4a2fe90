"""Text2Video-Zero (Khachatryan et al., ICCV 2023): a video from a text-to-image model, with no training.

    video = lab.video(pipe, "a large red circle on a gray background", frames=8, motion=(4, 0), seed=0)
    video.images                 # one PIL image per frame
    video.to_xarray()            # latents, pred_x0, noise_pred: [step, frame, channel, y, x]
    video.frames                 # the lab.Run of all frames (t1 -> 0); video.first: frame 0 from T to t0

Its ingredients, each a switch here:

1. **Motion dynamics in the latents** (``motion_dynamics``). Frame 0 is sampled with DDIM from x_T down to
   x_{t0}. Frame k's x_{t0} is frame 0's translated by k·δ (``W_k``), then re-noised to t1 by the DDPM forward
   process, x_{t1} = sqrt(a) x_{t0} + sqrt(1 - a) eps with a = prod alpha (diffusers takes the alphas of
   t0..t1-1). Every frame is then denoised from t1, frame 0 from its own x_{t1}. Off: every frame starts from
   its own x_T (the authors' ``use_motion_field=False``).
2. **Cross-frame attention** (``cross_frame``). Every frame's self-attention takes its keys and values from
   frame 0. This is :class:`CrossFrameAttention`, an attention plug-in bound to the frames' sampler through
   ``recorders=`` like the prompt-to-prompt edits (:mod:`lab.recording.dispatch`). It is not a processor set
   on the UNet, so other samplers on the same pipeline are unaffected.
3. **Background smoothing** (``background_smoothing``; from the authors' repository, not in diffusers). The
   frames are decoded and each frame's foreground mask M_k is found. Frame 0's x_{t1} with its foreground
   removed is warped to every frame. In the pixels that are background in both M_k and frame 0's warped mask,
   the frame's x_{t1} becomes a x_{t1} + (1 - a) (warped x_{t1}^0), with a = ``smoothing_strength`` (0.4, the
   repository's). The frames are then denoised again from t1. The masks are ``masks=`` (e.g. the shapes
   world's), else :func:`foreground_masks`, a saliency proxy: distance from the border's median colour,
   thresholded by Otsu. The authors use a salient-object detector.

Conventions, as diffusers' ``TextToVideoZeroPipeline`` (deprecated, importable in 0.42): DDIM, ``steps`` = 50,
``t0`` = 44 and ``t1`` = 47 are counted back from the end of the step list (the 50-step schedule's x_{881}
and x_{941}). ``motion=(dx, dy)``: image pixels per frame that the content moves. diffusers'
``motion_field_strength_x`` is the camera's motion in units of 1/512 of the image width, so it equals
-dx * 512 / width. The warp is diffusers' own function: a nearest-neighbour ``grid_sample`` with reflection at
the borders. On a 16x16 latent (64 px shapes images) a latent pixel is 4 image pixels, so shifts below that
per frame move in steps. With ``motion=None``, diffusers' default strength 12 applies (12 px per frame at 512
px, up and to the left).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from diffusers.utils.torch_utils import randn_tensor

from ..conditioning.base import Conditioning, Setup, StepInfo, UNetInputs
from ..recording.attention import attention_layer_names, select_layers
from ..recording.base import Binding, RecordingContext
from ..run import Run
from ..schedulers import make_scheduler

DIFFUSERS_STRENGTH = 12.0  # diffusers' default motion_field_strength_x/y (px per frame at 512 px, camera)


# ---------------------------------------------------------------------------------------------- plug-ins
@dataclass(frozen=True)
class CrossFrameAttention:
    """Every frame's self-attention reads the keys and values of frame ``frame`` (Text2Video-Zero,
    section 3.3.2): pass it in ``recorders=`` of a sampler whose ``batch`` is the ``frames`` frames. ``layers``:
    which self-attention layers (glob patterns over module paths; default all ``attn1``). It records nothing.
    Its ``run.recording_meta["cross_frame"]`` says which frame and how many layers."""

    frames: int
    frame: int = 0
    layers: str | tuple = "*attn1"

    def __post_init__(self):
        if not isinstance(self.frames, int) or self.frames < 1:
            raise ValueError(f"frames must be a positive int, got {self.frames!r}")
        if not 0 <= self.frame < self.frames:
            raise ValueError(f"frame must be within [0, {self.frames}), got {self.frame}")

    def bind(self, ctx: RecordingContext) -> "_CrossFrameBinding":
        return _CrossFrameBinding(self, ctx)


class _CrossFrameBinding(Binding):
    key = "cross_frame"

    def __init__(self, spec: CrossFrameAttention, ctx: RecordingContext):
        names = [n for n in select_layers(attention_layer_names(ctx.pipe.unet), spec.layers) if n.endswith("attn1")]
        if not names:
            raise KeyError(f"no self-attention (attn1) layers among {spec.layers!r}")
        if ctx.layout.batch != spec.frames:
            raise ValueError(f"CrossFrameAttention(frames={spec.frames}) needs a sampler with batch={spec.frames} "
                             f"(one row per frame), got batch={ctx.layout.batch}")
        self.attention_layers = frozenset(names)
        self.halves = 2 if ctx.cfg else 1
        self.frames, self.frame = spec.frames, spec.frame
        self.meta = {"frame": spec.frame, "frames": spec.frames, "layers": len(names)}

    def kv_for(self, name: str, is_cross: bool, step: int) -> list:
        return [] if is_cross or name not in self.attention_layers else [self._from_frame]

    def _from_frame(self, key: torch.Tensor, value: torch.Tensor):
        def pick(t):  # [halves * frames, heads, K, d]: each half's rows take its own frame's keys / values
            t = t.unflatten(0, (self.halves, self.frames))
            return t[:, [self.frame] * self.frames].flatten(0, 1)
        return pick(key), pick(value)


class StartAt(Conditioning):
    """Start a sampler at step ``step`` of its schedule from ``latents`` (``[batch, C, h, w]``, the x_t of
    that step's timestep). Text2Video-Zero's frames start at t1 this way. It is a plug-in that chooses the
    timesteps and the initial latents (:func:`lab.conditioning.prepare`) and adds nothing to the UNet's inputs."""

    kind, enters = "start", "latents"

    def __init__(self, latents: torch.Tensor, step: int):
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            raise ValueError(f"latents must be a [batch, channels, h, w] tensor, got "
                             f"{getattr(latents, 'shape', type(latents).__name__)}")
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or inf")
        self.latents, self.step = latents.detach(), int(step)

    def setup(self, s: Setup) -> None:
        want = (s.layout.batch, s.pipe.vae.config.latent_channels, *s.latent_hw)
        if tuple(self.latents.shape) != want:
            raise ValueError(f"StartAt latents have shape {tuple(self.latents.shape)}; this sampler's are {want}")
        if not 0 <= self.step < len(s.timesteps):
            raise ValueError(f"StartAt step must be within [0, {len(s.timesteps)}), got {self.step}")
        s.timesteps = s.timesteps[self.step:]
        s.latents = self.latents.to(s.device, s.dtype)

    def apply(self, x: UNetInputs, step: StepInfo) -> None:
        pass

    def describe(self) -> dict:
        return {"kind": self.kind, "enters": self.enters, "step": self.step, "shape": list(self.latents.shape)}


# ---------------------------------------------------------------------------------------------- helpers
def diffusers_strength(motion, width: int, height: int) -> tuple[float, float]:
    """diffusers' ``(motion_field_strength_x, motion_field_strength_y)`` for content motion ``(dx, dy)`` in image
    pixels per frame (``None``: diffusers' default, 12)."""
    if motion is None:
        return DIFFUSERS_STRENGTH, DIFFUSERS_STRENGTH
    dx, dy = motion
    return -float(dx) * 512.0 / width, -float(dy) * 512.0 / height


def content_motion(strength: tuple[float, float], width: int, height: int) -> tuple[float, float]:
    """The content's motion in image pixels per frame for diffusers' strengths (the inverse of
    :func:`diffusers_strength`)."""
    return 0.0 - strength[0] * width / 512.0, 0.0 - strength[1] * height / 512.0  # no -0.0


def warp(latents: torch.Tensor, strength: tuple[float, float], frame_ids) -> torch.Tensor:
    """``latents[i]`` translated as frame ``frame_ids[i]`` (diffusers' ``create_motion_field_and_warp_latents``:
    flow = strength * frame id in 512-px units, nearest sampling, reflection at the borders)."""
    from diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_zero import (
        create_motion_field_and_warp_latents)
    with warnings.catch_warnings():  # its meshgrid and grid_sample defaults: diffusers' code, nothing a user can change
        warnings.simplefilter("ignore", UserWarning)
        return create_motion_field_and_warp_latents(strength[0], strength[1], list(frame_ids), latents)


def ddpm_forward(x_t0: torch.Tensor, scheduler, t0: int, t1: int, generator) -> torch.Tensor:
    """Re-noise x_{t0} to t1 as diffusers' ``forward_loop``: sqrt(a) x + sqrt(1 - a) eps, a = prod alphas[t0:t1]."""
    eps = randn_tensor(x_t0.shape, generator=generator, dtype=x_t0.dtype, device=x_t0.device)
    a = torch.prod(scheduler.alphas[t0:t1])
    return torch.sqrt(a) * x_t0 + torch.sqrt(1 - a) * eps


def foreground_masks(images: np.ndarray, *, min_distance: float = 0.1) -> np.ndarray:
    """A saliency proxy for background smoothing: ``images`` ``[frames, H, W, 3]`` (uint8 or floats in [0, 1])
    -> bool ``[frames, H, W]``, True where a pixel's colour is far from the median colour of the image's border.
    The threshold is Otsu's on that distance, at least ``min_distance`` (in [0, 1] RGB units)."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be [frames, H, W, 3], got {x.shape}")
    if x.max() > 1.0:
        x = x / 255.0
    out = np.zeros(x.shape[:3], dtype=bool)
    for k, im in enumerate(x):
        border = np.concatenate([im[0], im[-1], im[:, 0], im[:, -1]])
        d = np.linalg.norm(im - np.median(border, axis=0), axis=-1) / np.sqrt(3)  # in [0, 1]
        otsu, _ = cv2.threshold(np.round(d * 255).astype(np.uint8), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        out[k] = d > max(min_distance / np.sqrt(3), otsu / 255)
    return out


def _latent_masks(masks: np.ndarray, hw: tuple[int, int], device, dtype) -> torch.Tensor:
    """Image-resolution masks -> latent resolution (nearest, as the authors), dilated as their 5x5 kernel on
    a 64x64 latent (radius 2, scaled to this latent's size, at least 1): ``[frames, 1, h, w]``."""
    m = torch.as_tensor(np.asarray(masks, dtype=np.float32))[:, None]
    m = F.interpolate(m, size=hw, mode="nearest")
    r = max(1, round(2 * hw[0] / 64))
    m = F.max_pool2d(m, 2 * r + 1, stride=1, padding=r)
    return m.to(device, dtype)


def check_video(pipe, prompt, frames, steps, t0, t1, motion, smoothing_strength, masks, height, width) -> None:
    """The bad-input table for :func:`video`: every check before any model work."""
    if getattr(pipe, "kind", None) not in ("sd", "sdxl"):
        raise ValueError(f"lab.video needs a text-to-image pipeline (kind 'sd' or 'sdxl'), got kind "
                         f"{getattr(pipe, 'kind', None)!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string (one video per call)")
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 2:
        raise ValueError(f"frames must be an int >= 2, got {frames!r}")
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an int >= 2, got {steps!r}")
    if not (isinstance(t0, int) and isinstance(t1, int) and 0 <= t0 < t1 <= steps - 1):
        raise ValueError(f"need 0 <= t0 < t1 <= steps - 1 (indices counted back from the last step, as diffusers'); "
                         f"got t0={t0!r}, t1={t1!r}, steps={steps}")
    if motion is not None:
        if len(motion) != 2 or not all(np.isfinite(float(v)) for v in motion):
            raise ValueError(f"motion must be (dx, dy), finite image pixels per frame, got {motion!r}")
        size = (width or pipe.default_size, height or pipe.default_size)
        if max(abs(float(motion[0])) * (frames - 1) / size[0], abs(float(motion[1])) * (frames - 1) / size[1]) > 1:
            raise ValueError(f"motion {tuple(motion)} px per frame moves the content more than the whole image over "
                             f"{frames} frames ({size[0]}x{size[1]} px)")
    if not 0.0 <= smoothing_strength <= 1.0:
        raise ValueError(f"smoothing_strength must be within [0, 1], got {smoothing_strength}")
    if masks is not None:
        m = np.asarray(masks)
        if m.ndim != 3 or m.shape[0] != frames:
            raise ValueError(f"masks must be [frames={frames}, H, W], got {m.shape}")


# ---------------------------------------------------------------------------------------------- the video
@dataclass
class Video:
    """A Text2Video-Zero video. ``frames``: the :class:`lab.Run` of all frames as one batch (its steps are the
    schedule's steps from t1 on, or all of them without motion dynamics); ``first``: frame 0 alone from x_T
    to x_{t0} (``None`` without motion dynamics); ``unsmoothed``: the frames before background smoothing;
    ``masks``: the foreground masks smoothing used; ``settings``: the call's arguments."""

    frames: Run
    first: Run | None
    settings: dict
    unsmoothed: Run | None = None
    masks: np.ndarray | None = None
    start_step: int = 0  # the schedule step of the frames' first step
    _images: list | None = field(default=None, repr=False)

    @property
    def n_frames(self) -> int:
        return int(self.frames.final_latents.shape[0])

    @property
    def images(self) -> list:
        """One PIL image per frame (decoded once)."""
        if self._images is None:
            self._images = self.frames.images
        return self._images

    def array(self) -> np.ndarray:
        """The frames as uint8 ``[frame, H, W, 3]``."""
        return np.stack([np.asarray(im.convert("RGB")) for im in self.images])

    def to_xarray(self) -> xr.Dataset:
        """The frames' record with ``frame`` for the batch dim and ``step`` numbered on the whole schedule (the
        frames' first step is ``start_step``): ``latents``, ``pred_x0``, ``noise_pred`` ``[step, frame, channel,
        y, x]``, ``final_latents`` ``[frame, ...]``."""
        ds = self.frames.to_xarray().rename(batch="frame")
        ds = ds.assign_coords(step=ds["step"].values + self.start_step)
        ds.attrs["video"] = repr({k: v for k, v in self.settings.items() if k != "masks"})
        return ds

    def __repr__(self) -> str:
        s = self.settings
        return (f"Video({self.n_frames} frames, {s['prompt']!r}, motion={s['motion']}, cross_frame={s['cross_frame']}, "
                f"motion_dynamics={s['motion_dynamics']}, background_smoothing={s['background_smoothing']})")


@torch.no_grad()
def video(pipe, prompt: str, frames: int = 8, motion=None, *, steps: int = 50, t0: int = 44, t1: int = 47,
          guidance: float = 7.5, negative_prompt=None, seed: int = 0, cross_frame: bool = True,
          motion_dynamics: bool = True, background_smoothing: bool = False, smoothing_strength: float = 0.4,
          masks=None, recorders=(), height: int | None = None, width: int | None = None,
          progress: bool = False) -> Video:
    """Text2Video-Zero on ``pipe`` (a text-to-image :class:`lab.Pipeline`: the shapes model, SD 1.x/2.x, SDXL).
    ``frames`` >= 2; ``motion=(dx, dy)`` in image pixels per frame (module docstring; ``None``: diffusers'
    default); ``steps``, ``t0``, ``t1``: the DDIM schedule and the two restart points, as diffusers';
    ``cross_frame``, ``motion_dynamics``, ``background_smoothing`` switch the ingredients; ``masks``: foreground
    masks ``[frames, H, W]`` for smoothing (default :func:`foreground_masks` of the unsmoothed frames);
    ``recorders`` (e.g. ``lab.AttentionRecorder()``) record the frames' run (per frame: its batch dim) and frame
    0's early steps. Returns a :class:`Video`."""
    check_video(pipe, prompt, frames, steps, t0, t1, motion, smoothing_strength, masks, height, width)
    kw = dict(steps=steps, guidance=guidance, scheduler=make_scheduler("ddim", pipe.scheduler.config), seed=seed,
              height=height, width=width, progress=progress)
    settings = dict(prompt=prompt, frames=frames, motion=None if motion is None else tuple(float(v) for v in motion),
                    steps=steps, t0=t0, t1=t1, guidance=guidance, negative_prompt=negative_prompt, seed=seed,
                    cross_frame=cross_frame, motion_dynamics=motion_dynamics,
                    background_smoothing=background_smoothing, smoothing_strength=smoothing_strength)
    k1, k0 = steps - t1 - 1, steps - t0 - 1  # schedule steps whose input is x_{t1}, x_{t0}
    recorders = tuple(recorders)
    extra = (CrossFrameAttention(frames),) if cross_frame else ()
    first = None
    if motion_dynamics:
        s1 = pipe.sampler(prompt, negative_prompt, recorders=recorders, **kw)
        for _ in range(k0):
            s1.step()
        x_t1 = s1.history[k1].latents
        strength = diffusers_strength(motion, s1.settings["width"], s1.settings["height"])
        moved = warp(s1.latents.repeat(frames - 1, 1, 1, 1), strength, range(1, frames))
        t_vals = s1.timesteps.cpu()
        moved = ddpm_forward(moved, s1.scheduler, int(t_vals[k0]), int(t_vals[k1]), s1.generator)
        start = torch.cat([x_t1, moved])
        first = s1.to_run()
        plugins, start_step = [StartAt(start, k1)], k1
    else:
        strength, plugins, start_step = (0.0, 0.0), [], 0
    run = pipe.sampler(prompt, negative_prompt, batch=frames, conditioning=plugins,
                       recorders=recorders + extra, **kw).run()
    settings["content_motion_px"] = content_motion(strength, run.settings["width"], run.settings["height"])
    out = Video(run, first, settings, start_step=start_step)
    if not background_smoothing:
        return out
    m = np.asarray(masks, dtype=bool) if masks is not None else foreground_masks(out.array())
    x_t1 = run.steps[k1 - start_step].latents  # both passes restart at t1 (schedule step k1)
    hw = tuple(x_t1.shape[-2:])
    fg = _latent_masks(m, hw, x_t1.device, x_t1.dtype)  # [frames, 1, h, w]
    ids = range(1, frames)
    fg_moved = torch.cat([fg[:1], warp(fg[:1].repeat(frames - 1, 1, 1, 1), strength, ids)])
    bg = (1 - fg) * (1 - fg_moved)
    ref = x_t1[:1] * (1 - fg[:1])
    ref_moved = torch.cat([ref, warp(ref.repeat(frames - 1, 1, 1, 1), strength, ids)])
    a = smoothing_strength
    smoothed = (1 - bg) * x_t1 + bg * (a * x_t1 + (1 - a) * ref_moved)
    run2 = pipe.sampler(prompt, negative_prompt, batch=frames, conditioning=[StartAt(smoothed, k1)],
                        recorders=recorders + extra, **kw).run()
    return Video(run2, first, settings, unsmoothed=run, masks=m, start_step=k1)
