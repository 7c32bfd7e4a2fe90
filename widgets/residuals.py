"""ResidualViewer: how strongly each ControlNet block pushed the UNet, per step, and where.

    ResidualViewer(run)   # a run sampled with control=... and recorders=[lab.ResidualRecorder(maps=True)]

Left: the block x step chart of residual norms for one net (:func:`analysis.plot_residual_norms`) with
the chosen cell marked; right: the spatial channel-norm map of that block at that step
(:func:`analysis.residual_map`; needs ``ResidualRecorder(maps=True)``), alone or over the generated image
or the condition, with a colour bar. It opens on the strongest cell among the finest-resolution blocks,
whose map shows the condition's shape best.
"""
from __future__ import annotations

import io

import ipywidgets as W
import numpy as np
import traitlets
from PIL import Image

import analysis
from analysis import short_block

from ._base import ErrorsMixin, colourbar, colourise, css, heat_overlay, png, shows_errors

CMAP = "magma"


def _control_image(run, net: str):
    """The condition image ``net`` was given (from the run's recipe), or None."""
    recipe = getattr(run, "recipe", None)
    controls = (recipe.args.get("control") if recipe is not None else None) or []
    for c in controls if isinstance(controls, (list, tuple)) else [controls]:
        if getattr(c, "net", None) == net:
            img = c.image
            return img.convert("RGB") if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img)).convert("RGB")
    return None


