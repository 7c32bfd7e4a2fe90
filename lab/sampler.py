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

What the UNet receives besides x_t comes from conditioning plug-ins (:mod:`lab.conditioning`: text by
cross-attention, concat inputs, ControlNet residuals, ...), and what is recorded from recorders bound to
this sampler (:mod:`lab.recording`). Before each step the sampler snapshots its full state (latents, a deep
copy of the scheduler, the RNG state, the plug-ins), so ``rewind(k)``, ``fork(**changes)`` and ``replay()``
are exact.
"""
from __future__ import annotations

import copy
import threading
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from .conditioning import ControlNet, Setup, StepInfo, Text, UNetInputs, control_grid
from .conditioning import change as change_plugins
from .conditioning import plugins as make_plugins
from .conditioning import prepare as prepare_plugins
from .conditioning.text import MICRO_KEYS
from .errors import SamplingOutOfMemory
from .finite import FiniteWatch
from .guidance import check_guides, guided_step_latents
from .memory import Estimate, SamplingMemoryError
from .memory import check as check_memory
from .memory import estimate as estimate_memory
from .recording import Recording, RecordingContext
from .recipe import Recipe
from .run import Run
from .schedulers import make_scheduler, predict_x0, scheduler_name, sigma_values, switch_scheduler
from .settings import check_fork_changes, check_memory_limit, sampler_settings
from .state import Snapshot, StepState
from .transfer import HostCopies, Records
from .version import versions

_SETUP_LOCK = threading.RLock()  # samplers in several threads: their set-ups one by one, their steps at once
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class Sampler:
    """A steppable sampling run on a :class:`lab.Pipeline`. Arguments: ``prompt`` (str or list of str),
    ``negative_prompt``, ``steps`` (>= 1), ``guidance`` (classifier-free guidance scale w >= 0; w <= 1 runs
    without the unconditional half), ``guidance_rescale`` (Lin et al. 2023, zero-SNR models), ``scheduler`` (a
    name of ``lab.SCHEDULERS`` or a diffusers scheduler; default the model's own), ``seed`` (seeds a CPU
    ``torch.Generator``: portable) or ``generator``, ``height``/``width`` (multiples of the VAE factor),
    ``batch`` (images per prompt), ``eta`` (DDIM), ``control`` (:func:`lab.conditioning.normalise_controls`),
    ``image``/``mask_image``/``strength`` (inpainting), ``image``/``noise_level`` (an upscaler's low-res image
    and its noise augmentation), ``prompt_2``/``negative_prompt_2`` and ``original_size``,
    ``crops_coords_top_left``, ``target_size`` with their ``negative_`` forms (SDXL, as diffusers),
    ``class_labels``/``null_class`` (a class embedding), ``conditioning`` (more :mod:`lab.conditioning` plug-ins),
    ``recorders`` (``bind(ctx)``, :mod:`lab.recording`), ``progress`` (tqdm in :meth:`run`), ``check_finite``
    (``True``, ``"step"``, ``"end"``, ``False``: NaN/inf found where it appears, :mod:`lab.finite`),
    ``memory_limit`` (bytes; ``None``: the device's free memory; ``False``: no check) for the estimate made
    before the first step (:mod:`lab.memory`), ``guides`` (gradient steps on the latents before a step:
    :class:`lab.AttendAndExcite`, :class:`lab.SyntaxBinding`, :mod:`lab.guidance`)."""

    def __init__(self, pipe, prompt="", negative_prompt=None, *, steps: int = 30, guidance: float = 7.5,
                 scheduler=None, seed: int = 0, generator: torch.Generator | None = None, height: int | None = None,
                 width: int | None = None, batch: int = 1, eta: float = 0.0, control=None, image=None,
                 mask_image=None, strength: float = 1.0, prompt_2=None, negative_prompt_2=None, class_labels=None,
                 null_class=None, guidance_rescale: float = 0.0, original_size=None, crops_coords_top_left=None,
                 target_size=None, negative_original_size=None, negative_crops_coords_top_left=None,
                 negative_target_size=None, conditioning=(), recorders=(), progress: bool = True,
                 check_finite: bool | str = True, memory_limit: int | bool | None = None, guides=(),
                 noise_level: int = 20):
        self._args = {k: v for k, v in locals().items() if k not in ("self", "pipe")}
        check_memory_limit(memory_limit)
        guides = check_guides(guides)
        settings = sampler_settings(pipe, prompt, negative_prompt, steps=steps, guidance=guidance, scheduler=scheduler,
                                    seed=seed, generator=generator, height=height, width=width, batch=batch, eta=eta,
                                    strength=strength, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
                                    guidance_rescale=guidance_rescale, check_finite=check_finite)
        plugins = make_plugins(pipe, prompt=prompt, negative_prompt=negative_prompt, prompt_2=prompt_2,
                               negative_prompt_2=negative_prompt_2, batch=batch, height=settings["height"],
                               width=settings["width"], control=control, image=image, mask_image=mask_image,
                               strength=strength, class_labels=class_labels, null_class=null_class,
                               extra=conditioning, noise_level=noise_level, **{k: self._args[k] for k in MICRO_KEYS})
        generator = generator if generator is not None else torch.Generator("cpu").manual_seed(seed)
        sched = make_scheduler(scheduler if scheduler is not None else pipe.scheduler, pipe.scheduler.config)
        self._scheduler0 = type(sched).from_config(sched.config)  # the recipe's: a name may mean another config later
        with _SETUP_LOCK:  # set-up runs the shared text encoder and the diffusers helper: one sampler at a time
            s = prepare_plugins(pipe, settings, plugins, generator, sched)
        self._begin(pipe, settings, tuple(plugins), s.layout, s.timesteps, generator, sched, s.latents,
                    recorders, progress, check_finite)
        self._external_generator = self._args["generator"] is not None
        self._guides = guides
        self.truncated = dict(self._text.truncated) if self._text else {}
        if guides and self._text is None:
            raise ValueError("guides need a text prompt (a sampler with text conditioning)")
        # the UNet has the maps (found once), the subject words are in the prompt: checked before any step
        self._guide_layers = {id(g): g.layers(pipe.unet) for g in guides}
        self._check_guide_words()

    def _check_guide_words(self) -> None:
        for g in self._guides:
            g.targets(self._text.tokens, self.layout)

    def _begin(self, pipe, settings, plugins, layout, timesteps, generator, scheduler, latents, recorders, progress,
               check_finite) -> None:
        """Every field of a sampler at its first step (``__init__``) or at a fork's."""
        self.pipe, self.device, self.settings = pipe, pipe.device, dict(settings)
        self._plugins, self.layout = plugins, layout
        self._nets_used = {p.control.net for p in self._nets}  # over the fork tree: what a replay must load
        self.timesteps = timesteps  # the UNet's (device); the scheduler gets host copies (_reset_schedule)
        self._t_values = [float(x) for x in timesteps.cpu()]
        self.generator, self.scheduler, self._latents = generator, scheduler, latents
        self.progress, self.check_finite = progress, check_finite
        self._finite = FiniteWatch(check_finite, self.device)
        self._recording = Recording(recorders)  # bound on the first step (a fork that never steps makes no files)
        self._host = HostCopies(self.device)  # recorders' device -> host copies (side stream on CUDA)
        self._stop = threading.Event()
        self.interrupted = False
        self.history: list[StepState] = []
        self._guide_notes: dict[int, list] = {}  # step -> what the guides did (losses, updates)
        self._snaps: list[Snapshot] = []
        self._plan: list[tuple[int, dict]] = []  # (step, changes) applied by forks, replayed exactly
        self._pending: list[tuple[int, dict]] = []
        self._i = 0
        self._reset_schedule()

    def _reset_schedule(self) -> None:
        """The scheduler's host timesteps (in its dtype: Euler refuses ints), sigmas, ``step`` arguments."""
        self._t_host = self.timesteps.cpu().to(self.scheduler.timesteps.dtype)
        self._sigma_values = sigma_values(self.scheduler)
        helper = self.pipe.helper(self.scheduler)
        self.extra_step_kwargs = helper.prepare_extra_step_kwargs(self.generator, self.settings["eta"])

    # ------------------------------------------------------------------ state
    num_steps = property(lambda self: len(self.timesteps))
    position = property(lambda self: self._i, doc="Index of the next step to run (== number of steps done).")
    done = property(lambda self: self._i >= self.num_steps)
    latents = property(lambda self: self._latents, doc="The current x_t (after the last step run).")
    conditioning = property(lambda self: self._plugins, doc="The active conditioning plug-ins, in order.")
    controls = property(lambda self: [p.control for p in self._nets])
    _nets = property(lambda self: tuple(p for p in self._plugins if isinstance(p, ControlNet)))
    _text = property(lambda self: next((p for p in self._plugins if isinstance(p, Text)), None))

    @property
    def _context_tokens(self) -> dict | None:
        """The token table of the cross-attention context the UNet reads: the last CA plug-in's that has one
        (class tokens replace the text's)."""
        return next((p.tokens for p in reversed(self._plugins) if p.enters == "CA" and getattr(p, "tokens", None)),
                    None)

    def control_grid(self, control) -> np.ndarray:
        """The ``[blocks, steps]`` weights ``control`` (a :class:`lab.Control` of a loaded net) applies here."""
        return control_grid(self._plugins, control, self.num_steps)

    def _snapshot(self) -> Snapshot:
        return Snapshot(self._latents, copy.deepcopy(self.scheduler), self.generator.get_state(), self._plugins,
                         dict(self.settings))

    def _restore(self, snap: Snapshot) -> None:
        self._latents, self._plugins, self.settings = snap.latents, snap.plugins, dict(snap.settings)
        self.scheduler = copy.deepcopy(snap.scheduler)
        self.generator.set_state(snap.rng_state)
        self._reset_schedule()

    def _setup(self) -> Setup:
        return Setup(self.pipe, self.settings, self.generator, self.scheduler, self.pipe.helper(self.scheduler),
                     layout=self.layout, dtype=self._latents.dtype, timesteps=self.timesteps, latents=self._latents)

    def _apply_changes(self, changes: dict) -> None:
        check_fork_changes(changes, self.layout.cfg)
        self.settings.update({k: float(changes[k]) for k in ("guidance", "guidance_rescale") if k in changes})
        if "seed" in changes:
            self.generator, self.settings["seed"] = torch.Generator("cpu").manual_seed(changes["seed"]), changes["seed"]
        if "recorders" in changes:  # e.g. an AttentionRecorder carrying prompt-to-prompt edits
            self._recording = Recording(changes["recorders"], self.recording_meta)
        if "scheduler" in changes:
            self.scheduler, factor = switch_scheduler(self.scheduler, changes["scheduler"], position=self._i,
                                                      steps=self.settings["steps"], timesteps=self.timesteps,
                                                      device=self.device)
            self._latents = self._latents * factor
            self.settings["scheduler"] = scheduler_name(self.scheduler)
        self._plugins = change_plugins(self._plugins, self._setup(), changes)
        self._nets_used |= {p.control.net for p in self._nets}
        self.settings.update({k: v for k, v in changes.items() if k in Text.forkable})
        for prompt, dropped in (self._text.truncated.items() if self._text else ()):
            self.truncated.setdefault(prompt, dropped)
        if "control" in changes:
            self._recording.bindings = None  # residual recorders describe the new nets
        if self._guides and (changes.keys() & set(Text.forkable)):
            self._check_guide_words()  # a new prompt must still name the guides' subjects (KeyError)
        self._reset_schedule()

    # ------------------------------------------------------------------ the loop
    recorders = property(lambda self: self._recording.recorders)
    guide_log = property(lambda self: {i: n for i, n in sorted(self._guide_notes.items()) if i < self._i and n},
                         doc="What the guides did at each step taken: their loss before updating, and the updates.")
    recording_meta = property(lambda self: self._recording.meta, doc="What the recorders describe (a run's).")

    def _bind(self) -> None:
        """Bind the recorders to this sampler (once; again after a fork changes them)."""
        if self._recording.bindings is None:
            hw, tokens = tuple(self._latents.shape[-2:]), self._context_tokens
            self._recording.bind(RecordingContext(self.pipe, self.num_steps, self.layout, hw, tokens, self._host,
                                                  self._nets))
            try:
                self._check_memory()
            except SamplingMemoryError:
                self._recording.bindings = None
                raise

    def memory_estimate(self) -> Estimate:
        """What this sampler's remaining steps need besides the model (:func:`lab.memory.estimate`)."""
        bindings = self._recording.bindings or []
        recorded = sum(b.memory_bytes() for b in bindings)
        explicit = any(n.endswith("attn1") for b in bindings for n in b.attention_layers)
        return estimate_memory(self.pipe, height=self.settings["height"], width=self.settings["width"],
                               rows=self.layout.rows, batch=self.layout.batch, steps=self.num_steps - self._i,
                               nets=[p.control.net for p in self._nets], recordings=recorded, explicit_self=explicit)

    def _check_memory(self) -> None:
        limit = self._args.get("memory_limit")
        if limit is not False:
            check_memory(self.memory_estimate(), limit, self.device,
                         what=f"sampling {self.settings['width']}x{self.settings['height']} x{self.layout.rows} rows "
                              f"for {self.num_steps - self._i} steps")

    @torch.no_grad()
    def step(self) -> StepState:
        """Run one denoising step and return its :class:`StepState`."""
        if self.done:
            raise RuntimeError(f"sampling is finished ({self.num_steps} steps); rewind(k) or fork() to go on")
        i = self._i
        for start, changes in [pc for pc in self._pending if pc[0] == i]:
            self._apply_changes(changes)
            self._plan.append((start, changes))
            self._pending.remove((start, changes))
        self._bind()
        snap = self._snapshot()
        self._snaps[i:] = [snap]
        try:
            with self._recording.dispatching(self.pipe.unet):
                state = self._step(i)
        except _OOM as e:  # e, and the tensors its frames hold, are dropped at the end of this block
            detail = str(e).splitlines()[0][:200] if str(e) else ""
        except BaseException:
            self._host.discard()
            self._restore(snap)  # an interrupted step leaves no trace
            raise
        else:
            self.history.append(state)
            self._latents, self._i = state.prev_latents, i + 1
            return state
        self._host.discard()
        self._restore(snap)
        raise SamplingOutOfMemory.after(detail, i, self.to_run(), self.device)

    def _step(self, i: int) -> StepState:
        sched, x, cfg = self.scheduler, self._latents, self.layout.cfg
        t, th = self.timesteps[i], self._t_host[i]
        rec = self._recording
        if self._guides:  # gradient steps on x_t (Attend-and-Excite); the plug-ins' inputs without recording
            def make_inputs(xx, quiet=StepInfo(i, t, th, sched, self.layout)):
                inp = UNetInputs(sched.scale_model_input(torch.cat([xx] * 2) if cfg else xx, th), t)
                for p in self._plugins:
                    p.apply(inp, quiet)
                return inp
            x, self._guide_notes[i] = guided_step_latents(self, x, i, make_inputs)
        inputs = UNetInputs(sched.scale_model_input(torch.cat([x] * 2) if cfg else x, th), t)
        info = StepInfo(i, t, th, sched, self.layout,
                        observe_residuals=lambda net, d, m: rec.observe_residuals(net, i, d, m))
        for p in self._plugins:
            p.apply(inputs, info)
        out = self.pipe.unet(inputs.sample, t, **inputs.unet_kwargs(), **rec.unet_kwargs(i))[0]
        if cfg:
            uncond, cond = out.chunk(2)
            guided = uncond + self.settings["guidance"] * (cond - uncond)
            if self.settings["guidance_rescale"] > 0:  # Lin et al. 2023, section 3.4 (diffusers' helper)
                guided = rescale_noise_cfg(guided, cond, guidance_rescale=self.settings["guidance_rescale"])
        else:
            uncond, cond, guided = None, out, out
        res = sched.step(guided, th, x, **self.extra_step_kwargs, return_dict=True)
        prev = res.prev_sample
        x0 = getattr(res, "pred_original_sample", None)
        if x0 is None:
            x0 = predict_x0(sched, guided, th, x)
        records = rec.collect(i)
        self._finite.after_step(i, prev, guided, self.to_run)
        sv = self._sigma_values
        sigma = sv[i] if sv is not None and i < len(sv) else float("nan")
        # the recorders' host copies start now, on a side stream; reading a record waits for them
        return StepState(i, self._t_values[i], sigma, x, prev, x0, cond, uncond, guided,
                         Records(records, self._host.flush()))

    def check_finite_now(self) -> None:
        """Check the per-step finiteness flags kept so far (``check_finite="end"``, :mod:`lab.finite`) with one
        device sync. On NaN/inf the sampler is rewound to just before the first bad step and
        :class:`NonFiniteError` raised."""
        first = self._finite.first_bad()
        if first is not None:
            noise_pred = self.history[first].noise_pred
            self.rewind(first)
            raise FiniteWatch.error(first, noise_pred, self.to_run())

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
        self.interrupted = False  # a run resumed to its end is not interrupted
        bar = tqdm(total=self.num_steps, initial=self._i, disable=not self.progress, desc="sampling", leave=False)
        try:
            if not self.done:
                self._bind()
            with self._recording.dispatching(self.pipe.unet):  # the whole loop: layers are not swapped every step
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
            bar.close()
        return self.to_run()

    def to_run(self) -> Run:
        return Run(list(self.history), settings=self.provenance(), pipe=self.pipe, final_latents=self._latents,
                   interrupted=self.interrupted, truncated=dict(self.truncated),
                   recording_meta=dict(self.recording_meta), recipe=self.recipe())

    def recipe(self) -> Recipe:
        """What :func:`lab.replay` needs to make this run again: the arguments and the forks' changes."""
        args = {**self._args, "scheduler": self._scheduler0, "generator": None}
        why = ("it was sampled with an external torch.Generator (pass seed= for a replayable run)"
               if self._external_generator else None)
        return Recipe(args, tuple((k, dict(c)) for k, c in self._plan), why)

    def provenance(self) -> dict:
        """The settings, model, scheduler config, active plug-ins (``controls``: ControlNets; ``conditioning``:
        the others) and the forks' changes: what a run records of how it was made."""
        sched, nets = self.scheduler, self._nets
        return {**self.settings, "scheduler": scheduler_name(sched), "num_steps": self.num_steps,
                "scheduler_config": {k: v for k, v in sched.config.items() if not k.startswith("_")},
                "model": self.pipe.name, "model_kind": self.pipe.kind, "device": str(self.device),
                "dtype": str(self.pipe.dtype).removeprefix("torch."), "controls": [p.describe() for p in nets],
                "conditioning": [p.describe() for p in self._plugins if p not in nets],
                "forks": [dict(step=k, **v) for k, v in self._plan],
                "guides": [g.describe() for g in self._guides],
                "weights": self.pipe.weights(sorted(self._nets_used)), "versions": versions()}

    # ------------------------------------------------------------------ time travel
    def rewind(self, k: int) -> "Sampler":
        """Go back to just before step ``k`` (0 <= k <= position); steps >= k are dropped. Negative
        ``k`` counts back from the current position. Stepping again recomputes them bit-exactly."""
        k = self._i + k if k < 0 else k
        if not 0 <= k <= self._i:
            raise IndexError(f"cannot rewind to step {k}: the sampler is at step {self._i}")
        if k == self._i:
            return self
        self._restore(self._snaps[k])
        self.history, self._snaps = self.history[:k], self._snaps[:k + 1]
        self._plan = [(s, c) for s, c in self._plan if s <= k]
        self._finite.flags = self._finite.until(k)
        self._i, self.interrupted = k, False
        return self

    def fork(self, *, at: int | None = None, **changes) -> "Sampler":
        """A new sampler from this one's snapshot before step ``at`` (default: the current position): it shares
        the steps before ``at`` (immutable) and nothing else, and continues with ``changes`` (``prompt``,
        ``negative_prompt``, ``guidance``, ``seed`` of fresh noise, ``recorders``, ``control``, ``scheduler`` on
        the same timesteps; SDXL: ``prompt_2``, ``negative_prompt_2``)."""
        k = self._i if at is None else (self._i + at if at < 0 else at)
        if not 0 <= k <= self._i:
            raise IndexError(f"cannot fork at step {k}: the sampler is at step {self._i}")
        snap = self._snaps[k] if k < len(self._snaps) else self._snapshot()
        generator = torch.Generator(self.generator.device)
        generator.set_state(snap.rng_state)
        new = Sampler.__new__(Sampler)
        new._begin(self.pipe, snap.settings, snap.plugins, self.layout, self.timesteps, generator,
                   copy.deepcopy(snap.scheduler), snap.latents, self.recorders, self.progress, self.check_finite)
        new._args, new._external_generator, new.truncated = self._args, self._external_generator, dict(self.truncated)
        new._scheduler0, new._nets_used = self._scheduler0, self._nets_used | new._nets_used
        new._guides, new._guide_layers = self._guides, self._guide_layers
        new._guide_notes = {s: n for s, n in self._guide_notes.items() if s < k}  # the inherited steps' log
        new._recording = Recording(self.recorders, copy.deepcopy(self.recording_meta))  # the inherited steps' meta
        new.history, new._snaps = self.history[:k], self._snaps[:k]
        new._plan = [(s, c) for s, c in self._plan if s < k]
        new._finite.flags = self._finite.until(k)
        new._i = k
        if changes:
            new._apply_changes(changes)
            new._plan.append((k, dict(changes)))
        new._snaps.append(new._snapshot())
        return new

    def replay(self) -> Run:
        """Sample again from the start with the same settings and forks; returns the new :class:`lab.Run`
        (bit-exact on CPU)."""
        if self._external_generator:
            raise RuntimeError("replay needs a seed: this sampler was given an external generator")
        new = Sampler(self.pipe, **self._args)
        new._pending = list(self._plan)
        return new.run()
