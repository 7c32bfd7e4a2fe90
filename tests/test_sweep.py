"""lab.sweep: grids of runs into one zarr store, in-process and on a real dask.distributed LocalCluster."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
import xarray as xr

import analysis
import lab
from lab.sweeps import Reduce, SweepReport

PROMPTS = ["a large red circle on a gray background", "a small blue square on a white background"]


def _never(run):
    raise AssertionError("a cell ran although the grid is invalid")


NEVER = Reduce(_never, {"x": ()}, name="never")


@pytest.mark.parametrize("grid, fixed, match", [
    ({"promt": PROMPTS}, {}, "unknown sweep axis 'promt'.*did you mean \\['prompt'"),
    ({"prompt": PROMPTS, "seed": []}, {}, "'seed' is empty"),
    ({"prompt": "a red circle"}, {}, "must be a list"),
    ({"prompt": PROMPTS, "seed": [0, -1]}, {}, "integer >= 0"),
    ({"prompt": PROMPTS, "scheduler": ["ddim", "dpm"]}, {}, "one of"),
    ({"prompt": PROMPTS, "seed": [1, 1]}, {}, "repeats a value"),
    ({"prompt": PROMPTS, "steps": [3]}, {"steps": 4}, "both a grid axis and in fixed"),
    ({"prompt": PROMPTS, "control_scale": [0.5, 1.0]}, {}, "has no control"),
    ({"seed": [0, 1]}, {}, "no prompt"),
    ({"prompt": PROMPTS}, {"stpes": 3}, "unknown settings"),
    ({}, {}, "non-empty dict"),
])
def test_bad_grid_is_refused_before_any_run(tmp_path, grid, fixed, match):
    store = tmp_path / "s.zarr"
    with pytest.raises((KeyError, ValueError, TypeError), match=match):
        lab.sweep("shapes", grid=grid, fixed=fixed, record=NEVER, store=store, progress=False)
    assert not store.exists()


def test_incompatible_settings_are_refused(tmp_path, shapes_pipe):
    store = tmp_path / "s.zarr"
    control = lab.Control("scribble", np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="start > end"):
        lab.sweep(shapes_pipe, grid={"prompt": PROMPTS, "control_start": [0.0, 0.8], "control_end": [0.5, 1.0]},
                  fixed={"control": control}, record=NEVER, store=store, progress=False)
    with pytest.raises(ValueError, match="per-step dim"):
        lab.sweep(shapes_pipe, grid={"prompt": PROMPTS, "steps": [4, 8]}, fixed={"control": control},
                  record=lab.sweeps.residual_norms(), store=store, progress=False)
    clash = Reduce(_never, {"x": ("seed",)}, name="clash")
    with pytest.raises(ValueError, match="also grid axes"):
        lab.sweep(shapes_pipe, grid={"prompt": PROMPTS, "seed": [0, 1]}, record=clash, store=store, progress=False)
    with pytest.raises(KeyError, match="no ControlNet named 'depth'"):
        lab.sweep(shapes_pipe, grid={"prompt": PROMPTS}, fixed={"control": lab.Control("depth", control.image)},
                  record=NEVER, store=store, progress=False)
    with pytest.raises(TypeError, match="must be one lab.Control"):
        lab.sweep(shapes_pipe, grid={"prompt": PROMPTS, "control_scale": [0.5]}, fixed={"control": {"scribble": control.image}},
                  record=NEVER, store=store, progress=False)
    with pytest.raises(ValueError, match="store= is required"):
        lab.sweep(shapes_pipe, grid={"prompt": PROMPTS}, record=NEVER, progress=False)
    with pytest.raises(TypeError, match="name or path"):
        lab.sweep(shapes_pipe, grid={"prompt": PROMPTS}, record=NEVER, store=store, client=object(), progress=False)
    assert not store.exists()


def _reference_image(pipe, prompt, seed, guidance, steps):
    return np.asarray(pipe.sampler(prompt, seed=seed, guidance=guidance, steps=steps, progress=False).run().image)


class Interrupt:
    """A reduction that behaves like lab.sweeps.image() but raises KeyboardInterrupt after ``n`` cells."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, run):
        self.calls += 1
        if self.calls > self.n:
            raise KeyboardInterrupt
        return lab.sweeps.image().fn(run)