class ResidualViewer(ErrorsMixin, W.VBox):
    """``run``: a :class:`lab.Run` with recorded residuals; ``size``: display size of the map."""

    version = traitlets.Int(0)

    def __init__(self, run, *, size: int = 192, batch: int = 0, raise_errors: bool | None = None):
        self._init_errors(raise_errors)
        self.norms = analysis.residual_norms(run, batch=batch)  # clear error when none were recorded
        self.run, self.batch, self.size = run, int(batch), int(size)
        self.nets = [str(n) for n in self.norms["net"].values]
        self.has_maps = any(getattr(r, "map", None) is not None for s in run.steps for r in s.records.values())
        n_steps = self.norms.sizes["step"]
        self.net = W.Dropdown(options=self.nets, value=self.nets[0], description="net", layout=W.Layout(width="200px"))
        self.block = W.Dropdown(options=self._block_options(self.nets[0]), description="block",
                                layout=W.Layout(width="220px"))
        self.step = W.IntSlider(value=0, min=0, max=n_steps - 1, description="step", layout=W.Layout(width="380px"))
        over = [("map alone", "map"), ("over the image", "image")]
        if any(_control_image(run, n) is not None for n in self.nets):
            over.append(("over the condition", "condition"))
        self.over = W.ToggleButtons(options=over, value="map", style={"button_width": "auto"})
        self.chart = W.Image(format="png", layout=W.Layout(width="520px"))
        self.map = W.Image(format="png", layout=W.Layout(width=f"{self.size}px", height=f"{self.size}px"))
        self.map.add_class("ll-pixelated")
        self.bar = W.HTML()
        self.caption = W.HTML(layout=W.Layout(max_width=f"{self.size + 70}px"))
        self._quiet = False  # set while show() moves the controls itself
        self.net.observe(self._net_changed, "value")
        for control in (self.block, self.step, self.over):
            control.observe(lambda ch: None if self._quiet else self.show(), "value")
        super().__init__([css(), W.HTML("<b>ControlNet residuals</b> · what each block added to the UNet, per step"),
                          W.HBox([self.net, self.block, self.step]), self.over,
                          W.HBox([self.chart, W.VBox([W.HBox([self.map, self.bar]), self.caption])]),
                          self.error_box])
        self.add_class("ll-residual-viewer")
        self.show(**self._strongest(self.nets[0]))

    def _strongest(self, net: str) -> dict:
        """The strongest (block, step) among the blocks of the finest resolution of ``net``."""
        d = self.norms.sel(net=net)
        res = [str(r) for r in d["resolution"].values]
        pixels = [int(np.prod([int(v) for v in r.split("x")])) if "x" in r else 0 for r in res]
        finest = [i for i, p in enumerate(pixels) if p == max(pixels)]
        vals = np.nan_to_num(d.transpose("block", "step").values[finest], nan=-np.inf)
        b, i = np.unravel_index(int(np.argmax(vals)), vals.shape)
        return dict(block=int(finest[b]), step=int(i))

    def _block_options(self, net: str):
        d = self.norms.sel(net=net)
        return [(f"{short_block(n)} · {r}", i) for i, (n, r) in enumerate(zip(d["block_name"].values, d["resolution"].values))]

    def _net_changed(self, change) -> None:
        quiet, self._quiet = self._quiet, True
        try:
            self.block.options = self._block_options(change["new"])
            best = self._strongest(change["new"])
            self.block.value, self.step.value = best["block"], best["step"]
        finally:
            self._quiet = quiet
        if not quiet:
            self.show()

    @shows_errors
    def show(self, net: str | None = None, block: int | str | None = None, step: int | None = None,
             over: str | None = None):
        """Show ``net``'s ``block`` (index or name) at ``step``, drawn ``over`` ``"map"`` (alone), ``"image"`` or
        ``"condition"``; arguments left out keep the current choice. Returns the map ``[y, x]`` (or ``None``
        when no maps were recorded)."""
        if net is not None and net not in self.nets:
            raise KeyError(f"no ControlNet {net!r} in this run; nets: {self.nets}")
        names = [str(n) for n in self.norms.sel(net=net or self.net.value)["block_name"].values]
        idx = names.index(block) if isinstance(block, str) and block in names else block
        if block is not None and (not isinstance(idx, (int, np.integer)) or not 0 <= idx < len(names)):
            raise KeyError(f"no block {block!r}; blocks: {names}")
        if step is not None and not 0 <= step <= self.step.max:
            raise IndexError(f"step {step} is out of range 0..{self.step.max}")
        if over is not None and over not in [v for _, v in self.over.options]:
            raise ValueError(f"over must be one of {[v for _, v in self.over.options]}, got {over!r}")
        self._quiet = True
        try:
            if net is not None:
                self.net.value = net
                self.block.options = self._block_options(net)
            if block is not None:
                self.block.value = int(idx)
            if step is not None:
                self.step.value = int(step)
            if over is not None:
                self.over.value = over
        finally:
            self._quiet = False
        net, b, i = self.net.value, self.block.value, self.step.value
        value = float(self.norms.sel(net=net).isel(block=b, step=i))
        run_step = int(self.norms["step"][i])  # the slider walks the recorded steps; the run counts all
        self._draw_chart()
        name = short_block(names[b])
        if np.isnan(value):
            self.map.value = b""
            self.bar.value = ""
            self.caption.value = f"step {run_step}: {net} added nothing (outside its start/end window)"
            self.version += 1
            return None
        if not self.has_maps:
            self.caption.value = f"norm {value:.3g} · record with <code>lab.ResidualRecorder(maps=True)</code> for maps"
            self.version += 1
            return None
        m = analysis.residual_map(self.run, net, b, run_step, batch=self.batch)
        hi = float(m.max())
        h, w = m.shape
        self.map.value = png(self._picture(m.values, hi, net))
        self.bar.value = colourbar(CMAP, 0.0, hi, height=self.size, label="channel norm")
        what = {"map": "", "image": " · over the image", "condition": " · over the condition"}[self.over.value]
        self.caption.value = (f"<b>{net}</b> · {name} ({w}x{h}) · step {run_step} · norm {value:.3g}{what}")
        self.version += 1
        return m

    def _picture(self, m: np.ndarray, hi: float, net: str) -> np.ndarray:
        if self.over.value == "map":
            return colourise(m, CMAP, 0.0, hi)
        base = self.run.images[self.batch] if self.over.value == "image" else _control_image(self.run, net)
        if base is None:  # this net's condition is not in the run's recipe
            return colourise(m, CMAP, 0.0, hi)
        H, W_ = int(self.run.settings["height"]), int(self.run.settings["width"])
        heat = np.asarray(Image.fromarray(m.astype(np.float32)).resize((W_, H), Image.BICUBIC)).clip(0)
        return heat_overlay(base.convert("RGB").resize((W_, H)), heat, 0.0, hi, alpha=0.75, cmap=CMAP)

    def _draw_chart(self) -> None:
        from matplotlib.figure import Figure
        fig = Figure(figsize=(6.2, 3.4), dpi=85)
        ax = fig.subplots()
        net = self.net.value
        # analysis.plot_residual_norms draws on the given axes; it calls ax.figure.colorbar, which works on a Figure
        analysis.plot_residual_norms(self.run, net, ax=ax, batch=self.batch)
        ax.tick_params(axis="x", labelsize=9)
        ax.add_patch(_rect(self.step.value, self.block.value))
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        self.chart.value = buf.getvalue()


def _rect(step: int, block: int):
    from matplotlib.patches import Rectangle
    return Rectangle((step - 0.5, block - 0.5), 1, 1, fill=False, edgecolor="#00e5ff", lw=2)
