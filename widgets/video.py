"""VideoViewer: a Text2Video-Zero video (:func:`lab.video`) as frames x denoising steps.

Every (step, frame) becomes a PNG sent to the browser once: the decoded x0 estimate (or the x0 preview,
no VAE). The play button runs through the frames and the step slider scrubs the denoising. Both are
linked in the browser (``jsdlink``: play -> frame slider -> each step's frame stack; step slider -> the
step stacks), so playing and scrubbing need no kernel round trip. Under the main view a film strip shows
all frames of the selected step.

    viewer = VideoViewer(lab.video(pipe, "a large red circle on a gray background", motion=(4, 0)))
"""
from __future__ import annotations

import ipywidgets as W
import torch

from ._base import ErrorsMixin, css, png

PANELS = {"image": "decoded x0", "x0": "x0 preview"}


class VideoViewer(ErrorsMixin, W.VBox):
    """``video``: a :class:`lab.Video`; ``pipe``: its pipeline (default the video's); ``panel``: ``"image"``
    (the VAE-decoded x0 estimate) or ``"x0"`` (the latent->RGB preview); ``size``: the main view in screen
    pixels, ``strip``: each film-strip frame; ``interval``: playback ms per frame."""

    def __init__(self, video, *, pipe=None, panel: str = "image", size: int = 256, strip: int = 80,
                 interval: int = 250, raise_errors: bool | None = None):
        if panel not in PANELS:
            raise ValueError(f"unknown panel {panel!r}; choose from {list(PANELS)}")
        if not hasattr(video, "frames") or not hasattr(video, "start_step"):
            raise TypeError(f"VideoViewer shows a lab.Video (lab.video(...)), got {type(video).__name__}")
        self._init_errors(raise_errors)
        self.video, self.panel = video, panel
        self.pipe = pipe if pipe is not None else video.frames.pipe
        if self.pipe is None:
            raise ValueError("the video has no pipeline attached: pass pipe=")
        steps = video.frames.steps
        n_frames = video.n_frames
        self.pngs = [self._frames(state) for state in steps]  # [step][frame] -> PNG bytes
        px, spx = f"{size}px", f"{strip}px"

        def image(data, side):
            img = W.Image(value=data, format="png", layout=W.Layout(width=side, height=side))
            img.add_class("ll-pixelated")
            return img

        last = len(steps) - 1
        self.play = W.Play(value=0, min=0, max=n_frames - 1, interval=interval, description="play frames")
        self.frame_slider = W.IntSlider(value=0, min=0, max=n_frames - 1, description="frame",
                                        layout=W.Layout(width="300px"))
        self.step_slider = W.IntSlider(value=last, min=0, max=last, description="step",
                                       layout=W.Layout(width="420px"))
        W.jsdlink((self.play, "value"), (self.frame_slider, "value"))
        self.main = W.Stack([W.Stack([image(d, px) for d in frames], selected_index=0) for frames in self.pngs],
                            selected_index=last, layout=W.Layout(width=px))
        for inner in self.main.children:
            W.jsdlink((self.frame_slider, "value"), (inner, "selected_index"))
        self.strip = W.Stack([W.HBox([image(d, spx) for d in frames]) for frames in self.pngs], selected_index=last)
        self.step_labels = W.Stack([W.HTML(f"step {video.start_step + s.index} · t = {s.timestep:g}") for s in steps],
                                   selected_index=last)
        self.frame_labels = W.Stack([W.HTML(f"frame {k}") for k in range(n_frames)], selected_index=0)
        for st in (self.main, self.strip, self.step_labels):
            W.jsdlink((self.step_slider, "value"), (st, "selected_index"))
        W.jsdlink((self.frame_slider, "value"), (self.frame_labels, "selected_index"))
        self.main.add_class("ll-video-main")
        self.strip.add_class("ll-video-strip")
        self.step_labels.add_class("ll-video-step-label")
        self.frame_labels.add_class("ll-video-frame-label")
        s = video.settings
        about = (f"<b>{PANELS[panel]}</b> · {n_frames} frames · motion {s.get('content_motion_px')} px/frame · "
                 f"cross-frame {'on' if s['cross_frame'] else 'off'} · motion dynamics "
                 f"{'on' if s['motion_dynamics'] else 'off'} · background smoothing "
                 f"{'on' if s['background_smoothing'] else 'off'}")
        super().__init__([css(), W.HTML(about), W.HBox([self.play, self.frame_slider, self.frame_labels]),
                          W.HBox([self.step_slider, self.step_labels]), self.main, self.strip, self.error_box])
        self.add_class("ll-video")

    def _frames(self, state) -> list[bytes]:
        x0 = state.pred_x0
        if self.panel == "x0":
            return [png(self.pipe.preview(x0[k])) for k in range(x0.shape[0])]
        with torch.no_grad():
            return [png(im) for im in self.pipe.decode(x0)]
