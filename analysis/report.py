"""An HTML report of one recorded run: the image, the trajectory of x0 estimates, word heat maps,
ControlNet residual norms and the settings. Used by ``make demo`` (``python -m lab demo``)."""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
from PIL import Image

from lab.conditioning.text import content_words


def _save_fig(fig, path: Path) -> str:
    fig.savefig(path, dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path.name


def write_report(run, out_dir, *, condition=None, title: str = "latent-lab run", seconds: float | None = None,
                 n_trajectory: int = 10) -> Path:
    """Write ``report.html`` and its PNGs into ``out_dir``; returns the HTML path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .attention import plot_heatmaps
    from .controlnet import plot_residual_norms
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    big = run.image.resize((256, 256), Image.NEAREST)
    big.save(out / "image.png")
    row = '<img src="image.png" width=256 title="final image">'
    if condition is not None:
        Image.fromarray(np.asarray(condition)).resize((256, 256), Image.NEAREST).save(out / "condition.png")
        row = '<img src="condition.png" width=256 title="condition"> ' + row
    parts.append(f"<h2>Result</h2><p>{row}</p>")

    n = len(run)
    picks = sorted(set(np.linspace(0, n - 1, min(n_trajectory, n)).round().astype(int).tolist()))
    fig, axs = plt.subplots(2, len(picks), figsize=(1.3 * len(picks), 2.9), squeeze=False)
    for j, k in enumerate(picks):
        axs[0, j].imshow(run.decode(k)[0])
        axs[0, j].set_title(f"step {k}\nt={run.steps[k].timestep:.0f}", fontsize=7)
        axs[1, j].imshow(run.preview(k, which="latents"))
        for a in axs[:, j]:
            a.set_axis_off()
    axs[0, 0].text(-0.3, 0.5, "decoded x0", transform=axs[0, 0].transAxes, rotation=90, va="center", fontsize=7)
    axs[1, 0].text(-0.3, 0.5, "x_t preview", transform=axs[1, 0].transAxes, rotation=90, va="center", fontsize=7)
    parts.append(f'<h2>Trajectory</h2><p>The model\'s x0 estimate (VAE-decoded pred_x0) and the noisy latent x_t '
                 f'(linear preview) at {len(picks)} of {n} steps.</p><img src="{_save_fig(fig, out / "trajectory.png")}">')

    if run.has_attention():
        words = content_words(run.attention[next(iter(run.attention.children))]["word"].isel(batch=0).values)
        axes = plot_heatmaps(run, words)
        parts.append("<h2>Word heat maps</h2><p>Cross-attention of each word, all layers and steps, upsampled to "
                     "the image (DAAM); colours stretched per map.</p>"
                     f'<img src="{_save_fig(np.atleast_1d(axes)[0].figure, out / "heatmaps.png")}">')
    if "residuals" in run.recording_meta:
        for net in run.residuals["net"].values:
            ax = plot_residual_norms(run, str(net))
            parts.append(f"<h2>ControlNet residuals: {html.escape(str(net))}</h2>"
                         f'<img src="{_save_fig(ax.figure, out / f"residuals-{net}.png")}">')
    settings = {k: v for k, v in run.settings.items() if v not in (None, [], {})}
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(json.dumps(v, default=str))}</td></tr>"
                   for k, v in sorted(settings.items()))
    took = f"<p>Sampling and recording took {seconds:.1f} s.</p>" if seconds is not None else ""
    parts.append(f"<h2>Settings</h2>{took}<table>{rows}</table>")
    page = (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{image-rendering:pixelated}"
            "td{padding:2px 10px;border-bottom:1px solid #ddd;font-size:13px}</style>"
            f"<h1>{html.escape(title)}</h1>" + "".join(parts))
    path = out / "report.html"
    path.write_text(page)
    return path
