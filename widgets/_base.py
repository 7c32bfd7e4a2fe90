"""What every latent-lab widget shares: image encoding, colour maps, and errors shown in the widget."""
from __future__ import annotations

import functools
import html
import io
import os
import traceback

import ipywidgets as W
import numpy as np
from PIL import Image

# Frames are sent at the model's resolution and scaled up by the browser; nearest-neighbour keeps a
# 16x16 latent preview readable instead of a blur.
_CSS = ("<style>.ll-pixelated img, img.ll-pixelated { image-rendering: pixelated; }"
        ".ll-error { color: #b00020; background: #fdecea; padding: 4px 8px; border-radius: 4px; "
        "white-space: pre-wrap; font-family: monospace; font-size: 12px; }"
        # a range slider's readout ("0.00 – 1.00") is wider than ipywidgets' readout box: let it show whole
        ".ll-studio .widget-readout, .ll-edit .widget-readout, .ll-attention-explorer .widget-readout "
        "{ overflow: visible; max-width: none; min-width: 80px; }</style>")


def css() -> W.HTML:
    """An invisible widget carrying the stylesheet the widgets use (one per widget tree)."""
    return W.HTML(_CSS, layout=W.Layout(height="0px", margin="0px"))


def png(image) -> bytes:
    """PNG bytes of a PIL image or a ``uint8`` array ``[h, w]`` / ``[h, w, 3|4]``."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # speed over size: frames are small already
    return buf.getvalue()


def colourise(values: np.ndarray, cmap: str = "magma", lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """A float map ``[h, w]`` -> ``uint8 [h, w, 3]`` through a matplotlib colour map (min..max unless given)."""
    from matplotlib import colormaps
    v = np.asarray(values, dtype=np.float32)
    lo = float(v.min()) if lo is None else lo
    hi = float(v.max()) if hi is None else hi
    t = (v - lo) / max(hi - lo, 1e-12)
    rgba = colormaps[cmap](np.clip(t, 0, 1))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def channel_tiles(x: np.ndarray) -> np.ndarray:
    """Latent channels ``[c, h, w]`` as one gray ``uint8`` mosaic (2 columns for 4 channels), each channel
    mapped from ``[-m, m]`` with ``m`` its largest magnitude, so 0 is mid-gray."""
    c, h, w = x.shape
    cols = int(np.ceil(np.sqrt(c)))
    rows = int(np.ceil(c / cols))
    out = np.full((rows * h + rows - 1, cols * w + cols - 1), 255, np.uint8)  # 1-px white gutters
    for i in range(c):
        m = float(np.abs(x[i]).max()) or 1.0
        tile = ((x[i] / m + 1) * 127.5).clip(0, 255).astype(np.uint8)
        r, q = divmod(i, cols)
        out[r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = tile
    return out


def forget_current_canvas(canvas) -> None:
    """Make ipycanvas name the canvas again before its next command. ipycanvas sends a canvas's commands
    through one manager that remembers, on both sides, which canvas it drew on last, and only says so when
    that changes; a reloaded page has a new manager that remembers none, so drawing on the canvas the kernel
    drew on last goes nowhere (ipycanvas issue #322). Call before drawing on a canvas whose views may have
    been rebuilt."""
    manager = getattr(canvas, "_canvas_manager", None)
    if manager is not None:
        manager._current_canvas = None


def heat_overlay(image, heat: np.ndarray, lo: float, hi: float, *, alpha: float = 0.7, cmap: str = "inferno") -> np.ndarray:
    """``heat`` ``[H, W]`` over ``image`` (PIL/array ``[H, W, 3]``) with its colour's opacity growing with the
    value (``alpha`` at ``hi``, none at ``lo``): the image stays readable where the map is low, unlike a
    uniform blend. Returns ``uint8 [H, W, 3]``."""
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    h = np.asarray(heat, dtype=np.float32)
    t = np.clip((h - lo) / max(hi - lo, 1e-12), 0, 1)[..., None]
    col = colourise(h, cmap, lo, max(hi, lo + 1e-12)).astype(np.float32)
    a = alpha * t
    return ((1 - a) * img + a * col).round().clip(0, 255).astype(np.uint8)


def colourbar(cmap: str, lo: float, hi: float, *, height: int = 256, label: str = "") -> str:
    """HTML of a vertical colour bar for ``cmap`` from ``lo`` (bottom) to ``hi`` (top), with three ticks."""
    from matplotlib import colormaps
    cm = colormaps[cmap]
    stops = ", ".join(f"rgb({int(r * 255)},{int(g * 255)},{int(b * 255)}) {100 * i / 10:.0f}%"
                      for i, (r, g, b, _) in enumerate(cm(np.linspace(1, 0, 11))))
    ticks = "".join(f"<span>{v:.2g}</span>" for v in (hi, (lo + hi) / 2, lo))
    title = f"<div class='ll-colourbar-label'>{html.escape(label)}</div>" if label else ""
    return (f"<div class='ll-colourbar' style='display:flex;gap:4px;align-items:stretch;font-size:11px;"
            f"line-height:11px'><div style='width:12px;height:{height}px;border:1px solid #888;"
            f"background:linear-gradient(to bottom, {stops})'></div><div style='display:flex;flex-direction:column;"
            f"justify-content:space-between;height:{height}px'>{ticks}</div>"
            f"<div style='writing-mode:vertical-rl;transform:rotate(180deg);text-align:center;color:#555'>"
            f"{title}</div></div>")


def _default_raise() -> bool:
    return "PYTEST_CURRENT_TEST" in os.environ or os.environ.get("LATENT_LAB_RAISE_WIDGET_ERRORS", "") == "1"


class ErrorBox(W.HTML):
    """Where a widget shows what went wrong in a callback. Hidden while there is no error."""

    def __init__(self):
        super().__init__(value="", layout=W.Layout(display="none"))
        self.errors: list[BaseException] = []

    def show(self, exc: BaseException) -> None:
        self.errors.append(exc)
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        self.value = f'<div class="ll-error">{html.escape(last)}</div>'
        self.layout.display = None

    def clear(self) -> None:
        self.value = ""
        self.layout.display = "none"


def shows_errors(method):
    """Decorate a widget method that runs as a callback: an exception is shown in ``self.error_box``
    (and kept in ``self.errors``); it is re-raised when ``self.raise_errors`` is true, which is the default
    under pytest or with ``LATENT_LAB_RAISE_WIDGET_ERRORS=1``, so tests see the real error."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - shown to the user, re-raised under tests
            self.error_box.show(exc)
            if self.raise_errors:
                raise
            return None

    return wrapper


class ErrorsMixin:
    """``error_box`` (an :class:`ErrorBox` to place in the layout), ``errors`` and ``raise_errors``."""

    def _init_errors(self, raise_errors: bool | None) -> None:
        self.error_box = ErrorBox()
        self.raise_errors = _default_raise() if raise_errors is None else bool(raise_errors)

    @property
    def errors(self) -> list[BaseException]:
        return self.error_box.errors
