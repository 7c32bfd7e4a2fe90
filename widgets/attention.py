"""AttentionExplorer: click a word to see where it attended; click a pixel to see what it attended to.

    AttentionExplorer(run)        # a run sampled with recorders=[lab.AttentionRecorder()]

Word buttons choose the heat map (:func:`analysis.word_heatmap`, drawn over the image), the filter
picks all layers, one resolution or one layer, the step window limits the steps averaged; a click on
the image plots :func:`analysis.attention_at` for that location: each word's attention over time.
"""
from __future__ import annotations

import io

import ipywidgets as W
import numpy as np
import traitlets
from ipycanvas import Canvas, hold_canvas
from PIL import Image

import analysis
from lab.conditioning.text import content_words

from ._base import ErrorsMixin, blend, css, shows_errors


def _short(layer: str) -> str:
    return (layer.removeprefix("unet.").replace("down_blocks", "down").replace("up_blocks", "up")
            .replace(".attentions", ".attn").replace(".transformer_blocks", ".tb").replace("mid_block", "mid"))


class AttentionExplorer(ErrorsMixin, W.VBox):
    """``run``: a :class:`lab.Run` with recorded cross-attention; ``image``: what to draw the maps over
    (default the run's decoded image); ``size``: display size in screen pixels; ``batch``: which image."""

    word = traitlets.Unicode("")
    version = traitlets.Int(0)  # increases with every redraw of the overlay

    def __init__(self, run, *, image=None, size: int = 256, batch: int = 0, alpha: float = 0.5,
                 raise_errors: bool | None = None):
        self._init_errors(raise_errors)
        tree = run.attention  # raises a clear ValueError when the run recorded no attention
        self.run, self.batch, self.size, self.alpha = run, int(batch), int(size), float(alpha)
        self.tree = tree
        self.words = analysis.words(run, batch=batch)
        if image is None:
            image = run.images[batch]
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        self.image = image.convert("RGB")
        self.height, self.width = int(run.settings["height"]), int(run.settings["width"])
        n_steps = len(run.steps)
        self.heatmap = None
        self.location = None     # (y, x) in image pixels of the last click
        self.over_time = None    # analysis.attention_at at that location

        options = [("all layers", "*")]
        for res, node in tree.children.items():
            ds = node.to_dataset()
            if "cross" in ds:
                layers = [str(v) for v in ds["layer"].values]
                options.append((f"{res} ({len(layers)} layer{'s' * (len(layers) != 1)})", f"res:{res}"))
                options += [(f"  {_short(lay)}", lay) for lay in layers]
        self._layer_sets = {v: self._layers_of(v) for _, v in options}
        self.word_buttons = W.ToggleButtons(options=self.words, value=self._default_word(),
                                            style={"button_width": "auto"})
        self.filter = W.Dropdown(options=options, value="*", description="layers", layout=W.Layout(width="340px"))
        self.steps = W.IntRangeSlider(value=(0, max(n_steps - 1, 0)), min=0, max=max(n_steps - 1, 0),
                                      description="steps", continuous_update=False, layout=W.Layout(width="340px"))
        self.canvas = Canvas(width=self.size, height=self.size,
                             layout=W.Layout(width=f"{self.size}px", height=f"{self.size}px"))
        self.canvas.add_class("ll-attention-canvas")
        self.plot = W.Image(format="png", layout=W.Layout(width="360px", display="none"))  # shown after a click
        self.plot.add_class("ll-attention-plot")
        self.caption = W.HTML()
        self._quiet = False  # set while show() moves the controls itself
        for control in (self.word_buttons, self.filter, self.steps):
            control.observe(lambda ch: None if self._quiet else self.show(), "value")
        self.canvas.on_mouse_down(self._clicked)
        self.canvas.on_client_ready(lambda: self._draw())

        super().__init__([css(), self.word_buttons, W.HBox([self.filter, self.steps]),
                          W.HBox([W.VBox([self.canvas, self.caption]), self.plot]), self.error_box])
        self.add_class("ll-attention-explorer")
        self.show(word=self.word_buttons.value)

    def _default_word(self) -> str:
        return next(iter(content_words(self.words)), self.words[0])

    def _layers_of(self, choice: str):
        if choice == "*":
            return None
        if choice.startswith("res:"):
            ds = self.tree[choice[4:]].to_dataset()
            return [str(v) for v in ds["layer"].values]
        return [choice]

    # ------------------------------------------------------------------ actions (also plain calls)
    @shows_errors
    def show(self, word: str | None = None, *, layers: str | None = None, steps: tuple[int, int] | None = None):
        """Draw the heat map of ``word`` with the layer choice (``"*"``, ``"res:16x16"`` or a layer name) and
        the step window ``(first, last)``; arguments left out keep the current choice."""
        if word is not None and word not in self.words:
            raise KeyError(f"word {word!r} is not in the prompt; its words: {self.words}")
        if layers is not None and layers not in self._layer_sets:
            raise KeyError(f"no layer choice {layers!r}; choices: {list(self._layer_sets)}")
        if steps is not None and not 0 <= steps[0] <= steps[1] <= self.steps.max:
            raise ValueError(f"step window must satisfy 0 <= first <= last <= {self.steps.max}, got {steps}")
        self._quiet = True  # move the controls without each of them redrawing
        try:
            if word is not None:
                self.word_buttons.value = word
            if layers is not None:
                self.filter.value = layers
            if steps is not None:
                self.steps.value = tuple(steps)
        finally:
            self._quiet = False
        w = self.word_buttons.value
        lo, hi = self.steps.value
        self.word = w
        self.heatmap = analysis.word_heatmap(self.run, w, layers=self._layer_sets[self.filter.value],
                                             steps=(lo, hi), size=(self.height, self.width), batch=self.batch)
        self._draw()
        self._caption()
        if self.location is not None:
            self._plot_location()
        return self.heatmap

    def _caption(self) -> None:
        lo, hi = self.steps.value
        where = (" · click the image for attention over time" if self.location is None else
                 f" · clicked (x={self.location[1]:.0f}, y={self.location[0]:.0f})")
        self.caption.value = f"<b>{self.word}</b> · {self.heatmap.attrs['layers']} layer(s) · steps {lo}–{hi}{where}"

    @shows_errors
    def click(self, x: float, y: float):
        """What image pixel ``(x, y)`` attended to over time (also what a click on the image does):
        returns ``[step, word]`` (:func:`analysis.attention_at`) and plots it."""
        self.location = (float(y), float(x))
        self.over_time = analysis.attention_at(self.run, y, x, layers=self._layer_sets[self.filter.value],
                                               batch=self.batch)
        self._plot_location()
        self._draw()
        self._caption()
        return self.over_time

    def _clicked(self, cx, cy):
        self.click(cx * self.width / self.size, cy * self.height / self.size)

    # ------------------------------------------------------------------ drawing
    def _overlay(self) -> np.ndarray:
        img = self.image if self.image.size == (self.width, self.height) else self.image.resize((self.width, self.height))
        mixed = Image.fromarray(blend(img, self.heatmap.values, alpha=self.alpha))
        resample = Image.NEAREST if self.size >= max(self.width, self.height) else Image.LANCZOS
        return np.asarray(mixed.resize((self.size, self.size), resample))

    def _draw(self) -> None:
        if self.heatmap is None:
            return
        self.overlay = self._overlay()
        with hold_canvas():
            self.canvas.clear()
            self.canvas.put_image_data(self.overlay, 0, 0)
            if self.location is not None:
                y, x = self.location
                cx, cy = (x + 0.5) * self.size / self.width, (y + 0.5) * self.size / self.height
                self.canvas.stroke_style = "#ffffff"
                self.canvas.line_width = 2
                self.canvas.stroke_circle(cx, cy, 6)
        self.version += 1

    def _plot_location(self) -> None:
        from matplotlib.figure import Figure  # no pyplot: no global figure state in a widget
        da = self.over_time
        fig = Figure(figsize=(4.2, 2.8), dpi=90)
        ax = fig.subplots()
        for w in da["word"].values:
            bold = str(w) == self.word_buttons.value
            ax.plot(da["step"].values, da.sel(word=w).values, lw=2.4 if bold else 1.0, alpha=1.0 if bold else 0.6,
                    label=str(w))
        y, x = self.location
        ax.set_title(f"attention at (x={x:.0f}, y={y:.0f}) over time", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("probability", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, ncol=2, loc="upper right")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        self.plot.value = buf.getvalue()
        self.plot.layout.display = None

