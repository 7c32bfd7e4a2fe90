"""Make a run again from what it recorded: ``lab.replay(run_or_path, pipe)``.

The run's :class:`~lab.recipe.Recipe` gives the sampler's arguments and the forks' changes; the new sampler
takes the same steps, applies each fork's changes at its step, and returns a new :class:`lab.Run`, equal bit
for bit on CPU (latents of every step). Before any sampling the model is compared with the one that made the
run (:meth:`lab.Pipeline.weights`): other weights, another dtype or a missing ControlNet are refused, naming
the part that differs.
"""
from __future__ import annotations

from pathlib import Path

from .recipe import Recipe, _PendingReplace
from .recording import AttentionRecorder, ReplaceAttention
from .run import Run
from .sampler import Sampler


class WeightsMismatch(ValueError):
    """The pipeline given to :func:`replay` is not the model that made the run."""


def replay(run, pipe, *, progress: bool = False, check_weights: bool = True) -> Run:
    """A new run made from ``run``'s recipe on ``pipe`` (``run``: a :class:`lab.Run` or the path of a saved
    one). ``check_weights=False`` replays on other weights anyway (the result then differs)."""
    if isinstance(run, (str, Path)):
        run = Run.load(run)
    recipe = getattr(run, "recipe", None)
    if recipe is None:
        raise ValueError("this run holds no recipe: it was saved by a latent-lab without replay (format 1) or "
                         "built by hand")
    if recipe.why_not:
        raise ValueError(f"this run cannot be replayed: {recipe.why_not}")
    if check_weights:
        check_same_weights(run.settings.get("weights"), pipe, run.settings)
    return _sample(recipe, pipe, progress)


def check_same_weights(recorded: dict | None, pipe, settings: dict) -> None:
    """Refuse ``pipe`` when a module the run recorded has other weights (or is missing)."""
    if not recorded:
        raise WeightsMismatch("the run recorded no weight digests, so its model cannot be checked; pass "
                              "check_weights=False to replay it anyway")
    nets = [k[len("controlnet["):-1] for k in recorded if k.startswith("controlnet[")]
    missing = [n for n in nets if n not in pipe.controlnets]
    if missing:
        raise WeightsMismatch(f"the run used ControlNet(s) {missing}, which this pipeline has not loaded "
                              f"(loaded: {sorted(pipe.controlnets)}); load it with lab.load(model, controlnet=...)")
    now = pipe.weights(nets)
    differ = [k for k, v in recorded.items() if now.get(k) != v]
    if differ:
        made = f"{settings.get('model')!r} in {settings.get('dtype')}"
        raise WeightsMismatch(f"this pipeline is not the model that made the run: {', '.join(differ)} "
                              f"differ{'s' if len(differ) == 1 else ''} (the run was made by {made}; this is "
                              f"{pipe.name!r} in {str(pipe.dtype).removeprefix('torch.')}). Load that model, or "
                              "pass check_weights=False to replay on these weights anyway")


def _sample(recipe: Recipe, pipe, progress: bool) -> Run:
    args = {k: _live(v, pipe) for k, v in recipe.args.items()}
    args["progress"] = progress
    sampler = Sampler(pipe, **args)
    sampler._pending = [(step, {k: _live(v, pipe) for k, v in changes.items()}) for step, changes in recipe.plan]
    return sampler.run()


def _live(v, pipe):
    """A decoded value with the edits that need a source run given one (replayed first, on ``pipe``)."""
    if isinstance(v, _PendingReplace):
        return ReplaceAttention(_sample(v.source, pipe, False), steps=v.steps, layers=v.layers)
    if isinstance(v, AttentionRecorder) and any(isinstance(e, _PendingReplace) for e in v.edits):
        v.edits = [_live(e, pipe) for e in v.edits]
        return v
    if isinstance(v, list):
        return [_live(x, pipe) for x in v]
    if isinstance(v, tuple):
        return tuple(_live(x, pipe) for x in v)
    return v
