"""ResidualViewer: how strongly each ControlNet block pushed the UNet, per step, and where.

    ResidualViewer(run)   # a run sampled with control=... and recorders=[lab.ResidualRecorder(maps=True)]

Left: the block x step chart of residual norms for one net (:func:`analysis.plot_residual_norms`) with
the chosen cell marked; right: the spatial channel-norm map of that block at that step
(:func:`analysis.residual_map`; needs ``ResidualRecorder(maps=True)``).
"""
from __future__ import annotations

import io

import ipywidgets as W
import numpy as np
import traitlets
from PIL import Image

import analysis

from ._base import ErrorsMixin, colourise, css, png, shows_errors


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
        self.net = W.Dropdown(options=self.nets, value=self.nets[0], description="net", layout=W.Layout(width="240px"))
        self.block = W.Dropdown(options=self._block_options(self.nets[0]), description="block",
                                layout=W.Layout(width="320px"))
        self.step = W.IntSlider(value=0, min=0, max=n_steps - 1, description="step", layout=W.Layout(width="380px"))
        self.chart = W.Image(format="png", layout=W.Layout(width="480px"))
        self.map = W.Image(format="png", layout=W.Layout(width=f"{self.size}px", height=f"{self.size}px"))
        self.map.add_class("ll-pixelated")
        self.caption = W.HTML()
        self._quiet = False  # set while show() moves the controls itself
        self.net.observe(self._net_changed, "value")
        self.block.observe(lambda ch: None if self._quiet else self.show(), "value")
        self.step.observe(lambda ch: None if self._quiet else self.show(), "value")
        super().__init__([css(), W.HBox([self.net, self.block]), self.step,
                          W.HBox([self.chart, W.VBox([self.map, self.caption])]), self.error_box])
        self.add_class("ll-residual-viewer")
        self.show()  # draws the chart and the map

    def _block_options(self, net: str):
        d = self.norms.sel(net=net)
        return [(f"{n} ({r})", i) for i, (n, r) in enumerate(zip(d["block_name"].values, d["resolution"].values))]

    def _net_changed(self, change) -> None:
        quiet, self._quiet = self._quiet, True
        try:
            self.block.options = self._block_options(change["new"])
            self.block.value = 0
        finally:
            self._quiet = quiet
        if not quiet:
            self.show()

    @shows_errors
    def show(self, net: str | None = None, block: int | str | None = None, step: int | None = None):
        """Show ``net``'s ``block`` (index or name) at ``step``; arguments left out keep the current choice.
        Returns the map ``[y, x]`` (or ``None`` when no maps were recorded)."""
        if net is not None and net not in self.nets:
            raise KeyError(f"no ControlNet {net!r} in this run; nets: {self.nets}")
        names = [str(n) for n in self.norms.sel(net=net or self.net.value)["block_name"].values]
        idx = names.index(block) if isinstance(block, str) and block in names else block
        if block is not None and (not isinstance(idx, (int, np.integer)) or not 0 <= idx < len(names)):
            raise KeyError(f"no block {block!r}; blocks: {names}")
        if step is not None and not 0 <= step <= self.step.max:
            raise IndexError(f"step {step} is out of range 0..{self.step.max}")
        self._quiet = True
        try:
            if net is not None:
                self.net.value = net
            if block is not None:
                self.block.value = int(idx)
            if step is not None:
                self.step.value = int(step)
        finally:
            self._quiet = False
        net, b, i = self.net.value, self.block.value, self.step.value
        value = float(self.norms.sel(net=net).isel(block=b, step=i))
        run_step = int(self.norms["step"][i])  # the slider walks the recorded steps; the run counts all
        self._draw_chart()
        if np.isnan(value):
            self.map.value = b""
            self.caption.value = f"step {run_step}: {net} added nothing (outside its start/end window)"
            self.version += 1
            return None
        if not self.has_maps:
            self.caption.value = f"norm {value:.3g} · record with <code>lab.ResidualRecorder(maps=True)</code> for maps"
            self.version += 1
            return None
        m = analysis.residual_map(self.run, net, b, run_step, batch=self.batch)
        img = Image.fromarray(colourise(m.values, "magma"))
        self.map.value = png(img)
        h, w = m.shape
        self.caption.value = f"norm {value:.3g} · map {w}x{h} · max {float(m.max()):.3g}"
        self.version += 1
        return m

    def _draw_chart(self) -> None:
        from matplotlib.figure import Figure
        fig = Figure(figsize=(5.6, 3.0), dpi=85)
        ax = fig.subplots()
        net = self.net.value
        # analysis.plot_residual_norms draws on the given axes; it calls ax.figure.colorbar, which works on a Figure
        analysis.plot_residual_norms(self.run, net, ax=ax, batch=self.batch)
        ax.add_patch(_rect(self.step.value, self.block.value))
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        self.chart.value = buf.getvalue()


def _rect(step: int, block: int):
    from matplotlib.patches import Rectangle
    return Rectangle((step - 0.5, block - 0.5), 1, 1, fill=False, edgecolor="#00e5ff", lw=2)
