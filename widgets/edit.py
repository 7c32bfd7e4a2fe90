"""EditWidget: prompt-to-prompt edits with the image before and after.

    EditWidget(pipe, "a large red circle on a gray background", seed=0)

The source run is sampled once with every head's cross-attention recorded. **Reweight** multiplies the
attention to one word by a factor (:class:`lab.Reweight`) over a window of the steps; **replace** samples a
new prompt from the same noise with the source's attention maps for the first part of the steps
(:class:`lab.ReplaceAttention`), beside the new prompt sampled plainly from the same noise, so what the edit
kept is visible. Each edit shows the source, the edited image and their difference, with the mean absolute
pixel change.
"""
from __future__ import annotations

import html

import ipywidgets as W
import numpy as np
import traitlets

import analysis
import lab
from lab.conditioning.text import content_words

from ._base import ErrorsMixin, css, png, shows_errors


class EditWidget(ErrorsMixin, W.VBox):
    """``pipe``: a text pipeline; ``prompt``, ``seed``, ``steps``, ``guidance``: the source run's settings."""

    version = traitlets.Int(0)  # increases with every edit shown

    def __init__(self, pipe, prompt: str, *, seed: int = 0, steps: int = 20, guidance: float = 5.0,
                 size: int = 192, raise_errors: bool | None = None):
        self._init_errors(raise_errors)
        self.pipe, self.size = pipe, int(size)
        self.settings = dict(steps=int(steps), guidance=float(guidance), seed=int(seed))
        self.source = pipe.sampler(prompt, recorders=[lab.AttentionRecorder(heads="all")], progress=False,
                                   **self.settings).run()
        self.words = content_words(analysis.words(self.source))
        self.edited = None   # the last edit's run
        self.plain = None    # replace: the new prompt sampled without the edit
        self.change = None   # mean |edited - source| in 0..255

        self.mode = W.ToggleButtons(options=[("reweight a word", "reweight"), ("replace the prompt", "replace")],
                                    value="reweight", style={"button_width": "auto"})
        self.word = W.Dropdown(options=self.words, description="word", layout=W.Layout(width="220px"))
        self.factor = W.FloatSlider(value=3.0, min=0.0, max=8.0, step=0.25, description="factor",
                                    layout=W.Layout(width="300px"))
        self.new_prompt = W.Text(value=prompt, description="new prompt", style={"description_width": "80px"},
                                 layout=W.Layout(width="460px", display="none"))
        self.window = W.FloatRangeSlider(value=(0.0, 1.0), min=0.0, max=1.0, step=0.05, description="steps",
                                         readout_format=".2f", layout=W.Layout(width="320px"),
                                         tooltip="the part of the trajectory the edit acts on")
        self.apply_button = W.Button(description="Apply", icon="magic", button_style="primary")
        self.apply_button.on_click(lambda _: self.apply())
        self.mode.observe(self._mode_changed, "value")
        blank = png(np.full((8, 8, 3), 235, np.uint8))
        px = f"{self.size}px"
        self.images = {k: W.Image(value=blank, format="png", layout=W.Layout(width=px, height=px))
                       for k in ("source", "edited", "plain", "difference")}
        self.captions = {k: W.HTML() for k in self.images}
        cards = []
        for k, img in self.images.items():
            img.add_class("ll-pixelated")
            card = W.VBox([img, self.captions[k]], layout=W.Layout(margin="0 10px 0 0", max_width=f"{self.size + 10}px"))
            card.add_class(f"ll-edit-{k}")
            cards.append(card)
        self.cards = dict(zip(self.images, cards))
        self.cards["plain"].layout.display = "none"
        self.summary = W.HTML()
        self.images["source"].value = png(self.source.image)
        self.captions["source"].value = f"<b>source</b>: {html.escape(prompt)}"
        super().__init__([css(), W.HTML("<b>Prompt-to-prompt edits</b> · same noise, the attention edited"),
                          self.mode, W.HBox([self.word, self.factor, self.new_prompt], layout=W.Layout(flex_flow="row wrap")),
                          W.HBox([self.window, self.apply_button]), W.HBox(cards, layout=W.Layout(flex_flow="row wrap")),
                          self.summary, self.error_box])
        self.add_class("ll-edit")

    def _mode_changed(self, change) -> None:
        reweight = change["new"] == "reweight"
        self.word.layout.display = self.factor.layout.display = None if reweight else "none"
        self.new_prompt.layout.display = "none" if reweight else None
        self.window.value = (0.0, 1.0) if reweight else (0.0, 0.6)

    # ------------------------------------------------------------------ actions (also plain calls)
    def _sample(self, prompt, edits=()):
        recorders = [lab.AttentionRecorder(record=False, edits=list(edits))] if edits else []
        return self.pipe.sampler(prompt, recorders=recorders, progress=False, **self.settings).run()

    @shows_errors
    def reweight(self, word: str, factor: float, *, steps: tuple[float, float] | None = None):
        """Multiply the attention to ``word`` by ``factor`` during ``steps`` (fractions of the trajectory);
        returns the edited run and shows it beside the source."""
        if word not in self.words:
            raise KeyError(f"word {word!r} is not a content word of the prompt; its words: {self.words}")
        if not np.isfinite(factor) or factor < 0:
            raise ValueError(f"factor must be a finite number >= 0, got {factor!r}")
        self.mode.value = "reweight"  # first: changing the mode resets the step window to the mode's default
        steps = tuple(steps) if steps is not None else tuple(self.window.value)
        self.word.value, self.factor.value, self.window.value = word, float(factor), steps
        self.edited = self._sample(self.source.settings["prompt"], [lab.Reweight({word: float(factor)}, steps=steps)])
        self.plain = None
        self._show(f"<b>{html.escape(word)}</b> × {factor:g}, steps {steps[0]:.0%}–{steps[1]:.0%}")
        return self.edited

    @shows_errors
    def replace(self, new_prompt: str, *, steps: tuple[float, float] | None = None):
        """Sample ``new_prompt`` from the source's noise with the source's attention maps during ``steps``
        (prompt-to-prompt's replace, or refine when the prompts differ in length); also samples it plainly.
        Returns the edited run."""
        if not new_prompt.strip():
            raise ValueError("the new prompt is empty")
        self.mode.value = "replace"  # first: changing the mode resets the step window to the mode's default
        steps = tuple(steps) if steps is not None else tuple(self.window.value)
        self.new_prompt.value, self.window.value = new_prompt, steps
        self.edited = self._sample(new_prompt, [lab.ReplaceAttention(self.source, steps=steps)])
        self.plain = self._sample(new_prompt)
        self._show(f"“{html.escape(new_prompt)}” with the source's maps, steps {steps[0]:.0%}–{steps[1]:.0%}")
        return self.edited

    def apply(self):
        """What the Apply button does: the edit the controls describe."""
        if self.mode.value == "reweight":
            return self.reweight(self.word.value, self.factor.value)
        return self.replace(self.new_prompt.value)

    def _show(self, what: str) -> None:
        before = np.asarray(self.source.image).astype(np.float32)
        after = np.asarray(self.edited.image).astype(np.float32)
        diff = np.abs(after - before).mean(-1)
        self.change = float(diff.mean())
        self.images["edited"].value = png(self.edited.image)
        self.captions["edited"].value = f"<b>edited</b>: {what}"
        # the difference, scaled so that 64/255 is white: small changes stay visible
        self.images["difference"].value = png((np.clip(diff / 64, 0, 1) * 255).astype(np.uint8))
        self.captions["difference"].value = f"|edited − source|: mean {self.change:.1f} / 255"
        if self.plain is not None:
            self.images["plain"].value = png(self.plain.image)
            self.captions["plain"].value = "the new prompt alone, same noise (no edit)"
            self.cards["plain"].layout.display = None
            kept = np.abs(after - np.asarray(self.plain.image).astype(np.float32)).mean()
            self.summary.value = (f"The edit changed the source by {self.change:.1f} / 255 on average; the new prompt "
                                  f"alone differs from the edited image by {kept:.1f} / 255.")
        else:
            self.cards["plain"].layout.display = "none"
            self.summary.value = (f"The edit changed the source by {self.change:.1f} / 255 on average "
                                  "(see notebook 02 for why reweighting one word acts weakly on the shapes model).")
        self.version += 1
