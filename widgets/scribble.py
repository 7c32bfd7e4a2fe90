"""ScribblePad: draw a ControlNet condition with the mouse, a pen or a finger, right in a cell.

The strokes live in Python (``pad.strokes``, in model pixels) and are rasterised here with PIL, so the
condition image never depends on the browser. The canvas (an ipycanvas ``MultiCanvas``: background,
strokes, cursor) is only a view: it echoes the stroke being drawn and then shows the exact rasterised
condition; a view that (re)connects is redrawn from the Python state.

    pad = ScribblePad(size=64, scale=4)       # or ScribblePad.for_pipeline(pipe)
    pad                                        # draw
    pad.image, pad.array                       # the condition (PIL RGB, uint8 [H, W, 3])
    pad.add_stroke([(10, 10), (50, 40)])       # the same as drawing, from code
"""
from __future__ import annotations

from dataclasses import dataclass

import ipywidgets as W
import numpy as np
import traitlets
from ipycanvas import MultiCanvas, hold_canvas
from PIL import Image, ImageColor, ImageDraw

from ._base import ErrorsMixin, css, forget_current_canvas, shows_errors

SUPERSAMPLE = 4  # strokes are drawn at 4x and box-filtered, like the shapes world's scribbles
COVERAGE = 96 / 255  # a pixel belongs to a stroke when the stroke covers this much of it (the world's threshold)


@dataclass(frozen=True)
class Stroke:
    """One stroke in model pixels: ``points`` ``((x, y), ...)``, ``width`` (pixels), ``color`` RGB;
    ``erase`` strokes paint the empty colour (black) instead."""

    points: tuple[tuple[float, float], ...]
    width: float = 2.0
    color: tuple[int, int, int] = (255, 255, 255)
    erase: bool = False


def rasterise(strokes, size: tuple[int, int], base: np.ndarray | None = None) -> np.ndarray:
    """Strokes over ``base`` (``uint8 [H, W, 3]``, default black) -> ``uint8 [H, W, 3]``. Each stroke is
    drawn as a round-jointed polyline at 4x, box-filtered to the model size, and the pixels it covers
    (>= 96/255) take its colour, later strokes over earlier ones."""
    w, h = size
    out = np.zeros((h, w, 3), np.uint8) if base is None else np.array(base, dtype=np.uint8, copy=True)
    s = SUPERSAMPLE
    for st in strokes:
        mask = Image.new("L", (w * s, h * s), 0)
        draw = ImageDraw.Draw(mask)
        pts = [((x + 0.5) * s - 0.5, (y + 0.5) * s - 0.5) for x, y in st.points]  # pixel centres
        lw = max(1, int(round(st.width * s)))
        if len(pts) > 1:
            draw.line(pts, fill=255, width=lw, joint="curve")
        r = lw / 2
        for x, y in (pts[0], pts[-1]):  # round caps (PIL lines have square-cut ends)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
        cover = np.asarray(mask.resize((w, h), Image.BOX), dtype=np.float32) / 255.0 >= COVERAGE
        out[cover] = (0, 0, 0) if st.erase else st.color
    return out


