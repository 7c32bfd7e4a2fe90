"""Run files on disk: written atomically, verified on load, recovered after an interrupted overwrite.

A run file is a zarr directory (or one netCDF file for ``.nc``) holding a :class:`xarray.DataTree`. Its
integrity rests on a **manifest** (the root attribute ``latent_lab_manifest``): the shape, dtype and SHA-256
of every array (coordinates included) and of every group's attributes. It is written last, after every array
is on disk, so a store is a complete run only when its manifest is there, and :func:`read_tree` checks each array
against it. Whatever is missing or changed (a deleted chunk that would read back as NaN, a chunk cut in half,
a deleted array or group, edited attributes) is a :class:`RunFileError` naming the file and the array.

Saving writes a temporary sibling ``.NAME.tmp-XXXXXXXX`` and renames it into place; replacing an existing
run first renames that one to ``.NAME.old-XXXXXXXX``. So a killed save leaves at most a temporary store,
which never loads as a run and which the next save next to it removes; a killed overwrite leaves the old run
under its ``.old-`` name, which the next load or save of ``NAME`` puts back (with a warning).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from .errors import RunFileError

MANIFEST = "latent_lab_manifest"
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}$")


# ---------------------------------------------------------------------------- digests
def digest(values) -> str:
    """SHA-256 of an array's values with its kind, width and shape (byte order and text storage normalised,
    so zarr and netCDF round trips give the same digest)."""
    a = np.asarray(values)
    h = hashlib.sha256()
    if a.dtype.kind in "biufc":
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        h.update(f"{a.dtype.kind}{a.dtype.itemsize}{a.shape}".encode())
        h.update(a.tobytes())
    else:  # text, fixed-width or object
        h.update(f"text{a.shape}".encode())
        h.update(json.dumps([str(v) for v in a.ravel()]).encode())
    return h.hexdigest()


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (np.ndarray, list, tuple)):
        return [_plain(x) for x in (v.tolist() if isinstance(v, np.ndarray) else v)]
    return v


def _attrs_digest(attrs: dict) -> str:
    body = {k: _plain(v) for k, v in attrs.items() if k != MANIFEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def manifest(tree: xr.DataTree) -> dict:
    """What :func:`read_tree` will check: ``arrays`` (``/group/name`` -> shape, dtype, sha256) and ``attrs``
    (group -> sha256 of its attributes)."""
    arrays, attrs = {}, {}
    for node in tree.subtree:
        path = node.path
        attrs[path] = _attrs_digest(node.attrs)
        for name, var in node.to_dataset(inherit=False).variables.items():
            values = var.values
            arrays[f"{path.rstrip('/')}/{name}"] = {"shape": list(values.shape), "dtype": values.dtype.str,
                                                    "sha256": digest(values)}
    return {"version": 1, "arrays": arrays, "attrs": attrs}


# ---------------------------------------------------------------------------- writing
def write_tree(tree: xr.DataTree, path, *, overwrite: bool = True, is_ours=None) -> Path:
    """Write ``tree`` to ``path`` atomically (see the module docstring); ``is_ours(path)`` says whether an
    existing ``path`` may be replaced (anything else is a ``FileExistsError`` and is left alone)."""
    path = Path(path)
    recover(path)
    if path.exists():
        if is_ours is not None and not is_ours(path):
            raise FileExistsError(f"{path} exists and is not a latent-lab run; refusing to overwrite it")
        if not overwrite:
            raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    record = json.dumps(manifest(tree))
    try:
        if path.suffix == ".nc":
            tree.to_netcdf(tmp, engine="h5netcdf")
            import h5netcdf
            with h5netcdf.File(tmp, "a") as f:  # last: the file is a run from here on
                f.attrs[MANIFEST] = record
        else:
            tree.to_zarr(tmp, mode="w", consolidated=False, zarr_format=2)  # v2: fixed-width strings are specified
            import zarr
            zarr.open_group(str(tmp), mode="r+", zarr_format=2).attrs[MANIFEST] = record
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


def _siblings(path: Path, kind: str) -> list[Path]:
    if not path.parent.is_dir():
        return []
    return sorted((p for p in path.parent.iterdir()
                   if (m := _HIDDEN.match(p.name)) and m["name"] == path.name and m["kind"] == kind),
                  key=lambda p: p.stat().st_mtime, reverse=True)


def remove_temporaries(path: Path) -> None:
    """Remove the temporary stores that killed saves to ``path`` left (``.NAME.tmp-*``)."""
    for p in _siblings(Path(path), "tmp"):
        _remove(p)


def recover(path) -> bool:
    """Finish an overwrite of ``path`` that was killed between its two renames: the old run, left as
    ``.NAME.old-*``, goes back to ``path`` when nothing is there (True), and is removed when the new run
    made it there. Returns whether a run was put back."""
    path = Path(path)
    olds = _siblings(path, "old")
    if not olds:
        return False
    restored = False
    if not path.exists() and is_run(olds[0]):
        os.replace(olds[0], path)
        warnings.warn(f"{path}: an overwrite was interrupted; the run that was there is back "
                      f"(it was left as {olds[0].name})", stacklevel=3)
        olds, restored = olds[1:], True
    for p in olds:
        _remove(p)
    return restored


# ---------------------------------------------------------------------------- reading
def _open(path: Path) -> xr.DataTree:
    if path.is_dir():
        return xr.open_datatree(path, engine="zarr", consolidated=False)
    return xr.open_datatree(path, engine="h5netcdf")


def is_run(path: Path) -> bool:
    try:
        with _open(Path(path)) as tree:
            return "latent_lab_run" in tree.attrs
    except Exception:
        return False


def read_tree(path, *, newest_format: int) -> xr.DataTree:
    """The verified tree of the run at ``path`` (loaded into memory). Raises ``FileNotFoundError`` or
    :class:`RunFileError` (foreign, temporary, incomplete, corrupt or newer than ``newest_format``)."""
    path = Path(path)
    m = _HIDDEN.match(path.name)
    if m:
        what = "a temporary store of a save that did not finish" if m["kind"] == "tmp" else \
            "the previous run of an interrupted overwrite"
        raise RunFileError(f"{path} is {what}, not a run; load {path.with_name(m['name'])} (loading or saving it "
                           "recovers or removes these)")
    recover(path)
    if not path.exists():
        raise FileNotFoundError(f"no run at {path}")
    try:
        tree = _open(path)
    except Exception as e:
        raise RunFileError(f"{path} is not a readable latent-lab run ({type(e).__name__}: {e})") from e
    with tree:  # in memory once read: the file is closed again
        return _checked(tree, path, newest_format)


def _checked(tree: xr.DataTree, path: Path, newest_format: int) -> xr.DataTree:
    fmt = tree.attrs.get("latent_lab_run")
    if fmt is None:
        raise RunFileError(f"{path} is not a latent-lab run: the attribute 'latent_lab_run' is missing")
    if int(fmt) > newest_format:
        raise RunFileError(f"{path}: run format {fmt} is newer than this latent-lab ({newest_format}); "
                           "upgrade latent-lab to read it")
    record = tree.attrs.get(MANIFEST)
    if record is None:
        if int(fmt) >= 2:
            raise RunFileError(f"{path} is incomplete: it has no manifest (its save did not finish, or the file "
                               "was cut or edited)")
        warnings.warn(f"{path} was saved by a latent-lab without checksums (run format {fmt}); it is not verified",
                      stacklevel=3)
        return tree.load()
    return _verified(tree, json.loads(record), path)


def _verified(tree: xr.DataTree, record: dict, path: Path) -> xr.DataTree:
    nodes = {node.path: node for node in tree.subtree}
    missing_groups = sorted(g for g in record["attrs"] if g not in nodes)
    if missing_groups:
        raise RunFileError(f"{path} is corrupt: group {missing_groups[0]} is missing"
                           + (f" (and {len(missing_groups) - 1} more)" if len(missing_groups) > 1 else ""))
    loaded = {}
    for gpath, node in nodes.items():
        ds = node.to_dataset(inherit=False)
        if gpath in record["attrs"] and _attrs_digest(ds.attrs) != record["attrs"][gpath]:
            raise RunFileError(f"{path} is corrupt: the attributes of group {gpath} changed since it was saved")
        for name in list(ds.variables):
            key = f"{gpath.rstrip('/')}/{name}"
            try:
                ds.variables[name].load()
            except Exception as e:
                raise RunFileError(f"{path} is corrupt: array {key} cannot be read ({type(e).__name__}: {e})") from e
            want = record["arrays"].get(key)
            if want is not None:
                values = ds.variables[name].values
                if list(values.shape) != want["shape"] or digest(values) != want["sha256"]:
                    raise RunFileError(f"{path} is corrupt: array {key} does not match its checksum (a chunk was "
                                       "lost or changed)")
        loaded[gpath] = ds
    absent = [k for k in record["arrays"] if _split(k)[1] not in loaded[_split(k)[0]].variables]
    if absent:
        raise RunFileError(f"{path} is corrupt: array {absent[0]} is missing"
                           + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))
    return xr.DataTree.from_dict(loaded)


def _split(key: str) -> tuple[str, str]:
    """``/group/name`` -> (``/group``, ``name``); ``/name`` -> (``/``, ``name``)."""
    group, name = key.rsplit("/", 1)
    return group or "/", name


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()
