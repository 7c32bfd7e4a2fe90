"""The layers import one way: lab never imports analysis, widgets, ipywidgets, ipycanvas, matplotlib."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

BLOCKED = ("ipywidgets", "ipycanvas", "matplotlib", "analysis", "widgets")


def _run_with_blocked(tmp_path, blocked, code):
    """Run ``code`` in a fresh interpreter where each of ``blocked`` is shadowed, ahead of everything on
    sys.path, by a package whose import fails. Returns (completed process, environment)."""
    for name in blocked:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('blocked by test: {name}')\n")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(root)]))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                         env=env, cwd=tmp_path)
    return out, env


def test_lab_imports_with_ui_and_plotting_blocked(tmp_path):
    out, env = _run_with_blocked(tmp_path, BLOCKED, """
        import sys
        import lab, lab.cli, lab.shapes.world, lab.shapes.train, lab.shapes.tokenizer, lab.sweeps
        pipe = lab.load('shapes')
        run = pipe.sampler('a red circle', steps=2, progress=False).run()
        run.to_xarray(); run.preview(0)
        bad = [m for m in sys.modules if m.split('.')[0] in %r]
        assert not bad, bad
        print('ok')
    """ % (BLOCKED,))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
    # the blocker works: importing a blocked package in that environment fails
    probe = subprocess.run([sys.executable, "-c", "import matplotlib"], capture_output=True, text=True, env=env,
                           cwd=tmp_path)
    assert probe.returncode != 0 and "blocked by test" in probe.stderr


def test_analysis_imports_without_widgets(tmp_path):
    """analysis sits between lab and widgets: it works with ipywidgets, ipycanvas and widgets blocked."""
    out, _ = _run_with_blocked(tmp_path, ("ipywidgets", "ipycanvas", "widgets"), """
        import sys
        import analysis, analysis.attention, analysis.controlnet, analysis.evaluate, analysis.report, analysis.sweep
        bad = [m for m in sys.modules if m.split('.')[0] in ('ipywidgets', 'ipycanvas', 'widgets')]
        assert not bad, bad
        print('ok')
    """)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_widgets_build_only_on_lab_and_analysis():
    """widgets import lab and analysis (and the UI packages), never the other way round, and hold no
    module-level widget instances (no comm is opened by importing them)."""
    code = textwrap.dedent("""
        import warnings
        warnings.simplefilter('ignore', DeprecationWarning)
        import ipywidgets, ipycanvas, matplotlib  # ipycanvas opens its own canvas-manager widget on import
        from ipywidgets.widgets.widget import _instances
        before = set(_instances)
        import widgets
        assert set(_instances) == before, 'importing widgets created widget instances'
        print('ok')
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    root = Path(__file__).resolve().parents[1]
    for pkg in ("lab", "analysis"):
        for f in (root / pkg).rglob("*.py"):
            text = f.read_text()
            assert "import widgets" not in text and "from widgets" not in text, f
