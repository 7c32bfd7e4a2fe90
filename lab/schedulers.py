"""Schedulers by name. All are diffusers classes, built from the pipeline's own scheduler config
(the swap diffusers documents: ``Cls.from_config(pipe.scheduler.config)``)."""
from __future__ import annotations

import difflib
import inspect

import numpy as np
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SCHEDULERS: dict[str, tuple[type, dict]] = {
    # the seed's ancestral update z_{t-1} = (z_t - (1-a_t)/sqrt(1-abar_t) eps)/sqrt(a_t) + sigma_t eps_t
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
}


#: sigma schedules a scheduler may use instead of its own; the name says so ("euler+karras")
SIGMA_SCHEDULES = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


#: schedulers on the training schedule's discrete timesteps (no sigmas of their own)
DISCRETE = (DDPMScheduler, DDIMScheduler, PNDMScheduler)


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """The :data:`SCHEDULERS` name of ``scheduler`` (its class name if none), with a ``+karras`` (``+exponential``,
    ``+beta``) suffix when it uses that sigma schedule. The full config is in a run's ``scheduler_config``."""
    name = next((n for n, (cls, extra) in SCHEDULERS.items()
                 if type(scheduler) is cls and all(scheduler.config.get(k) == v for k, v in extra.items())),
                type(scheduler).__name__)
    return name + "".join(f"+{k.split('_')[1]}" for k in SIGMA_SCHEDULES if scheduler.config.get(k))


def make_scheduler(spec, base_config) -> SchedulerMixin:
    """``spec``: a name of :data:`SCHEDULERS`, a scheduler instance (copied), or ``None`` (the
    pipeline's own, copied)."""
    import copy

    if spec is None:
        raise ValueError("make_scheduler needs a name or an instance")
    if isinstance(spec, SchedulerMixin):
        return copy.deepcopy(spec)
    if not isinstance(spec, str):
        raise TypeError(f"scheduler must be a name {sorted(SCHEDULERS)} or a diffusers scheduler, "
                        f"not {type(spec).__name__}")
    key = spec.lower()
    if key not in SCHEDULERS:
        close = difflib.get_close_matches(key, SCHEDULERS, n=3, cutoff=0.3)
        raise KeyError(f"unknown scheduler {spec!r}; known: {sorted(SCHEDULERS)}"
                       + (f"; did you mean {close}?" if close else ""))
    cls, extra = SCHEDULERS[key]
    return cls.from_config(base_config, **extra)


def alpha_bar(scheduler: SchedulerMixin, t) -> torch.Tensor:
    """abar_t of the training schedule at (integer) timestep ``t``."""
    return scheduler.alphas_cumprod[int(t)]


def predict_x0(scheduler: SchedulerMixin, model_output: torch.Tensor, t, sample: torch.Tensor) -> torch.Tensor:
    """x0 from a model output at timestep ``t`` for a DDPM-space sample x_t (used when the scheduler's
    ``step`` does not return ``pred_original_sample``: PNDM, DPM-Solver++).

    epsilon:       x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    v_prediction:  x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v
    sample:        x0 = model output
    """
    a = alpha_bar(scheduler, t).to(torch.float32)  # a 0-dim host tensor is a scalar to a device op: no copy
    kind = scheduler.config.prediction_type
    x, out = sample.float(), model_output.float()
    if kind == "epsilon":
        x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
    elif kind == "v_prediction":
        x0 = a.sqrt() * x - (1 - a).sqrt() * out
    elif kind == "sample":
        x0 = out
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    return x0.to(sample.dtype)


def sigma_values(scheduler: SchedulerMixin) -> list[float] | None:
    """The sigma of each step for schedulers that define one (Euler, Euler a, DPM-Solver); None else."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or isinstance(scheduler, DISCRETE):
        return None
    return [float(x) for x in sigmas.cpu()]


def set_timesteps(scheduler: SchedulerMixin, steps: int, device=None) -> torch.Tensor:
    """``scheduler.set_timesteps(steps)``, kept on the training schedule's timesteps 0..T-1.

    With "leading" spacing and ``steps_offset=1`` (SD's config) the grid at ``steps == T`` is 1..T, and T is
    past the end of the schedule (diffusers' own pipelines raise IndexError there). Then the offset is dropped,
    so the lecture's full chain runs on t = T-1, ..., 0. More steps than T is a ValueError naming T for
    schedulers of discrete timesteps.

    "linspace" spacing rounds ``linspace(0, T-1, steps+1)``: near ``steps == T`` two steps land on one timestep
    (dpm++2m at 1000 steps repeats t=500, its multistep update divides by the zero step and gives NaN). A grid
    that repeats a timestep is replaced by ``steps`` distinct ones evenly spaced over T-1..0, where the
    scheduler takes custom timesteps; elsewhere it is a ValueError naming the repeat."""
    T = scheduler.config.num_train_timesteps
    if steps > T and (not hasattr(scheduler, "sigmas") or isinstance(scheduler, DISCRETE)):
        raise ValueError(f"steps={steps} is more than the {T} timesteps of the training schedule "
                         f"({scheduler_name(scheduler)}); use at most {T}")
    scheduler.set_timesteps(steps, device=device)
    if int(scheduler.timesteps.max()) >= T and scheduler.config.get("steps_offset", 0):
        scheduler.register_to_config(steps_offset=0)
        scheduler.set_timesteps(steps, device=device)
    t = scheduler.timesteps
    if isinstance(scheduler, DISCRETE) or not hasattr(scheduler, "sigmas") or t.is_floating_point():
        return t
    values, counts = torch.unique(t, return_counts=True)
    if bool((counts > 1).any()):
        repeated = int(values[counts > 1][0])
        if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(f"{scheduler_name(scheduler)} at steps={steps} repeats timestep {repeated}; use fewer "
                             "steps or another scheduler")
        grid = np.linspace(T - 1, 0, steps).round().astype(np.int64).tolist()
        scheduler.set_timesteps(device=device, timesteps=grid)
    return scheduler.timesteps


def latent_scale(scheduler: SchedulerMixin, i: int) -> float:
    """How scheduler's x_t at step ``i`` relates to the variance-preserving one: sqrt(sigma_i^2 + 1) for
    schedulers that work on sigma-scaled latents (Euler: ``init_noise_sigma`` > 1), else 1."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or float(scheduler.init_noise_sigma) <= 1:
        return 1.0
    return float((sigmas[i] ** 2 + 1) ** 0.5)


def switch_scheduler(current: SchedulerMixin, spec, *, position: int, steps: int, timesteps: torch.Tensor, device):
    """A scheduler ``spec`` (built from ``current``'s config) that continues a trajectory at step ``position``
    on the same ``timesteps``, and the factor that moves the latents into its space (x_sigma = x_vp
    sqrt(sigma^2 + 1) between DDIM/DPM-Solver and Euler). A scheduler on other timesteps is refused."""
    new = make_scheduler(spec, current.config)
    set_timesteps(new, steps, device=device)
    if not torch.equal(new.timesteps.cpu().double(), timesteps.cpu().double()):
        raise ValueError(f"{scheduler_name(new)} takes other timesteps ({new.timesteps[:4].tolist()}...) than this "
                         f"sampler ({timesteps[:4].tolist()}...); a fork can only switch to a scheduler on the same "
                         "timesteps")
    if hasattr(new, "set_begin_index"):
        new.set_begin_index(position)
    return new, latent_scale(new, position) / latent_scale(current, position)
