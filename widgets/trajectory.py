"""TrajectoryViewer: play through a denoising run, or watch one live while it samples.

Every step becomes a set of small PNG frames (the x0 preview, the VAE-decoded x0, the latent
channels, the noise prediction) sent to the browser once, as ``ipywidgets.Image`` children of a
``Stack`` per panel. The play button, the step slider and every stack are linked in the browser
(``jsdlink``: play -> slider -> stacks), so playback and scrubbing need no kernel round trip. The links
go one way only, so the page never writes a value back while the kernel moves the slider during a live run.

Live, the page tells the kernel which step it has shown (one more one-way link, from the step labels to a
hidden integer that the page saves back). A step whose frames would queue behind frames the page has not
shown yet is not sent: the page always gets the newest step, and the skipped steps' frames are filled in
when the run ends. Stop keeps the run up to one step past the step the page showed when it was pressed
(the sampler rewinds the steps it ran ahead; stepping again recomputes them bit-exactly).

    viewer = TrajectoryViewer(run)                 # a finished run
    viewer = TrajectoryViewer(pipe=pipe)           # then viewer.follow(pipe.sampler(...)) runs it live
"""
from __future__ import annotations

import threading
import time

import ipywidgets as W
import numpy as np
import traitlets

from ._base import ErrorsMixin, channel_tiles, css, png

PANELS = {
    "x0": "x0 preview",        # the x0 estimate through the tiny preview decoder (lab.Pipeline.preview; no VAE)
    "image": "decoded x0",     # VAE decode of the x0 estimate
    "latents": "latents x_t",  # the latent channels the step started from
    "noise": "noise prediction",  # the guided epsilon the scheduler used
}


