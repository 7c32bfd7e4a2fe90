"""How fast a finished step reaches the notebook front end, in a real Jupyter kernel.

    python benchmarks/widgets.py [--json PATH] [--steps 30] [--runs 3]

A real ipykernel is started (jupyter_client, as JupyterLab starts one); in it the shapes model samples
live under a :class:`widgets.TrajectoryViewer` that is displayed, so every frame's comm messages are
serialised and sent on the kernel's iopub socket, as they are to a browser. Measured per step:

* ``frame_ms``: from the step's completion (the sampler's callback) to its frames sent (PNG encoding
  of all panels, the Image widgets created, the stacks and the slider updated). Target: <= 50 ms on
  these machines for the shapes model (issue 6);
* ``bytes_per_frame``: PNG bytes of all panels of one step (what playback later needs, sent once);
* per panel: milliseconds and bytes of ``x0`` (latent preview), ``image`` (VAE decode), ``latents``,
  ``noise``;
* ``sampling_ms_per_step`` with and without the viewer (what a user pays for watching live).
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
out = {"frame_ms": [], "bytes_per_frame": [], "panel_ms": {}, "panel_bytes": {}, "with_viewer_s": [], "plain_s": []}
for r in range(RUNS):
    t = time.perf_counter(); pipe.sampler(PROMPT, steps=STEPS, seed=r, progress=False).run()
    out["plain_s"].append(time.perf_counter() - t)
    v = widgets.TrajectoryViewer(pipe=pipe)
    display(v)
    t = time.perf_counter(); v.follow(pipe.sampler(PROMPT, steps=STEPS, seed=r, progress=False), block=True)
    out["with_viewer_s"].append(time.perf_counter() - t)
    out["frame_ms"] += v.frame_ms
    out["bytes_per_frame"] += v.frame_bytes
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


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--runs", type=int, default=3)
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
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {sys.version.split()[0]}",
        "seconds": round(time.time() - t0, 1),
    }
    emit(res, args.json)
    return res


if __name__ == "__main__":
    main()
