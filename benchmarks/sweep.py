"""Wall time of one sweep in-process and on a 2-worker dask LocalCluster (processes, loopback).

    python benchmarks/sweep.py [--json PATH] [--prompts 4] [--seeds 4] [--steps 20]

The grid is held-out shapes captions x seeds x guidance {1, 5}; each cell records cross-attention and is
reduced to the final image, the shape nouns' heat-map IoU against the oracle's masks and the oracle's
verdict (``lab.sweeps.image() + analysis.sweep.noun_iou()``). Both stores are compared cell by cell.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from _report import emit  # benchmarks/ is on sys.path when a benchmark runs as a script


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from distributed import Client, LocalCluster

    import analysis
    import lab
    from lab.shapes import world

    caps = [world.make_example(300, i, split="heldout")["caption"] for i in range(args.prompts)]
    grid = {"prompt": caps, "seed": list(range(args.seeds)), "guidance": [1.0, 5.0]}
    record = lab.sweeps.combine(lab.sweeps.image(), analysis.sweep.noun_iou())
    fixed = {"steps": args.steps}
    tmp = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    n_cells = int(np.prod([len(v) for v in grid.values()]))
    try:
        t0 = time.perf_counter()
        pipe = lab.load("shapes")
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        local = lab.sweep(pipe, grid=grid, fixed=fixed, record=record, store=tmp / "local.zarr", progress=False).load()
        t_local = time.perf_counter() - t0

        t0 = time.perf_counter()
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None, silence_logs=40) as cluster, Client(cluster) as client:
            t_cluster_start = time.perf_counter() - t0
            t0 = time.perf_counter()
            dist = lab.sweep("shapes", grid=grid, fixed=fixed, record=record, store=tmp / "dist.zarr", client=client,
                             progress=False).load()
            t_dist = time.perf_counter() - t0
            t0 = time.perf_counter()  # again on the warm workers (imports done, model loaded): the steady state
            lab.sweep("shapes", grid=grid, fixed=fixed, record=record, store=tmp / "dist2.zarr", client=client,
                      progress=False)
            t_dist_warm = time.perf_counter() - t0
        same_images = float((local["image"].values == dist["image"].values).mean())
        iou_diff = float(np.nanmax(np.abs(local["noun_iou"].values - dist["noun_iou"].values)))
        res = {
            "cells": n_cells, "grid": {k: len(v) for k, v in grid.items()}, "steps": args.steps,
            "record": record.name,
            "in_process_s": round(t_local, 1), "in_process_torch_threads": torch.get_num_threads(),
            "local_cluster_s": round(t_dist, 1), "local_cluster_workers": "2 processes x 1 thread",
            "local_cluster_warm_s": round(t_dist_warm, 1),
            "local_cluster_start_s": round(t_cluster_start, 1), "model_load_s": round(t_load, 2),
            "speedup": round(t_local / t_dist, 2), "speedup_warm": round(t_local / t_dist_warm, 2),
            "identical_image_pixels": round(same_images, 4), "max_noun_iou_diff": iou_diff,
            "mean_noun_iou": {f"guidance={g}": round(float(analysis.sweep.mean_over(
                local["noun_iou"].sel(guidance=g), "prompt").mean()), 3) for g in grid["guidance"]},
            "correct_fraction": {f"guidance={g}": round(float(local["correct"].sel(guidance=g).mean()), 3)
                                 for g in grid["guidance"]},
            "store_bytes": sum(f.stat().st_size for f in (tmp / "local.zarr").rglob("*") if f.is_file()),
            "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    emit(res, args.json)
    return res


if __name__ == "__main__":
    main()
