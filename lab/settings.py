"""A sampler's arguments, checked before any model work (the bad-input table of DESIGN.md)."""
from __future__ import annotations

import math

from .schedulers import scheduler_name

FINITE_CHECKS = (True, False, "step", "end")


def check_number(name, v, *, minimum=None, integer=False) -> None:
    if integer:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")


def check_seed(seed) -> None:
    check_number("seed", seed, minimum=0, integer=True)
    if seed >= 2 ** 64:
        raise ValueError(f"seed must be < 2**64 (a torch.Generator seed), got {seed}")


def check_guidance_rescale(v) -> None:
    check_number("guidance_rescale", v, minimum=0)
    if v > 1:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {v}")


def check_memory_limit(v) -> None:
    if v is None or v is False:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"memory_limit must be a number of bytes > 0, None (the free memory) or False (no check), "
                         f"got {v!r}")


def nearest_multiple(v: int, f: int) -> int:
    return max(f, int(round(v / f)) * f)


def sampler_settings(pipe, prompt, negative_prompt, *, steps, guidance, scheduler, seed, generator, height, width,
                     batch, eta, strength, prompt_2, negative_prompt_2, check_finite, guidance_rescale=0.0) -> dict:
    """The checked settings of a sampler as a plain dict (its provenance). Raises ValueError/TypeError."""
    if check_finite not in FINITE_CHECKS:
        raise ValueError(f"check_finite must be True, False, 'step' or 'end', got {check_finite!r}")
    check_number("steps", steps, minimum=1, integer=True)
    check_number("guidance", guidance, minimum=0)
    check_guidance_rescale(guidance_rescale)
    check_number("batch", batch, minimum=1, integer=True)
    check_number("eta", eta, minimum=0)
    check_number("strength", strength, minimum=0)
    if strength > 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if generator is None:
        check_seed(seed)
    f = pipe.vae_scale_factor
    height = pipe.default_size if height is None else height
    width = pipe.default_size if width is None else width
    for name, v in (("height", height), ("width", width)):
        check_number(name, v, minimum=1, integer=True)
        if v % f:
            raise ValueError(f"{name}={v} is not a multiple of the VAE factor {f}; nearest valid: "
                             f"{nearest_multiple(v, f)}")
    if not isinstance(prompt, (str, list, tuple)):
        raise TypeError(f"prompt must be a string or a non-empty list of strings, not {type(prompt).__name__}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompt must be a string or a non-empty list of strings")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        if len(negative_prompt) != len(prompts):
            raise ValueError(f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts")
    return dict(prompt=prompt, negative_prompt=negative_prompt, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
                steps=steps, guidance=float(guidance), guidance_rescale=float(guidance_rescale), seed=seed,
                height=height, width=width, batch=batch, eta=eta, strength=strength,
                scheduler=scheduler if isinstance(scheduler, str) or scheduler is None else scheduler_name(scheduler))


#: what a fork may change (steps, size, batch and guidance on/off fix the trajectory)
FORKABLE = ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2", "guidance", "guidance_rescale", "seed",
            "recorders", "control", "scheduler")


def check_fork_changes(changes: dict, cfg: bool) -> None:
    """Refuse what a fork cannot change, before it changes anything."""
    unknown = set(changes) - set(FORKABLE)
    if unknown:
        raise ValueError(f"cannot change {sorted(unknown)} in a fork; forkable: {list(FORKABLE)} "
                         "(steps, size and batch fix the trajectory: start a new sampler)")
    if "guidance" in changes:
        check_number("guidance", changes["guidance"], minimum=0)
        if (changes["guidance"] > 1.0) != cfg:
            raise ValueError("a fork cannot switch classifier-free guidance on or off (guidance across 1.0)")
    if "seed" in changes:
        check_seed(changes["seed"])
    if "guidance_rescale" in changes:
        check_guidance_rescale(changes["guidance_rescale"])
