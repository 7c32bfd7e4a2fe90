"""A real JupyterLab server on loopback and a real Chromium driving it (Python Playwright).

Used by the ``browser`` tests. Chromium is Debian's (``/usr/bin/chromium``, installed by ``make test``);
Playwright never downloads a browser. The server runs with this interpreter, so its kernels import the
project as installed in the venv.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import numpy as np

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic", "--no-first-run"]
REPO = Path(__file__).resolve().parents[1]


def chromium_path() -> str | None:
    for cand in (os.environ.get("LATENT_LAB_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if cand and Path(cand).exists():
            return cand
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """``with JupyterLab(root) as lab: lab.url(...)`` — a JupyterLab 4 server serving ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root.parent / f"jupyter-{self.port}.log"
        self.proc = None

    def __enter__(self) -> "JupyterLab":
        home = self.root.parent / "jupyter-home"
        settings = home / "lab-settings"
        notif = settings / "@jupyterlab" / "apputils-extension"
        notif.mkdir(parents=True, exist_ok=True)
        # no news or update checks: this machine has no network, and the toast would cover the page
        (notif / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                           "checkForUpdates": False}))
        env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings),
                   JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        env.pop("PYTEST_CURRENT_TEST", None)  # the kernel is a user's kernel: errors show in the widgets
        cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
               "--ServerApp.port_retries=0", "--ServerApp.token=", "--ServerApp.password=",
               f"--ServerApp.root_dir={self.root}", "--LabServerApp.extension_manager=readonly",
               "--LabApp.news_url=", "--ServerApp.terminals_enabled=False"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                urllib.request.urlopen(f"{self.base}/api/status", timeout=2)
                return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"JupyterLab did not answer within 90 s:\n{self.log()[-3000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api(self, path: str):
        return json.load(urllib.request.urlopen(f"{self.base}/api/{path}", timeout=5))

    def wait_kernel_ready(self, timeout: float = 90) -> dict:
        """Wait until a kernel is started, idle and connected to a browser tab."""
        deadline = time.time() + timeout
        last, ks = None, []
        while time.time() < deadline:
            try:
                ks = self.api("kernels")
            except urllib.error.HTTPError as e:
                # jupyter_server answers 500 to a kernel listing that lands while a kernel is still starting
                # (its ``last_activity`` is not set yet: "expected a datetime, not the NoneType None"); poll on
                if e.code != 500:
                    raise
                ks, last = [], e
            if ks and ks[0]["connections"] >= 1 and ks[0]["execution_state"] == "idle":
                return ks[0]
            time.sleep(0.3)
        raise TimeoutError(f"no idle connected kernel after {timeout} s (last error: {last}): {ks}"
                           f"\n{self.log()[-3000:]}")


def write_notebook(path: Path, cells: list[str]) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, path)
    return path


def launch(playwright):
    exe = chromium_path()
    return playwright.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)


def run_cell(page, index: int) -> None:
    """Select code cell ``index`` of the open notebook and run it (Shift+Enter)."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.locator(".jp-InputPrompt").click()
    page.keyboard.press("Shift+Enter")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = predicate()
        if isinstance(v, np.ndarray) or v:  # an array counts as found
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
