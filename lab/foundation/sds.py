"""Score distillation: optimise an image generator so its renders score well under a frozen diffusion prior.

DreamFusion (Poole et al. 2022) optimises a NeRF; here the generator is any module of
:mod:`lab.foundation.render` (a soft shapes scene, free pixels, or a raw latent). One iteration::

    x  = g(theta)                                    # the render, [B, 3, H, W] in [0, 1]
    z  = E(2x - 1) * scaling_factor                  # the VAE encoder's posterior mean (skipped for a raw latent)
    t ~ U{t_min T, ..., t_max T},  eps ~ N(0, I)
    z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps
    eps_hat = eps_u + s (eps_c - eps_u)              # classifier-free guidance, diffusers' convention
    grad_z  = w(t) (eps_hat - eps)                   # SDS: the UNet's Jacobian is left out
    theta  <- Adam(theta, d/dtheta [ sum(stopgrad(grad_z) * z) ])

The surrogate ``sum(stopgrad(grad_z) * z)`` has exactly ``grad_z`` as its gradient with respect to ``z``
(:func:`surrogate_loss`); autograd carries it through the encoder and the renderer.

Conventions (documented choices):

* ``t_range=(0.02, 0.98)``: t is drawn uniformly from those fractions of the training schedule's T, as
  DreamFusion does; one t per iteration, shared by the batch (each batch item has its own noise).
* ``weighting="sds"``: w(t) = 1 - abar_t, DreamFusion's sigma_t^2; ``"uniform"``: w(t) = 1;
  ``"snr"``: w(t) = sqrt(abar_t (1 - abar_t)) (the weighting of the x0 residual, used by some SD ports).
* ``guidance`` is diffusers' scale s in ``eps_u + s (eps_c - eps_u)``; DreamFusion's omega = 100 in
  ``eps_c + omega (eps_c - eps_u)`` is s = 101 here. The default is 100 for SDS (DreamFusion's order) and 7.5
  for VSD (ProlificDreamer's); the shapes model needs 100 for VSD too (``lab.shapes.evaluate_sds``).
* ``t_schedule="anneal"`` lowers t linearly from the range's top to its bottom over the run (with a jitter of
  +-0.05 T), high noise levels first, as time-prioritised variants of SDS do.
* ``through_unet=True`` back-propagates ``0.5 w(t) |eps_hat - eps|^2`` through the UNet instead (the
  comparison DreamFusion makes: it keeps the UNet's Jacobian, costs a backward pass and works worse).
* ``consistency=1.0`` adds ``consistency / 2 |x - stopgrad(D(E(x)))|^2``: it pulls the render toward what the
  autoencoder makes of it. A VAE trained on a narrow world maps colours it never saw onto ones it knows (a
  pink circle on olive gets a latent that decodes to a red circle on gray), so latent SDS alone is satisfied by
  renders that only its encoder reads as right; the term moves them into the range where the encoder is
  faithful. ``consistency=0`` is DreamFusion's SDS unchanged.
* ``space="image"`` replaces the latent residual by the decoded one (HiFA's image-space SDS): the gradient on the
  render (in the VAE's [-1, 1] units) is ``w(t) sqrt(abar_t / (1 - abar_t)) (x - D(x0_hat))``, which equals
  the latent form ``w(t) (eps_hat - eps)`` when encoder and decoder are the identity. With VSD the particles'
  own decoded residual ``D(z) - D(x0_lora)`` is subtracted.
* ``method="vsd"``: variational score distillation (ProlificDreamer, Wang et al. 2023): the batch is a set of
  particles of one distribution, a LoRA copy of the UNet (``peft``) learns their score by the ordinary
  diffusion loss, and the particles move by ``w(t) (eps_hat - eps_lora)`` instead of ``w(t) (eps_hat - eps)``.

``distill`` returns a :class:`Distillation`: the optimised generator, per-iteration records as xarray
(:meth:`Distillation.to_xarray`: the parameters, the render, t, the gradient norm, eps_hat - eps), and a
:class:`lab.Run` view (:meth:`Distillation.to_run`) so the trajectory viewer and the run analyses work on an
optimisation as they do on sampling.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

WEIGHTINGS = ("sds", "uniform", "snr")
METHODS = ("sds", "vsd")
T_SCHEDULES = ("uniform", "anneal")
SPACES = ("latent", "image")
ANNEAL_JITTER = 0.05  # "anneal": t_i = t_high - (t_high - t_low) i / (N - 1), plus U(-0.05, 0.05) T, clipped


def weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, weighting: str = "sds") -> torch.Tensor:
    """w(t) for timesteps ``t`` (integer tensor) under ``weighting`` (:data:`WEIGHTINGS`)."""
    a = alphas_cumprod.to(t.device)[t].float()
    if weighting == "sds":
        return 1 - a
    if weighting == "uniform":
        return torch.ones_like(a)
    if weighting == "snr":
        return torch.sqrt(a * (1 - a))
    raise ValueError(f"unknown weighting {weighting!r}; choose from {WEIGHTINGS}")


def sds_gradient(eps_hat: torch.Tensor, eps: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``w(t) (eps_hat - eps)``, ``w`` per batch item."""
    return w.view(-1, *[1] * (eps.ndim - 1)).to(eps.dtype) * (eps_hat - eps)