def test_in_process_sweep_interrupt_and_resume(tmp_path, shapes_pipe):
    store = tmp_path / "s.zarr"
    grid = {"prompt": PROMPTS, "seed": [0, 1], "guidance": [1.0, 5.0]}
    stop_after_3 = Interrupt(3)
    with pytest.raises(KeyboardInterrupt):
        lab.sweep(shapes_pipe, grid=grid, fixed={"steps": 3}, store=store, progress=False,
                  record=Reduce(stop_after_3, {"image": ("y", "x", "rgb")}, name="image"))
    partial = xr.open_zarr(store, mask_and_scale=False)
    assert int(partial["done"].sum()) == 3, "a partial sweep is readable: the cells done so far"
    counting = Interrupt(10 ** 6)
    report = SweepReport("", 0)
    ds = lab.sweep(shapes_pipe, grid=grid, fixed={"steps": 3}, store=store, progress=False, report=report,
                   record=Reduce(counting, {"image": ("y", "x", "rgb")}, name="image"))
    assert counting.calls == 8 - 3 and report.skipped == 3 and len(report.ran) == 5, "stored cells are not recomputed"
    assert bool(ds["done"].all()) and ds["image"].dtype == np.uint8
    assert ds["image"].dims == ("prompt", "seed", "guidance", "y", "x", "rgb")
    for p in PROMPTS:
        for s in (0, 1):
            for g in (1.0, 5.0):
                got = ds["image"].sel(prompt=p, seed=s, guidance=g).values
                np.testing.assert_array_equal(got, _reference_image(shapes_pipe, p, s, g, 3))
    again = SweepReport("", 0)
    lab.sweep(shapes_pipe, grid=grid, fixed={"steps": 3}, store=store, progress=False, report=again,
              record=Reduce(NEVER.fn, {"image": ("y", "x", "rgb")}, name="image"))
    assert again.ran == [] and again.skipped == 8


def test_fingerprint_tells_condition_images_apart():
    from lab.sweeps import _fingerprint
    a, b = np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64, 3), np.uint8)
    b[30, 30] = 255  # one pixel: a repr of the array would not show it
    axes, rec = {"prompt": PROMPTS}, lab.sweeps.image()
    assert _fingerprint("shapes", axes, {"control": {"scribble": a}}, rec) != \
        _fingerprint("shapes", axes, {"control": {"scribble": b}}, rec)
    assert _fingerprint("shapes", axes, {"control": lab.Control("scribble", a)}, rec) != \
        _fingerprint("shapes", axes, {"control": lab.Control("scribble", b)}, rec)
    assert _fingerprint("shapes", axes, {"control": lab.Control("scribble", a)}, rec) == \
        _fingerprint("shapes", axes, {"control": lab.Control("scribble", a.copy())}, rec)


def test_a_failing_cell_is_reported_and_the_others_are_kept(tmp_path, shapes_pipe):
    def picky(run):
        if "blue" in run.settings["prompt"] and run.settings["seed"] == 1:
            raise ValueError("no blue today")
        return lab.sweeps.image().fn(run)

    grid, store = {"prompt": PROMPTS, "seed": [0, 1]}, tmp_path / "s.zarr"
    with pytest.raises(RuntimeError, match="1 of 4 cells failed.*no blue today"):
        lab.sweep(shapes_pipe, grid=grid, fixed={"steps": 2}, store=store, progress=False,
                  record=Reduce(picky, {"image": ("y", "x", "rgb")}, name="image"))
    done = xr.open_zarr(store, mask_and_scale=False)["done"]
    assert int(done.sum()) == 3 and not bool(done.sel(prompt=PROMPTS[1], seed=1))
    report = SweepReport("", 0)
    lab.sweep(shapes_pipe, grid=grid, fixed={"steps": 2}, store=store, progress=False, report=report)
    assert report.ran == [(1, 1)] and report.skipped == 3