class ScribblePad(ErrorsMixin, W.VBox):
    """A drawing pad for ControlNet conditions. ``size``: the model's image size (int or ``(w, h)``);
    ``scale``: screen pixels per model pixel; ``brush``: stroke width in model pixels; ``color``: pen colour
    (white for scribbles; class colours for segmentation maps). ``version`` increases with every change:
    ``pad.observe(callback, "version")`` to react to new strokes."""

    version = traitlets.Int(0)
    tool = traitlets.Unicode("pen")
    brush = traitlets.Float(2.0)
    color = traitlets.Unicode("#ffffff")

    def __init__(self, size=64, *, scale: int = 4, brush: float = 2.0, color: str = "#ffffff", background=None,
                 background_is_condition: bool = False, raise_errors: bool | None = None):
        w, h = (size, size) if isinstance(size, int) else tuple(size)
        if w < 1 or h < 1 or scale < 1:
            raise ValueError(f"size and scale must be positive, got size={size!r}, scale={scale!r}")
        self._init_errors(raise_errors)
        self.size = (int(w), int(h))
        self.scale = int(scale)
        self._strokes: list[Stroke] = []
        self._redo: list[Stroke] = []
        self._current: list[tuple[float, float]] | None = None
        self._background: np.ndarray | None = None
        self._background_is_condition = False
        self._cache: np.ndarray | None = None
        self._hint_shown = False

        cw, ch = w * self.scale, h * self.scale
        self.canvas = MultiCanvas(3, width=cw, height=ch, layout=W.Layout(width=f"{cw}px", height=f"{ch}px"))
        self.canvas.add_class("ll-scribble-canvas")
        self._tool = W.ToggleButtons(options=[("✎ pen", "pen"), ("⌫ eraser", "eraser")], value="pen",
                                     style={"button_width": "auto"})
        self._brush = W.FloatSlider(value=brush, min=0.5, max=12, step=0.5, description="brush",
                                    style={"description_width": "44px"}, layout=W.Layout(width="180px"))
        self._color = W.ColorPicker(value=color, concise=True, description="colour", style={"description_width": "44px"},
                                    layout=W.Layout(width="100px"))
        self._undo = W.Button(description="undo", icon="undo", layout=W.Layout(width="70px"))
        self._clear = W.Button(description="clear", icon="trash", layout=W.Layout(width="70px"))
        self.status = W.Label()
        traitlets.link((self._tool, "value"), (self, "tool"))
        traitlets.link((self._brush, "value"), (self, "brush"))
        traitlets.link((self._color, "value"), (self, "color"))
        self._undo.on_click(lambda _: self.undo())
        self._clear.on_click(lambda _: self.clear())

        self.canvas.on_mouse_down(self._down)
        self.canvas.on_mouse_move(self._move)
        self.canvas.on_mouse_up(self._up)
        self.canvas.on_mouse_out(self._up)
        self.canvas.on_touch_start(lambda touches: self._down(*touches[0]))
        self.canvas.on_touch_move(lambda touches: self._move(*touches[0]))
        self.canvas.on_touch_end(lambda touches: self._finish())
        self.canvas.on_touch_cancel(lambda touches: self._finish())
        self.canvas.on_client_ready(self.redraw)  # a new or reloaded view starts empty: redraw it

        wrap = W.Layout(flex_flow="row wrap")  # a narrow column wraps the tools instead of scrolling them
        super().__init__([css(), W.HBox([self._tool, self._undo, self._clear], layout=wrap),
                          W.HBox([self._brush, self._color], layout=wrap), self.canvas, self.status, self.error_box])
        if background is not None:
            self.set_background(background, as_condition=background_is_condition)
        else:
            self.redraw()
        self._status()

    @classmethod
    def for_pipeline(cls, pipe, **kwargs) -> "ScribblePad":
        """A pad at ``pipe``'s default image size."""
        return cls(pipe.default_size, **kwargs)

    # ------------------------------------------------------------------ state
    @property
    def strokes(self) -> tuple[Stroke, ...]:
        return tuple(self._strokes)

    @property
    def array(self) -> np.ndarray:
        """The condition, ``uint8 [H, W, 3]``: the strokes over black (or over the background when it is
        the condition)."""
        if self._cache is None:
            base = self._background if self._background_is_condition else None
            self._cache = rasterise(self._strokes, self.size, base)
        return self._cache.copy()

    @property
    def image(self) -> Image.Image:
        return Image.fromarray(self.array)

    def _changed(self) -> None:
        self._cache = None
        self.version += 1
        if self._hint_shown != self._wants_hint():
            self.redraw()
        self._status()

    def _status(self) -> None:
        n = len(self._strokes)
        if not n:
            self.status.value = f"draw on the pad with the mouse: the ControlNet follows it · {self.size[0]}x{self.size[1]}"
            return
        self.status.value = f"{n} stroke{'s' * (n != 1)} · {int((self.array.max(-1) > 0).sum())} px set · " \
                            f"{self.size[0]}x{self.size[1]}"

    def _wants_hint(self) -> bool:
        return not self._strokes and self._background is None

    # ------------------------------------------------------------------ actions (also plain calls)
    def add_stroke(self, points, *, width: float | None = None, color: str | tuple | None = None,
                   erase: bool | None = None) -> Stroke:
        """Add a stroke given in model pixels ``[(x, y), ...]`` (one point makes a dot)."""
        pts = tuple((float(x), float(y)) for x, y in points)
        if not pts:
            raise ValueError("a stroke needs at least one point")
        if not all(np.isfinite(pts).ravel()):
            raise ValueError("stroke points must be finite numbers")
        width = self.brush if width is None else float(width)
        if not width > 0:
            raise ValueError(f"stroke width must be positive, got {width}")
        rgb = _rgb(self.color if color is None else color)
        st = Stroke(pts, width, rgb, self.tool == "eraser" if erase is None else bool(erase))
        self._strokes.append(st)
        self._redo.clear()
        self._changed()
        self._draw_raster()
        return st

    def undo(self) -> Stroke | None:
        """Remove the last stroke (returns it, or ``None`` when there is none)."""
        if not self._strokes:
            return None
        st = self._strokes.pop()
        self._redo.append(st)
        self._changed()
        self._draw_raster()
        return st

    def redo(self) -> Stroke | None:
        if not self._redo:
            return None
        self._strokes.append(self._redo.pop())
        self._changed()
        self._draw_raster()
        return self._strokes[-1]

    def clear(self) -> None:
        """Remove every stroke (the background stays)."""
        self._strokes.clear()
        self._redo.clear()
        self._changed()
        self._draw_raster()

    def set_strokes(self, strokes) -> None:
        """Replace the strokes (e.g. from another pad, or a saved list)."""
        strokes = [s if isinstance(s, Stroke) else Stroke(**s) for s in strokes]
        self._strokes = list(strokes)
        self._redo.clear()
        self._changed()
        self._draw_raster()

    @shows_errors
    def set_background(self, image, *, as_condition: bool = False) -> None:
        """Show ``image`` under the strokes (PIL or ``uint8 [H, W(, 3)]`` at the model size), e.g. a photo to
        trace or a preprocessor's output. ``as_condition``: the image is part of the condition (strokes and
        the eraser edit it); otherwise it is only a guide and the condition is the strokes on black."""
        if image is None:
            self._background, self._background_is_condition = None, False
        else:
            arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
            if arr.ndim == 2:
                arr = np.repeat(arr[..., None], 3, axis=2)
            if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
                raise TypeError(f"background must be a PIL image or uint8 [H, W] / [H, W, 3], got "
                                f"{arr.dtype} {arr.shape}")
            if arr.shape[:2] != (self.size[1], self.size[0]):
                raise ValueError(f"background is {arr.shape[1]}x{arr.shape[0]} but the pad is "
                                 f"{self.size[0]}x{self.size[1]}; resize it first")
            self._background, self._background_is_condition = arr.copy(), bool(as_condition)
        self._changed()
        self.redraw()

    # ------------------------------------------------------------------ events (canvas pixels)
    def _model_xy(self, x: float, y: float) -> tuple[float, float]:
        return (min(max(x / self.scale - 0.5, -0.5), self.size[0] - 0.5),
                min(max(y / self.scale - 0.5, -0.5), self.size[1] - 0.5))

    @shows_errors
    def _down(self, x, y):
        self._current = [self._model_xy(x, y)]
        self._echo(self._current[-1], self._current[-1])

    @shows_errors
    def _move(self, x, y):
        self._draw_cursor(x, y)
        if self._current is None:
            return
        p = self._model_xy(x, y)
        if p != self._current[-1]:
            self._echo(self._current[-1], p)
            self._current.append(p)

    @shows_errors
    def _up(self, x, y):
        if self._current is not None and self._model_xy(x, y) != self._current[-1]:
            self._current.append(self._model_xy(x, y))  # where the button was released ends the stroke
        self._finish()

    @shows_errors
    def _finish(self):
        if self._current is None:
            return
        pts, self._current = self._current, None
        self.add_stroke(pts)

    # ------------------------------------------------------------------ drawing (views only)
    def _echo(self, a, b) -> None:
        """Draw the stroke being made, segment by segment, until its exact raster replaces it."""
        layer = self.canvas[1]
        s = self.scale
        erase = self.tool == "eraser"
        layer.stroke_style = "#000000" if erase else self.color
        layer.line_width = max(1.0, self.brush * s)
        layer.line_cap = "round"
        layer.stroke_line((a[0] + 0.5) * s, (a[1] + 0.5) * s, (b[0] + 0.5) * s, (b[1] + 0.5) * s)

    def _draw_cursor(self, x, y) -> None:
        layer = self.canvas[2]
        with hold_canvas():
            layer.clear()
            layer.stroke_style = "#888888"
            layer.line_width = 1
            layer.stroke_circle(x, y, max(1.0, self.brush * self.scale / 2))

    def _upscaled(self, arr: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(arr, self.scale, axis=0), self.scale, axis=1)

    def _draw_raster(self) -> None:
        """The strokes layer shows the exact condition: stroke pixels opaque, the rest transparent
        (unless the background is the condition, then it is all opaque)."""
        arr = self.array
        alpha = np.full(arr.shape[:2], 255, np.uint8)
        if not self._background_is_condition:
            alpha[arr.max(-1) == 0] = 0
            if self._background is None and not self._hint_shown:
                alpha[:] = 255  # on a black pad, black is what the model sees (the same black as the pad's)
        rgba = np.concatenate([arr, alpha[..., None]], axis=2)
        with hold_canvas():
            self.canvas[1].clear()
            self.canvas[1].put_image_data(self._upscaled(rgba), 0, 0)

    def redraw(self, *_) -> None:
        """Draw every layer from the Python state (called when a view connects)."""
        forget_current_canvas(self.canvas[0])
        with hold_canvas():
            bg = self.canvas[0]
            bg.clear()
            if self._background is not None:
                shown = self._background if self._background_is_condition else (
                    self._background.astype(np.float32) * 0.6).astype(np.uint8)  # dimmed: a guide, not the condition
                bg.put_image_data(self._upscaled(shown), 0, 0)
            else:
                bg.fill_style = "#000000"
                bg.fill_rect(0, 0, self.size[0] * self.scale, self.size[1] * self.scale)
            self._hint_shown = self._wants_hint()
            if self._hint_shown:  # on the screen only: the condition (self.array) stays black
                bg.fill_style = "#777777"
                bg.font = "16px sans-serif"
                bg.text_align = "center"
                bg.fill_text("draw here", self.size[0] * self.scale / 2, self.size[1] * self.scale / 2)
            self.canvas[2].clear()
        self._draw_raster()


def _rgb(color) -> tuple[int, int, int]:
    if isinstance(color, str):
        try:
            return tuple(ImageColor.getrgb(color)[:3])
        except ValueError:
            raise ValueError(f"unknown colour {color!r}; use a name or '#rrggbb'") from None
    rgb = tuple(int(c) for c in color)
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ValueError(f"colour must be 3 values in 0..255, got {color!r}")
    return rgb
