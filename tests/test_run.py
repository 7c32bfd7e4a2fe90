"""Runs as labelled arrays, saved atomically and loaded back identically."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr
from components import PROMPT, tiny_sd_components

import lab
from lab import Run, RunFileError


@pytest.fixture(scope="module")
def run():
    pipe = lab.Pipeline.from_components(**tiny_sd_components())
    return pipe.sampler(PROMPT, "gray", steps=4, guidance=3.0, scheduler="euler", seed=2, height=32, width=32,
                        progress=False).run()


def test_to_xarray_layout(run):
    ds = run.to_xarray()
    assert ds["latents"].dims == ("step", "batch", "channel", "y", "x")
    for v in ("latents", "prev_latents", "pred_x0", "noise_pred", "noise_pred_cond", "noise_pred_uncond"):
        assert v in ds
    assert list(ds["step"].values) == [0, 1, 2, 3]
    assert ds["timestep"].dims == ("step",) and ds["sigma"].dims == ("step",)
    np.testing.assert_array_equal(ds["timestep"].values, [s.timestep for s in run.steps])
    cfg = json.loads(ds.attrs["config"])
    assert cfg["seed"] == 2 and cfg["scheduler"] == "euler" and cfg["guidance"] == 3.0
    assert ds.attrs["scheduler"] == "euler" and ds.attrs["seed"] == 2
    np.testing.assert_array_equal(ds["pred_x0"].sel(step=2).values, run.steps[2].pred_x0.numpy())


@pytest.mark.parametrize("suffix", [".zarr", ".nc"])
def test_save_load_roundtrip_is_identical(run, tmp_path, suffix):
    path = run.save(tmp_path / f"run{suffix}")
    back = Run.load(path)
    xr.testing.assert_identical(run.to_xarray(), back.to_xarray())
    for a, b in zip(run.steps, back.steps):
        assert torch.equal(a.prev_latents, b.prev_latents) and a.timestep == b.timestep
    assert torch.equal(run.final_latents, back.final_latents)
    assert back.settings == json.loads(json.dumps(run.settings, default=str))
    # saving again over our own run replaces it
    run.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"run{suffix}"]


def test_interrupted_save_leaves_no_run(run, tmp_path, monkeypatch):
    def half_then_fail(self, store, *a, **k):
        self["run"].to_dataset()[["latents"]].to_zarr(store)  # something is on disk ...
        raise OSError("No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(xr.DataTree, "to_zarr", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        run.save(tmp_path / "r.zarr")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_run(run, tmp_path, monkeypatch):
    path = run.save(tmp_path / "r.zarr")
    monkeypatch.setattr(xr.DataTree, "to_zarr", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run.save(path)
    xr.testing.assert_identical(Run.load(path).to_xarray(), run.to_xarray())
    assert [p.name for p in tmp_path.iterdir()] == ["r.zarr"]


def test_foreign_and_corrupted_files(run, tmp_path):
    foreign = tmp_path / "foreign.zarr"
    xr.Dataset({"a": ("x", np.arange(3))}).to_zarr(foreign)
    with pytest.raises(RunFileError, match="not a latent-lab run"):
        Run.load(foreign)
    with pytest.raises(FileExistsError):
        run.save(foreign)
    assert "a" in xr.open_zarr(foreign)  # untouched
    junk = tmp_path / "junk.nc"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(RunFileError):
        Run.load(junk)
    with pytest.raises(FileExistsError):
        run.save(junk)
    assert junk.read_bytes() == b"\x00garbage" * 10
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        run.save(tmp_path / "notes")
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError):
        Run.load(tmp_path / "missing.zarr")


def test_newer_format_is_refused(run, tmp_path):
    ds = run.to_xarray()
    ds.attrs["latent_lab_run"] = 99
    ds.to_zarr(tmp_path / "new.zarr")
    with pytest.raises(RunFileError, match="newer"):
        Run.load(tmp_path / "new.zarr")


def test_loaded_run_decodes_with_a_pipeline(run, tmp_path):
    back = Run.load(run.save(tmp_path / "r.zarr"))
    with pytest.raises(RuntimeError, match="no pipeline attached"):
        back.image
    back.attach(run.pipe)
    assert back.image.size == (32, 32)
    assert np.array_equal(np.asarray(back.image), np.asarray(run.image))
