"""AttentionExplorer: click a word to see where it attended; click a pixel to see what it attended to.

    AttentionExplorer(run)        # a run sampled with recorders=[lab.AttentionRecorder()]

Words: the word buttons choose the heat map (:func:`analysis.word_heatmap`, drawn over the image with its
colour's opacity growing with the value, and a colour bar in attention probability); the scale is the
word's own maximum or one maximum shared by all words (so weak words look weak); the filter picks all
layers, one resolution or one layer, the head menu one head (runs recorded with ``heads="all"``), the step
window the steps averaged. A click on the image plots :func:`analysis.attention_at` there: each word's
attention over time.

Self-attention (runs recorded with ``AttentionRecorder(kind="both")``): a click on the image shows where
that pixel looked (:func:`analysis.self_attention_at`), with the same layer, head and step choices.
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

from ._base import ErrorsMixin, colourbar, css, forget_current_canvas, heat_overlay, shows_errors

CMAP = "inferno"


def _short(layer: str) -> str:
    return (layer.removeprefix("unet.").replace("down_blocks", "down").replace("up_blocks", "up")
            .replace(".attentions", ".attn").replace(".transformer_blocks", ".tb").replace("mid_block", "mid"))


class AttentionExplorer(ErrorsMixin, W.VBox):
    """``run``: a :class:`lab.Run` with recorded cross-attention; ``image``: what to draw the maps over
    (default the run's decoded image); ``size``: display size in screen pixels; ``batch``: which image;
    ``alpha``: the overlay's opacity at the top of the scale."""

    word = traitlets.Unicode("")
    version = traitlets.Int(0)  # increases with every redraw of the overlay

    def __init__(self, run, *, image=None, size: int = 256, batch: int = 0, alpha: float = 0.7,
                 raise_errors: bool | None = None):
        self._init_errors(raise_errors)
        tree = run.attention  # raises a clear ValueError when the run recorded no attention
        self.run, self.batch, self.size = run, int(batch), int(size)
        self.tree = tree
        self.words = analysis.words(run, batch=batch)
        if image is None:
            image = run.images[batch]
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        self.image = image.convert("RGB")
        self.height, self.width = int(run.settings["height"]), int(run.settings["width"])
        n_steps = len(run.steps)
        self.heatmap = None      # what the canvas shows: [y, x], attention probability
        self.scale_max = 1.0     # the top of the colour scale
        self.location = None     # (y, x) in image pixels of the last click
        self.over_time = None    # analysis.attention_at at that location
        self._shared_cache: dict = {}

        kinds = {"cross": [], "self": []}
        n_heads = 1
        for res, node in tree.children.items():
            ds = node.to_dataset()
            for kind in kinds:
                if kind in ds:
                    dim = "layer_self" if kind == "self" and "layer_self" in ds[kind].dims else "layer"
                    kinds[kind].append((res, [str(v) for v in ds[dim].values]))
                    n_heads = max(n_heads, ds[kind].sizes.get("head", 1))
        self.has_self = bool(kinds["self"])
        self._options = {k: self._layer_options(v) for k, v in kinds.items()}
        self._layers_by_kind = {k: {v: lay for _, v, lay in opts} for k, opts in self._options.items()}

        self.view = W.ToggleButtons(options=[("words (cross-attention)", "cross"), ("self-attention", "self")],
                                    value="cross", style={"button_width": "auto"},
                                    layout=W.Layout(display=None if self.has_self else "none"))
        self.word_buttons = W.ToggleButtons(options=self.words, value=self._default_word(),
                                            style={"button_width": "auto"})
        wide = W.Layout(width="330px")
        self.filter = W.Dropdown(options=[(label, v) for label, v, _ in self._options["cross"]], value="*",
                                 description="layers", layout=wide)
        self.heads = W.Dropdown(options=[("mean of heads", -1)] + [(f"head {h}", h) for h in range(n_heads)],
                                value=-1, description="heads", layout=W.Layout(width="230px"),
                                disabled=n_heads == 1)
        self.steps = W.IntRangeSlider(value=(0, max(n_steps - 1, 0)), min=0, max=max(n_steps - 1, 0),
                                      description="steps", continuous_update=False, layout=wide)
        self.scale = W.ToggleButtons(options=[("per-word scale", "word"), ("shared scale", "shared")], value="word",
                                     style={"button_width": "auto"},
                                     tooltip="per word: each map to its own maximum; shared: one maximum for all "
                                             "words, so a word that attends weakly looks weak")
        self.opacity = W.FloatSlider(value=float(alpha), min=0.0, max=1.0, step=0.05, description="overlay",
                                     continuous_update=False, layout=W.Layout(width="260px"))
        self.canvas = Canvas(width=self.size, height=self.size,
                             layout=W.Layout(width=f"{self.size}px", height=f"{self.size}px"))
        self.canvas.add_class("ll-attention-canvas")
        self.bar = W.HTML()
        self.bar.add_class("ll-attention-colourbar")
        self.plot = W.Image(format="png", layout=W.Layout(width="440px", display="none"))  # shown after a click
        self.plot.add_class("ll-attention-plot")
        self.caption = W.HTML(layout=W.Layout(max_width=f"{self.size + 60}px"))
        self._quiet = False  # set while show() moves the controls itself
        for control in (self.word_buttons, self.filter, self.steps, self.heads, self.scale, self.opacity):
            control.observe(lambda ch: None if self._quiet else self.show(), "value")
        self.view.observe(self._view_changed, "value")
        self.canvas.on_mouse_down(self._clicked)
        self.canvas.on_client_ready(lambda: self._draw())

        super().__init__([css(), W.HTML("<b>Attention explorer</b> · click a word, then a pixel"), self.view,
                          self.word_buttons, W.HBox([self.filter, self.heads, self.steps]),
                          W.HBox([self.scale, self.opacity]),
                          W.HBox([W.VBox([W.HBox([self.canvas, self.bar]), self.caption]), self.plot]),
                          self.error_box])
        self.add_class("ll-attention-explorer")
        self.show(word=self.word_buttons.value)

    @property
    def _layer_sets(self) -> dict:
        """The layer menu's values -> layer names (None: all) of the current view."""
        return self._layers_by_kind[self.view.value]

    @staticmethod
    def _layer_options(per_res) -> list[tuple[str, str, list | None]]:
        """(label, value, layer names or None for all) for the layer menu of one kind."""
        out = [("all layers", "*", None)]
        for res, layers in per_res:
            out.append((f"{res} ({len(layers)} layer{'s' * (len(layers) != 1)})", f"res:{res}", layers))
            out += [(f"  {_short(lay)}", lay, [lay]) for lay in layers]
        return out

    def _default_word(self) -> str:
        return next(iter(content_words(self.words)), self.words[0])

    def _view_changed(self, change) -> None:
        kind = change["new"]
        self._quiet = True
        try:
            self.filter.options = [(label, v) for label, v, _ in self._options[kind]]
            self.filter.value = "*"
        finally:
            self._quiet = False
        self.word_buttons.layout.display = None if kind == "cross" else "none"
        self.scale.layout.display = None if kind == "cross" else "none"
        # the over-time plot is the words view's; in the self-attention view it would show a stale pixel
        self.plot.layout.display = "none" if kind == "self" or self.over_time is None else None
        if kind == "self" and self.location is None:
            self.location = ((self.height - 1) / 2, (self.width - 1) / 2)  # the centre until a click
        self.show()

    # ------------------------------------------------------------------ actions (also plain calls)
    def _selection(self) -> dict:
        h = self.heads.value
        return dict(layers=self._layer_sets[self.filter.value], steps=tuple(self.steps.value),
                    heads=None if h < 0 else int(h))

    @shows_errors
    def show(self, word: str | None = None, *, layers: str | None = None, steps: tuple[int, int] | None = None,
             heads: int | None = None, scale: str | None = None, view: str | None = None):
        """Draw the heat map of ``word`` (or, in the self-attention ``view``, of the clicked pixel) with the layer
        choice (``"*"``, ``"res:16x16"`` or a layer name), the step window ``(first, last)``, ``heads`` (a head
        index, or -1 for their mean) and ``scale`` (``"word"`` or ``"shared"``); arguments left out keep the
        current choice. Returns the map ``[y, x]`` in attention probability."""
        if view is not None and view not in ("cross", "self"):
            raise ValueError(f"view must be 'cross' or 'self', got {view!r}")
        if view == "self" and not self.has_self:
            raise ValueError("this run recorded no self-attention; record it with lab.AttentionRecorder(kind='both')")
        if view is not None and view != self.view.value:
            self.view.value = view  # resets the layer menu to the view's layers
        kind = self.view.value
        if word is not None and word not in self.words:
            raise KeyError(f"word {word!r} is not in the prompt; its words: {self.words}")
        valid = [v for _, v, _ in self._options[kind]]
        if layers is not None and layers not in valid:
            raise KeyError(f"no layer choice {layers!r}; choices: {valid}")
        if steps is not None and not 0 <= steps[0] <= steps[1] <= self.steps.max:
            raise ValueError(f"step window must satisfy 0 <= first <= last <= {self.steps.max}, got {steps}")
        if heads is not None and heads not in [v for _, v in self.heads.options]:
            raise KeyError(f"no head {heads!r}; this run recorded {len(self.heads.options) - 1} head(s) (-1: mean)")
        if scale is not None and scale not in ("word", "shared"):
            raise ValueError(f"scale must be 'word' or 'shared', got {scale!r}")
        self._quiet = True  # move the controls without each of them redrawing
        try:
            for control, value in ((self.word_buttons, word), (self.filter, layers), (self.steps, steps),
                                   (self.heads, heads), (self.scale, scale)):
                if value is not None:
                    control.value = tuple(value) if control is self.steps else value
        finally:
            self._quiet = False
        sel = self._selection()
        self.word = self.word_buttons.value
        if kind == "cross":
            self.heatmap = analysis.word_heatmap(self.run, self.word, size=(self.height, self.width),
                                                 batch=self.batch, normalize=False, **sel)
            self.scale_max = self._shared_max(sel) if self.scale.value == "shared" else float(self.heatmap.max())
        else:
            y, x = self.location
            self.heatmap = analysis.self_attention_at(self.run, y, x, size=(self.height, self.width),
                                                      batch=self.batch, **sel)
            self.scale_max = float(self.heatmap.max())
        self._draw()
        self._caption()
        if kind == "cross" and self.location is not None:
            self._plot_location()
        return self.heatmap

    def _shared_max(self, sel: dict) -> float:
        key = (repr(sel["layers"]), sel["steps"], sel["heads"])
        if key not in self._shared_cache:
            self._shared_cache[key] = float(analysis.token_heatmaps(
                self.run, size=(self.height, self.width), batch=self.batch, normalize=False, **sel).max())
        return self._shared_cache[key]

    def _caption(self) -> None:
        lo, hi = self.steps.value
        head = "mean of heads" if self.heads.value < 0 else f"head {self.heads.value}"
        layers = self.heatmap.attrs["layers"]
        if self.view.value == "self":
            y, x = self.location
            self.caption.value = (f"self-attention of the pixel (x={x:.0f}, y={y:.0f}) · {layers} layer(s) · {head} · "
                                  f"steps {lo}–{hi} · click another pixel")
            return
        where = (" · click the image for attention over time" if self.location is None else
                 f" · clicked (x={self.location[1]:.0f}, y={self.location[0]:.0f})")
        scale = "shared by all words" if self.scale.value == "shared" else "this word's maximum"
        self.caption.value = (f"<b>{self.word}</b> · {layers} layer(s) · {head} · steps {lo}–{hi} · scale: {scale}"
                              f"{where}")

    @shows_errors
    def click(self, x: float, y: float):
        """The image pixel ``(x, y)`` (also what a click on the image does). Words view: what it attended to
        over time, ``[step, word]`` (:func:`analysis.attention_at`), plotted; self-attention view: where it
        looked, ``[y, x]`` (:func:`analysis.self_attention_at`), drawn."""
        if not (0 <= y < self.height and 0 <= x < self.width):
            raise ValueError(f"({x}, {y}) is outside the {self.width}x{self.height} image")
        self.location = (float(y), float(x))
        if self.view.value == "self":
            return self.show()
        sel = self._selection()
        self.over_time = analysis.attention_at(self.run, y, x, layers=sel["layers"], heads=sel["heads"],
                                               batch=self.batch)
        self._plot_location()
        self._draw()
        self._caption()
        return self.over_time

    def _clicked(self, cx, cy):
        self.click(min(cx * self.width / self.size, self.width - 1), min(cy * self.height / self.size, self.height - 1))

    # ------------------------------------------------------------------ drawing
    def _overlay(self) -> np.ndarray:
        img = self.image if self.image.size == (self.width, self.height) else self.image.resize((self.width, self.height))
        mixed = Image.fromarray(heat_overlay(img, self.heatmap.values, 0.0, self.scale_max,
                                             alpha=float(self.opacity.value), cmap=CMAP))
        resample = Image.NEAREST if self.size >= max(self.width, self.height) else Image.LANCZOS
        return np.asarray(mixed.resize((self.size, self.size), resample))

    def _draw(self) -> None:
        if self.heatmap is None:
            return
        self.overlay = self._overlay()
        label = "attention probability" if self.view.value == "cross" else "self-attention probability"
        self.bar.value = colourbar(CMAP, 0.0, self.scale_max, height=self.size, label=label)
        forget_current_canvas(self.canvas)
        with hold_canvas():
            self.canvas.clear()
            self.canvas.put_image_data(self.overlay, 0, 0)
            if self.location is not None:
                y, x = self.location
                cx, cy = (x + 0.5) * self.size / self.width, (y + 0.5) * self.size / self.height
                self.canvas.stroke_style = "#00e5ff"
                self.canvas.line_width = 2
                self.canvas.stroke_circle(cx, cy, 6)
        self.version += 1

    def _plot_location(self) -> None:
        from matplotlib.figure import Figure  # no pyplot: no global figure state in a widget
        da = self.over_time
        fig = Figure(figsize=(5.2, 2.9), dpi=90)
        ax = fig.subplots()
        from matplotlib import colormaps
        ax.set_prop_cycle(color=colormaps["tab20"].colors)  # up to 20 words without a repeated colour
        for w in da["word"].values:
            bold = str(w) == self.word_buttons.value
            ax.plot(da["step"].values, da.sel(word=w).values, lw=2.4 if bold else 1.0, alpha=1.0 if bold else 0.6,
                    label=str(w))
        y, x = self.location
        ax.set_title(f"attention at (x={x:.0f}, y={y:.0f}) over time", fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.set_ylabel("attention probability", fontsize=9)
        ax.tick_params(labelsize=8)
        # the legend beside the axes, never over the curves
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        self.plot.value = buf.getvalue()
        self.plot.layout.display = None
