"""``lab.load``: local diffusers directories, the bundled shapes model, cached Hugging Face repos.

Nothing here downloads: a repo id is looked up in the local Hugging Face cache only
(``local_files_only=True``), so a missing model fails at once with :class:`ModelNotFound`
instead of waiting on the network.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path

import torch

from .errors import IncompleteModel, ModelNotFound

BUNDLED = {"shapes": Path(__file__).parent / "models" / "shapes"}
DEFAULT_MODEL = "shapes"


def bundled_path(name: str = DEFAULT_MODEL) -> Path:
    return BUNDLED[name]


def resolve_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """Default device: CUDA if available, else CPU. Default dtype: fp16 on CUDA, fp32 on CPU.
    fp16/bf16 asked on CPU runs in fp32 with a warning (CPU half kernels are slow or missing)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dt = torch.float16 if dev.type == "cuda" else torch.float32
    else:
        dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if not isinstance(dt, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or its name, not {dtype!r}")
    if dev.type == "cpu" and dt in (torch.float16, torch.bfloat16):
        warnings.warn(f"{dt} on CPU is not supported by latent-lab; running in float32 instead", stacklevel=3)
        dt = torch.float32
    return dev, dt


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
        return str(HF_HUB_CACHE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return os.path.expanduser("~/.cache/huggingface/hub")


def resolve_path(name_or_path) -> Path:
    """A local directory for ``name_or_path``: a bundled name, an existing path, or a cached repo id."""
    if isinstance(name_or_path, Path) or os.path.sep in str(name_or_path) and Path(name_or_path).exists():
        p = Path(name_or_path)
        if not p.exists():
            raise ModelNotFound(f"no model directory at {p}", [str(p)])
        return p
    name = str(name_or_path)
    tried = []
    if name in BUNDLED:
        p = BUNDLED[name]
        if not (p / "model_index.json").exists():
            raise IncompleteModel(f"the bundled model {name!r} is missing from the installed package; reinstall "
                                  f"latent-lab or retrain it with `python -m lab train shapes`", [str(p)])
        return p
    tried.append(f"bundled models: {sorted(BUNDLED)}")
    p = Path(name).expanduser()
    tried.append(f"local directory {p.resolve()}")
    if p.exists():
        return p
    if name.count("/") == 1 and not name.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        cache = _hf_cache_dir()
        tried.append(f"Hugging Face cache {cache} (repo {name}, local files only)")
        try:
            return Path(snapshot_download(name, local_files_only=True))
        except Exception as e:  # LocalEntryNotFoundError, OfflineModeIsEnabled, ...
            tried[-1] += f": {type(e).__name__}"
    raise ModelNotFound(
        f"model {name!r} is not available offline. Pass a local diffusers directory, or on a machine with "
        f"network run `huggingface-cli download {name}` (or `diffusers.DiffusionPipeline.download`) to fill "
        f"the cache, then load again with HF_HUB_OFFLINE=1.", tried)


def read_model_index(path: Path) -> dict:
    idx = path / "model_index.json"
    if not idx.exists():
        cfg = path / "config.json"
        if cfg.exists() and json.loads(cfg.read_text()).get("_class_name") == "ControlNetModel":
            raise IncompleteModel(f"{path} is a ControlNet, not a pipeline: pass it as "
                                  f"lab.load(BASE_MODEL, controlnet={str(path)!r})", [str(idx)])
        raise IncompleteModel(f"{path} has no model_index.json: not a diffusers pipeline directory", [str(idx)])
    try:
        index = json.loads(idx.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IncompleteModel(f"{idx} is not valid JSON ({e}); restore it from the model's source",
                              [str(idx)]) from None
    if not isinstance(index, dict):
        raise IncompleteModel(f"{idx} does not hold a JSON object; restore it from the model's source", [str(idx)])
    return index


def load_controlnet(spec, base_path: Path, dtype: torch.dtype):
    """A ``ControlNetModel`` from a kind name of the base model (``"scribble"`` -> its
    ``controlnet-scribble`` subfolder), a local directory, a cached repo id, or an instance."""
    from diffusers import ControlNetModel
    if isinstance(spec, ControlNetModel):
        return spec.to(dtype=dtype)
    spec = str(spec)
    sub = base_path / f"controlnet-{spec}"
    tried = [str(sub)]
    if (sub / "config.json").exists():
        return ControlNetModel.from_pretrained(sub, dtype=dtype)
    try:
        path = resolve_path(spec)
    except ModelNotFound as e:
        kinds = sorted(p.name.removeprefix("controlnet-") for p in base_path.glob("controlnet-*"))
        raise ModelNotFound(f"ControlNet {spec!r} not found; this model ships {kinds or 'none'}",
                            tried + e.tried) from None
    try:
        return ControlNetModel.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise IncompleteModel(f"could not read a ControlNetModel from {path}: {e}", tried + [str(path)]) from e


@contextlib.contextmanager
def quiet_libraries():
    """Silence diffusers/transformers info logs and loading bars for the duration (restored after)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog
    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


def _adapter_base(path: Path, sub: Path, task: str, base: str, retrain: str) -> str:
    """The folder of ``path`` that the adapter in ``sub`` goes over (its ``lab_adapter.json``'s ``base``, else
    ``base``): a clear error when it is missing, a warning when its weights are not the ones the adapter was
    trained over (``retrain``: the ``--task`` that trains it again)."""
    from .token_encoders import ADAPTER_FILE, weights_digest
    if not (sub / ADAPTER_FILE).exists():
        return base
    adapter = json.loads((sub / ADAPTER_FILE).read_text())
    base = adapter.get("base", base)
    if not (path / base / "config.json").exists():
        raise IncompleteModel(f"the {task!r} model is an adapter over {path / base}, which is missing",
                              [str(path / base)])
    digest = weights_digest(path / base) if "base_digest" in adapter else None
    if digest is not None and digest != adapter["base_digest"]:
        warnings.warn(f"the {task!r} adapter ({sub}) was trained and measured over other weights of "
                      f"{path / base} (digest {adapter['base_digest']}, these are {digest}): it loads, "
                      f"but its measured quality may not hold; retrain it over this base "
                      f"(python -m lab train shapes --task {retrain} --base {path})", stacklevel=4)
    return base


def _task_vae(path: Path, task: str, dtype: torch.dtype):
    """The task's VAE where the model has a decoder adapter for it (``vae-TASK``, the view model's: a LoRA over the
    decoder of the VAE it names, merged in), else ``None`` (the pipeline's own VAE)."""
    from diffusers import AutoencoderKL
    from .token_encoders import LORA_FILE, merge_lora
    sub = path / f"vae-{task}"
    if not (sub / LORA_FILE).exists():
        return None
    base = _adapter_base(path, sub, task, "vae", f"{task}-decoder")
    with quiet_libraries():
        vae = AutoencoderKL.from_pretrained(path / base, dtype=dtype)
    merge_lora(vae, sub / LORA_FILE)
    return vae


def _task_unet(path: Path, task: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel
    from .token_encoders import LORA_FILE, PARTIAL_FILE, TOKEN_ENCODERS, load_partial, merge_lora
    sub = path / f"unet-{task}"
    if (sub / PARTIAL_FILE).exists():
        # weights over the text UNet (lab.token_encoders); a CA task's token encoder beside it (TASK_embedder);
        # an adapter's record names the UNet it goes over (the view model's: the inpainting UNet) and its weights
        base = _adapter_base(path, sub, task, "unet", task)
        with quiet_libraries():
            unet = UNet2DConditionModel.from_pretrained(path / base, dtype=dtype)
        load_partial(unet, sub / PARTIAL_FILE)
        if (sub / LORA_FILE).exists():  # a LoRA adapter (the view model's), merged in
            merge_lora(unet, sub / LORA_FILE)
        out = {"unet": unet}
        name = {"views": "camera_embedder"}.get(task, f"{task}_embedder")
        if name in TOKEN_ENCODERS:
            if not (path / name / "config.json").exists():
                raise IncompleteModel(f"the {task!r} model reads tokens made by {path / name}, which is missing",
                                      [str(path / name)])
            with quiet_libraries():
                out[name] = TOKEN_ENCODERS[name].from_pretrained(path / name).to(dtype)
        return out
    if not (sub / "config.json").exists():
        have = sorted(p.name.removeprefix("unet-") for p in path.glob("unet-*")
                      if (p / "config.json").exists() or (p / PARTIAL_FILE).exists())
        raise ModelNotFound(f"{path} has no {task!r} task model (a unet-{task} folder); it has "
                            f"{have or 'none'}. Train one with `python -m lab train shapes --task {task} --base "
                            f"{path}`", [str(sub)])
    with quiet_libraries():
        unet = UNet2DConditionModel.from_pretrained(sub, dtype=dtype)
    out = {"unet": unet}
    if unet.config.num_class_embeds and unet.config.in_channels == unet.config.out_channels + 3:
        # SD's x4 upscaler layout: the low-res image is noised by a scheduler of its own (StableDiffusionUpscalePipeline)
        from diffusers import DDPMScheduler
        lrs = path / "low_res_scheduler"
        if not (lrs / "scheduler_config.json").exists():
            raise IncompleteModel(f"the {task!r} model is an upscaler and needs {lrs}/scheduler_config.json",
                                  [str(lrs)])
        out["low_res_scheduler"] = DDPMScheduler.from_pretrained(lrs)
    return out


def load(name_or_path=DEFAULT_MODEL, *, controlnet=None, device=None, dtype=None, task=None):
    """Load a pipeline into a :class:`lab.Pipeline`.

    ``name_or_path``: ``"shapes"`` (bundled), a local diffusers directory (SD 1.x/2.x, SDXL,
    inpainting layouts), or a Hugging Face repo id present in the local cache.
    ``controlnet``: a kind of the bundled model (``"scribble"``, ``"segmentation"``, ``"edges"``, ``"pose"``,
    ``"depth"``), a ControlNet directory or repo id, a ``ControlNetModel``, or a list/dict of those.
    ``task``: a model of the task table that lives beside the text model in a ``unet-TASK`` subfolder (the
    shapes model's ``"segmap"``, ``"class"``, ..., :mod:`lab.shapes.tasks`; ``"views"``, the Zero-1-to-3 view model,
    :mod:`lab.shapes.view_model`): its UNet with the directory's other components (and an upscaler's
    ``low_res_scheduler`` folder, a class or layout model's token encoder, the view model's ``camera_embedder``
    and decoder adapter ``vae-views``, merged into the VAE).
    """
    from diffusers import DiffusionPipeline

    from .pipeline import Pipeline

    dev, dt = resolve_device_dtype(device, dtype)
    path = resolve_path(name_or_path)
    index = read_model_index(path)
    extra = {}
    if "safety_checker" in index:
        extra.update(safety_checker=None, requires_safety_checker=False)
    if "feature_extractor" in index:
        extra["feature_extractor"] = None
    task_parts = {}
    if task is not None:
        task_parts = _task_unet(path, task, dt)
        extra["unet"] = task_parts.pop("unet")
        vae = _task_vae(path, task, dt)
        if vae is not None:
            extra["vae"] = vae
    try:
        with quiet_libraries():
            dpipe = DiffusionPipeline.from_pretrained(path, dtype=dt, local_files_only=True, **extra)
    except (OSError, ValueError, EnvironmentError) as e:
        raise IncompleteModel(f"could not load a diffusers pipeline from {path}: {e}", [str(path)]) from e
    nets = {}
    if controlnet is not None:
        if isinstance(controlnet, dict):
            items = controlnet.items()
        elif isinstance(controlnet, (list, tuple)):
            items = [(str(c) if isinstance(c, (str, Path)) else f"controlnet{i}", c) for i, c in enumerate(controlnet)]
        else:
            items = [(str(controlnet) if isinstance(controlnet, (str, Path)) else "controlnet", controlnet)]
        for key, spec in items:
            key = Path(key).name if os.path.sep in key else key
            with quiet_libraries():
                nets[key] = load_controlnet(spec, path, dt)
    components = {**dpipe.components, **task_parts}  # what the task's pipeline class has beyond the model index
    if "controlnet" in components:  # a StableDiffusionControlNetPipeline directory
        cn = components.pop("controlnet")
        if cn is not None and not nets:
            nets["controlnet"] = cn
    name = str(name_or_path)
    with quiet_libraries():
        return Pipeline(components, controlnets=nets, name=name, path=path, device=dev, dtype=dt,
                        class_name=index.get("_class_name", ""))
