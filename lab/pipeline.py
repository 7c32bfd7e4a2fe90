"""The project's pipeline object: diffusers modules plus the diffusers pipeline whose helpers
(prompt encoding, latent preparation, SDXL time ids, inpainting masks) the lab's own loop reuses."""
from __future__ import annotations

import copy
import hashlib
import inspect
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch
from PIL import Image


_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes, values). Cached until a parameter or buffer
    changes (in place, by its version counter, or replaced, by its storage)."""
    tensors = module.state_dict(keep_vars=True)
    stamp = tuple((t.data_ptr(), t._version) for t in tensors.values())
    hit = _DIGESTS.get(module)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    h = hashlib.sha256()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{str(t.dtype).removeprefix('torch.')}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    _DIGESTS[module] = (stamp, h.hexdigest())
    return h.hexdigest()


def _helper_class(components: dict):
    from diffusers import (StableDiffusionInpaintPipeline, StableDiffusionPipeline, StableDiffusionUpscalePipeline,
                           StableDiffusionXLPipeline)
    if components.get("text_encoder_2") is not None or components.get("tokenizer_2") is not None:
        return "sdxl", StableDiffusionXLPipeline
    if components.get("class_embedder") is not None:  # class tokens by cross-attention (lab.shapes.tasks)
        return "class", StableDiffusionPipeline
    if components.get("layout_embedder") is not None:  # box tokens by cross-attention (lab.shapes.tasks)
        return "layout", StableDiffusionPipeline
    if components.get("camera_embedder") is not None:  # a view model (lab.shapes.view_model): input view + camera
        return "views", StableDiffusionPipeline
    if components["unet"].config.in_channels == 9:
        return "inpaint", StableDiffusionInpaintPipeline
    if components.get("low_res_scheduler") is not None:  # SD's x4 upscaler layout: [z_t, noised low-res image]
        return "upscale", StableDiffusionUpscalePipeline
    return "sd", StableDiffusionPipeline


class Pipeline:
    """A loaded latent diffusion model. Make one with :func:`lab.load` or :meth:`from_components`.

    Attributes: ``vae``, ``unet``, ``text_encoder`` (and ``text_encoder_2`` for SDXL), ``tokenizer``,
    ``scheduler`` (the default one; samplers copy it), ``controlnets`` (dict name -> ControlNetModel),
    ``kind`` (``"sd"``, ``"sdxl"``, ``"inpaint"``, ``"upscale"``, or ``"class"`` / ``"layout"``: class or box
    tokens by cross-attention, the ``class_embedder`` / ``layout_embedder`` component; ``"views"``: a view model,
    the input view concatenated and the camera by cross-attention, the ``camera_embedder`` component), ``diffusers`` (the diffusers pipeline sharing
    these modules, used for its helpers and for equivalence checks).
    """

    def __init__(self, components: dict, *, controlnets: dict | None = None, name: str = "", path=None,
                 device="cpu", dtype=torch.float32, class_name: str = ""):
        self.kind, helper_cls = _helper_class(components)
        params = inspect.signature(helper_cls.__init__).parameters
        kwargs = {k: components.get(k) for k in params if k not in ("self", "requires_safety_checker", "force_zeros_for_empty_prompt", "add_watermarker")}
        if "max_noise_level" in kwargs and kwargs["max_noise_level"] is None:  # a config value, not a module
            kwargs["max_noise_level"] = params["max_noise_level"].default
        if "requires_safety_checker" in params:
            kwargs["requires_safety_checker"] = False
        if "add_watermarker" in params:
            kwargs["add_watermarker"] = False
        for opt in ("safety_checker", "feature_extractor", "image_encoder"):
            if opt in kwargs:
                kwargs[opt] = components.get(opt)
        vae_scale = kwargs["vae"].config.scaling_factor if kwargs.get("vae") is not None else None
        with warnings.catch_warnings():  # the upscaler's "wrong scaling_factor" notice: handled just below
            warnings.filterwarnings("ignore", message=".*scaling_factor.*", category=FutureWarning)
            self.diffusers = helper_cls(**kwargs)
        if self.kind == "upscale" and vae_scale is not None:
            # StableDiffusionUpscalePipeline sets the VAE's scaling factor to SD's upscaler's 0.08333 (that VAE's
            # latents needed it); a model trained on its own VAE's factor keeps that one
            self.vae.register_to_config(scaling_factor=vae_scale)
        self.diffusers.set_progress_bar_config(disable=True)
        self.components = components
        self.controlnets = dict(controlnets or {})
        self.name, self.path, self.class_name = name, Path(path) if path else None, class_name
        self.device, self.dtype = torch.device(device), dtype
        self._preview = None
        self._preview_decoder = None  # None: not looked for yet; False: the model ships none
        self.to(self.device)

    # modules -----------------------------------------------------------------
    vae = property(lambda self: self.diffusers.vae)
    unet = property(lambda self: self.diffusers.unet)
    text_encoder = property(lambda self: self.diffusers.text_encoder)
    tokenizer = property(lambda self: self.diffusers.tokenizer)
    text_encoder_2 = property(lambda self: getattr(self.diffusers, "text_encoder_2", None))
    tokenizer_2 = property(lambda self: getattr(self.diffusers, "tokenizer_2", None))
    scheduler = property(lambda self: self.diffusers.scheduler)

    @property
    def vae_scale_factor(self) -> int:
        return self.diffusers.vae_scale_factor

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def helper(self, scheduler):
        """The diffusers pipeline's helpers (``prepare_latents``, ``get_timesteps``, ...) seeing ``scheduler``: a
        shallow copy, so the shared pipeline is never changed (samplers may live in threads)."""
        helper = copy.copy(self.diffusers)
        object.__setattr__(helper, "scheduler", scheduler)
        return helper

    @classmethod
    def from_components(cls, *, controlnets=None, name: str = "components", device="cpu", dtype=None, **components):
        """Wrap modules built in memory (tests, notebooks): ``vae=, unet=, text_encoder=, tokenizer=,
        scheduler=`` (plus ``text_encoder_2=, tokenizer_2=`` for SDXL)."""
        dtype = dtype or next(components["unet"].parameters()).dtype
        return cls(components, controlnets=controlnets, name=name, device=device, dtype=dtype)

    def to(self, device=None, dtype=None) -> "Pipeline":
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        self.diffusers.to(self.device, self.dtype)
        for name in ("class_embedder", "layout_embedder", "camera_embedder"):
            if self.components.get(name) is not None:
                self.components[name].to(self.device, self.dtype)
        for net in self.controlnets.values():
            net.to(self.device, self.dtype)
        return self

    def compile(self, *, controlnets: bool = True, **kwargs) -> "Pipeline":
        """``torch.compile`` the UNet (and the ControlNets) in place (``nn.Module.compile``: they stay the same
        diffusers modules, so recorders, edits and residuals work as before). ``kwargs`` go to
        ``torch.compile`` (``mode=``, ``backend=``, ``dynamic=``). The step loop does not recompile per step
        (the timestep is a tensor; the recording processors trace into the same graph); a run with new
        recorders recompiles once, as its attention processors are new objects, and after
        ``torch._dynamo.config.cache_size_limit`` such runs dynamo falls back to eager."""
        self.unet.compile(**kwargs)
        if controlnets:
            for net in self.controlnets.values():
                net.compile(**kwargs)
        return self

    def __repr__(self) -> str:
        nets = f", controlnets={sorted(self.controlnets)}" if self.controlnets else ""
        return (f"<lab.Pipeline {self.name!r} kind={self.kind} {self.default_size}px "
                f"latents {self.unet.config.in_channels}ch/{self.vae_scale_factor}x{nets} on {self.device} {self.dtype}>")

    def weights(self, controlnets=()) -> dict[str, str]:
        """:func:`weights_digest` of the UNet, text encoder(s), VAE and the named ControlNets: what a run
        records of the model that made it, and :func:`lab.replay` compares."""
        modules = {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
                   "vae": self.vae, **{f"controlnet[{n}]": self.controlnets[n] for n in controlnets}}
        return {k: weights_digest(m) for k, m in modules.items() if m is not None}

    # sampling ----------------------------------------------------------------
    def sampler(self, prompt="", negative_prompt=None, **kwargs):
        """An explicit, steppable sampler; see :class:`lab.Sampler` for the arguments."""
        from .sampler import Sampler
        return Sampler(self, prompt, negative_prompt, **kwargs)

    def __call__(self, prompt="", negative_prompt=None, **kwargs):
        """Sample to the end and return the :class:`lab.Run`."""
        return self.sampler(prompt, negative_prompt, **kwargs).run()

    # decoding ----------------------------------------------------------------
    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode of (scaled) latents ``[B, C, h, w]`` -> images ``[B, 3, H, W]`` in [0, 1] (float32, CPU)."""
        vae = self.vae
        z = latents.to(self.device)
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        dtype = torch.float32 if upcast else vae.dtype
        if upcast:
            vae.to(torch.float32)
        try:
            img = vae.decode(z.to(dtype) / vae.config.scaling_factor, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)
        return (img.float() / 2 + 0.5).clamp(0, 1).cpu()

    def to_pil(self, images01: torch.Tensor) -> list[Image.Image]:
        arr = (images01.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
        return [Image.fromarray(a) for a in arr]

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        from .errors import NonFiniteError
        imgs = self.decode_latents(latents)
        if not torch.isfinite(imgs).all():
            raise NonFiniteError("decoded image", None, hint="the VAE produced NaN/inf; try float32 or bfloat16")
        return self.to_pil(imgs)

    @property
    def preview_decoder(self):
        """The model's tiny preview decoder (:class:`lab.preview.PreviewDecoder`), or None when it ships none."""
        if self._preview_decoder is None:
            from .preview import DECODER_DIR, PreviewDecoder
            folder = self.path / DECODER_DIR if self.path else None
            self._preview_decoder = PreviewDecoder.load(folder) if folder and (folder / "config.json").exists() else False
        return self._preview_decoder or None

    def preview(self, latents) -> np.ndarray:
        """A fast RGB preview (``uint8 [H, W, 3]``, or ``[B, H, W, 3]``) of scaled latents ``[C, h, w]`` (or
        ``[B, C, h, w]``): the preview decoder at full resolution where the model ships one, else the
        latent-resolution map (:attr:`preview_map`)."""
        dec = self.preview_decoder
        return dec.rgb(latents) if dec is not None else self.preview_map(latents)

    @property
    def preview_map(self):
        """The fitted latent -> RGB linear map of this model (:func:`lab.preview.fit_preview`)."""
        if self._preview is None:
            from .preview import FILENAME, PreviewMap, fit_preview
            shipped = self.path / FILENAME if self.path else None
            self._preview = PreviewMap.load(shipped) if shipped and shipped.exists() else fit_preview(self.vae)
        return self._preview
