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


class ClassTokens(Conditioning):
    """Class labels as cross-attention tokens (LDM's class-conditional models, the lecture's "CA" row for
    classes): the pipeline's ``class_embedder`` turns each label into a context ``[tokens, dim]`` that replaces
    the text's; the unconditional half of guidance gets the encoder's null class. ``labels``: one class index
    per prompt (an int for all). Its token table names the class token by the class (``"large red circle"``),
    so attention recorders label its map with it."""

    kind, enters = "class-tokens", "CA"

    def __init__(self, labels):
        if isinstance(labels, bool) or not isinstance(labels, (int, list, tuple)):
            raise TypeError(f"class labels are an int or a list of ints, got {type(labels).__name__}")
        self.labels = [labels] if isinstance(labels, int) else list(labels)
        if not self.labels or any(isinstance(v, bool) or not isinstance(v, int) for v in self.labels):
            raise TypeError(f"class labels are an int or a non-empty list of ints, got {labels!r}")
        self.tokens: dict | None = None
        self._ctx = None

    def setup(self, s: Setup) -> None:
        enc = s.pipe.components.get("class_embedder")
        if enc is None:
            raise ValueError("class tokens need a class model (a class_embedder component): "
                             "lab.load('shapes', task='class')")
        n, layout = enc.config.num_classes, s.layout
        for v in self.labels:
            if not 0 <= v < n:
                raise ValueError(f"class label {v} is outside the model's {n} classes (0..{n - 1})")
        if len(self.labels) not in (1, layout.n_prompts):
            raise ValueError(f"{len(self.labels)} class labels for {layout.n_prompts} prompts: give one, or one per "
                             "prompt")
        labels = self.labels * layout.n_prompts if len(self.labels) == 1 else self.labels
        cond = torch.tensor(labels, device=s.device).repeat_interleave(layout.per_prompt)
        rows = torch.cat([torch.full_like(cond, enc.null_class), cond]) if layout.cfg else cond
        self._ctx = enc(rows).to(s.dtype)
        names = list(enc.config.class_names) or [str(v) for v in range(n)]
        self.tokens = {"n_tokens": enc.config.length,
                       "prompts": [_context_row({enc.config.slot: names[v]}, enc.config.length) for v in labels]}

    def apply(self, x: UNetInputs, step: StepInfo) -> None:
        x.encoder_hidden_states = self._ctx

    def describe(self) -> dict:
        return {**super().describe(), "labels": self.labels}


def _context_row(tokens_at: dict[int, str], length: int) -> dict:
    """A token table row for a context of learned tokens: ``tokens_at`` names the condition's slots (their
    words, what recorders label the maps with); the other slots are the model's frame."""
    words = sorted(set(tokens_at.values()), key=list(tokens_at.values()).index)
    return {"tokens": [tokens_at.get(j, "<frame>") for j in range(length)],
            "word_index": [words.index(tokens_at[j]) if j in tokens_at else -1 for j in range(length)],
            "words": [tokens_at.get(j, "") for j in range(length)]}


class Layout(Conditioning):
    """Boxes with labels as cross-attention tokens (LDM's layout-to-image, the lecture's "CA" row for layouts):
    the pipeline's ``layout_embedder`` turns each box into a token; guidance's unconditional half gets no boxes.
    ``boxes``: one layout for every image, or a list of layouts (one per prompt); a layout is a list of
    ``(label, (x0, y0, x1, y1))`` with the box in pixels of the sample (exclusive ends) and the label one of the
    model's (``"red circle"``), at most the model's ``max_objects``."""

    kind, enters = "layout", "CA"

    def __init__(self, boxes):
        one = isinstance(boxes, (list, tuple)) and boxes and isinstance(boxes[0], (list, tuple)) and \
            len(boxes[0]) == 2 and isinstance(boxes[0][0], str)
        layouts = [boxes] if one else boxes
        if not isinstance(layouts, (list, tuple)) or not layouts:
            raise TypeError("boxes= takes a layout [(label, (x0, y0, x1, y1)), ...] or a list of them")
        self.boxes = tuple(tuple(self._box(b) for b in lay) for lay in layouts)
        self.tokens: dict | None = None
        self._ctx = None

    @staticmethod
    def _box(b):
        import math
        try:
            label, (x0, y0, x1, y1) = b
            xy = tuple(float(v) for v in (x0, y0, x1, y1))
        except (TypeError, ValueError):
            raise TypeError(f"a box is (label, (x0, y0, x1, y1)), got {b!r}") from None
        if not isinstance(label, str) or not all(math.isfinite(v) for v in xy) or xy[2] <= xy[0] or xy[3] <= xy[1]:
            raise ValueError(f"a box is (label, (x0, y0, x1, y1)) with x0 < x1 and y0 < y1, got {b!r}")
        return label, xy

    @property
    def n_layouts(self) -> int:
        return len(self.boxes)

    def setup(self, s: Setup) -> None:
        enc = s.pipe.components.get("layout_embedder")
        if enc is None:
            raise ValueError("box tokens need a layout model (a layout_embedder component): "
                             "lab.load('shapes', task='layout')")
        names, k, layout = list(enc.config.label_names), enc.config.max_objects, s.layout
        h, w = s.settings["height"], s.settings["width"]
        for lay in self.boxes:
            if len(lay) > k:
                raise ValueError(f"a layout of {len(lay)} boxes; this model reads at most {k}")
            for label, (x0, y0, x1, y1) in lay:
                if label not in names:
                    raise ValueError(f"unknown box label {label!r}; this model's: {names}")
                if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
                    raise ValueError(f"box {(x0, y0, x1, y1)} is outside the {w}x{h} sample")
        if len(self.boxes) not in (1, layout.n_prompts):
            raise ValueError(f"{len(self.boxes)} layouts for {layout.n_prompts} prompts: give one, or one per prompt")
        lays = list(self.boxes) * layout.n_prompts if len(self.boxes) == 1 else list(self.boxes)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32) / enc.config.image_size  # boxes in the model's pixels
        box = torch.zeros(len(lays), k, 4)
        lab = torch.full((len(lays), k), -1, dtype=torch.long)
        for i, lay in enumerate(lays):
            for j, (label, xy) in enumerate(lay):
                box[i, j] = torch.tensor(xy) / scale
                lab[i, j] = names.index(label)
        box = box.repeat_interleave(layout.per_prompt, 0).to(s.device)
        lab = lab.repeat_interleave(layout.per_prompt, 0).to(s.device)
        if layout.cfg:
            box, lab = torch.cat([box, box]), torch.cat([torch.full_like(lab, -1), lab])
        self._ctx = enc(box.to(enc.dtype), lab).to(s.dtype)
        self.tokens = {"n_tokens": enc.config.length,
                       "prompts": [_context_row({1 + j: label for j, (label, _) in enumerate(lay)}, enc.config.length)
                                   for lay in lays]}

    def apply(self, x: UNetInputs, step: StepInfo) -> None:
        x.encoder_hidden_states = self._ctx

    def describe(self) -> dict:
        return {**super().describe(), "boxes": [[[label, list(xy)] for label, xy in lay] for lay in self.boxes]}