def test_store_is_never_overwritten_by_another_sweep(tmp_path, shapes_pipe):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a latent-lab sweep"):
        lab.sweep(shapes_pipe, grid={"prompt": PROMPTS}, fixed={"steps": 2}, store=foreign, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    store = tmp_path / "s.zarr"
    lab.sweep(shapes_pipe, grid={"prompt": PROMPTS}, fixed={"steps": 2}, store=store, progress=False)
    before = xr.open_zarr(store, mask_and_scale=False).load()
    with pytest.raises(FileExistsError, match="different sweep"):
        lab.sweep(shapes_pipe, grid={"prompt": PROMPTS[:1]}, fixed={"steps": 2}, store=store, progress=False)
    xr.testing.assert_identical(before, xr.open_zarr(store, mask_and_scale=False).load())


def test_control_axes_and_residual_norms(tmp_path, shapes_pipe):
    from lab.shapes import world
    ex = world.make_example(5, 1, split="heldout")
    control = lab.Control("scribble", ex["scribble"])
    ds = lab.sweep(shapes_pipe, grid={"control_scale": [0.0, 1.0], "control_mode": ["balanced", "control"]},
                   fixed={"prompt": ex["caption"], "steps": 3, "control": control},
                   record=lab.sweeps.residual_norms(), store=tmp_path / "c.zarr", progress=False)
    norms = ds["residual_norm"].load()
    assert norms.dims == ("control_scale", "control_mode", "step", "net", "block")
    assert float(norms.sel(control_scale=0.0).max()) == 0.0, "scale 0 adds nothing"
    assert float(norms.sel(control_scale=1.0).min()) > 0
    direct = shapes_pipe.sampler(ex["caption"], steps=3, progress=False, recorders=[lab.ResidualRecorder()],
                                 control=lab.Control("scribble", ex["scribble"], mode="control")).run()
    np.testing.assert_allclose(norms.sel(control_scale=1.0, control_mode="control").values,
                               direct.residuals["norm"].isel(batch=0).values, rtol=1e-6)


def test_analysis_on_a_sweep(tmp_path, shapes_pipe):
    import matplotlib
    matplotlib.use("Agg")
    from lab.shapes import world
    caps = [world.make_example(300, i, split="heldout")["caption"] for i in range(2)]
    ds = lab.sweep(shapes_pipe, grid={"prompt": caps, "guidance": [1.0, 5.0]}, fixed={"steps": 4},
                   record=lab.sweeps.combine(analysis.sweep.noun_iou(), analysis.sweep.word_heatmaps(["circle", "square"])),
                   store=tmp_path / "a.zarr", progress=False)
    assert ds["noun_iou"].dims == ("prompt", "guidance", "noun") and ds["heatmap"].sizes["word"] == 2
    per_g = analysis.sweep.mean_over(ds["noun_iou"], "guidance")
    assert per_g.dims == ("guidance",) and per_g.sizes["guidance"] == 2
    ax = analysis.sweep.plot_over(ds["noun_iou"], "guidance")
    assert len(ax.lines) == 1
    # words missing from a prompt are NaN, present ones are heat maps scaled to max 1
    for p in caps:
        for w in ("circle", "square"):
            m = ds["heatmap"].sel(prompt=p, guidance=5.0, word=w).values
            assert (np.isnan(m).all() if w not in p.split() else np.isclose(np.nanmax(m), 1.0))


# ------------------------------------------------------------------------------------------ distributed
@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, silence_logs=40) as c, Client(c) as client:
        yield client


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_local_cluster_equals_in_process_and_survives_a_killed_worker(tmp_path, shapes_pipe, cluster):
    grid = {"prompt": PROMPTS, "seed": [0, 1, 2], "guidance": [2.0, 5.0]}
    fixed = {"steps": 6}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each dask worker (one thread each): the same float arithmetic
    try:
        ref = lab.sweep(shapes_pipe, grid=grid, fixed=fixed, store=tmp_path / "ref.zarr", progress=False).load()
    finally:
        torch.set_num_threads(threads)

    pids = cluster.run(os.getpid)
    killed = []

    def kill_one(index, seconds):
        if len(killed) == 0 and len(report.ran) == 3:  # mid-sweep: 3 of 12 cells stored
            addr, pid = next(iter(pids.items()))
            os.kill(pid, signal.SIGKILL)
            killed.append(addr)

    report = SweepReport("", 0)
    got = lab.sweep("shapes", grid=grid, fixed=fixed, store=tmp_path / "dist.zarr", client=cluster,
                    progress=False, callback=kill_one, report=report).load()
    assert killed, "a worker was killed mid-sweep"
    cells = sorted(report.ran)
    assert len(cells) == 12 and len(set(cells)) == 12, "every cell stored exactly once"
    assert bool(got["done"].all())
    xr.testing.assert_identical(got.drop_vars("seconds"), ref.drop_vars("seconds").assign_attrs(got.attrs))
    # the killed worker's nanny restarted it; the cluster has two workers again
    assert len(cluster.scheduler_info()["workers"]) == 2
