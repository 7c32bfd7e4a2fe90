"""The explicit sampler: the denoising loop written out, one ``step()`` at a time.

    sampler = pipe.sampler("a red circle", steps=30, guidance=7.5, seed=0)
    state = sampler.step()            # one StepState
    for state in sampler: ...         # the rest
    run = sampler.run()               # a Run holding every step

Each step is the loop of diffusers' ``StableDiffusionPipeline.__call__``:

    model_input = scheduler.scale_model_input(cat([z_t, z_t]), t)
    eps_uncond, eps_cond = unet(model_input, t, cat([c_neg, c])).chunk(2)
    eps = eps_uncond + w (eps_cond - eps_uncond)                    # classifier-free guidance
    z_{t-1} = scheduler.step(eps, t, z_t)                             # e.g. the seed's DDPM update

with prompt encoding, latent preparation, SDXL time ids and inpainting masks done by the diffusers
pipeline's own helpers, so the result equals diffusers' on the same modules and seed.

Before each step the sampler snapshots its full state (latents, a deep copy of the scheduler, the RNG
state, the conditioning), so ``rewind(k)``, ``fork(**changes)`` and ``replay()`` are exact.
"""
from __future__ import annotations

import contextlib
import copy
import math
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from .control import Control, condition_tensor, normalise_controls
from .errors import NonFiniteError, SamplingOutOfMemory
from .schedulers import make_scheduler, predict_x0, scheduler_name
from .transfer import HostCopies, Records


_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
_NONFINITE_HINT = "try float32, a lower guidance, or another scheduler"


@dataclass(frozen=True)
class StepState:
    """What one denoising step saw and produced. Tensors are ``[batch, channels, h, w]``.

    ``latents`` is x_t before the step (diffusers' ``sample``), ``prev_latents`` x_{t-1}
    (``prev_sample``), ``pred_x0`` the model's estimate of x_0 (``pred_original_sample``),
    ``noise_pred_cond``/``noise_pred_uncond`` the two halves of the UNet output (uncond is ``None``
    without guidance) and ``noise_pred`` the guided output the scheduler used."""

    index: int
    timestep: float
    sigma: float
    latents: torch.Tensor
    prev_latents: torch.Tensor
    pred_x0: torch.Tensor
    noise_pred_cond: torch.Tensor
    noise_pred_uncond: torch.Tensor | None
    noise_pred: torch.Tensor
    records: Mapping[str, Any] = field(default_factory=Records)

    @property
    def prev_sample(self) -> torch.Tensor:
        return self.prev_latents

    @property
    def pred_original_sample(self) -> torch.Tensor:
        return self.pred_x0

    def __repr__(self) -> str:
        return (f"StepState(index={self.index}, timestep={self.timestep:g}, sigma={self.sigma:.4g}, "
                f"latents={tuple(self.latents.shape)}, records={sorted(self.records)})")


@dataclass
class _Snapshot:
    latents: torch.Tensor
    scheduler: Any
    rng_state: torch.Tensor
    cond: dict
    settings: dict


FORKABLE = ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2", "guidance", "seed", "recorders")


def _check_number(name, v, *, minimum=None, integer=False):
    if integer:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")


def _nearest_multiple(v: int, f: int) -> int:
    return max(f, int(round(v / f)) * f)


@contextlib.contextmanager
def _with_scheduler(dpipe, scheduler):
    """Let the diffusers helper see this sampler's scheduler for the duration of a call."""
    old = dpipe.scheduler
    dpipe.scheduler = scheduler
    try:
        yield
    finally:
        dpipe.scheduler = old


