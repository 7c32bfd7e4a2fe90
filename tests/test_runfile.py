"""Run files you can trust: every array checked against a manifest written last; temporary stores never
load; an overwrite killed between its renames is recovered (lab.runfile)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

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
    return pipe.sampler(PROMPT, "gray", steps=3, guidance=3.0, scheduler="euler", seed=2, height=32, width=32,
                        recorders=[lab.AttentionRecorder()], progress=False).run()


@pytest.fixture
def saved(run, tmp_path):
    return run.save(tmp_path / "r.zarr")


def _chunk(store, array):
    return next(p for p in (store / array).iterdir() if not p.name.startswith("."))


def test_a_good_file_verifies_and_loads_identically(run, saved):
    back = Run.load(saved)
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(run.steps, back.steps))
    record = json.loads(xr.open_zarr(saved, consolidated=False).attrs["latent_lab_manifest"])
    # every array, coordinates included, of every group has a checksum
    assert {"/run/latents", "/run/timestep", "/run/step", "/run/final_latents"} <= set(record["arrays"])
    assert any(k.startswith("/attention/") for k in record["arrays"])


def test_a_chunk_cut_in_half_is_named(saved):
    chunk = _chunk(saved, "run/latents")
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])
    with pytest.raises(RunFileError, match=r"r\.zarr is corrupt: array /run/latents"):
        Run.load(saved)


def test_a_changed_chunk_is_caught_by_its_checksum(saved):
    """A chunk that still decodes, to other values (the case that used to load silently)."""
    import zarr
    arr = zarr.open_array(str(saved / "run" / "pred_x0"), mode="r+", zarr_format=2)
    arr[0, 0, 0, 0, 0] = arr[0, 0, 0, 0, 0] + 1e-3
    with pytest.raises(RunFileError, match="array /run/pred_x0 does not match its checksum"):
        Run.load(saved)


def test_a_deleted_chunk_is_not_read_as_nan(saved):
    _chunk(saved, "run/noise_pred_uncond").unlink()
    with pytest.raises(RunFileError, match="array /run/noise_pred_uncond"):
        Run.load(saved)


@pytest.mark.parametrize("array", ["run/noise_pred_uncond", "run/timestep", "run/final_latents"])
def test_a_deleted_array_is_named(saved, array):
    shutil.rmtree(saved / array)
    with pytest.raises(RunFileError, match=f"array /{array} is missing"):
        Run.load(saved)


def test_deleted_array_metadata_is_named(saved):
    (saved / "run" / "latents" / ".zarray").unlink()
    with pytest.raises(RunFileError, match="array /run/latents is missing"):
        Run.load(saved)


def test_a_deleted_group_is_named(saved):
    """Without this the run loaded as if sampled without attention."""
    group = next(p for p in (saved / "attention").iterdir() if p.is_dir())
    shutil.rmtree(group)
    with pytest.raises(RunFileError, match=f"group /attention/{group.name} is missing"):
        Run.load(saved)


def test_edited_attributes_are_caught(saved):
    attrs = json.loads((saved / ".zattrs").read_text())
    attrs["config"] = attrs["config"].replace('"seed": 2', '"seed": 3')
    (saved / ".zattrs").write_text(json.dumps(attrs))
    with pytest.raises(RunFileError, match="attributes of group / changed"):
        Run.load(saved)


def test_a_store_without_manifest_is_incomplete(saved):
    attrs = json.loads((saved / ".zattrs").read_text())
    del attrs["latent_lab_manifest"]
    (saved / ".zattrs").write_text(json.dumps(attrs))
    with pytest.raises(RunFileError, match="incomplete: it has no manifest"):
        Run.load(saved)


def test_netcdf_is_verified_too(run, tmp_path):
    path = run.save(tmp_path / "r.nc")
    assert Run.load(path).steps[1].timestep == run.steps[1].timestep
    import h5netcdf
    with h5netcdf.File(path, "a") as f:
        f["run"].variables["latents"][0, 0, 0, 0, 0] = 123.0
    with pytest.raises(RunFileError, match=r"r\.nc is corrupt: array /run/latents"):
        Run.load(path)


def test_a_killed_save_leaves_a_temporary_store_that_never_loads_and_is_cleaned(run, tmp_path):
    """A save killed for real (SIGKILL while writing): no run at the path, the temporary store is refused
    by name, and the next save removes it."""
    path = tmp_path / "r.zarr"
    code = textwrap.dedent(f"""
        import os, sys, xarray as xr
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        import lab
        from components import PROMPT, tiny_sd_components
        pipe = lab.Pipeline.from_components(**tiny_sd_components())
        run = pipe.sampler(PROMPT, steps=2, seed=0, height=32, width=32, progress=False).run()
        real = xr.DataTree.to_zarr
        def die(self, store, *a, **k):
            real(self, store, *a, **k)
            os._exit(9)  # killed after the arrays, before the manifest
        xr.DataTree.to_zarr = die
        run.save({str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert not path.exists()
    (tmp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".r.zarr.tmp-")]
    with pytest.raises(RunFileError, match="temporary store of a save that did not finish"):
        Run.load(tmp)
    renamed = tmp_path / "renamed.zarr"  # the same store under an ordinary name: still not a run
    shutil.copytree(tmp, renamed)
    with pytest.raises(RunFileError, match="no manifest"):
        Run.load(renamed)
    run.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zarr", "renamed.zarr"]


@pytest.mark.parametrize("then", ["load", "save"])
def test_an_overwrite_killed_between_its_renames_is_recovered(run, tmp_path, then):
    path = run.save(tmp_path / "r.zarr")
    os.replace(path, tmp_path / ".r.zarr.old-0123abcd")  # what a kill after the first rename leaves
    if then == "load":
        with pytest.warns(UserWarning, match="an overwrite was interrupted"):
            back = Run.load(path)
        assert torch.equal(back.steps[-1].latents, run.steps[-1].latents)
    else:
        with pytest.warns(UserWarning, match="an overwrite was interrupted"):
            run.save(path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zarr"]


def test_a_finished_overwrite_with_a_leftover_old_run_is_tidied(run, tmp_path):
    path = run.save(tmp_path / "r.zarr")
    shutil.copytree(path, tmp_path / ".r.zarr.old-0123abcd")  # the kill came after the second rename
    Run.load(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zarr"]


def test_format_1_files_load_with_a_warning(run, tmp_path):
    tree = run.to_datatree()
    tree.attrs["latent_lab_run"] = 1
    tree.to_zarr(tmp_path / "old.zarr", consolidated=False, zarr_format=2)
    with pytest.warns(UserWarning, match="without checksums"):
        back = Run.load(tmp_path / "old.zarr")
    np.testing.assert_array_equal(back.steps[0].latents.numpy(), run.steps[0].latents.numpy())