class TrajectoryViewer(ErrorsMixin, W.VBox):
    """``run``: a :class:`lab.Run` to show; ``pipe``: the pipeline (default ``run.pipe``; needed for the
    x0 preview and the decoded image); ``panels``: any of ``"x0"``, ``"image"``, ``"latents"``, ``"noise"``;
    ``size``: display size of each panel in screen pixels; ``interval``: playback ms per frame;
    ``decode_live``: make the VAE-decoded panel of every live step as it comes (by default a live run shows the
    preview decoder's x0 and the VAE decodes are made once, when the run ends: the VAE is most of a frame's
    cost)."""

    run = traitlets.Any(None, allow_none=True)   # the run shown (set when a live run finishes or stops)
    running = traitlets.Bool(False)
    n_frames = traitlets.Int(0)

    def __init__(self, run=None, *, pipe=None, panels=("x0", "image", "latents", "noise"), size: int = 160,
                 interval: int = 200, batch: int = 0, decode_live: bool = False, raise_errors: bool | None = None):
        unknown = [p for p in panels if p not in PANELS]
        if unknown:
            raise ValueError(f"unknown panels {unknown}; choose from {list(PANELS)}")
        self._init_errors(raise_errors)
        self.pipe = pipe if pipe is not None else getattr(run, "pipe", None)
        needs_pipe = [p for p in panels if p in ("x0", "image")]
        if needs_pipe and self.pipe is None:
            raise ValueError(f"panels {needs_pipe} need the pipeline: pass pipe= (the run has none attached)")
        self.panels = tuple(panels)
        self.size = int(size)
        self.batch = int(batch)
        self.frame_ms: list[float] = []      # per step sent live: step done -> its frames sent
        self.frame_bytes: list[int] = []     # per step sent live: PNG bytes of all its panels
        self.dropped = 0                     # steps of the last live run not sent while the page was behind
        self.stopped_at: int | None = None   # the step the page showed when stop was pressed (live, with a page)
        self._steps_sent: list[int] = []     # the step of each child of the stacks, in order
        self._page_seen = False              # whether a page has ever reported a shown step
        self._last_send = 0.0
        self.decode_live = bool(decode_live)
        self._live = False                   # a followed run is in progress (its frames may defer the VAE panel)
        self._deferred: set[int] = set()     # steps whose VAE panel waits for the end of the run
        self.complete_ms = 0.0               # the end of the last live run: deferred and skipped frames made
        self.sampler = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._lock = threading.Lock()

        self.play = W.Play(value=0, min=0, max=0, interval=interval, description="play")
        self.slider = W.IntSlider(value=0, min=0, max=0, description="step", continuous_update=True,
                                  layout=W.Layout(width="420px"))
        W.jsdlink((self.play, "value"), (self.slider, "value"))
        self.stop_button = W.Button(description="stop", icon="stop", button_style="warning", disabled=True,
                                    tooltip="end the run at the next step boundary; the partial run is kept")
        self.stop_button.on_click(lambda _: self.stop())
        # a Stack always holds a child at index 0 (the browser's StackView fails on an index with no child):
        # a placeholder until the first step's frames replace it
        self.labels = W.Stack([self._placeholder()], selected_index=0)
        self.stacks = {p: W.Stack([self._placeholder()], selected_index=0) for p in self.panels}
        for st in [self.labels, *self.stacks.values()]:
            W.jsdlink((self.slider, "value"), (st, "selected_index"))
        cells = [W.VBox([W.HTML(f"<b>{PANELS[p]}</b>"), self.stacks[p]],
                        layout=W.Layout(width=f"{self.size + 8}px")) for p in self.panels]
        for p, cell in zip(self.panels, cells):
            cell.add_class(f"ll-panel-{p}")
        self.labels.add_class("ll-step-label")
        # what the page shows: the labels' index, saved back by the page (jsdlink calls save_changes)
        self.shown = W.IntText(value=-1, layout=W.Layout(display="none"))
        W.jsdlink((self.labels, "selected_index"), (self.shown, "value"))
        self.shown.observe(self._page_showed, "value")
        self.status = W.HTML()  # wraps, where a Label would cut a long line
        super().__init__([css(), W.HBox([self.play, self.slider, self.stop_button]), self.labels, W.HBox(cells),
                          self.status, self.error_box, self.shown])
        self.add_class("ll-trajectory")
        if run is not None:
            self.show_run(run)

    # ------------------------------------------------------------------ frames
    @staticmethod
    def _placeholder() -> W.HTML:
        return W.HTML("<i style='color:#888'>no steps yet</i>")

    def _frames(self, state, skip=()) -> dict[str, bytes]:
        b = self.batch
        out = {}
        for p in self.panels:
            if p in skip:
                continue
            if p == "x0":
                out[p] = png(self.pipe.preview(state.pred_x0[b]))
            elif p == "image":
                out[p] = png(self.pipe.decode(state.pred_x0[b:b + 1])[0])
            elif p == "latents":
                out[p] = png(channel_tiles(state.latents[b].float().cpu().numpy()))
            elif p == "noise":
                out[p] = png(channel_tiles(state.noise_pred[b].float().cpu().numpy()))
        return out

    def _widgets(self, state) -> tuple[dict, W.HTML, int]:
        """The Image widget of each panel and the label of one step, and their PNG bytes."""
        defer = ("image",) if self._live and not self.decode_live and "image" in self.panels else ()
        frames = self._frames(state, skip=defer)
        px = f"{self.size}px"
        images = {}
        for p in self.panels:
            if p in defer:  # made when the run ends (_complete)
                images[p] = W.HTML("<i style='color:#888'>VAE decode when the run ends</i>",
                                   layout=W.Layout(width=px, height=px))
                self._deferred.add(int(state.index))
                continue
            images[p] = W.Image(value=frames[p], format="png", layout=W.Layout(width=px, height=px))
            images[p].add_class("ll-pixelated")
        sigma = "" if np.isnan(state.sigma) else f" · σ = {state.sigma:.3g}"
        label = W.HTML(f"step {state.index} · t = {state.timestep:g}{sigma}")
        return images, label, sum(len(v) for v in frames.values())

    def add_step(self, state) -> float:
        """Make and send the frames of one :class:`lab.StepState`; returns the milliseconds it took."""
        t0 = time.perf_counter()
        images, label, nbytes = self._widgets(state)
        with self._lock:
            kept = self.n_frames  # children beyond the frames are the placeholder
            for p, img in images.items():
                self.stacks[p].children = (*self.stacks[p].children[:kept], img)
            self.labels.children = (*self.labels.children[:kept], label)
            self._steps_sent = [*self._steps_sent[:kept], int(state.index)]
            self._select(kept + 1)
        self._last_send = time.perf_counter()
        ms = (self._last_send - t0) * 1e3
        self.frame_ms.append(ms)
        self.frame_bytes.append(nbytes)
        return ms

    def _select(self, n: int) -> None:
        """``n`` frames are in the stacks: show the newest (the page follows the slider through the links)."""
        # max first, then value, as two messages: the page's slider clamps a value above its current max and
        # writes the clamped value back, so the new max must be in place before the new value arrives.
        # play's value too: on a reload the page's play -> slider link starts by copying play's value
        self.play.max = n - 1
        self.slider.max = n - 1
        self.play.value = n - 1
        self.slider.value = n - 1
        for st in [self.labels, *self.stacks.values()]:
            st.selected_index = n - 1
        self.n_frames = n

    def _page_showed(self, change) -> None:
        if change["new"] >= 0:
            self._page_seen = True

    def _page_step(self) -> int | None:
        """The step of the frame the page reported showing last (None before any report)."""
        i = self.shown.value
        return self._steps_sent[i] if 0 <= i < len(self._steps_sent) else None

    def _live_step(self, state) -> None:
        """The sampler's callback: send the step, or skip it while the page has not shown the frames sent before
        (filled in when the run ends); a page that reported nothing yet, or nothing for a second, gets every step."""
        behind = (self._page_seen and self.n_frames and self.shown.value < self.n_frames - 1
                  and time.perf_counter() - self._last_send < 1.0)
        if behind:  # not sent: the end of the run (_complete) fills the gap from the run's own steps
            self.dropped += 1
            return
        self.add_step(state)

    def _complete(self, run) -> None:
        """After a live run: the stacks hold every step of ``run`` in order, each with all its panels (frames the
        page has are kept; skipped steps and deferred VAE panels are made now)."""
        t0 = time.perf_counter()
        self._live = False
        have = {}
        for i, step in enumerate(self._steps_sent):
            have[step] = ({p: self.stacks[p].children[i] for p in self.panels}, self.labels.children[i])
        if [s.index for s in run.steps] == self._steps_sent and not self._deferred:
            return
        order = []
        px = f"{self.size}px"
        for state in run.steps:
            if state.index not in have:
                images, label, _ = self._widgets(state)
                have[state.index] = (images, label)
            elif state.index in self._deferred:
                img = W.Image(value=self._frames(state, skip=[p for p in self.panels if p != "image"])["image"],
                              format="png", layout=W.Layout(width=px, height=px))
                img.add_class("ll-pixelated")
                have[state.index][0]["image"] = img
            order.append(have[state.index])
        self._deferred.clear()
        self.complete_ms = (time.perf_counter() - t0) * 1e3
        with self._lock:
            if not order:
                self.clear()
                return
            for p in self.panels:
                self.stacks[p].children = tuple(images[p] for images, _ in order)
            self.labels.children = tuple(label for _, label in order)
            self._steps_sent = [s.index for s in run.steps]
            self._select(len(order))

    def clear(self) -> None:
        with self._lock:
            for st in [self.labels, *self.stacks.values()]:
                st.selected_index = 0
                st.children = (self._placeholder(),)
            self.slider.value = self.play.value = 0
            self.play.max = self.slider.max = 0
            self.n_frames = 0
            self._steps_sent = []
            self._deferred = set()
        self.frame_ms.clear()
        self.frame_bytes.clear()

    def show_run(self, run) -> None:
        """Show every step of a finished run (replacing what is shown)."""
        if self.pipe is None and any(p in ("x0", "image") for p in self.panels):
            self.pipe = run.pipe
        self.clear()
        for state in run.steps:
            self.add_step(state)
        self.show(len(run.steps) - 1 if run.steps else 0)
        self.run = run
        self._report()

    def show(self, step: int) -> None:
        """Show ``step`` (the slider moves; the frame switch itself happens in the browser)."""
        n = self.n_frames
        if not n:
            raise ValueError("nothing to show yet")
        if not -n <= step < n:
            raise IndexError(f"step {step} is out of range: the trajectory has {n} steps")
        step %= n
        self.play.value = step  # the page's play -> slider link copies play's value on a reload
        self.slider.value = step
        for st in [self.labels, *self.stacks.values()]:  # the page does this through jsdlink; keep Python in step
            st.selected_index = step

    @property
    def step(self) -> int:
        return int(self.slider.value)

    def _report(self) -> None:
        run = self.run
        msg = f"{self.n_frames} steps"
        if self.frame_ms:
            msg += f" · frame {np.median(self.frame_ms):.0f} ms, {np.mean(self.frame_bytes) / 1024:.1f} KiB"
        if self.dropped:
            msg += f" · {self.dropped} steps shown only at the end (the page was behind)"
        if self.complete_ms and "image" in self.panels and not self.decode_live:
            msg += f" · VAE panels made at the end in {self.complete_ms / 1e3:.1f} s"
        if run is not None and run.interrupted:
            msg += " · stopped early (partial run kept)"
            if self.stopped_at is not None:
                msg += f": Stop pressed at step {self.stopped_at}"
        self.status.value = msg

    # ------------------------------------------------------------------ live
    def follow(self, sampler, *, block: bool = False, on_done=None) -> threading.Thread:
        """Run ``sampler`` in a background thread, showing each step as it completes. The stop button (or
        :meth:`stop`) ends it at a step boundary and keeps the partial run; :attr:`run` is set at the end and
        ``on_done(run)`` (if given) is called, both in the sampling thread. ``block``: wait for the end.
        Steps are dropped rather than queued while the page is behind (see the module doc)."""
        if self.running:
            raise RuntimeError("a run is already in progress; stop() it first")
        if self.pipe is None:
            self.pipe = sampler.pipe
        self.clear()
        self.error_box.clear()
        self.sampler = sampler
        self.running = True
        self.stop_button.disabled = False
        self.run = None
        self._failure = None
        self.dropped = 0
        self.stopped_at = None
        self.complete_ms = 0.0
        self._live = True

        def work():
            try:
                run = sampler.run(callback=self._live_step)
                if self.stopped_at is not None and run.interrupted and sampler.position > self.stopped_at + 2:
                    # keep one step past what the page showed; the sampler can go on from there
                    sampler.rewind(self.stopped_at + 2)
                    sampler.interrupted = True
                    run = sampler.to_run()
                self._complete(run)
                self.run = run
                if on_done is not None:
                    on_done(run)
            except Exception as exc:  # noqa: BLE001 - shown in the widget; re-raised by wait()
                self._failure = exc
                self.error_box.show(exc)
            finally:
                self._live = False
                self.running = False
                self.stop_button.disabled = True
                self._report()

        self._thread = threading.Thread(target=work, name="latent-lab-sampler", daemon=True)
        self._thread.start()
        if block:
            self.wait()
        return self._thread

    @property
    def failure(self) -> BaseException | None:
        """The exception that ended the last followed run (shown in the error box), or None."""
        return self._failure

    def stop(self) -> None:
        """End the live run: the partial run is kept up to one step past the step the page shows (without a
        page: up to the next step boundary)."""
        if self.sampler is not None:
            if self.running and self._page_seen:
                self.stopped_at = self._page_step()
            self.sampler.stop()

    def wait(self, timeout: float | None = None):
        """Wait for the live run to end; returns the run. An error raised while sampling is re-raised here
        when ``raise_errors`` is set."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the run did not finish within {timeout} s")
        if self._failure is not None and self.raise_errors:
            raise self._failure
        return self.run
