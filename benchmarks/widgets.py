"""How fast a finished step reaches the notebook front end, in a real Jupyter kernel.

    python benchmarks/widgets.py [--json PATH] [--steps 30] [--runs 3]

A real ipykernel is started (jupyter_client, as JupyterLab starts one); in it the shapes model samples
live under a :class:`widgets.TrajectoryViewer` that is displayed, so every frame's comm messages are
serialised and sent on the kernel's iopub socket, as they are to a browser. Measured per step:

* ``frame_ms``: from the step's completion (the sampler's callback) to its frames sent (PNG encoding
  of the live panels, the Image widgets created, the stacks and the slider updated). Target: <= 50 ms on
  these machines for the shapes model (issues 6, 25). Live, the viewer draws the x0 estimate with the preview
  decoder and makes the VAE-decoded panel of every step once the run ends (``TrajectoryViewer(decode_live=False)``,
  the default): ``complete_ms`` is that end-of-run work for the whole run, ``frame_ms_decode_live`` the frame
  time with the VAE panel made live too (one run);
* ``bytes_per_frame``: PNG bytes of all panels of one step (what playback later needs, sent once);
* per panel: milliseconds and bytes of ``x0`` (latent preview), ``image`` (VAE decode), ``latents``,
  ``noise``;
* ``sampling_ms_per_step`` with and without the viewer (what a user pays for watching live).

The x0 preview (:class:`lab.preview.PreviewDecoder`, in this process):

* ``preview_ms``: one 16x16 latent -> 64x64 RGB ``uint8``, batch 1, the median of 200 (target <= 5 ms);
* ``preview_psnr_db``: PSNR of the preview against the VAE decode of the same latents, mean over 512
  held-out scenes' latents (posterior means; target >= 25 dB); ``preview_psnr_db_trajectory``: the same over
  every step's x0 estimate of 8 sampled runs (20 steps), what the viewer shows; ``map_psnr_db*``: the same
  for the latent-resolution colour map it replaces (nearest-upsampled), for comparison.

In a real JupyterLab and Chromium (``--no-browser`` to skip), the Studio at 80 steps:

* ``stop_latency_steps``: Stop is clicked while the page shows step k (read right after the click);
  the kept run's last step minus k, the worst of ``--stops`` tries at different steps (target <= 1);
* ``stop_tries``: each try's (shown step, last kept step, steps dropped while the page was behind).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from _report import emit  # benchmarks/ is on sys.path when a benchmark runs as a script
from jupyter_client.manager import start_new_kernel

KERNEL_CODE = r"""
import json, statistics, time, io
import numpy as np
import lab, widgets
from IPython.display import display
pipe = lab.load("shapes")
PROMPT = "a large red circle and a small blue square on a gray background"
pipe.sampler(PROMPT, steps=3, progress=False).run()  # warm-up
out = {"frame_ms": [], "bytes_per_frame": [], "panel_ms": {}, "panel_bytes": {}, "with_viewer_s": [], "plain_s": [],
       "complete_ms": []}
for r in range(RUNS):
    t = time.perf_counter(); pipe.sampler(PROMPT, steps=STEPS, seed=r, progress=False).run()
    out["plain_s"].append(time.perf_counter() - t)
    v = widgets.TrajectoryViewer(pipe=pipe)
    display(v)
    t = time.perf_counter(); v.follow(pipe.sampler(PROMPT, steps=STEPS, seed=r, progress=False), block=True)
    out["with_viewer_s"].append(time.perf_counter() - t)
    out["frame_ms"] += v.frame_ms
    out["bytes_per_frame"] += v.frame_bytes
    out["complete_ms"].append(v.complete_ms)
