"""The command line: info, sample, demo (the README's main job), and errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lab

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "lab", *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=cwd or ROOT)


def test_info():
    out = _cli("info")
    assert out.returncode == 0, out.stderr
    assert "shapes" in out.stdout and "ok" in out.stdout and "controlnets: depth, edges, pose, scribble, segmentation" in out.stdout


def test_sample_writes_image_and_run(tmp_path):
    out = _cli("sample", "a small green triangle on a white background", "--out", str(tmp_path), "--steps", "8",
               "--quiet")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "image.png").exists() and (tmp_path / "previews.png").exists()
    run = lab.Run.load(tmp_path / "run.zarr")
    assert len(run) == 8 and run.settings["prompt"] == "a small green triangle on a white background"


def test_bad_input_is_a_clear_error(tmp_path):
    out = _cli("sample", "x", "--out", str(tmp_path), "--steps", "0")
    assert out.returncode == 2 and "steps must be >= 1" in out.stderr
    out = _cli("sample", "x", "--out", str(tmp_path), "--model", "nobody/nothing")
    assert out.returncode == 2 and "not available offline" in out.stderr


def test_control_flags_fail_early_and_clearly(tmp_path):
    out = _cli("sample", "x", "--out", str(tmp_path), "--control", "scribble", "--control-image", "/no/such.png")
    assert out.returncode == 2 and "--control-image /no/such.png" in out.stderr and "Traceback" not in out.stderr
    out = _cli("sample", "x", "--out", str(tmp_path), "--control", "scribble", "--control-image",
               str(ROOT / "README.md"))
    assert out.returncode == 2 and "cannot identify image file" in out.stderr
    # a model of the user's own with a ControlNet but no condition image given: it cannot make one
    from components import controlnet, tiny_sd_components
    from diffusers import StableDiffusionPipeline
    base = tiny_sd_components()
    StableDiffusionPipeline(**base, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "sd")
    controlnet(base["unet"]).save_pretrained(tmp_path / "sd" / "controlnet-canny")
    out = _cli("sample", "x", "--out", str(tmp_path / "o"), "--model", str(tmp_path / "sd"), "--control", "canny",
               "--steps", "2")
    assert out.returncode == 2 and "--control canny needs --control-image" in out.stderr, out.stderr[-1500:]


def test_demo_writes_the_report(tmp_path):
    out = _cli("demo", "--out", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "report:" in out.stdout and "took" in out.stdout
    page = (tmp_path / "demo" / "report.html").read_text()
    for section in ("Trajectory", "Word heat maps", "ControlNet residuals: scribble", "Settings"):
        assert section in page
    # every picture has a caption; the settings read as a table, the raw provenance folded away
    assert page.count("<figure>") == page.count("<figcaption>") >= 5
    assert "<th>guidance scale</th><td>5</td>" in page and "<details>" in page
    for png in ("image.png", "condition.png", "trajectory.png", "heatmaps.png", "residuals-scribble.png"):
        assert (tmp_path / "demo" / png).stat().st_size > 300  # a real PNG (the condition is two-tone, so small)
