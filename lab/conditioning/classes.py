"""Class-label conditioning through the UNet's class embedding (``class_labels``), with a null class for
classifier-free guidance: the unconditional half gets ``null_class`` (the seed's class-conditional LDMs
drop the label to a reserved index the same way)."""
from __future__ import annotations

import torch

from .base import Conditioning, Setup, StepInfo, UNetInputs


class ClassLabel(Conditioning):
    """``labels``: one class index per prompt (an int for all); ``null_class``: the index the unconditional
    half gets. The UNet needs a class embedding (``num_class_embeds`` or ``class_embed_type``)."""

    kind, enters = "class", "embedding"
    forkable = ("class_labels",)

    def __init__(self, labels, null_class: int | None = None):
        self.labels = [labels] if isinstance(labels, int) else [int(v) for v in labels]
        self.null_class = null_class
        self._labels = None

    def setup(self, s: Setup) -> None:
        cfg_ = s.pipe.unet.config
        n = cfg_.num_class_embeds
        if n is None and cfg_.class_embed_type is None:
            raise ValueError("class_labels= needs a UNet with a class embedding (num_class_embeds or class_embed_type)")
        layout = s.layout
        if len(self.labels) not in (1, layout.n_prompts):
            raise ValueError(f"{len(self.labels)} class labels for {layout.n_prompts} prompts: give one, or one per "
                             "prompt")
        for v in self.labels + ([self.null_class] if self.null_class is not None else []):
            if n is not None and not 0 <= v < n:
                raise ValueError(f"class label {v} is outside the UNet's {n} classes")
        if layout.cfg and self.null_class is None:
            raise ValueError("guidance > 1 with class labels needs null_class= (the label of the unconditional half)")
        labels = self.labels * layout.n_prompts if len(self.labels) == 1 else self.labels
        cond = torch.tensor(labels, device=s.device).repeat_interleave(layout.per_prompt)
        self._labels = torch.cat([torch.full_like(cond, self.null_class), cond]) if layout.cfg else cond

    def apply(self, x: UNetInputs, step: StepInfo) -> None:
        x.class_labels = self._labels

    def changed(self, s: Setup, class_labels=None, **changes) -> "ClassLabel":
        new = ClassLabel(class_labels if class_labels is not None else self.labels, self.null_class)
        new.setup(s)
        return new

    def describe(self) -> dict:
        return {**super().describe(), "labels": self.labels, "null_class": self.null_class}