dl = widgets.TrajectoryViewer(pipe=pipe, decode_live=True)
display(dl)
dl.follow(pipe.sampler(PROMPT, steps=STEPS, seed=0, progress=False), block=True)
out["frame_ms_decode_live"] = dl.frame_ms
# per panel: encode each panel alone for the steps of the last run
for p in ("x0", "image", "latents", "noise"):
    one = widgets.TrajectoryViewer(pipe=pipe, panels=(p,))
    for st in v.run.steps:
        one.add_step(st)
    out["panel_ms"][p] = statistics.median(one.frame_ms)
    out["panel_bytes"][p] = statistics.median(one.frame_bytes)
print("RESULT " + json.dumps(out))
"""


def run_in_kernel(code: str, timeout: float = 900) -> dict:
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        lines = []

        def hook(msg):
            if msg["msg_type"] == "stream":
                lines.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                lines.append("\n".join(msg["content"]["traceback"]))

        reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        text = "".join(lines)
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"benchmark failed in the kernel:\n{text[-4000:]}")
        line = next(l for l in text.splitlines() if l.startswith("RESULT "))
        return json.loads(line[len("RESULT "):])
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def preview_quality(n_scenes: int = 512, n_runs: int = 8, steps: int = 20) -> dict:
    import numpy as np
    import torch

    import lab
    from lab.preview import psnr
    from lab.shapes import world
    pipe = lab.load("shapes")
    dec = pipe.preview_decoder
    if dec is None:
        raise RuntimeError("the shapes model ships no preview decoder (lab/models/shapes/preview_decoder)")
    d = world.generate(n_scenes, seed=11, split="heldout")
    x = torch.from_numpy(d["image"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = torch.cat([pipe.vae.encode(x[i:i + 128]).latent_dist.mean for i in range(0, n_scenes, 128)])
        z = z * pipe.vae.config.scaling_factor
    runs = [pipe.sampler(d["caption"][k], steps=steps, seed=k, progress=False).run() for k in range(n_runs)]
    zt = torch.cat([torch.cat([s.pred_x0 for s in r.steps]) for r in runs]).float()

    def scores(latents):
        with torch.no_grad():
            ref = torch.cat([pipe.decode_latents(latents[i:i + 128]) for i in range(0, len(latents), 128)])
            ours = torch.cat([dec(latents[i:i + 128]).clamp(0, 1) for i in range(0, len(latents), 128)])
        ours = (ours * 255).round() / 255  # what is shown: uint8
        rgb = torch.from_numpy(pipe.preview_map(latents)).permute(0, 3, 1, 2).float() / 255
        up = torch.nn.functional.interpolate(rgb, size=ref.shape[-2:], mode="nearest")
        return float(psnr(ours, ref).mean()), float(psnr(up, ref).mean())

    held, held_map = scores(z)
    traj, traj_map = scores(zt)
    one = z[:1]
    for _ in range(20):
        dec.rgb(one[0])
    times = []
    for k in range(200):
        t = time.perf_counter()
        dec.rgb(z[k % len(z)])
        times.append((time.perf_counter() - t) * 1e3)
    return {"preview_ms": round(float(np.median(times)), 3), "preview_ms_p95": round(_pct(times, 0.95), 3),
            "preview_psnr_db": round(held, 2), "preview_psnr_db_trajectory": round(traj, 2),
            "map_psnr_db": round(held_map, 2), "map_psnr_db_trajectory": round(traj_map, 2),
            "preview_params": sum(p.numel() for p in dec.parameters()), "preview_scenes": n_scenes,
            "preview_trajectory_latents": len(zt), "torch_threads": torch.get_num_threads()}


STOP_NOTEBOOK = ["""
import json, os
from pathlib import Path
import lab, widgets
pipe = lab.load("shapes", controlnet="scribble")
studio = widgets.Studio(pipe, steps=80, seed=1)
def on_run(change):
    run = change["new"]
    if run is not None:
        v = studio.viewer
        Path("stop.json").write_text(json.dumps(dict(steps=len(run.steps), last=run.steps[-1].index,
                                     interrupted=run.interrupted, stopped_at=v.stopped_at, dropped=v.dropped)))
