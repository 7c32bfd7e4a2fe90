"""latent-lab: the headless core. Load a pipeline, step through sampling, record a run.

    import lab
    pipe = lab.load("shapes", controlnet="scribble")
    sampler = pipe.sampler("a large red circle on a gray background", steps=30, guidance=5, seed=0)
    for state in sampler:
        ...                     # state.latents, state.pred_x0, state.noise_pred_cond, ...
    run = sampler.to_run()      # run.image, run.to_xarray(), run.save("run.zarr")
"""
from __future__ import annotations

from . import conditioning, memory, recording, sweeps
from .foundation import sds
from .foundation.video import CrossFrameAttention, Video, video
from .conditioning import Control
from .counterfactual import Ablation, ablate
from .errors import (IncompleteModel, ModelNotAvailable, ModelNotFound, NonFiniteError, RunFileError,
                     SamplingOutOfMemory)
from .guidance import AttendAndExcite, SyntaxBinding
from .loading import DEFAULT_MODEL, load
from .memory import SamplingMemoryError
from .pipeline import Pipeline
from .recording import (AttentionRecorder, RecordingBudgetError, ReplaceAttention, ResidualRecorder, Reweight,
                        attention_layer_names)
from .replays import WeightsMismatch, replay
from .run import Run
from .sampler import Sampler
from .schedulers import SCHEDULERS
from .state import StepState
from .sweeps import sweep
from .version import __version__

__all__ = [
    "Ablation", "AttendAndExcite", "AttentionRecorder", "Control", "CrossFrameAttention", "DEFAULT_MODEL",
    "IncompleteModel", "ModelNotAvailable", "ModelNotFound", "NonFiniteError", "Pipeline", "RecordingBudgetError",
    "ReplaceAttention", "ResidualRecorder", "Reweight", "Run", "RunFileError", "SCHEDULERS", "Sampler",
    "SamplingMemoryError", "SamplingOutOfMemory", "StepState", "SyntaxBinding", "WeightsMismatch", "__version__",
    "ablate", "attention_layer_names", "conditioning", "load", "memory", "recording", "replay", "sds", "sweep",
    "sweeps", "Video", "video",
]
