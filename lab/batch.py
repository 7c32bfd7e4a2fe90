"""The rows of the UNet's batch: which half is which, and which prompt a row belongs to.

With classifier-free guidance the UNet sees ``[uncond x B, cond x B]`` (diffusers' ``torch.cat([negative,
positive])``), without it ``[cond x B]``. ``B = prompts x per_prompt``, and row ``r`` of a half belongs to
prompt ``r // per_prompt`` (diffusers' ``num_images_per_prompt`` repeats each prompt's rows together).
Recorders, edits, ControlNet's guess mode and the labelled arrays all take these rules from here.
"""
from __future__ import annotations

from dataclasses import dataclass

HALVES = ("cond", "uncond", "both")


@dataclass(frozen=True)
class BatchLayout:
    """``n_prompts`` prompts, ``per_prompt`` images each, ``cfg``: whether the unconditional half is there."""

    n_prompts: int
    per_prompt: int
    cfg: bool

    @property
    def batch(self) -> int:
        """Images per half (the batch the user asked for)."""
        return self.n_prompts * self.per_prompt

    @property
    def rows(self) -> int:
        """Rows of the UNet's batch (both halves under guidance)."""
        return self.batch * (2 if self.cfg else 1)

    def half(self, which: str) -> slice:
        """The rows of ``"cond"``, ``"uncond"`` (empty without guidance) or ``"both"``."""
        if which not in HALVES:
            raise ValueError(f"half must be one of {HALVES}, got {which!r}")
        b = self.batch
        if not self.cfg:
            return slice(0, 0) if which == "uncond" else slice(0, b)
        return {"cond": slice(b, 2 * b), "uncond": slice(0, b), "both": slice(0, 2 * b)}[which]

    def halves(self, which: str) -> int:
        """How many halves ``which`` keeps (2 only for ``"both"`` under guidance)."""
        return 2 if (which == "both" and self.cfg) else 1

    def prompt_of(self, row: int) -> int:
        """The prompt of row ``row`` of one half (0 <= row < batch)."""
        return min(row % self.batch // self.per_prompt, self.n_prompts - 1)
