"""latent-lab widgets: ipywidgets/ipycanvas front ends over plain ``lab`` and ``analysis`` calls.

* :class:`ScribblePad` — draw a ControlNet condition (strokes held and rasterised in Python);
* :class:`TrajectoryViewer` — play through a run, or watch a live one (x0 preview, decoded x0,
  latents, noise prediction), with Stop;
* :class:`AttentionExplorer` — word heat maps over the image, layer and step filters, attention over
  time at a clicked pixel;
* :class:`ResidualViewer` — ControlNet residual norms per block and step, and their spatial maps;
* :class:`VideoViewer` — a Text2Video-Zero video (:func:`lab.video`) as frames x steps: play the frames,
  scrub the denoising;
* :class:`EditWidget` — prompt-to-prompt reweight / replace with the image before and after;
* :class:`Studio` — all of them around a prompt, settings and Generate/Stop, and forks of a run.

Every button or slider has a method that does the same from code (``pad.add_stroke``,
``viewer.show``, ``explorer.show``/``click``, ``studio.generate``), and errors raised in callbacks
are shown in the widget (re-raised under pytest or with ``LATENT_LAB_RAISE_WIDGET_ERRORS=1``).
"""
from .attention import AttentionExplorer
from .edit import EditWidget
from .residuals import ResidualViewer
from .scribble import ScribblePad, Stroke, rasterise
from .studio import Studio
from .trajectory import TrajectoryViewer
from .video import VideoViewer

__all__ = ["AttentionExplorer", "EditWidget", "ResidualViewer", "ScribblePad", "Stroke", "Studio", "TrajectoryViewer", "VideoViewer", "rasterise"]