def _x0(z_t: torch.Tensor, eps: torch.Tensor, a_t: float) -> torch.Tensor:
    return (z_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)


def _decode(vae, z: torch.Tensor) -> torch.Tensor:
    return vae.decode(z.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0].to(z.dtype)


def surrogate_loss(z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient with respect to ``z`` is exactly ``grad`` (held constant): ``sum(grad * z)``."""
    return (grad.detach() * z).sum()


@dataclass
class Settings:
    iterations: int = 300
    guidance: float = 100.0
    t_range: tuple = (0.02, 0.98)
    t_schedule: str = "uniform"
    weighting: str = "sds"
    lr: float = 0.1
    method: str = "sds"
    space: str = "latent"
    through_unet: bool = False
    consistency: float = 1.0
    seed: int = 0
    lora_rank: int = 4
    lora_lr: float = 1e-3
    negative_prompt: str = ""

    def check(self) -> None:
        """Bad settings fail here, before any model work."""
        if not isinstance(self.iterations, (int, np.integer)) or self.iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {self.iterations!r}")
        g = float(self.guidance)
        if not math.isfinite(g) or g < 0:
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance!r}")
        lo, hi = (float(v) for v in self.t_range)
        if not (0 < lo < hi < 1):
            raise ValueError(f"t_range must satisfy 0 < low < high < 1 (fractions of the schedule's T), "
                             f"got {tuple(self.t_range)}")
        if self.t_schedule not in T_SCHEDULES:
            raise ValueError(f"unknown t_schedule {self.t_schedule!r}; choose from {T_SCHEDULES}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose from {WEIGHTINGS}")
        if self.space not in SPACES:
            raise ValueError(f"unknown space {self.space!r}; choose from {SPACES}")
        if self.space == "image" and self.through_unet:
            raise ValueError("through_unet back-propagates the latent-space loss; it needs space='latent'")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {METHODS}")
        if self.method == "vsd" and self.through_unet:
            raise ValueError("through_unet applies to SDS only (VSD's particle gradient has no such variant)")
        if not math.isfinite(float(self.consistency)) or self.consistency < 0:
            raise ValueError(f"consistency must be a finite number >= 0, got {self.consistency!r}")
        for name in ("lr", "lora_lr"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")


@dataclass
class Distillation:
    """What :func:`distill` returns: ``target`` (the optimised generator), ``settings``, ``prompts``, and the
    per-iteration records (numpy): ``t`` [it], ``weight`` [it], ``grad_norm`` [it, B] (of ``w(t)(eps_hat - eps)``
    per batch item), ``loss`` [it] (the surrogate, or the through-UNet loss), ``eps_diff``, ``latents``
    (``z_t``), ``pred_x0``, ``noise_pred`` (guided), ``noise_pred_cond``/``noise_pred_uncond`` [it, B, C, h, w],
    ``z`` [it, B, C, h, w] (the render's latent before the update), ``renders`` [it, B, H, W, 3] ``uint8`` and
    ``params`` [it, B, K, P] (soft shapes only; names :data:`lab.foundation.render.PARAMS`), recorded every
    ``record_every`` iterations (``iteration`` holds which). ``seconds``: wall time of the optimisation."""

    target: torch.nn.Module
    settings: dict
    prompts: list
    iteration: np.ndarray
    t: np.ndarray
    weight: np.ndarray
    grad_norm: np.ndarray
    loss: np.ndarray
    arrays: dict = field(default_factory=dict)
    final_latents: torch.Tensor | None = None
    seconds: float = 0.0
    lora_loss: np.ndarray | None = None
    alpha_bar: np.ndarray | None = None  # abar_t per iteration

    @torch.no_grad()
    def images(self) -> np.ndarray:
        """The final renders ``uint8 [B, H, W, 3]`` (raw latents: ``None``; decode ``final_latents``)."""
        if getattr(self.target, "is_latent", False):
            return None
        return _uint8(self.target())

    def to_xarray(self):
        """An ``xarray.Dataset`` with ``step`` (the recorded iteration) first: ``t``, ``weight``, ``grad_norm``,
        ``loss`` [step] / [step, batch]; ``eps_diff``, ``latents``, ``pred_x0``, ``noise_pred``, ``z``
        [step, batch, channel, y, x]; ``render`` [step, batch, py, px, rgb]; ``params`` [step, batch, object,
        param] with the parameter names as ``param``'s coordinate. attrs: the settings (JSON) and prompts."""
        import xarray as xr
        from .render import PARAMS
        rec = self.iteration
        data = {"t": (("step",), self.t[rec]), "weight": (("step",), self.weight[rec]),
                "loss": (("step",), self.loss[rec]), "grad_norm": (("step", "batch"), self.grad_norm[rec])}
        for name in ("eps_diff", "latents", "pred_x0", "noise_pred", "noise_pred_cond", "noise_pred_uncond", "z"):
            if name in self.arrays:
                data[name] = (("step", "batch", "channel", "y", "x"), self.arrays[name])
        if "renders" in self.arrays:
            data["render"] = (("step", "batch", "py", "px", "rgb"), self.arrays["renders"])
        coords = {"step": rec, "batch": np.arange(len(self.prompts))}
        if "params" in self.arrays:
            data["params"] = (("step", "batch", "object", "param"), self.arrays["params"])
            coords["param"] = list(PARAMS)
        attrs = {"latent_lab_distillation": 1, "settings": json.dumps(self.settings, default=str),
                 "prompts": json.dumps(self.prompts), "seconds": float(self.seconds)}
        return xr.Dataset(data, coords=coords, attrs=attrs)

    def to_run(self, pipe=None):
        """The optimisation as a :class:`lab.Run`: one :class:`lab.StepState` per recorded iteration, with
        ``latents`` = z_t, ``pred_x0`` = the prior's x0 estimate, ``noise_pred*`` = the UNet's outputs,
        ``prev_latents`` = the render's latent z, ``timestep`` = t; ``final_latents`` = the final render's
        latent. ``run.image`` decodes it, and :class:`widgets.TrajectoryViewer` plays it."""
        from ..run import Run
        from ..state import StepState
        missing = [k for k in ("latents", "pred_x0", "noise_pred", "noise_pred_cond", "z") if k not in self.arrays]
        if missing:
            raise ValueError(f"this distillation did not record {missing}: call distill(..., record=True)")
        steps = []
        a = self.arrays
        get = lambda n, j: torch.from_numpy(a[n][j]) if n in a else None  # noqa: E731
        for j, it in enumerate(self.iteration):
            sigma = float(np.sqrt((1 - self.alpha_bar[it]) / self.alpha_bar[it]))
            steps.append(StepState(int(it), float(self.t[it]), sigma, get("latents", j), get("z", j), get("pred_x0", j),
                                   get("noise_pred_cond", j), get("noise_pred_uncond", j), get("noise_pred", j)))
        settings = {**self.settings, "prompt": self.prompts if len(self.prompts) > 1 else self.prompts[0],
                    "num_steps": len(self.t), "kind": "distillation"}
        return Run(steps, settings=settings, pipe=pipe, final_latents=self.final_latents)


def _uint8(images01: torch.Tensor) -> np.ndarray:
    return (images01.detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def _prompt_embeddings(pipe, prompts: list, negative: str):
    if pipe.kind != "sd":
        raise ValueError(f"score distillation needs a text-to-image pipeline (kind 'sd'), this one is {pipe.kind!r}")
    with torch.no_grad():
        cond, uncond = pipe.diffusers.encode_prompt(prompts, pipe.device, 1, True, [negative] * len(prompts))
    return cond, uncond


def _lora_unet(unet, rank: int):
    """A trainable LoRA copy of ``unet`` (peft, on the attention projections; B zero-initialised, so it starts
    equal to the prior), for VSD's particle score."""
    try:
        from peft import LoraConfig
    except ImportError as e:  # pragma: no cover - peft is a dependency
        raise ImportError("VSD needs peft (pip install peft)") from e
    lora = copy.deepcopy(unet)
    lora.requires_grad_(False)
    lora.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return lora


def distill(pipe, prompt, target: torch.nn.Module, *, iterations: int = 300, guidance: float | None = None,
            t_range=(0.02, 0.98), t_schedule: str = "uniform", weighting: str = "sds", lr: float = 0.1,
            method: str = "sds", space: str = "latent", through_unet: bool = False, consistency: float = 1.0,
            seed: int = 0, lora_rank: int = 4, lora_lr: float = 1e-3,
            negative_prompt: str = "", record: bool = True, record_every: int = 1, progress: bool = False,
            callback=None) -> Distillation:
    """Optimise ``target`` (a module of :mod:`lab.foundation.render` whose ``forward()`` gives ``[B, 3, H, W]``
    images in [0, 1], or a latent when it has ``is_latent``) under ``pipe``'s frozen UNet for ``prompt`` (a
    string for every batch item, or one per item). ``guidance`` defaults to 100 for SDS and 7.5 for VSD.
    ``seed`` seeds the t and noise draws (a CPU generator). ``record``: keep the per-iteration arrays (every
    ``record_every``-th); ``callback(i, info)`` is called after each iteration with a dict (``t``,
    ``grad_norm``, ``loss``). See the module docstring for the update and the conventions."""
    if guidance is None:
        guidance = 7.5 if method == "vsd" else 100.0
    s = Settings(iterations=iterations, guidance=guidance, t_range=tuple(t_range), t_schedule=t_schedule,
                 weighting=weighting, lr=lr, method=method, space=space, through_unet=bool(through_unet),
                 consistency=float(consistency), seed=int(seed), lora_rank=int(lora_rank), lora_lr=float(lora_lr),
                 negative_prompt=negative_prompt)
    s.check()
    if not isinstance(record_every, int) or record_every < 1:
        raise ValueError(f"record_every must be an integer >= 1, got {record_every!r}")
    batch = target.batch
    prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
    if len(prompts) != batch:
        raise ValueError(f"{len(prompts)} prompts for a target of batch {batch}: give one prompt or one per item")
    latent_target = getattr(target, "is_latent", False)
    if latent_target and s.space == "image":
        raise ValueError("space='image' compares renders with decoded x0 estimates; a raw latent has no render")
    size = pipe.default_size
    if not latent_target:
        with torch.no_grad():
            probe = target()
        if probe.shape[-2:] != (size, size):
            raise ValueError(f"the target renders {tuple(probe.shape[-2:])} images; this pipeline's size is "
                             f"{size}x{size}")

    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    device, dtype = pipe.device, pipe.dtype
    cond, uncond = _prompt_embeddings(pipe, prompts, negative_prompt)
    cfg = s.guidance > 1
    text = torch.cat([uncond, cond]) if cfg else cond
    abar = scheduler.alphas_cumprod.to(torch.float64)
    T = len(abar)
    t_lo, t_hi = max(1, int(round(s.t_range[0] * T))), min(T - 1, int(round(s.t_range[1] * T)))
    gen = torch.Generator().manual_seed(s.seed)
    target.to(device)
    opt = torch.optim.Adam(target.parameters(), lr=s.lr)
    lora = lora_opt = None
    if s.method == "vsd":
        lora = _lora_unet(unet, s.lora_rank).to(device)
        lora_opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=s.lora_lr)

    ts, ws, gnorms, losses, lora_losses = [], [], [], [], []
    arrays: dict[str, list] = {}
    recorded = []
    params = [p for p in target.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    for i in tqdm(range(s.iterations), disable=not progress, desc=s.method):
        opt.zero_grad(set_to_none=True)
        x = target()
        keep = record and i % record_every == 0
        table = target.table().detach().cpu().numpy() if keep and hasattr(target, "table") else None
        if latent_target:
            z = x
        else:
            z = vae.encode((2 * x - 1).to(device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        z = z.to(dtype)
        if s.t_schedule == "uniform":
            t_int = int(torch.randint(t_lo, t_hi + 1, (1,), generator=gen))
        else:
            frac = i / max(1, s.iterations - 1)
            jitter = (2 * float(torch.rand((), generator=gen)) - 1) * ANNEAL_JITTER * T
            t_int = int(min(t_hi, max(t_lo, round(t_hi - (t_hi - t_lo) * frac + jitter))))
        eps = torch.randn(z.shape, generator=gen).to(device, dtype)
        a_t = float(abar[t_int])
        t_vec = torch.full((batch,), t_int, device=device, dtype=torch.long)
        w = weight(scheduler.alphas_cumprod, t_vec.cpu(), s.weighting).to(device)
        z_in = z if s.through_unet else z.detach()
        z_t = math.sqrt(a_t) * z_in + math.sqrt(1 - a_t) * eps
        model_in = torch.cat([z_t, z_t]) if cfg else z_t
        t_in = torch.full((model_in.shape[0],), t_int, device=device, dtype=torch.long)
        with torch.set_grad_enabled(s.through_unet):
            out = unet(model_in, t_in, encoder_hidden_states=text, return_dict=False)[0]
        e_u, e_c = out.chunk(2) if cfg else (None, out)
        eps_hat = e_u + s.guidance * (e_c - e_u) if cfg else e_c
        if s.method == "vsd":
            with torch.no_grad():
                eps_ref = lora(z_t, t_vec, encoder_hidden_states=cond, return_dict=False)[0]
        else:
            eps_ref = eps
        grad = sds_gradient(eps_hat.detach(), eps_ref, w)
        if s.through_unet:
            loss = 0.5 * (w.view(-1, 1, 1, 1) * (eps_hat - eps) ** 2).sum()
        elif s.space == "image":
            with torch.no_grad():
                x0_hat = _x0(z_t, eps_hat, a_t)
                residual = (2 * x - 1).detach() - _decode(vae, x0_hat)  # x - D(x0_hat), the VAE's [-1, 1] units
                if s.method == "vsd":  # minus the particles' own: D(z) - D(x0_lora)
                    residual = residual - (_decode(vae, z.detach()) - _decode(vae, _x0(z_t, eps_ref, a_t)))
                image_grad = math.sqrt(a_t * (1 - a_t)) * w.view(-1, 1, 1, 1) / (1 - a_t) * residual
            loss = surrogate_loss(2 * x - 1, image_grad)
        else:
            loss = surrogate_loss(z, grad)
        if s.consistency > 0 and not latent_target:  # pull the render into the VAE's range: x -> D(E(x))
            with torch.no_grad():
                projected = _decode(vae, z.detach())
            loss = loss + s.consistency * 0.5 * (((2 * x - 1) - projected) ** 2).sum()
        # the target's gradients only: the prior's parameters (shared with other samplers) never get a .grad
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g
        if not all(torch.isfinite(g).all() for g in grads if g is not None):
            from ..errors import NonFiniteError
            raise NonFiniteError("score distillation gradient", i, hint="lower guidance or lr")
        opt.step()
        if lora is not None:  # the particles' score: the ordinary diffusion loss on their current latents
            t2 = torch.randint(1, T, (batch,), generator=gen).to(device)
            e2 = torch.randn(z.shape, generator=gen).to(device, dtype)
            a2 = scheduler.alphas_cumprod.to(device)[t2].to(dtype).view(-1, 1, 1, 1)
            zt2 = a2.sqrt() * z.detach() + (1 - a2).sqrt() * e2
            l2 = torch.nn.functional.mse_loss(lora(zt2, t2, encoder_hidden_states=cond, return_dict=False)[0], e2)
            lora_opt.zero_grad(set_to_none=True)
            l2.backward()
            lora_opt.step()
            lora_losses.append(float(l2.detach()))
        gn = grad.flatten(1).norm(dim=1).cpu().numpy()
        ts.append(t_int)
        ws.append(float(w[0]))
        gnorms.append(gn)
        losses.append(float(loss.detach()))
        if keep:
            recorded.append(i)
            with torch.no_grad():
                px0 = _x0(z_t, eps_hat, a_t)
                items = {"eps_diff": eps_hat - eps_ref, "latents": z_t, "pred_x0": px0, "noise_pred": eps_hat,
                         "noise_pred_cond": e_c, "z": z}
                if e_u is not None:
                    items["noise_pred_uncond"] = e_u
                for k, v in items.items():
                    arrays.setdefault(k, []).append(v.detach().float().cpu().numpy())
                if not latent_target:
                    arrays.setdefault("renders", []).append(_uint8(x))
                if table is not None:
                    arrays.setdefault("params", []).append(table)
        if callback is not None:
            callback(i, {"t": t_int, "grad_norm": gn, "loss": float(loss.detach())})
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        x = target()
        final = x if latent_target else vae.encode((2 * x - 1).to(device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.__dict__.items()}
    settings.update(model=pipe.name, target=type(target).__name__, batch=batch, scheduler=type(scheduler).__name__)
    result = Distillation(target, settings, prompts, np.asarray(recorded, np.int64), np.asarray(ts, np.int64),
                          np.asarray(ws), np.stack(gnorms), np.asarray(losses),
                          {k: np.stack(v) for k, v in arrays.items()}, final.detach().float().cpu(), seconds,
                          np.asarray(lora_losses) if lora_losses else None)
    result.alpha_bar = abar.numpy()[result.t]
    return result
