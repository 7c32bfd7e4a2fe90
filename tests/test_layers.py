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


# ---------------------------------------------------------------------------- the import graph of lab/
UPWARD = ("analysis", "widgets", "ipywidgets", "ipycanvas", "matplotlib")
CLI = {"lab.cli", "lab.__main__"}  # the command line sits above the core (it may run lab.shapes' training)


def _lab_import_graph(root: Path = Path(__file__).resolve().parents[1]) -> dict[str, set[str]]:
    """Every module under ``root/lab`` -> the modules it imports, at module level or inside functions (lazily)."""
    import ast
    files = {}
    for f in (root / "lab").rglob("*.py"):
        parts = list(f.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_pkg else parts)
        files[name] = (f, is_pkg)
    graph = {}
    for name, (f, is_pkg) in files.items():
        package = name if is_pkg else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module
                deps.add(mod)
                deps |= {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in files}
        graph[name] = {d for d in deps if d != name}
    return graph


def _layering_problems(graph: dict[str, set[str]]) -> list[str]:
    """Upward imports, core -> lab.shapes imports, and import cycles in ``graph``."""
    problems = [f"{m} imports {d} (a layer above lab)" for m, deps in sorted(graph.items()) for d in sorted(deps)
                if d.split(".")[0] in UPWARD]
    core = [m for m in graph if not m.startswith("lab.shapes") and m not in CLI]
    problems += [f"{m} (core) imports {d}" for m in sorted(core) for d in sorted(graph[m])
                 if d.startswith("lab.shapes")]
    internal = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in sorted(internal[m]):
            if state.get(d) == 1:
                problems.append("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2
    for m in sorted(internal):
        if m not in state:
            visit(m, [m])
    return problems


def test_lab_import_graph_has_no_cycle_and_no_upward_import():
    """Issue 16: nothing under lab/ imports analysis or widgets (or the UI and plotting packages), not even
    lazily; lab's core does not import lab.shapes; the modules of lab/ import each other without cycles."""
    graph = _lab_import_graph()
    assert "lab.sampler" in graph and "lab.conditioning.text" in graph and "lab.recording.dispatch" in graph
    assert _layering_problems(graph) == []


def test_the_import_graph_check_finds_cycles_and_upward_imports(tmp_path):
    """The check can fail: on a copy of lab/ with a lazy upward import, a lazy core -> shapes import and a
    cycle added, it reports each."""
    import shutil
    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "lab", tmp_path / "lab", ignore=shutil.ignore_patterns("models", "__pycache__"))
    with open(tmp_path / "lab" / "steps.py", "a") as f:
        f.write("\n\ndef _late():\n    import analysis.report\n    from .shapes import world\n"
                "    from .sampler import Sampler\n")
    problems = _layering_problems(_lab_import_graph(tmp_path))
    assert any("lab.steps imports analysis.report" in p for p in problems)
    assert any("lab.steps (core) imports lab.shapes" in p for p in problems)
    assert any(p.startswith("import cycle") and "lab.steps" in p for p in problems)