class Sampler:
    """A steppable sampling run on a :class:`lab.Pipeline`.

    Arguments: ``prompt`` (str or list of str), ``negative_prompt``, ``steps`` (>= 1), ``guidance``
    (classifier-free guidance scale w >= 0; w <= 1 runs without the unconditional half), ``scheduler``
    (a name of ``lab.SCHEDULERS`` or a diffusers scheduler; default the model's own), ``seed``
    (a CPU ``torch.Generator`` is seeded with it: portable seeds), ``generator`` (use this one
    instead), ``height``/``width`` (multiples of the VAE factor), ``batch`` (images per prompt),
    ``eta`` (DDIM), ``control`` (see :func:`lab.control.normalise_controls`), ``image``/``mask_image``/
    ``strength`` (inpainting models), ``prompt_2``/``negative_prompt_2`` (SDXL), ``recorders``
    (objects with ``attached(sampler)`` context managers and ``collect()``), ``progress`` (tqdm bar
    in :meth:`run`), ``check_finite`` (raise :class:`NonFiniteError` where NaN/inf first appears: ``"step"``
    checks after every step; ``"end"`` keeps a device-side flag per step and checks them once, at the end of
    :meth:`run` or of iteration, or on :meth:`check_finite_now` — no device sync in the loop; ``True``: "step"
    on CPU, "end" on CUDA; ``False``: no check).
    """

    def __init__(self, pipe, prompt="", negative_prompt=None, *, steps: int = 30, guidance: float = 7.5,
                 scheduler=None, seed: int = 0, generator: torch.Generator | None = None, height: int | None = None,
                 width: int | None = None, batch: int = 1, eta: float = 0.0, control=None, image=None,
                 mask_image=None, strength: float = 1.0, prompt_2=None, negative_prompt_2=None,
                 recorders=(), progress: bool = True, check_finite: bool | str = True):
        # ---- validation: everything before any model work
        if check_finite not in (True, False, "step", "end"):
            raise ValueError(f"check_finite must be True, False, 'step' or 'end', got {check_finite!r}")
        _check_number("steps", steps, minimum=1, integer=True)
        _check_number("guidance", guidance, minimum=0)
        _check_number("batch", batch, minimum=1, integer=True)
        _check_number("eta", eta, minimum=0)
        _check_number("strength", strength, minimum=0)
        if generator is None:
            _check_number("seed", seed, minimum=0, integer=True)
        f = pipe.vae_scale_factor
        height = pipe.default_size if height is None else height
        width = pipe.default_size if width is None else width
        for name, v in (("height", height), ("width", width)):
            _check_number(name, v, minimum=1, integer=True)
            if v % f:
                raise ValueError(f"{name}={v} is not a multiple of the VAE factor {f}; nearest valid: "
                                 f"{_nearest_multiple(v, f)}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompt must be a string or a non-empty list of strings")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            if len(negative_prompt) != len(prompts):
                raise ValueError(f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts")
        if pipe.kind == "inpaint" and (image is None or mask_image is None):
            raise ValueError("an inpainting model needs image= and mask_image=")
        if pipe.kind != "inpaint" and (image is not None or mask_image is not None):
            raise ValueError(f"image=/mask_image= need an inpainting UNet (9 input channels); this is {pipe.kind!r}")
        if strength > 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        self.controls: list[Control] = normalise_controls(control, pipe)

        self.pipe = pipe
        self.progress = progress
        self.check_finite = check_finite
        self._finite_mode = (("step" if pipe.device.type == "cpu" else "end") if check_finite is True
                             else (check_finite or None))
        self._finite_flags: dict[int, torch.Tensor] = {}  # step -> device bool, "end" mode
        self.recorders = list(recorders)
        self.settings = dict(prompt=prompt, negative_prompt=negative_prompt, prompt_2=prompt_2,
                             negative_prompt_2=negative_prompt_2, steps=steps, guidance=float(guidance),
                             seed=seed, height=height, width=width, batch=batch, eta=eta, strength=strength,
                             scheduler=scheduler if isinstance(scheduler, str) or scheduler is None else scheduler_name(scheduler))
        self._base_kwargs = dict(steps=steps, guidance=guidance, scheduler=scheduler, seed=seed, height=height,
                                 width=width, batch=batch, eta=eta, control=control, image=image,
                                 mask_image=mask_image, strength=strength, prompt_2=prompt_2,
                                 negative_prompt_2=negative_prompt_2, recorders=recorders, progress=progress,
                                 check_finite=check_finite)
        self._external_generator = generator is not None
        self._base_prompt = (prompt, negative_prompt)
        self.n_prompts = len(prompts)
        self.batch_size = len(prompts) * batch
        self.device = pipe.device
        self.generator = generator if generator is not None else torch.Generator("cpu").manual_seed(seed)
        self.scheduler = make_scheduler(scheduler if scheduler is not None else pipe.scheduler, pipe.scheduler.config)
        self.truncated: dict[str, str] = {}
        self.recording_meta: dict = {}
        self._host = HostCopies(self.device)  # recorders' device -> host copies (side stream on CUDA)
        self._attached = False
        self.interrupted = False
        self._stop = threading.Event()
        self._plan: list[tuple[int, dict]] = []  # (step, changes) applied by forks, replayed exactly
        self._pending: list[tuple[int, dict]] = []

        with torch.no_grad():
            self.cond = self._encode(self.settings)
            self._prepare(image, mask_image)
        self.history: list[StepState] = []
        self._snaps: list[_Snapshot] = []
        self._i = 0

    # ------------------------------------------------------------------ set-up
    def _report_truncation(self, text: str) -> None:
        for tok in [self.pipe.tokenizer, self.pipe.tokenizer_2]:
            if tok is None or not text:
                continue
            ids = tok(text, truncation=False, add_special_tokens=True).input_ids
            n = tok.model_max_length
            if len(ids) > n:
                dropped = tok.decode(ids[n - 1:-1]).strip()
                if text not in self.truncated:
                    self.truncated[text] = dropped
                    warnings.warn(f"prompt is longer than the text encoder's {n} tokens; dropped: {dropped!r}",
                                  stacklevel=4)

    def _encode(self, s: dict) -> dict:
        """Prompt embeddings (and SDXL's pooled embeddings and time ids) for the whole CFG batch."""
        pipe, dp = self.pipe, self.pipe.diffusers
        prompts = [s["prompt"]] if isinstance(s["prompt"], str) else list(s["prompt"])
        for p in prompts + ([s["negative_prompt"]] if isinstance(s["negative_prompt"], str) else list(s["negative_prompt"] or [])):
            self._report_truncation(p)
        cfg = s["guidance"] > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        if pipe.kind == "sdxl":
            pe, npe, pooled, npooled = dp.encode_prompt(
                prompt=s["prompt"], prompt_2=s["prompt_2"], device=self.device, num_images_per_prompt=s["batch"],
                do_classifier_free_guidance=cfg, negative_prompt=s["negative_prompt"],
                negative_prompt_2=s["negative_prompt_2"])
            proj = (int(pooled.shape[-1]) if dp.text_encoder_2 is None else dp.text_encoder_2.config.projection_dim)
            size = (s["height"], s["width"])
            time_ids = dp._get_add_time_ids(size, (0, 0), size, dtype=pe.dtype, text_encoder_projection_dim=proj)
            neg_time_ids = time_ids
            if cfg:
                pe = torch.cat([npe, pe], 0)
                pooled = torch.cat([npooled, pooled], 0)
                time_ids = torch.cat([neg_time_ids, time_ids], 0)
            added = {"text_embeds": pooled.to(self.device),
                     "time_ids": time_ids.to(self.device).repeat(self.batch_size, 1)}
            return {"prompt_embeds": pe.to(self.device), "added_cond_kwargs": added, "cfg": cfg}
        pe, npe = dp.encode_prompt(s["prompt"], self.device, s["batch"], cfg, s["negative_prompt"])
        if cfg:
            pe = torch.cat([npe, pe])
        return {"prompt_embeds": pe, "added_cond_kwargs": None, "cfg": cfg}

    def _prepare(self, image, mask_image) -> None:
        pipe, dp, s = self.pipe, self.pipe.diffusers, self.settings
        dtype = self.cond["prompt_embeds"].dtype
        self.concat = None
        with _with_scheduler(dp, self.scheduler):
            self.scheduler.set_timesteps(s["steps"], device=self.device)
            timesteps = self.scheduler.timesteps
            if pipe.kind == "inpaint":
                timesteps, n = dp.get_timesteps(num_inference_steps=s["steps"], strength=s["strength"], device=self.device)
                if n < 1:
                    raise ValueError(f"strength={s['strength']} leaves no steps out of {s['steps']}")
                init = dp.image_processor.preprocess(image, height=s["height"], width=s["width"]).to(torch.float32)
                latents, _noise = dp.prepare_latents(
                    self.batch_size, pipe.vae.config.latent_channels, s["height"], s["width"], dtype, self.device,
                    self.generator, None, image=init, timestep=timesteps[:1].repeat(self.batch_size),
                    is_strength_max=s["strength"] == 1.0, return_noise=True, return_image_latents=False)
                mask_cond = dp.mask_processor.preprocess(mask_image, height=s["height"], width=s["width"])
                masked = init * (mask_cond < 0.5)
                mask, masked_latents = dp.prepare_mask_latents(
                    mask_cond, masked, self.batch_size, s["height"], s["width"], dtype, self.device, self.generator,
                    self.cond["cfg"])
                self.concat = (mask, masked_latents)  # the seed table's "concat" conditioning
            else:
                latents = dp.prepare_latents(self.batch_size, pipe.unet.config.in_channels, s["height"], s["width"],
                                             dtype, self.device, self.generator, None)
            if pipe.kind == "sdxl" and hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(0)
            self.extra_step_kwargs = dp.prepare_extra_step_kwargs(self.generator, s["eta"])
        self.timesteps = timesteps
        # host copies: the scheduler gets host timesteps (its tables live on the CPU, and a device timestep
        # there is a sync: DDIM's `alphas_cumprod[t]`, `if prev_t >= 0`); the UNet and ControlNets get the device ones
        self._t_host = timesteps.cpu()
        self._t_values = [float(x) for x in self._t_host]
        sigmas = getattr(self.scheduler, "sigmas", None)
        self._sigma_values = ([float(x) for x in sigmas.cpu()] if sigmas is not None and type(self.scheduler).__name__
                              not in ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler") else None)
        self._latents = latents
        self._control_images = {}
        self._control_cache = {}
        for c in self.controls:
            img = condition_tensor(c.image, s["height"], s["width"])
            net = pipe.controlnets[c.net]
            if img.shape[0] not in (1, self.n_prompts):
                raise ValueError(f"{img.shape[0]} control images for {self.n_prompts} prompts: give one image, "
                                 f"or one per prompt")
            img = img.repeat_interleave(self.batch_size if img.shape[0] == 1 else s["batch"], dim=0)
            img = img.to(self.device, net.dtype)
            self._control_images[c.net] = torch.cat([img] * 2) if self.cond["cfg"] else img

    # ------------------------------------------------------------------ state
    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def position(self) -> int:
        """Index of the next step to run (== number of steps done)."""
        return self._i

    @property
    def done(self) -> bool:
        return self._i >= self.num_steps

    @property
    def latents(self) -> torch.Tensor:
        """The current x_t (after the last step run)."""
        return self._latents

    def _snapshot(self) -> _Snapshot:
        return _Snapshot(self._latents, copy.deepcopy(self.scheduler), self.generator.get_state(), self.cond,
                         dict(self.settings))

    def _restore(self, snap: _Snapshot) -> None:
        self._latents = snap.latents
        self.scheduler = copy.deepcopy(snap.scheduler)
        self.generator.set_state(snap.rng_state)
        self.cond = snap.cond
        self.settings = dict(snap.settings)
        self.extra_step_kwargs = {k: (self.generator if k == "generator" else v)
                                  for k, v in self.extra_step_kwargs.items()}

    def _apply_changes(self, changes: dict) -> None:
        unknown = set(changes) - set(FORKABLE)
        if unknown:
            raise ValueError(f"cannot change {sorted(unknown)} in a fork; forkable: {list(FORKABLE)} "
                             "(steps, size, scheduler and batch fix the trajectory: start a new sampler)")
        if "guidance" in changes:
            _check_number("guidance", changes["guidance"], minimum=0)
            if (changes["guidance"] > 1.0) != self.cond["cfg"]:
                raise ValueError("a fork cannot switch classifier-free guidance on or off (guidance across 1.0)")
        if "seed" in changes:
            _check_number("seed", changes["seed"], minimum=0, integer=True)
        changes = dict(changes)
        if "recorders" in changes:  # e.g. an AttentionRecorder carrying prompt-to-prompt edits
            self.recorders = list(changes.pop("recorders"))
        self.settings.update(changes)
        if {"prompt", "negative_prompt", "prompt_2", "negative_prompt_2"} & set(changes):
            with torch.no_grad():
                self.cond = self._encode(self.settings)
        if "seed" in changes:
            self.generator = torch.Generator("cpu").manual_seed(changes["seed"])
            self.extra_step_kwargs = {k: (self.generator if k == "generator" else v)
                                      for k, v in self.extra_step_kwargs.items()}

    # ------------------------------------------------------------------ the loop
    def _control_heights(self, c: Control) -> list[int]:
        """Latent height of each residual block of ``c``'s net (encoder blocks, then the middle block)."""
        key = ("heights", c.net)
        if key not in self._control_cache:
            net = self.pipe.controlnets[c.net]
            h = self._latents.shape[-2]
            heights = [h]  # conv_in's output is the first residual
            for block in net.down_blocks:
                heights += [h] * len(block.resnets)
                if block.downsamplers is not None:
                    h = (h + 1) // 2
                    heights.append(h)
            heights.append(h)  # the middle block
            if len(heights) != len(net.controlnet_down_blocks) + 1:
                raise RuntimeError(f"could not map {c.net}'s residuals to blocks ({len(heights)} heights for "
                                   f"{len(net.controlnet_down_blocks) + 1} residuals)")
            self._control_cache[key] = heights
        return self._control_cache[key]

    def control_grid(self, c: Control):
        """The ``[blocks, steps]`` weights ``c`` applies in this sampler."""
        return c.grid(self._control_heights(c), self.num_steps)

    def _control_residuals(self, i: int, t, model_input: torch.Tensor, x: torch.Tensor):
        """Sum over nets of weighted ControlNet residuals for step ``i``; each net's (weighted) residuals
        are also handed to recorders that observe them."""
        down = mid = None
        cfg = self.cond["cfg"]
        for c in self.controls:
            w = self._control_cache.get(("grid", c.net, id(c)))
            if w is None:
                w = self._control_cache[("grid", c.net, id(c))] = self.control_grid(c)
            col = w[:, i]
            if not col.any():
                continue  # outside [start, end]: diffusers multiplies by 0; skipping adds exactly nothing
            net = self.pipe.controlnets[c.net]
            image = self._control_images[c.net]
            added = self.cond["added_cond_kwargs"]  # SDXL: pooled text embeddings and time ids
            if c.cond_only and cfg:  # guess mode: the net sees the conditional half only
                inp = self.scheduler.scale_model_input(x, self._t_host[i])
                emb = self.cond["prompt_embeds"].chunk(2)[1]
                image = image.chunk(2)[1]
                added = {k: v.chunk(2)[1] for k, v in added.items()} if added else None
            else:
                inp, emb = model_input, self.cond["prompt_embeds"]
            if self.concat is not None:
                inp = inp[:, : self.pipe.vae.config.latent_channels]
            kw = {"added_cond_kwargs": added} if added else {}
            d, m = net(inp, t, encoder_hidden_states=emb, controlnet_cond=image, conditioning_scale=1.0,
                       guess_mode=False, return_dict=False, **kw)
            d = [r * float(wi) for r, wi in zip(d, col[:-1])]
            m = m * float(col[-1])
            if c.cond_only and cfg:
                d = [torch.cat([torch.zeros_like(r), r]) for r in d]
                m = torch.cat([torch.zeros_like(m), m])
            for rec in self.recorders:
                if hasattr(rec, "observe_residuals"):
                    rec.observe_residuals(c.net, i, d, m)
            if down is None:
                down, mid = list(d), m
            else:  # summed across nets, as diffusers' MultiControlNetModel does
                down = [a + b for a, b in zip(down, d)]
                mid = mid + m
        return down, mid

    @torch.no_grad()
    def step(self) -> StepState:
        """Run one denoising step and return its :class:`StepState`."""
        if self.done:
            raise RuntimeError(f"sampling is finished ({self.num_steps} steps); rewind(k) or fork() to go on")
        i = self._i
        for start, changes in list(self._pending):
            if start == i:
                self._apply_changes(changes)
                self._plan.append((start, changes))
                self._pending.remove((start, changes))
        snap = self._snapshot()
        self._snaps[i:] = [snap]
        try:
            with self._recording():
                state = self._step(i)
        except _OOM as e:
            self._host.discard()
            self._restore(snap)
            detail = str(e).splitlines()[0][:200] if str(e) else ""
            del e  # drop the traceback's frames (and their tensors) before giving the cache back
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise SamplingOutOfMemory(i, run=self.to_run(), detail=detail) from None
        except BaseException:
            self._host.discard()
            self._restore(snap)  # an interrupted step leaves no trace
            raise
        self.history.append(state)
        self._latents = state.prev_latents
        self._i = i + 1
        return state

    def _step(self, i: int) -> StepState:
        sched, unet = self.scheduler, self.pipe.unet
        t, th = self.timesteps[i], self._t_host[i]  # the UNet's (device) and the scheduler's (host) timestep
        x = self._latents
        cfg = self.cond["cfg"]
        model_input = torch.cat([x] * 2) if cfg else x
        model_input = sched.scale_model_input(model_input, th)
        sv = self._sigma_values
        sigma = sv[i] if sv is not None and i < len(sv) else float("nan")
        if self.concat is not None:
            model_input = torch.cat([model_input, *self.concat], dim=1)
        down, mid = self._control_residuals(i, t, model_input, x)
        records = {}
        out = unet(model_input, t, encoder_hidden_states=self.cond["prompt_embeds"], timestep_cond=None,
                   added_cond_kwargs=self.cond["added_cond_kwargs"], down_block_additional_residuals=down,
                   mid_block_additional_residual=mid, return_dict=False)[0]
        if cfg:
            uncond, cond = out.chunk(2)
            guided = uncond + self.settings["guidance"] * (cond - uncond)
        else:
            uncond, cond, guided = None, out, out
        res = sched.step(guided, th, x, **self.extra_step_kwargs, return_dict=True)
        prev = res.prev_sample
        x0 = getattr(res, "pred_original_sample", None)
        if x0 is None:
            x0 = predict_x0(sched, guided, th, x)
        for rec in self.recorders:
            records.update(rec.collect(i))
        if self._finite_mode == "step":
            if not bool(torch.isfinite(prev).all()):
                bad = "noise_pred (UNet output)" if not bool(torch.isfinite(guided).all()) else "latents"
                raise NonFiniteError(bad, i, run=self.to_run(), hint=_NONFINITE_HINT)
        elif self._finite_mode == "end":
            self._finite_flags[i] = torch.isfinite(prev).all()  # stays on the device: no sync here
        tval = self._t_values[i]
        # the recorders' host copies start now, on a side stream; reading a record waits for them
        return StepState(i, tval, sigma, x, prev, x0, cond, uncond, guided, Records(records, self._host.flush()))

    def check_finite_now(self) -> None:
        """Check the per-step finiteness flags kept so far (``check_finite="end"``) with one device sync. On
        NaN/inf the sampler is rewound to just before the first bad step and :class:`NonFiniteError` raised."""
        if not self._finite_flags:
            return
        idx = sorted(self._finite_flags)
        ok = torch.stack([self._finite_flags[i] for i in idx]).cpu()  # the one sync
        if bool(ok.all()):
            self._finite_flags.clear()
            return
        first = idx[int((~ok).nonzero()[0, 0])]
        st = self.history[first]
        bad = "noise_pred (UNet output)" if not bool(torch.isfinite(st.noise_pred).all()) else "latents"
        self.rewind(first)
        raise NonFiniteError(bad, first, run=self.to_run(), hint=_NONFINITE_HINT)

    @contextlib.contextmanager
    def _recording(self):
        """Attach the recorders for one step when :meth:`run` has not attached them for the whole loop."""
        if self._attached or not self.recorders:
            yield
            return
        with contextlib.ExitStack() as stack:
            for rec in self.recorders:
                stack.enter_context(rec.attached(self))
            self._attached = True
            try:
                yield
            finally:
                self._attached = False

    def __iter__(self):
        while not self.done and not self._stop.is_set():
            yield self.step()
        self.check_finite_now()

    def stop(self) -> None:
        """Ask :meth:`run` (possibly in another thread) to stop at the next step boundary."""
        self._stop.set()

    def run(self, callback=None):
        """Run the remaining steps and return the :class:`lab.Run`. Ctrl-C (KeyboardInterrupt) or
        :meth:`stop` ends at a step boundary; the partial run is returned, marked ``interrupted``.
        ``callback(state)`` is called with each :class:`StepState` as soon as its step is done (diffusers'
        ``callback_on_step_end``, read-only); an exception it raises ends the run and propagates."""
        self._stop.clear()
        stack = contextlib.ExitStack()
        bar = tqdm(total=self.num_steps, initial=self._i, disable=not self.progress, desc="sampling", leave=False)
        try:
            for rec in self.recorders:
                stack.enter_context(rec.attached(self))
            self._attached = bool(self.recorders)
            with stack:
                while not self.done:
                    if self._stop.is_set():
                        self.interrupted = True
                        break
                    state = self.step()
                    bar.update(1)
                    if callback is not None:
                        callback(state)
                self.check_finite_now()
        except KeyboardInterrupt:
            self.interrupted = True
            warnings.warn(f"interrupted: returning the partial run ({self._i} of {self.num_steps} steps)", stacklevel=2)
        finally:
            self._attached = False
            bar.close()
        return self.to_run()

    def to_run(self):
        from .run import Run
        return Run(list(self.history), settings=self.provenance(), pipe=self.pipe,
                   final_latents=self._latents, interrupted=self.interrupted, truncated=dict(self.truncated),
                   recording_meta=dict(self.recording_meta))

    def provenance(self) -> dict:
        s = dict(self.settings)
        s["scheduler"] = scheduler_name(self.scheduler)
        s["model"] = self.pipe.name
        s["model_kind"] = self.pipe.kind
        s["dtype"] = str(self.pipe.dtype).removeprefix("torch.")
        s["device"] = str(self.device)
        s["num_steps"] = self.num_steps
        s["controls"] = [dict(net=c.net, scale=c.scale, start=c.start, end=c.end, mode=c.mode,
                              halves="cond" if c.cond_only else "both", weights=None if c.weights is None
                              else np.asarray(c.weights).tolist()) for c in self.controls]
        s["forks"] = [dict(step=k, **v) for k, v in self._plan]
        return s

    # ------------------------------------------------------------------ time travel
    def rewind(self, k: int) -> "Sampler":
        """Go back to just before step ``k`` (0 <= k <= position); steps >= k are dropped. Negative
        ``k`` counts back from the current position. Stepping again recomputes them bit-exactly."""
        if k < 0:
            k = self._i + k
        if not 0 <= k <= self._i:
            raise IndexError(f"cannot rewind to step {k}: the sampler is at step {self._i}")
        if k == self._i:
            return self
        self._restore(self._snaps[k])
        self.history = self.history[:k]
        self._snaps = self._snaps[:k + 1]
        self._plan = [(s, c) for s, c in self._plan if s <= k]
        self._finite_flags = {j: f for j, f in self._finite_flags.items() if j < k}
        self._i = k
        self.interrupted = False
        return self

    def fork(self, *, at: int | None = None, **changes) -> "Sampler":
        """A new sampler that shares this one's steps up to ``at`` (default: the current position) and
        continues with ``changes`` (``prompt``, ``negative_prompt``, ``guidance``, ``seed`` of fresh
        noise; SDXL: ``prompt_2``, ``negative_prompt_2``). The scheduler state is deep-copied."""
        k = self._i if at is None else (self._i + at if at < 0 else at)
        if not 0 <= k <= self._i:
            raise IndexError(f"cannot fork at step {k}: the sampler is at step {self._i}")
        new = copy.copy(self)
        new.generator = torch.Generator("cpu")
        new._stop = threading.Event()
        new.history = self.history[:k]
        new._snaps = self._snaps[:k]
        new._plan = [(s, c) for s, c in self._plan if s < k]
        new._pending = []
        new._finite_flags = {j: f for j, f in self._finite_flags.items() if j < k}
        new.recording_meta = dict(self.recording_meta)
        new._attached = False
        new._host = HostCopies(self.device)
        new.interrupted = False
        new._i = k
        snap = self._snaps[k] if k < len(self._snaps) else self._snapshot()
        new._restore(snap)
        if changes:
            new._apply_changes(changes)
            new._plan.append((k, dict(changes)))
        new._snaps.append(new._snapshot())
        return new

    def replay(self):
        """Sample again from the start with the same settings and forks; returns the new :class:`lab.Run`
        (bit-exact on CPU)."""
        if self._external_generator:
            raise RuntimeError("replay needs a seed: this sampler was given an external generator")
        new = Sampler(self.pipe, *self._base_prompt, **self._base_kwargs)
        new._pending = list(self._plan)
        return new.run()
