"""Typed errors of latent-lab. Each message says what was tried and what to do."""
from __future__ import annotations

import torch


class ModelNotAvailable(RuntimeError):
    """A model could not be loaded. ``tried`` lists the places looked at, in order."""

    def __init__(self, message: str, tried: list[str] | None = None):
        self.tried = list(tried or [])
        if self.tried:
            message += "\n  tried:\n" + "\n".join(f"    - {t}" for t in self.tried)
        super().__init__(message)


class ModelNotFound(ModelNotAvailable):
    """No local directory and no cached Hugging Face snapshot has this name."""


class IncompleteModel(ModelNotAvailable):
    """A directory or cached snapshot exists but lacks files or holds unreadable ones."""


class NonFiniteError(FloatingPointError):
    """NaN or inf appeared in a tensor of the sampling loop. ``step`` is the step index where it first
    appeared, ``name`` the tensor, ``run`` the partial run up to (excluding) that step."""

    def __init__(self, name: str, step: int | None, run=None, hint: str = ""):
        self.name, self.step, self.run = name, step, run
        where = f"at step {step}" if step is not None else "after sampling"
        msg = f"non-finite values (NaN/inf) in {name} {where}"
        super().__init__(msg + (f"; {hint}" if hint else ""))


class RunFileError(ValueError):
    """A path does not hold a readable latent-lab run (foreign, corrupted, or from a newer version)."""


class SamplingOutOfMemory(torch.cuda.OutOfMemoryError):
    """The device ran out of memory during a step. The step left no trace (the sampler is back before it,
    the device's cached memory was released, recorders' processors were restored), so the sampler and the
    pipeline stay usable: free memory and call ``step()``/``run()`` again. ``run`` is the partial run."""

    @classmethod
    def after(cls, detail: str, step: int, run, device: torch.device) -> "SamplingOutOfMemory":
        """The error for an OOM at ``step`` (``detail``: the first line of torch's message), once the device's
        cached memory is released (call it after the original exception, and its frames' tensors, are gone)."""
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return cls(step, run=run, detail=detail)

    def __init__(self, step: int, run=None, detail: str = ""):
        self.step, self.run = step, run
        super().__init__(
            f"out of memory at step {step}{': ' + detail if detail else ''}. The sampler is back before step "
            f"{step} and can go on once memory is freed. To need less: a smaller batch or image, "
            "AttentionRecorder(heads='mean', layers=fewer, steps=fewer) or spill=DIR, float16/bfloat16, "
            "or pipe.diffusers.enable_model_cpu_offload()")
