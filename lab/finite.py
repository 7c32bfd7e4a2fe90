"""NaN/inf in the sampling loop, found at the step where it appears (``Sampler(check_finite=...)``).

``"step"`` checks x_{t-1} after every step (one device sync per step); ``"end"`` keeps a device-side flag
per step and reads them all with one sync at the end of :meth:`lab.Sampler.run` or of iteration, or on
:meth:`lab.Sampler.check_finite_now`; ``True`` is "step" on CPU and "end" on CUDA; ``False`` checks nothing.
"""
from __future__ import annotations

import torch

from .errors import NonFiniteError

HINT = "try float32, a lower guidance, or another scheduler"


def _culprit(noise_pred: torch.Tensor) -> str:
    return "noise_pred (UNet output)" if not bool(torch.isfinite(noise_pred).all()) else "latents"


class FiniteWatch:
    """The per-step flags of one sampler (mode resolved for its device)."""

    def __init__(self, check_finite, device: torch.device):
        self.mode = ("step" if device.type == "cpu" else "end") if check_finite is True else (check_finite or None)
        self.flags: dict[int, torch.Tensor] = {}  # step -> device bool ("end" mode)

    def after_step(self, i: int, prev: torch.Tensor, noise_pred: torch.Tensor, partial_run) -> None:
        """Step ``i`` made ``prev`` from ``noise_pred``; ``partial_run()`` gives the run so far for the error."""
        if self.mode == "step" and not bool(torch.isfinite(prev).all()):
            raise self.error(i, noise_pred, partial_run())
        if self.mode == "end":
            self.flags[i] = torch.isfinite(prev).all()  # stays on the device: no sync here

    def first_bad(self) -> int | None:
        """The first step whose flag is False (one device sync), or None; the flags are then cleared."""
        if not self.flags:
            return None
        idx = sorted(self.flags)
        ok = torch.stack([self.flags[i] for i in idx]).cpu()  # the one sync
        self.flags.clear()
        return None if bool(ok.all()) else idx[int((~ok).nonzero()[0, 0])]

    def until(self, k: int) -> dict:
        """The flags of the steps before ``k`` (a rewind or a fork keeps those)."""
        return {j: f for j, f in self.flags.items() if j < k}

    @staticmethod
    def error(step: int, noise_pred: torch.Tensor, run) -> NonFiniteError:
        return NonFiniteError(_culprit(noise_pred), step, run=run, hint=HINT)
