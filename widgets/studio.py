"""Studio: prompt, settings, a scribble pad, Generate/Stop, the live trajectory and the attention explorer.

    Studio(lab.load("shapes", controlnet="scribble"))

Generate builds a :class:`lab.Sampler` from the controls (the pad's drawing is the ControlNet
condition when a net is chosen), runs it in a background thread with the trajectory viewer following
it, and shows the image, the attention explorer and (with control) the residual viewer at the end.
Each Generate also shows the equivalent plain ``lab`` code, so a run made here can be repeated in a script: it
loads the same model, saves the pad's drawing as a PNG under ``workdir`` (named by its content) and opens it
from there, and names every recorder the Studio used (:attr:`Studio.code_text`; it runs as it stands).
"""
from __future__ import annotations

import hashlib
import html
import threading
from pathlib import Path

import ipywidgets as W
import numpy as np
import traitlets

import lab

from ._base import ErrorsMixin, css, png, shows_errors
from .attention import AttentionExplorer
from .residuals import ResidualViewer
from .scribble import ScribblePad
from .trajectory import TrajectoryViewer


class Studio(ErrorsMixin, W.VBox):
    """``pipe``: a :class:`lab.Pipeline` (with ControlNets to steer it); the keyword arguments set the
    starting values of the controls."""

    run = traitlets.Any(None, allow_none=True)  # the last finished (or stopped) run
    n_forks = traitlets.Int(0)  # branches finished since the last Generate (their runs: ``forks``)

    def __init__(self, pipe, *, prompt: str = "a large red circle and a small blue square on a gray background",
                 negative_prompt: str = "", steps: int = 20, guidance: float = 5.0, seed: int = 0,
                 scheduler: str | None = None, control: str | None = None, panels=("x0", "image", "latents", "noise"),
                 workdir="runs/studio", raise_errors: bool | None = None):
        self._init_errors(raise_errors)
        self.pipe = pipe
        self.workdir = Path(workdir)
        self.code_text = ""  # the equivalent plain code of the last Generate
        nets = list(pipe.controlnets)
        if control is not None and control not in nets:
            raise KeyError(f"no ControlNet {control!r} loaded; loaded: {nets or 'none'}")
        st = dict(style={"description_width": "76px"}, layout=W.Layout(width="320px"))
        self.prompt = W.Textarea(value=prompt, description="prompt", rows=3, **st)
        self.negative_prompt = W.Text(value=negative_prompt, description="negative", **st)
        self.seed = W.BoundedIntText(value=seed, min=0, max=2 ** 63 - 1, description="seed", **st)
        self.steps = W.IntSlider(value=steps, min=1, max=100, description="steps", **st)
        self.guidance = W.FloatSlider(value=guidance, min=0.0, max=15.0, step=0.5, description="guidance", **st)
        self.scheduler = W.Dropdown(options=[("model default", "default")] + [(s, s) for s in lab.SCHEDULERS],
                                    value=scheduler or "default", description="scheduler", **st)
        self.control = W.Dropdown(options=[("none", "none")] + [(n, n) for n in nets],
                                  value=control if control is not None else (nets[0] if nets else "none"),
                                  description="ControlNet", **st)
        self.mode = W.Dropdown(options=list(lab.conditioning.MODES), value="balanced", description="mode", **st)
        self.scale = W.FloatSlider(value=1.0, min=0.0, max=2.0, step=0.05, description="scale", **st)
        self.window = W.FloatRangeSlider(value=(0.0, 1.0), min=0.0, max=1.0, step=0.05, description="start/end",
                                         readout_format=".2f", **st)
        self.generate_button = W.Button(description="Generate", icon="play", button_style="success")
        self.stop_button = W.Button(description="Stop", icon="stop", button_style="warning", disabled=True)
        self.generate_button.on_click(lambda _: self.generate())
        self.stop_button.on_click(lambda _: self.stop())
        self.pad = ScribblePad.for_pipeline(pipe, scale=max(1, 256 // pipe.default_size), raise_errors=raise_errors)
        self.viewer = TrajectoryViewer(pipe=pipe, panels=panels, raise_errors=raise_errors)
        self.viewer.observe(self._running_changed, "running")
        self.image = W.Image(value=png(np.full((8, 8, 3), 235, np.uint8)), format="png",
                             layout=W.Layout(width="224px", height="224px"))
        self.image.add_class("ll-pixelated")
        self.image.add_class("ll-studio-image")
        self.image_caption = W.HTML()
        self.viewer.stop_button.layout.display = "none"  # the studio's own Stop does the same
        self.code = W.HTML()
        self.results = W.VBox([])
        # the time machine: fork the last run at the step the trajectory shows, with changes; branches side by side
        fst = dict(style={"description_width": "60px"})
        self.fork_prompt = W.Text(value=prompt, description="prompt", layout=W.Layout(width="420px"), **fst)
        self.fork_guidance = W.FloatText(value=guidance, description="guidance", layout=W.Layout(width="150px"), **fst)
        self.fork_seed = W.IntText(value=seed, description="seed", layout=W.Layout(width="150px"), **fst,
                                   tooltip="a new seed draws fresh noise for the steps after the fork")
        self.fork_button = W.Button(description="Fork at shown step", icon="code-branch", disabled=True,
                                    layout=W.Layout(width="180px"),
                                    tooltip="continue the last run from the step the trajectory shows, with these "
                                            "settings; the steps before it are shared")
        self.fork_button.on_click(lambda _: self.fork())
        self.branches = W.HBox([], layout=W.Layout(flex_flow="row wrap"))
        self.branches.add_class("ll-branches")
        self.forks: list = []  # (step, changes, run) of every branch, in order
        self._fork_thread = None
        self.fork_box = W.VBox([W.HTML("<b>Fork</b> · go back to the step the trajectory shows and continue with "
                                       "another prompt, guidance or seed (the time machine)"),
                                W.HBox([self.fork_prompt, self.fork_guidance, self.fork_seed, self.fork_button],
                                       layout=W.Layout(flex_flow="row wrap")), self.branches],
                               layout=W.Layout(display="none"))
        self.fork_box.add_class("ll-fork")
        controls = W.VBox([W.HTML("<b>settings</b>"), self.prompt, self.negative_prompt, self.seed, self.steps,
                           self.guidance, self.scheduler, self.control, self.mode, self.scale, self.window,
                           W.HBox([self.generate_button, self.stop_button])], layout=W.Layout(min_width="324px"))
        pad_w = self.pad.size[0] * self.pad.scale
        # the three columns keep their width and wrap onto the next line in a narrow notebook; side by side
        # they fit a 1366-px laptop screen with JupyterLab's file browser open
        top = W.HBox([controls,
                       W.VBox([W.HTML("<b>condition</b> · draw here"), self.pad],
                              layout=W.Layout(min_width=f"{max(pad_w, 316) + 8}px")),
                       W.VBox([W.HTML("<b>result</b>"), self.image, self.image_caption],
                              layout=W.Layout(min_width="232px", max_width="260px"))],
                      layout=W.Layout(flex_flow="row wrap"))
        title = W.HTML("<div style='font-size:15px'><b>latent-lab Studio</b> · write a prompt, draw a condition, "
                       "press Generate; the trajectory, the attention and the residuals follow below</div>")
        trajectory = W.HTML("<b>Denoising trajectory</b> · play or scrub the steps; live while sampling")
        super().__init__([css(), title, top, self.error_box, trajectory, self.viewer, self.fork_box, self.code,
                          self.results])
        self.add_class("ll-studio")

    # ------------------------------------------------------------------ actions (also plain calls)
    def sampler_kwargs(self) -> dict:
        """The settings the controls describe, as :meth:`lab.Pipeline.sampler` keyword arguments."""
        kw = dict(prompt=self.prompt.value, negative_prompt=self.negative_prompt.value or None,
                  steps=int(self.steps.value), guidance=round(float(self.guidance.value), 4), seed=int(self.seed.value),
                  scheduler=None if self.scheduler.value == "default" else self.scheduler.value)
        if self.control.value != "none":
            start, end = self.window.value
            kw["control"] = lab.Control(self.control.value, self.pad.image, scale=round(float(self.scale.value), 4),
                                        start=round(float(start), 4), end=round(float(end), 4), mode=self.mode.value)
        return kw

    @shows_errors
    def generate(self, *, wait: bool = False):
        """Start a run with the current settings (in a background thread; ``wait`` blocks until it ends and
        returns the run). Invalid settings raise here, before any sampling, and show in the widget."""
        if self.viewer.running:
            raise RuntimeError("a run is in progress: press Stop first")
        if self._forking():
            raise RuntimeError("a fork is being sampled: wait for its image")
        self.error_box.clear()
        kw = self.sampler_kwargs()
        if not kw["prompt"].strip():
            raise ValueError("the prompt is empty: type what to draw")
        recorders = [self._attention_recorder()]
        if "control" in kw:
            recorders.append(lab.ResidualRecorder(maps=True))
        sampler = self.pipe.sampler(**kw, recorders=recorders, progress=False)
        self.code_text = self._as_code(kw, recorders)
        self.code.value = ("<details><summary>the same run in plain <code>lab</code> code</summary>"
                           "<pre style='font-size:11px'>" + html.escape(self.code_text) + "</pre></details>")
        # the previous run's result and views go while this one is live (issue 25: they stayed, as if current)
        self.image.value = png(np.full((8, 8, 3), 235, np.uint8))
        self.image_caption.value = f"sampling {kw['steps']} steps, seed {kw['seed']}: the trajectory is below"
        self.results.children = ()
        self.branches.children = ()
        self.forks = []
        self.n_forks = 0
        self.fork_box.layout.display = "none"
        self.viewer.follow(sampler, on_done=self._finished)
        if wait:
            run = self.viewer.wait()
            if self.viewer.failure is not None:  # shown by the viewer; raise_errors is off
                return None
            return run
        return None

    def _attention_recorder(self):
        """Cross-attention for the explorer; with a latent of at most 16x16 (the shapes model) also
        self-attention and every head (a few MB per step), for the explorer's heads and self-attention views."""
        side = self.pipe.default_size // self.pipe.vae_scale_factor
        if side * side <= 256:
            return lab.AttentionRecorder(kind="both", heads="all")
        return lab.AttentionRecorder()

    def stop(self) -> None:
        """End the current run: the partial run is kept up to one step past the step the page shows, and
        shown."""
        self.viewer.stop()

    def _running_changed(self, change) -> None:
        self.generate_button.disabled = change["new"]
        self.stop_button.disabled = not change["new"]

    def _finished(self, run) -> None:
        """In the sampling thread, when the run ends: the image, the explorer and the residual viewer."""
        if run.interrupted and run.steps:  # x_t of a stopped run is still noisy: show the model's x0 estimate
            shown = run.decode(-1)[0]
            self.image_caption.value = (f"stopped after {len(run.steps)} of {run.settings['num_steps']} steps: "
                                        "the x0 estimate")
        else:
            shown = run.image
            self.image_caption.value = f"{len(run.steps)} steps, seed {run.settings['seed']}"
        self.image.value = png(shown)
        views = []
        if run.steps:
            views.append(AttentionExplorer(run, image=shown, raise_errors=self.raise_errors))
            if run.settings.get("controls"):
                views.append(ResidualViewer(run, raise_errors=self.raise_errors))
        self.results.children = views
        if run.steps:
            self.fork_prompt.value = str(run.settings["prompt"])
            self.fork_guidance.value = float(run.settings["guidance"])
            self.fork_seed.value = int(run.settings["seed"]) if run.settings.get("seed") is not None else 0
            self.fork_button.disabled = False
            self.fork_box.layout.display = None
        self.run = run

    # ------------------------------------------------------------------ the time machine
    def fork_changes(self) -> dict:
        """What the fork fields change against the last run (``prompt``, ``guidance``, ``seed``)."""
        st = self.run.settings
        out = {}
        if self.fork_prompt.value.strip() != str(st["prompt"]):
            out["prompt"] = self.fork_prompt.value.strip()
        if round(float(self.fork_guidance.value), 4) != float(st["guidance"]):
            out["guidance"] = round(float(self.fork_guidance.value), 4)
        if st.get("seed") is None or int(self.fork_seed.value) != int(st["seed"]):
            out["seed"] = int(self.fork_seed.value)
        return out

    @shows_errors
    def fork(self, step: int | None = None, *, wait: bool = False, **changes):
        """Continue the last run from before ``step`` (default: the step the trajectory shows) with ``changes``
        (default: the fork fields' changes; :meth:`lab.Sampler.fork`'s keywords), in a background thread; the
        branch's image joins the others side by side. ``wait``: block and return the branch's run."""
        if self.run is None or not self.run.steps:
            raise RuntimeError("nothing to fork yet: Generate a run first")
        if self.viewer.running or self._forking():
            raise RuntimeError("a run is in progress: wait for it, or press Stop")
        sampler = self.viewer.sampler
        k = int(self.viewer.step if step is None else step)
        if not 0 <= k < len(self.run.steps):
            raise IndexError(f"step {k} is outside the run's steps 0..{len(self.run.steps) - 1}")
        changes = changes or self.fork_changes()
        if "prompt" in changes and not str(changes["prompt"]).strip():
            raise ValueError("the fork's prompt is empty")
        if not changes:
            raise ValueError("the fork changes nothing: edit its prompt, guidance or seed first")
        branch = sampler.fork(at=k, **changes)  # raises on an invalid change, before any sampling
        card = self._card(None, f"fork at step {k}: sampling…")
        if not self.branches.children:
            r = self.run
            self.branches.children = (self._card(r.decode(-1)[0], f"the run, stopped after {len(r.steps)} steps: its "
                                                 "x0 estimate") if r.interrupted else self._card(r.image, "the run as generated"),)
        self.branches.children = (*self.branches.children, card)
        self.fork_button.disabled = True
        result = {}

        def work():
            try:
                run = branch.run()
                result["run"] = run
                self.forks.append((k, dict(changes), run))
                self.n_forks = len(self.forks)
                what = ", ".join(f"{key} {v!r}" if key == "prompt" else f"{key} {v}" for key, v in changes.items())
                card.children[0].value = png(run.image)
                card.children[1].value = f"fork at step {k}: {html.escape(what)}"
            except Exception as exc:  # noqa: BLE001 - shown in the widget
                card.children[1].value = f"<span class='ll-error'>{html.escape(str(exc))}</span>"
                result["error"] = exc
            finally:
                self.fork_button.disabled = False

        self._fork_thread = threading.Thread(target=work, name="latent-lab-fork", daemon=True)
        self._fork_thread.start()
        if wait:
            self._fork_thread.join()
            if "error" in result and self.raise_errors:
                raise result["error"]
            return result.get("run")
        return None

    def _forking(self) -> bool:
        return self._fork_thread is not None and self._fork_thread.is_alive()

    @staticmethod
    def _card(image, caption: str) -> W.VBox:
        img = W.Image(value=png(image if image is not None else np.full((8, 8, 3), 235, np.uint8)), format="png",
                      layout=W.Layout(width="160px", height="160px"))
        img.add_class("ll-pixelated")
        box = W.VBox([img, W.HTML(caption, layout=W.Layout(max_width="170px"))], layout=W.Layout(margin="0 10px 0 0"))
        box.add_class("ll-branch")
        return box

    @property
    def explorer(self) -> AttentionExplorer | None:
        return next((v for v in self.results.children if isinstance(v, AttentionExplorer)), None)

    @property
    def residual_viewer(self) -> ResidualViewer | None:
        return next((v for v in self.results.children if isinstance(v, ResidualViewer)), None)


    def _as_code(self, kw: dict, recorders) -> str:
        """Plain ``lab`` code that makes the same run: the model load, the condition image (saved under
        :attr:`workdir` by the hash of its pixels), the sampler call with every recorder used."""
        lines = ["import lab"]
        nets = sorted(self.pipe.controlnets)
        net_arg = f", controlnet={nets!r}" if nets else ""
        if self.pipe.path is not None or self.pipe.name in lab.loading.BUNDLED:
            source = self.pipe.name if self.pipe.name in lab.loading.BUNDLED else str(self.pipe.path)
            lines.append(f"pipe = lab.load({source!r}{net_arg})")
        else:
            lines.append("# pipe: the lab.Pipeline this Studio was given (built from components, not from a directory)")
        parts = [repr(kw["prompt"])]
        for k in ("negative_prompt", "steps", "guidance", "seed", "scheduler"):
            if kw.get(k) is not None:
                parts.append(f"{k}={kw[k]!r}")
        if "control" in kw:
            c = kw["control"]
            lines.insert(1, "from PIL import Image")
            path = self._save_condition(c.image)
            parts.append(f"control=lab.Control({c.net!r}, Image.open({str(path)!r}), scale={c.scale}, "
                         f"start={c.start}, end={c.end}, mode={c.mode!r})")
        rec = ", ".join(_recorder_code(r) for r in recorders)
        lines.append("run = pipe.sampler(" + ", ".join(parts) + f",\n                   recorders=[{rec}]).run()")
        return "\n".join(lines)

    def _save_condition(self, image) -> Path:
        """The drawing as a PNG named by its pixels (written once; the same drawing reuses the file)."""
        path = self.workdir / f"condition-{hashlib.sha256(np.asarray(image).tobytes()).hexdigest()[:12]}.png"
        if not path.exists():
            self.workdir.mkdir(parents=True, exist_ok=True)
            image.save(path, format="PNG")
        return path


def _recorder_code(recorder) -> str:
    if isinstance(recorder, lab.ResidualRecorder):
        return "lab.ResidualRecorder(maps=True)"
    if recorder.kind != "cross" or recorder.heads != "mean":
        return f"lab.AttentionRecorder(kind={recorder.kind!r}, heads={recorder.heads!r})"
    return "lab.AttentionRecorder()"