studio.observe(on_run, "run")
studio
"""]


def stop_latency(tries: tuple[int, ...] = (8, 20, 40)) -> dict:
    """Stop clicked in a real page at the given shown steps: see the module doc."""
    import re
    import tempfile

    from playwright.sync_api import sync_playwright
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from jupyterlab_browser import JupyterLab, launch, run_cell, wait_for, write_notebook
    out = []
    with tempfile.TemporaryDirectory() as tmp, JupyterLab(Path(tmp)) as server, sync_playwright() as pw:
        root = Path(tmp)
        write_notebook(root / "stop.ipynb", STOP_NOTEBOOK)
        browser = launch(pw)
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        page.goto(f"{server.base}/lab/tree/stop.ipynb")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
        server.wait_kernel_ready()
        run_cell(page, 0)
        page.wait_for_selector(".ll-studio", timeout=120_000)
        label = page.locator(".ll-step-label").first
        for at in tries:
            (root / "stop.json").unlink(missing_ok=True)
            page.locator(".ll-studio button", has_text="Generate").click()

            def shown():
                m = re.match(r"step (\d+) ", label.inner_text())
                return m is not None and int(m.group(1)) >= at and not (root / "stop.json").exists()
            wait_for(shown, 120, f"step {at} on the page")
            page.locator(".ll-studio button", has_text="Stop").first.click()
            seen = int(re.match(r"step (\d+) ", label.inner_text()).group(1))
            res = json.loads(wait_for(lambda: (root / "stop.json").exists() and (root / "stop.json").read_text(),
                                      120, "the stopped run"))
            out.append({"shown": seen, "last_kept": res["last"], "dropped": res["dropped"],
                        "kernel_stopped_at": res["stopped_at"], "latency": res["last"] - seen})
        browser.close()
    return {"stop_latency_steps": max(t["latency"] for t in out), "stop_tries": out}


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-browser", action="store_true", help="skip the stop-latency measurement in JupyterLab")
    args = ap.parse_args(argv)
    t0 = time.time()
    raw = run_in_kernel(KERNEL_CODE.replace("RUNS", str(args.runs)).replace("STEPS", str(args.steps)))
    fm = raw["frame_ms"]
    per_step_plain = 1e3 * min(raw["plain_s"]) / args.steps
    per_step_viewer = 1e3 * min(raw["with_viewer_s"]) / args.steps
    res = {
        "model": "shapes (64 px, 16x16 latents)",
        "steps": args.steps, "runs": args.runs, "frames": len(fm),
        "frame_ms": {"median": round(_pct(fm, 0.5), 2), "p95": round(_pct(fm, 0.95), 2), "max": round(max(fm), 2)},
        "frame_ms_target": 50,
        "bytes_per_frame": {"median": int(_pct(raw["bytes_per_frame"], 0.5)), "max": int(max(raw["bytes_per_frame"]))},
        "panel_ms": {k: round(v, 2) for k, v in raw["panel_ms"].items()},
        "panel_bytes": {k: int(v) for k, v in raw["panel_bytes"].items()},
        "sampling_ms_per_step": {"plain": round(per_step_plain, 1), "live_viewer": round(per_step_viewer, 1)},
        "frame_ms_p95": round(_pct(fm, 0.95), 2),
        "complete_ms": round(_pct(raw["complete_ms"], 0.5), 1),
        "frame_ms_decode_live": {"median": round(_pct(raw["frame_ms_decode_live"], 0.5), 2),
                                 "p95": round(_pct(raw["frame_ms_decode_live"], 0.95), 2)},
        **preview_quality(),
        **({} if args.no_browser else stop_latency()),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {sys.version.split()[0]}",
        "seconds": round(time.time() - t0, 1),
    }
    emit(res, args.json)
    return res


if __name__ == "__main__":
    main()
