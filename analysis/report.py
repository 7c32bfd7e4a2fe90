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


SUMMARY_KEYS = (("prompt", "prompt"), ("negative_prompt", "negative prompt"), ("num_steps", "steps"),
                ("guidance", "guidance scale"), ("scheduler", "scheduler"), ("seed", "seed"), ("height", "height"),
                ("width", "width"), ("model", "model"), ("device", "device"), ("dtype", "dtype"))


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], str):
        return ", ".join(v)
    return str(v)


def _figure(src: str, caption: str, width: int | None = None) -> str:
    w = f" width={width}" if width else ""
    return (f'<figure><img src="{src}"{w} alt="{html.escape(caption)}"><figcaption>{caption}</figcaption></figure>')


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
    st = run.settings
    parts = ["<p class=lead>One run of the sampler with everything recorded: the result, how the model's estimate "
             "of the final image formed step by step, where each word of the prompt attended, and how strongly the "
             "ControlNet steered. Every figure is drawn from <code>run.zarr</code> beside this page "
             "(<code>lab.Run.load</code>).</p>"]
    big = run.image.resize((256, 256), Image.NEAREST)
    big.save(out / "image.png")
    figs = [_figure("image.png", f"<b>result</b>: “{html.escape(str(st.get('prompt', '')))}”, "
                    f"{st.get('num_steps')} steps, seed {st.get('seed')}", 256)]
    if condition is not None:
        Image.fromarray(np.asarray(condition)).resize((256, 256), Image.NEAREST).save(out / "condition.png")
        nets = ", ".join(c["net"] for c in st.get("controls", [])) or "ControlNet"
        figs.insert(0, _figure("condition.png", f"<b>condition</b>: the {html.escape(nets)} input the image follows",
                               256))
    parts.append("<h2>Result</h2><div class=row>" + "".join(figs) + "</div>")

    n = len(run)
    picks = sorted(set(np.linspace(0, n - 1, min(n_trajectory, n)).round().astype(int).tolist()))
    fig, axs = plt.subplots(3, len(picks), figsize=(1.45 * len(picks), 5.0), squeeze=False)
    rows = ("decoded x0", "x0 preview", "noisy x_t")
    for j, k in enumerate(picks):
        axs[0, j].imshow(run.decode(k)[0])
        axs[0, j].set_title(f"step {k}\nt = {run.steps[k].timestep:.0f}", fontsize=10)
        axs[1, j].imshow(run.preview(k), interpolation="nearest")
        axs[2, j].imshow(run.preview(k, which="latents"), interpolation="nearest")
        for a in axs[:, j]:
            a.set_xticks([])
            a.set_yticks([])
    for i, name in enumerate(rows):
        axs[i, 0].set_ylabel(name, fontsize=10)
    fig.tight_layout()
    parts.append("<h2>Trajectory</h2><p>Columns are steps, from pure noise (left) to the end (right). "
                 "<b>decoded x0</b>: the model's estimate of the final image at that step, through the VAE decoder; "
                 "<b>x0 preview</b>: the same estimate through the fast preview (what the notebook widgets show "
                 "live); <b>noisy x_t</b>: the latent the step started from, through the latent colour map.</p>"
                 + _figure(_save_fig(fig, out / "trajectory.png"), f"{len(picks)} of {n} steps"))

    if run.has_attention():
        words = content_words(run.attention[next(iter(run.attention.children))]["word"].isel(batch=0).values)
        axes = plot_heatmaps(run, words)
        for a in np.atleast_1d(axes).ravel():
            a.title.set_fontsize(11)
        parts.append("<h2>Word heat maps</h2><p>Where each content word of the prompt attended: its cross-attention "
                     "over all layers and steps, upsampled to the image (DAAM's method), over the result. Each map "
                     "is scaled to its own maximum, so compare shapes, not strengths.</p>"
                     + _figure(_save_fig(np.atleast_1d(axes).ravel()[0].figure, out / "heatmaps.png"),
                               "red: attended, blue: not"))
    if "residuals" in run.recording_meta:
        for net in run.residuals["net"].values:
            ax = plot_residual_norms(run, str(net))
            parts.append(f"<h2>ControlNet residuals: {html.escape(str(net))}</h2><p>The size (L2 norm) of what each "
                         "ControlNet block added to the UNet's skip connections at each step: rows are blocks "
                         "(resolution beside the name), columns steps. Bright: strong steering.</p>"
                         + _figure(_save_fig(ax.figure, out / f"residuals-{net}.png"), "residual norm per block and step"))
    took = f" Sampling and recording took {seconds:.1f} s." if seconds is not None else ""
    rows_html = "".join(f"<tr><th>{label}</th><td>{html.escape(_value(st[k]))}</td></tr>"
                        for k, label in SUMMARY_KEYS if st.get(k) not in (None, "", [], {}))
    for c in st.get("controls", []):
        rows_html += (f"<tr><th>ControlNet {html.escape(c['net'])}</th><td>scale {c['scale']:g}, steps "
                      f"{c['start']:.0%}–{c['end']:.0%} of the run, mode {html.escape(str(c['mode']))}</td></tr>")
    full = json.dumps({k: v for k, v in st.items() if v not in (None, [], {})}, indent=2, default=str)
    parts.append(f"<h2>Settings</h2><p>What made this run.{took}</p><table>{rows_html}</table>"
                 f"<details><summary>everything the run recorded about how it was made (provenance)</summary>"
                 f"<pre>{html.escape(full)}</pre></details>")
    page = (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;font-size:15px;line-height:1.45}"
            "img{image-rendering:pixelated;max-width:100%}figure{margin:0 24px 12px 0;display:inline-block}"
            "figcaption{font-size:14px;color:#333;max-width:420px}.row{display:flex;flex-wrap:wrap}"
            "th{text-align:left;padding:3px 14px 3px 0;font-weight:600}td{padding:3px 10px}"
            "tr{border-bottom:1px solid #ddd}table{border-collapse:collapse}pre{font-size:12px;background:#f6f6f6;"
            "padding:8px;overflow:auto}.lead{font-size:16px}</style>"
            f"<h1>{html.escape(title)}</h1>" + "".join(parts))
    path = out / "report.html"
    path.write_text(page)
    return path
