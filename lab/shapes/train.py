"""Train the shapes model the seed's way, stage by stage, resumable, within a time budget.

Stage 1 (``vae``): ``AutoencoderKL`` trained on reconstruction (MSE + L1) plus a small KL term.
Stage 2 (``unet``): ``UNet2DConditionModel`` and a small ``CLIPTextModel`` trained jointly on

    L_LDM = E_{z=E(x), eps~N(0,1), t} || eps - eps_phi(z_t, t, tau_theta(y)) ||^2

with z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps, 1000 scaled-linear steps, and 10% of captions
dropped to "" so classifier-free guidance works. With ``grounding`` > 0 (the cpu and gpu presets: 0.05)
a token grounding loss is added (TokenCompose, Wang et al. 2024; :func:`grounding_loss`): each word
that names an object (its size, colour, shape) or the background should draw its cross-attention from
that region of the scene's mask. A small model trained on L_LDM alone learns near-uniform attention
over the 32 token slots (a global bag of attributes: colours leak between two objects and heat maps
do not find the objects); the grounding term makes attention route words to places, which is what
binds "red" to the circle and what the attention lab shows. The token loss only asks that a word's
attention stay inside its region, so a peak at the object's centre satisfies it; ``pixel`` > 0 adds
TokenCompose's pixel loss (:func:`pixel_grounding_loss`), which asks each word's map to cover its whole
region, so that heat maps take the object's extent.
Stage 3 (``controlnet-KIND``): a ``ControlNetModel`` copied from the trained UNet's encoder, joined
by zero convolutions; the UNet and text encoder are frozen, 50% of prompts are dropped (as in the
ControlNet paper). ``init="gaussian"`` re-initialises the zero convolutions N(0, 0.02) for the
ablation.

Every stage trains for a wall-clock budget (the learning rate follows a cosine over that budget),
saves a checkpoint every ``ckpt_every`` seconds and resumes from it; losses go to
``OUT/logs/STAGE.jsonl``. ``export`` writes the diffusers directories in fp16.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..recording.dispatch import ProbsAttnProcessor
from ..token_encoders import ADAPTER_FILE, COORD_CHANNELS, LORA_FILE, coordinate_channels, write_adapter_record
from ..token_encoders import TOKEN_ENCODERS as ENCODERS
from . import configs, world
from .tasks import (CAPTION_DROP, CLASS_FRAME, CLASS_SLOT, CONCAT_TASKS, EXTRA_CHANNELS, GROUNDING, LAYOUT_LABELS,
                    MAX_NOISE_LEVEL, NEW_LR_MULT, PARTIAL_FILE, TASKS, TOKEN_LR_MULT, TOKEN_TASKS, TRAINING_RECORD,
                    SplitConvIn, check_task, class_encoder, continued_record, class_index, float_images, inpaint_inputs, inpaint_masks,
                    layout_encoder, low_res, low_res_scheduler, object_boxes, segmap_onehot, trained_subset,
                    widen_conv_in)
from .tokenizer import write_tokenizer

STAGES = ("vae", "preview", "unet", *(f"controlnet-{k}" for k in world.CONDITION_KINDS))
# the task table's models (lab.shapes.tasks) and the view model (lab.shapes.view_model), on the text model's UNet
TASK_STAGES = tuple(f"task-{t}" for t in TASKS) + ("task-views", "task-views-zero123", "task-views-coords",
                                                    "task-views-decoder")
#: the view model's stages: their input layout and coordinate channels (lab.shapes.view_model)
_VIEW_STAGES = {"task-views": ("warped", False), "task-views-zero123": ("view", False),
                "task-views-coords": ("view", True)}


@dataclass(frozen=True)
class Preset:
    n_train: int
    workers: int
    vae_seconds: float
    unet_seconds: float
    controlnet_seconds: float
    vae_batch: int
    unet_batch: int
    controlnet_batch: int
    vae_lr: float = 5e-4
    unet_lr: float = 3e-4
    controlnet_lr: float = 3e-4
    ema_decay: float = 0.999
    ckpt_every: float = 120.0
    max_steps: int | None = None  # for smoke tests
    log_every: int = 25
    grounding: float = 0.0  # weight of the token grounding loss on cross-attention (0: plain L_LDM)
    pixel: float = 0.0  # weight of the pixel grounding loss (BCE of each token's map vs its region)
    two_share: float = 0.5  # share of two-object scenes in the training set (the world's default: 0.5)
    overlap_share: float = 0.5  # pose and depth ControlNets: share of scenes of two overlapping objects
    controlnet_drop: float = 0.5  # share of prompts dropped to "" in ControlNet training (the paper's 50%)
    probe_every: int = 0  # ControlNet training: the condition IoU of fresh samples every this many steps (0: off)
    probe_n: int = 16  # conditions per probe
    probe_steps: int = 20  # DDIM steps per probe sample
    preview_seconds: float = 900.0  # the preview decoder (lab.preview.PreviewDecoder), distilled from the VAE
    preview_pairs: int = 8192  # (latent, VAE decode) pairs it trains on, decoded once
    preview_batch: int = 32
    preview_lr: float = 2e-3


PRESETS = {
    # 2 CPU cores: ~2 hours for everything (see README "Retraining the shapes model").
    "cpu": Preset(n_train=30_000, workers=2, vae_seconds=1500, unet_seconds=4200, controlnet_seconds=500,
                  vae_batch=32, unet_batch=64, controlnet_batch=64, grounding=0.05, pixel=0.01),
    # one H100/H200: about 8 minutes for everything.
    "gpu": Preset(n_train=120_000, workers=16, vae_seconds=95, unet_seconds=250, controlnet_seconds=42,
                  vae_batch=256, unet_batch=512, controlnet_batch=512, ckpt_every=60, grounding=0.05,
                  pixel=0.01, preview_seconds=60, preview_pairs=60_000, preview_batch=256),
    # a few steps of every stage, to keep the training code tested.
    # The step count decides, not the clock (a loaded test machine must not cut a run short).
    "smoke": Preset(n_train=64, workers=1, vae_seconds=900, unet_seconds=900, controlnet_seconds=900,
                    vae_batch=8, unet_batch=8, controlnet_batch=8, max_steps=3, ckpt_every=0.0, preview_pairs=16,
                    preview_batch=8),
}


def _device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _cosine_lr(base: float, frac: float, warmup: float = 0.03) -> float:
    if frac < warmup:
        return base * max(frac / warmup, 0.01)
    frac = min(1.0, (frac - warmup) / (1 - warmup))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


class _Log:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a")

    def __call__(self, **row):
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()


def _load_ckpt(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def _save_ckpt(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _encoding_cache(vae_dir: Path, n_train: int, seed: int, device: torch.device,
                    two_share: float = 0.5, overlap_share: float = 0.0) -> Path | None:
    """Where the VAE encoding of a training set is kept between commands: ``$LATENT_LAB_CACHE`` (default
    ``~/.cache/latent-lab``; ``LATENT_LAB_CACHE=off`` disables it), named by a hash of the VAE's weights
    and config, of the world's generator source, the set's size and seed and the device type, so a changed
    VAE or world is never served a stale encoding."""
    root = os.environ.get("LATENT_LAB_CACHE", str(Path.home() / ".cache" / "latent-lab"))
    if root.lower() in ("off", "0", "none", ""):
        return None
    h = hashlib.sha256()
    for f in sorted(Path(vae_dir).glob("*.safetensors")) + [Path(world.__file__)]:
        h.update(f.read_bytes())
    config = json.loads((Path(vae_dir) / "config.json").read_text())
    config.pop("_name_or_path", None)  # where it was saved from: a copy of a VAE is the same VAE
    h.update(json.dumps(config, sort_keys=True).encode())
    h.update(f"{n_train}-{seed}-{device.type}".encode())
    if two_share != 0.5:
        h.update(f"two_share={two_share}".encode())
    if overlap_share:
        h.update(f"overlap_share={overlap_share}".encode())
    return Path(root) / "encodings" / f"{h.hexdigest()[:20]}.pt"


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach().float(), 1 - decay)


def _forward_process(z0: torch.Tensor, abar: torch.Tensor, g: torch.Generator):
    """One draw of the forward process q(z_t | z_0) for a batch: ``(z_t, t, eps)``, ``t`` uniform over the
    schedule's steps (``abar``: its cumulative alphas)."""
    eps = torch.randn(z0.shape, generator=g, device=z0.device)
    t = torch.randint(0, len(abar), (len(z0),), generator=g, device=z0.device)
    a = abar[t].view(-1, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * eps, t, eps


class Trainer:
    """Holds the in-memory dataset and the models while the stages run."""

    def __init__(self, out: str | Path, preset: str | Preset = "cpu", device: str | None = None, seed: int = 0,
                 progress: bool = True, base: str | Path | None = None, overlap_share: float = 0.0):
        """``base``: a pipeline directory (e.g. the bundled model) to start from: later stages use its
        components where this trainer has not trained its own (``out/unet`` wins over ``base/unet``), the
        ``unet`` stage fine-tunes its UNet and text encoder, a ControlNet stage with ``init="base"`` its
        ControlNet of that kind. ``overlap_share``: the share of the training scenes drawn as two overlapping
        objects (:func:`lab.shapes.world.generate`; :func:`train` gives the pose and depth ControlNets a trainer
        with the preset's)."""
        self.out = Path(out)
        self.base = Path(base) if base is not None else self.out
        self.preset = PRESETS[preset] if isinstance(preset, str) else preset
        self.device = _device(device)
        self.seed = seed
        self.progress = progress
        self.overlap_share = overlap_share
        self._data = None
        self._progress = 0.0
        self._stats: dict[str, tuple] = {}  # VAE dir -> (scaling factor, posterior means, stds)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.tokenizer_dir = (self.base / "tokenizer" if base is not None
                              else write_tokenizer(self.out / "tokenizer", world.VOCABULARY, configs.MAX_TOKENS))

    # ---------------------------------------------------------------- data
    @property
    def data(self) -> dict:
        if self._data is None:
            t0 = time.time()
            d = world.generate(self.preset.n_train, self.seed, split="train", workers=self.preset.workers,
                               two_share=self.preset.two_share, overlap_share=self.overlap_share)
            self._data = {
                "caption": d["caption"],
                **{k: torch.from_numpy(d[k]).to(self.device) for k in ("image", *world.CONDITION_KINDS)},
                "group_masks": _group_masks(torch.from_numpy(d["object_masks"])).to(self.device),
                "boxes": object_boxes(d["object_masks"]).to(self.device),
            }
            print(f"[data] {self.preset.n_train} scenes in {time.time() - t0:.1f}s", flush=True)
        return self._data

    def _component(self, name: str) -> Path:
        """Where a trained component comes from: this run's own, else the base's."""
        return self.out / name if (self.out / name / "config.json").exists() else self.base / name

    def autocast(self):
        """bf16 autocast on CUDA, none on CPU (for stages defined outside this module: lab.shapes.stage1)."""
        return _autocast(self.device)

    forward_process = staticmethod(_forward_process)
    # for stages defined outside this module (lab.shapes.view_model), which do not import it
    encoding_cache = staticmethod(_encoding_cache)
    save_ckpt = staticmethod(_save_ckpt)

    def tokenizer(self):
        from transformers import CLIPTokenizer
        return CLIPTokenizer.from_pretrained(self.tokenizer_dir)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    def _batch_idx(self, g: torch.Generator, batch: int) -> torch.Tensor:
        return torch.randint(0, self.preset.n_train, (batch,), generator=g, device=self.device)

    # ---------------------------------------------------------------- loop
    def _loop(self, stage: str, params, seconds: float, lr: float, step_fn, state_fn, load_fn, batch_g,
              batch: int | None = None, probe=None, record: dict | None = None):
        """``probe``: ``(every, fn)``: ``fn()`` -> a dict of measurements logged (with the step) before the first
        step and every ``every`` steps, off the clock (its time does not count against ``seconds``);
        ``record``: more keys for the stage's summary."""
        ckpt_path = self.out / "ckpt" / f"{stage}.pt"
        # params: tensors, or param groups whose "lr_mult" scales the schedule's learning rate for that group
        groups = [g if isinstance(g, dict) else {"params": [g]} for g in params]
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0 if stage == "vae" else 1e-2)
        params = [q for grp in opt.param_groups for q in grp["params"]]
        step, elapsed = 0, 0.0
        ck = _load_ckpt(ckpt_path)
        if ck is not None:
            load_fn(ck)
            opt.load_state_dict(ck["opt"])
            step, elapsed = ck["step"], ck["elapsed"]
            batch_g.set_state(ck["gen"])
            print(f"[{stage}] resumed at step {step} ({elapsed:.0f}s done)", flush=True)
        log = _Log(self.out / "logs" / f"{stage}.jsonl")
        max_steps = self.preset.max_steps
        bar = tqdm(total=int(seconds), desc=stage, unit="s", disable=not self.progress, initial=int(elapsed))
        t_last_ckpt = time.time()
        t_start = time.time() - elapsed
        running = None

        def run_probe():
            nonlocal t_start
            t0 = time.time()
            row = probe[1]()
            log(step=step, t=round(elapsed, 2), probe_seconds=round(time.time() - t0, 2), **row)
            t_start += time.time() - t0  # off the clock

        if probe is not None and step == 0:
            run_probe()
        while elapsed < seconds and (max_steps is None or step < max_steps):
            self._progress = elapsed / seconds  # for a step_fn whose loss changes over the budget (stage1's GAN)
            for grp in opt.param_groups:
                grp["lr"] = _cosine_lr(lr, elapsed / seconds) * grp.get("lr_mult", 1.0)
            loss, extra = step_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            if step % self.preset.log_every == 0 or step <= 3:
                lv = float(loss.detach())
                running = lv if running is None else 0.9 * running + 0.1 * lv
                log(step=step, t=round(elapsed, 2), loss=lv, lr=opt.param_groups[0]["lr"],
                    **{k: float(v) for k, v in extra.items()})
                bar.set_postfix(loss=f"{running:.4f}", step=step)
            now = time.time()
            bar.update(int(now - t_start) - bar.n)
            elapsed = now - t_start
            if probe is not None and step % probe[0] == 0:
                run_probe()
                elapsed = time.time() - t_start
            if now - t_last_ckpt > self.preset.ckpt_every and self.preset.ckpt_every > 0:
                _save_ckpt(ckpt_path, {**state_fn(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                                       "gen": batch_g.get_state()})
                t_last_ckpt = now
        bar.close()
        if probe is not None and step % probe[0] != 0:
            run_probe()
        _save_ckpt(ckpt_path, {**state_fn(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                               "gen": batch_g.get_state()})
        summary = {"stage": stage, "steps": step, "seconds": round(elapsed, 1), "final_loss": running,
                   "device": str(self.device), "batch": batch, "lr": lr, "ema_decay": self.preset.ema_decay,
                   "lr_mults": sorted({grp.get("lr_mult", 1.0) for grp in opt.param_groups}),
                   "trained_params": sum(q.numel() for q in params), "n_train": self.preset.n_train,
                   "base": os.path.relpath(self.base) if self.base.is_absolute() else str(self.base),
                   **(record or {})}
        (self.out / "logs" / f"{stage}.summary.json").write_text(json.dumps(summary, indent=2))
        print(f"[{stage}] {step} steps in {elapsed:.0f}s, loss {running}", flush=True)
        return summary

    # ---------------------------------------------------------------- stage 1
    def train_vae(self):
        from diffusers import AutoencoderKL
        torch.manual_seed(self.seed)
        vae = AutoencoderKL(**configs.VAE).to(self.device)
        images = self.data["image"]
        g = self._generator(self.seed + 1)
        p = self.preset

        def step_fn():
            x = float_images(images[self._batch_idx(g, p.vae_batch)])
            with _autocast(self.device):
                post = vae.encode(x).latent_dist
                z = post.sample()
                rec = vae.decode(z).sample
            rec = rec.float()
            mse = F.mse_loss(rec, x)
            l1 = (rec - x).abs().mean()
            kl = post.kl().mean() / z[0].numel()  # per latent element
            loss = mse + 0.5 * l1 + 1e-4 * kl
            return loss, {}

        summary = self._loop("vae", list(vae.parameters()), p.vae_seconds, p.vae_lr, step_fn,
                             lambda: {"model": vae.state_dict()},
                             lambda ck: vae.load_state_dict(ck["model"]), g, p.vae_batch)
        # scaling factor so that scaled latents have unit variance (SD's 0.18215 is found the same way)
        with torch.no_grad():
            z = self._encode(vae, images[:4096], sample=True)
            vae.register_to_config(scaling_factor=float(1.0 / z.float().std()))
        vae.save_pretrained(self.out / "vae")
        return summary

    def train_preview(self):
        """TAESD's idea on this model's VAE: a tiny decoder (:class:`lab.preview.PreviewDecoder`) trained to
        reproduce the VAE decoder on latents like a sampler's x0 estimates (:func:`lab.preview.preview_inputs`
        of the training set's posteriors); L1 + MSE against the VAE's decode of the same latents."""
        from diffusers import AutoencoderKL

        from ..preview import PreviewDecoder, preview_inputs
        p = self.preset
        vae_dir = self._component("vae")
        scale, mean, std = self._latent_stats(vae_dir)
        vae = AutoencoderKL.from_pretrained(vae_dir, dtype=torch.float32).to(self.device).eval().requires_grad_(False)
        g = self._generator(self.seed + 7)
        n = min(len(mean), p.preview_pairs)
        inputs = preview_inputs(mean[:n], std[:n], scale, g)
        t0 = time.time()
        with torch.no_grad():
            targets = torch.cat([(vae.decode(inputs[i:i + 256] / scale).sample.float() / 2 + 0.5).clamp(0, 1)
                                 .mul(255).round().to(torch.uint8) for i in range(0, n, 256)])
        print(f"[preview] {n} VAE decodes in {time.time() - t0:.1f}s", flush=True)
        del vae
        torch.manual_seed(self.seed + 7)
        dec = PreviewDecoder().to(self.device)

        def step_fn():
            idx = torch.randint(0, n, (p.preview_batch,), generator=g, device=self.device)
            with _autocast(self.device):
                out = dec(inputs[idx])
            out, target = out.float(), targets[idx].float() / 255
            mse = F.mse_loss(out, target)
            return (out - target).abs().mean() + mse, {"psnr": -10 * torch.log10(mse.detach())}

        summary = self._loop("preview", list(dec.parameters()), p.preview_seconds, p.preview_lr, step_fn,
                             lambda: {"model": dec.state_dict()}, lambda ck: dec.load_state_dict(ck["model"]), g,
                             p.preview_batch)
        dec.save(self.out / "preview_decoder")
        return summary

    @torch.no_grad()
    def _encode(self, vae, images_u8, sample: bool, batch: int = 1024):
        outs = []
        for i in range(0, len(images_u8), batch):
            with _autocast(self.device):
                post = vae.encode(float_images(images_u8[i:i + batch])).latent_dist
            outs.append((post.sample() if sample else post.mean).float())
        return torch.cat(outs)

    # ---------------------------------------------------------------- stage 2
    def _latent_stats(self, vae_dir: Path):
        """The VAE posterior's mean and std of every training image, encoded once per VAE and kept for the
        later stages of this trainer, and on disk (:func:`_encoding_cache`) for later commands: on 2 CPU
        cores encoding 30k scenes takes minutes."""
        key = str(Path(vae_dir).resolve())
        if key not in self._stats:
            from diffusers import AutoencoderKL
            scale = AutoencoderKL.load_config(vae_dir)["scaling_factor"]
            cache = _encoding_cache(vae_dir, self.preset.n_train, self.seed, self.device, self.preset.two_share,
                                    self.overlap_share)
            if cache is not None and cache.exists():
                ck = torch.load(cache, map_location=self.device)
                mean, std = ck["mean"], ck["std"]
                print(f"[encode] {len(mean)} scenes from {cache}", flush=True)
            else:
                t0 = time.time()
                vae = AutoencoderKL.from_pretrained(vae_dir, dtype=torch.float32).to(self.device).eval()
                mean, std = self._encode_stats(vae.requires_grad_(False))
                print(f"[encode] {len(mean)} scenes in {time.time() - t0:.1f}s", flush=True)
                if cache is not None:
                    _save_ckpt(cache, {"mean": mean.cpu(), "std": std.cpu()})
            self._stats[key] = (scale, mean, std)
        return self._stats[key]

    def _encode_stats(self, vae):
        with torch.no_grad():
            means, stds = [], []
            for i in range(0, self.preset.n_train, 1024):
                with _autocast(self.device):
                    post = vae.encode(float_images(self.data["image"][i:i + 1024])).latent_dist
                means.append(post.mean.float())
                stds.append(post.std.float())
        return torch.cat(means), torch.cat(stds)

    def _token_ids(self, captions):
        tok = self.tokenizer()
        ids = tok(captions, padding="max_length", max_length=configs.MAX_TOKENS, truncation=True,
                  return_tensors="pt").input_ids
        return ids.to(self.device)

    def _text_encoder(self):
        from transformers import CLIPTextConfig, CLIPTextModel
        tok = self.tokenizer()
        cfg = CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **configs.TEXT_ENCODER)
        return CLIPTextModel(cfg)

    def _token_groups(self, captions, ids: torch.Tensor) -> torch.Tensor:
        """``[n, MAX_TOKENS]`` int8: per token (``ids``, from :meth:`_token_ids`) of each caption what it names
        (:func:`world.word_groups`: object index, ``MAX_OBJECTS`` for the background, -1 for none and for
        special tokens)."""
        from ..conditioning.text import token_words
        tok = self.tokenizer()
        ids = ids.tolist()
        out = torch.full((len(captions), configs.MAX_TOKENS), -1, dtype=torch.int8)
        for i, caption in enumerate(captions):
            groups = world.word_groups(caption)
            for j, w in enumerate(token_words(tok, ids[i])["word_index"]):
                if w >= 0:
                    out[i, j] = groups[w]
        return out.to(self.device)

    def train_unet(self):
        """Stage 2: the UNet and the text encoder, jointly, with L_LDM (plus the token grounding loss when
        the preset's ``grounding`` > 0). With a ``base`` pipeline directory they start from its weights
        (fine-tuning); otherwise from scratch on this trainer's VAE."""
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel
        p = self.preset
        scale, mean, std = self._latent_stats(self._component("vae"))
        ids = self._token_ids(self.data["caption"])
        empty = self._token_ids([""])[0]
        torch.manual_seed(self.seed + 2)
        if self.base != self.out and (self.base / "unet").exists():
            unet = UNet2DConditionModel.from_pretrained(self.base / "unet", dtype=torch.float32).to(self.device)
            text = CLIPTextModel.from_pretrained(self.base / "text_encoder", dtype=torch.float32).to(self.device)
            print(f"[unet] fine-tuning from {self.base}", flush=True)
        else:
            unet = UNet2DConditionModel(**configs.UNET).to(self.device)
            text = self._text_encoder().to(self.device)
        unet.train()
        text.train()
        grounding = p.grounding > 0 or p.pixel > 0
        if grounding:
            groups = self._token_groups(self.data["caption"], ids)
            group_masks = self.data["group_masks"]
            probs: list[torch.Tensor] = []
            _keep_cross_attention_probs(unet, probs)
        ema_unet = copy.deepcopy(unet).requires_grad_(False)
        ema_text = copy.deepcopy(text).requires_grad_(False)
        sched = DDPMScheduler(**configs.TRAIN_SCHEDULER)
        abar = sched.alphas_cumprod.to(self.device)
        g = self._generator(self.seed + 3)

        def step_fn():
            idx = self._batch_idx(g, p.unet_batch)
            z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g, device=self.device)) * scale
            tok = ids[idx].clone()
            drop = torch.rand(len(idx), generator=g, device=self.device) < 0.1
            tok[drop] = empty
            zt, t, eps = _forward_process(z0, abar, g)
            with _autocast(self.device):
                cond = text(tok).last_hidden_state
                pred = unet(zt, t, encoder_hidden_states=cond).sample
            loss = F.mse_loss(pred.float(), eps)  # L_LDM
            if not grounding:
                return loss, {}
            token_group = groups[idx].long()
            token_group[drop] = -1  # a dropped caption names nothing
            ground, pix = grounding_losses(probs, group_masks[idx].float(), token_group)
            probs.clear()
            extra = {"mse": loss.detach(), "grounding": ground.detach()}
            if p.pixel > 0:
                extra["pixel"] = pix.detach()
            return loss + p.grounding * ground + p.pixel * pix, extra

        params = list(unet.parameters()) + list(text.parameters())

        def state():
            return {"unet": unet.state_dict(), "text": text.state_dict(),
                    "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict()}

        def load(ck):
            unet.load_state_dict(ck["unet"])
            text.load_state_dict(ck["text"])
            ema_unet.load_state_dict(ck["ema_unet"])
            ema_text.load_state_dict(ck["ema_text"])

        summary = self._loop_with_ema("unet", params, p.unet_seconds, p.unet_lr, step_fn, state, load, g,
                                      [(ema_unet, unet), (ema_text, text)], p.unet_batch)
        if grounding:
            from diffusers.models.attention_processor import AttnProcessor2_0
            ema_unet.set_attn_processor(AttnProcessor2_0())
        ema_unet.save_pretrained(self.out / "unet")
        ema_text.save_pretrained(self.out / "text_encoder")
        self._save_scheduler()
        return summary

    def _loop_with_ema(self, stage, params, seconds, lr, step_fn, state_fn, load_fn, g, pairs, batch=None,
                       record=None):
        decay = self.preset.ema_decay
        counter = {"n": 0}

        def wrapped():
            # the EMA update for the previous optimiser step happens before the next forward pass
            if counter["n"] > 0:
                d = min(decay, (1 + counter["n"]) / (10 + counter["n"]))
                for ema, model in pairs:
                    _ema_update(ema, model, d)
            counter["n"] += 1
            return step_fn()

        summary = self._loop(stage, params, seconds, lr, wrapped, state_fn, load_fn, g, batch, record=record)
        d = min(decay, (1 + counter["n"]) / (10 + counter["n"]))
        for ema, model in pairs:
            _ema_update(ema, model, d)
        return summary

    def _save_scheduler(self):
        from diffusers import DDIMScheduler
        DDIMScheduler(**configs.SCHEDULER).save_pretrained(self.out / "scheduler")

    # ---------------------------------------------------------------- stage 3
    def train_controlnet(self, kind: str, init: str = "zero", drop: float | None = None):
        """A ControlNet for condition ``kind`` on the frozen UNet and text encoder, ``drop`` (default: the preset's
        ``controlnet_drop``, 0.5) of prompts replaced by "". Its stage (and output folder) is
        ``controlnet-KIND``, with ``-gaussian`` for ``init="gaussian"`` and ``-dropNN`` for another drop rate than
        0.5. With the preset's ``probe_every`` > 0 the log also gets the condition IoU of fresh samples
        (:meth:`_condition_probe`) every that many steps: the curve on which sudden convergence shows."""
        from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel
        if kind not in world.CONDITION_KINDS:
            raise KeyError(f"unknown condition kind {kind!r}; expected one of {world.CONDITION_KINDS}")
        p = self.preset
        if init not in ("zero", "gaussian", "base"):
            raise ValueError(f"unknown init {init!r}; expected 'zero', 'gaussian' or 'base'")
        drop = p.controlnet_drop if drop is None else drop
        if not 0.0 <= drop <= 1.0:
            raise ValueError(f"prompt drop rate must be within [0, 1], got {drop}")
        stage = (f"controlnet-{kind}" + ("-gaussian" if init == "gaussian" else "")
                 + (f"-drop{round(drop * 100)}" if drop != 0.5 else ""))
        start = self.base / f"controlnet-{kind}"
        if init == "base" and not (start / "config.json").exists():
            raise FileNotFoundError(f"init='base' needs a ControlNet to start from; {start} has none (pass base=)")
        scale, mean, std = self._latent_stats(self._component("vae"))
        unet = UNet2DConditionModel.from_pretrained(self._component("unet"), dtype=torch.float32).to(self.device)
        text = CLIPTextModel.from_pretrained(self._component("text_encoder"), dtype=torch.float32).to(self.device)
        unet.eval().requires_grad_(False)
        text.eval().requires_grad_(False)
        ids = self._token_ids(self.data["caption"])
        empty = self._token_ids([""])[0]
        torch.manual_seed(self.seed + 4)
        if init == "base":  # go on training the base's ControlNet of this kind (e.g. on a fine-tuned UNet)
            net = ControlNetModel.from_pretrained(start, dtype=torch.float32).to(self.device).train()
            print(f"[{stage}] fine-tuning from {start}", flush=True)
        else:
            net = ControlNetModel.from_unet(unet, **configs.CONTROLNET).to(self.device).train()
            if init == "gaussian":
                gaussian_init_zero_convs(net)
        cond_u8 = self.data[kind]
        sched = DDPMScheduler(**configs.TRAIN_SCHEDULER)
        abar = sched.alphas_cumprod.to(self.device)
        g = self._generator(self.seed + 5)

        def step_fn():
            idx = self._batch_idx(g, p.controlnet_batch)
            z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g, device=self.device)) * scale
            tok = ids[idx].clone()
            tok[torch.rand(len(idx), generator=g, device=self.device) < drop] = empty
            hint = cond_u8[idx].permute(0, 3, 1, 2).float() / 255.0  # [B, 3, 64, 64] in [0, 1]
            zt, t, eps = _forward_process(z0, abar, g)
            with torch.no_grad(), _autocast(self.device):
                cond = text(tok).last_hidden_state
            with _autocast(self.device):
                down, mid = net(zt, t, encoder_hidden_states=cond, controlnet_cond=hint, return_dict=False)
                pred = unet(zt, t, encoder_hidden_states=cond, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample
            return F.mse_loss(pred.float(), eps), {}

        probe = (p.probe_every, self._condition_probe(kind, net, unet, text)) if p.probe_every > 0 else None
        summary = self._loop(stage, list(net.parameters()), p.controlnet_seconds, p.controlnet_lr, step_fn,
                             lambda: {"model": net.state_dict()}, lambda ck: net.load_state_dict(ck["model"]), g,
                             p.controlnet_batch, probe=probe,
                             record={"kind": kind, "init": init, "prompt_drop": drop,
                                     "overlap_share": self.overlap_share})
        net.save_pretrained(self.out / stage)
        return summary

    def _condition_probe(self, kind: str, net, unet, text):
        """A function measuring how well ``net`` (in training) controls: :data:`Preset.probe_n` held-out scenes'
        ``kind`` conditions sampled through the lab's sampler (DDIM, ``probe_steps`` steps, guidance 5, fixed
        seeds) with their captions, and with no prompt; the oracle's foreground against the condition's objects
        (:func:`lab.shapes.evaluator.mask_iou`). Returns ``{"iou": ..., "iou_no_prompt": ...}``."""
        import numpy as np
        from diffusers import AutoencoderKL, DDIMScheduler

        from ..conditioning.controlnet import Control
        from ..pipeline import Pipeline
        from .evaluator import detect, mask_iou
        p = self.preset
        vae = AutoencoderKL.from_pretrained(self._component("vae"), dtype=torch.float32).to(self.device).eval()
        pipe = Pipeline.from_components(vae=vae, unet=unet, text_encoder=text, tokenizer=self.tokenizer(),
                                        scheduler=DDIMScheduler(**configs.SCHEDULER), controlnets={kind: net},
                                        device=self.device, name="probe")
        exs = [world.make_example(200, i, split="heldout") for i in range(p.probe_n)]
        conditions = [e[kind] for e in exs]
        targets = [e["masks"].any(0) for e in exs]

        def probe() -> dict:
            out = {}
            for key, prompts in (("iou", [e["caption"] for e in exs]), ("iou_no_prompt", [""] * len(exs))):
                with torch.no_grad():
                    run = pipe.sampler(prompts, steps=p.probe_steps, guidance=5.0, scheduler="ddim", seed=0,
                                       control=Control(kind, conditions), progress=False).run()
                out[key] = float(np.mean([mask_iou(detect(np.asarray(im))[2], m)
                                          for im, m in zip(run.images, targets)]))
            net.train()
            return out

        return probe

    # ---------------------------------------------------------------- the task table
    def train_task(self, task: str, init: str = "zero") -> dict:
        """A model of the task table (:mod:`lab.shapes.tasks`): the text model's UNet (this run's own, else the
        base's) with ``conv_in`` widened for the task's concat channels, fine-tuned on this trainer's data, the text
        encoder and the VAE frozen; EMA weights to ``out / f"unet-{task}"``. ``init="base"``: a concat model
        starts instead from the base's trained ``unet-{task}`` (a fresh cosine on top of an earlier run)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel

        start = _check_task_init(task, init, self.base)
        if task in (*TOKEN_TASKS, "uncond"):
            return self._train_tokens(task)
        p = self.preset
        stage = f"task-{task}"
        scale, mean, std = self._latent_stats(self._component("vae"))
        vae = AutoencoderKL.from_pretrained(self._component("vae"), dtype=torch.float32).to(self.device).eval()
        vae.requires_grad_(False)
        text = CLIPTextModel.from_pretrained(self._component("text_encoder"), dtype=torch.float32).to(self.device).eval()
        text.requires_grad_(False)
        text_channels = UNet2DConditionModel.load_config(self._component("unet"))["in_channels"]
        if init == "base":
            unet = UNet2DConditionModel.from_pretrained(start, dtype=torch.float32).to(self.device).train()
        else:
            base = UNet2DConditionModel.from_pretrained(self._component("unet"), dtype=torch.float32).to(self.device)
            unet = widen_conv_in(base, EXTRA_CHANNELS[task],
                                 num_class_embeds=MAX_NOISE_LEVEL + 1 if task == "sr" else None).train()
            del base
        unet.conv_in = SplitConvIn(unet.conv_in, text_channels)
        fast = [unet.conv_in.new_weight] + ([unet.class_embedding.weight] if task == "sr" else [])
        params = [{"params": [q for q in unet.parameters() if all(q is not f for f in fast)]},
                  {"params": fast, "lr_mult": NEW_LR_MULT}]
        lrs = low_res_scheduler()
        ids = self._token_ids(self.data["caption"])
        empty = self._token_ids([""])[0]
        boxes = self.data["boxes"]
        images = self.data["image"]
        segs = self.data["segmentation"]
        ema = copy.deepcopy(unet).requires_grad_(False)
        sched = DDPMScheduler(**configs.TRAIN_SCHEDULER)
        abar = sched.alphas_cumprod.to(self.device)
        torch.manual_seed(self.seed + 6)
        g = self._generator(self.seed + 7)

        def step_fn():
            idx = self._batch_idx(g, p.unet_batch)
            z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g, device=self.device)) * scale
            tok = ids[idx].clone()
            tok[torch.rand(len(idx), generator=g, device=self.device) < CAPTION_DROP[task]] = empty
            labels = None
            if task == "inpaint":
                masks = inpaint_masks(boxes[idx], g)
                extra = list(inpaint_inputs(vae, images[idx], masks, scale, g))
            elif task == "segmap":
                extra = [F.avg_pool2d(segmap_onehot(segs[idx]), configs.IMAGE_SIZE // configs.LATENT_SIZE)]
            else:  # sr: the low-res scene, noised to a random level (the level is the class label)
                low = low_res(images[idx])
                labels = torch.randint(0, MAX_NOISE_LEVEL + 1, (len(idx),), generator=g, device=self.device)
                noise = torch.randn(low.shape, generator=g, device=self.device)
                extra = [lrs.add_noise(low, noise, labels.cpu()).to(self.device)]
            zt, t, eps = _forward_process(z0, abar, g)
            with torch.no_grad(), _autocast(self.device):
                cond = text(tok).last_hidden_state
            with _autocast(self.device):
                pred = unet(torch.cat([zt, *extra], 1), t, encoder_hidden_states=cond, class_labels=labels).sample
            return F.mse_loss(pred.float(), eps), {}

        def state():
            return {"unet": unet.state_dict(), "ema": ema.state_dict()}

        def load(ck):
            unet.load_state_dict(ck["unet"])
            ema.load_state_dict(ck["ema"])

        record = continued_record(start) if init == "base" else None  # the task table counts the runs before
        summary = self._loop_with_ema(stage, params, p.unet_seconds, p.unet_lr, step_fn, state, load, g, [(ema, unet)],
                                      p.unet_batch, record=record)
        ema.conv_in = ema.conv_in.merged()
        ema.save_pretrained(self.out / f"unet-{task}")
        if task == "sr":
            lrs.save_pretrained(self.out / "low_res_scheduler")
        return summary

    def _train_tokens(self, task: str) -> dict:
        """A CA task model: tokens made from the condition (:mod:`lab.token_encoders`, started from
        the text encoder) read by the text model's UNet through cross-attention, with the UNet weights of
        :func:`~lab.shapes.tasks.trained_subset` fine-tuned and the rest frozen. ``class``: the one-object scenes
        of this trainer's data, their (size, colour, shape) the label; ``layout``: every scene, its objects'
        boxes and (colour, shape) labels, in either order, its UNet taking coordinate channels. Where
        :data:`~lab.shapes.tasks.GROUNDING` gives weights (each box token; the class token's are off), each condition
        token's cross-attention map is trained onto its object (:func:`grounding_losses`). The condition is dropped to
        the null one time in ten (guidance). EMA weights to ``out / "unet-TASK" / PARTIAL_FILE`` and
        ``out / "TASK_embedder"``."""
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from safetensors.torch import save_file
        from transformers import CLIPTextModel

        from .evaluator import parse_caption
        p = self.preset
        scale, mean, std = self._latent_stats(self._component("vae"))
        text = CLIPTextModel.from_pretrained(self._component("text_encoder"), dtype=torch.float32).to(self.device).eval()
        if task == "uncond":  # no condition: every scene with the empty caption's context
            with torch.no_grad():
                empty = text(self._token_ids([""])).last_hidden_state.float()
            encoder = torch.nn.Module()
        else:
            encoder = (class_encoder if task == "class" else layout_encoder)(text, self.tokenizer()).to(self.device).train()
        del text
        unet = UNet2DConditionModel.from_pretrained(self._component("unet"), dtype=torch.float32).to(self.device)
        coords = None
        if task == "layout" and encoder.config.coordinates:  # where each latent position is, as 2 more inputs
            unet = widen_conv_in(unet, COORD_CHANNELS)
            unet.conv_in = SplitConvIn(unet.conv_in, unet.config.in_channels - COORD_CHANNELS)
            coords = coordinate_channels(1, configs.LATENT_SIZE, configs.LATENT_SIZE, device=self.device)
        unet.requires_grad_(False)
        names = set(trained_subset(unet, task))
        trained = [q for name, q in unet.named_parameters() if name in names]
        probs: list[torch.Tensor] = []
        grounded = task in GROUNDING and any(GROUNDING[task])
        if grounded:  # each condition token's map is trained onto its object (grounding_losses), as in train_unet
            _keep_cross_attention_probs(unet, probs)
        for q in trained:
            q.requires_grad_(True)
        parsed = [parse_caption(c)[0] for c in self.data["caption"]]
        if task == "uncond":
            pool = torch.arange(len(parsed), device=self.device)
        elif task == "class":
            pool = torch.tensor([i for i, objs in enumerate(parsed) if len(objs) == 1], device=self.device)
            labels = torch.tensor([class_index(*parsed[i][0]) for i in pool.tolist()], device=self.device)
        else:
            pool = torch.arange(len(parsed), device=self.device)
            labels = torch.tensor([[LAYOUT_LABELS.index(f"{c} {sh}") for _, c, sh in objs] + [-1] * (world.MAX_OBJECTS - len(objs))
                                   for objs in parsed], device=self.device)
        boxes = self.data["boxes"].float()
        print(f"[task-{task}] {len(pool)} scenes, {len(trained)} UNet tensors trained "
              f"({sum(q.numel() for q in trained) / 1e6:.2f}M)", flush=True)
        ema_enc = copy.deepcopy(encoder).requires_grad_(False)
        ema_unet = copy.deepcopy(unet).requires_grad_(False)
        sched = DDPMScheduler(**configs.TRAIN_SCHEDULER)
        abar = sched.alphas_cumprod.to(self.device)
        torch.manual_seed(self.seed + 8)
        g = self._generator(self.seed + 9)

        def step_fn():
            j = torch.randint(0, len(pool), (p.unet_batch,), generator=g, device=self.device)
            idx = pool[j]
            # contiguous: the cached latent statistics can be channels-last, and torch's CPU GroupNorm backward
            # for channels-last inputs crashes (segfault) when the norm's own weights train (the layout model's)
            z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g, device=self.device)).contiguous() * scale
            drop = torch.rand(len(j), generator=g, device=self.device) < 0.1
            if task == "uncond":
                ctx = empty.expand(len(j), -1, -1)
            elif task == "class":
                ctx = encoder(torch.where(drop, encoder.null_class, labels[j]))
                # the class token names the scene's one object (group 0); the frame's other tokens name nothing
                token_group = torch.full(ctx.shape[:2], -1, dtype=torch.long, device=self.device)
                token_group[:, CLASS_SLOT] = torch.where(drop, -1, 0)
            else:
                lab, box = labels[j], boxes[idx]
                swap = (torch.rand(len(j), generator=g, device=self.device) < 0.5) & (lab[:, 1] >= 0)
                lab = torch.where(swap[:, None], lab.flip(1), lab)
                box = torch.where(swap[:, None, None], box.flip(1), box)
                ctx = encoder(box, torch.where(drop[:, None], -1, lab))
                # which object each box slot names (slots 1..K, swapped with the boxes), -1 for none
                k = lab.shape[1]
                order = torch.arange(k, device=self.device)
                token_group = torch.full(ctx.shape[:2], -1, dtype=torch.long, device=self.device)
                token_group[:, 1:1 + k] = torch.where(swap[:, None], order.flip(0), order)
                token_group[:, 1:1 + k][lab < 0] = -1
                token_group[drop] = -1
            zt, t, eps = _forward_process(z0, abar, g)
            x = zt if coords is None else torch.cat([zt, coords.expand(len(j), -1, -1, -1)], 1)
            with _autocast(self.device):
                pred = unet(x, t, encoder_hidden_states=ctx).sample
            loss = F.mse_loss(pred.float(), eps)
            if not grounded:
                return loss, {}
            ground, pix = grounding_losses(probs, self.data["group_masks"][idx].float(), token_group)
            probs.clear()
            w_token, w_pixel = GROUNDING[task]
            return loss + w_token * ground + w_pixel * pix, {"mse": loss.detach(), "grounding": ground.detach(),
                                                             "pixel": pix.detach()}

        def state():
            return {"encoder": encoder.state_dict(), "unet": trained_subset(unet, task),
                    "ema_encoder": ema_enc.state_dict(), "ema_unet": trained_subset(ema_unet, task)}

        def load(ck):
            encoder.load_state_dict(ck["encoder"])
            ema_enc.load_state_dict(ck["ema_encoder"])
            unet.load_state_dict(ck["unet"], strict=False)
            ema_unet.load_state_dict(ck["ema_unet"], strict=False)

        fast = [unet.conv_in.new_weight] if coords is not None else []  # the new input channels, as train_task's
        params = [{"params": [q for q in trained if all(q is not f for f in fast)]}] + \
            ([{"params": fast, "lr_mult": NEW_LR_MULT}] if fast else []) + \
            ([{"params": list(encoder.parameters()), "lr_mult": TOKEN_LR_MULT}] if task != "uncond" else [])
        summary = self._loop_with_ema(f"task-{task}", params, p.unet_seconds, p.unet_lr, step_fn, state, load, g,
                                      [(ema_enc, encoder), (ema_unet, unet)], p.unet_batch,
                                      record={"frame": CLASS_FRAME} if task == "class" else None)
        if task != "uncond":
            ema_enc.save_pretrained(self.out / TOKEN_TASKS[task])
        (self.out / f"unet-{task}").mkdir(parents=True, exist_ok=True)
        if coords is not None:
            ema_unet.conv_in = ema_unet.conv_in.merged()
        save_file({k: v.contiguous() for k, v in trained_subset(ema_unet, task).items()},
                  str(self.out / f"unet-{task}" / PARTIAL_FILE))
        # the text UNet's weights it goes over, so a retrained text UNet under it is noticed at load (lab.loading)
        write_adapter_record(self.out / f"unet-{task}", "unet", self._component("unet"))
        return summary

    # ---------------------------------------------------------------- export
    def export(self, dest: str | Path, kinds=world.CONDITION_KINDS) -> Path:
        """Write the diffusers pipeline directory (fp16 safetensors) with ``controlnet-KIND`` subfolders."""
        return export_pipeline(self.out, dest, kinds, base=self.base)


def _check_task_init(task: str, init: str, base: Path) -> Path:
    """Where a task model with ``init`` starts (``base / unet-TASK`` for ``"base"``), or a clear error."""
    check_task(task)
    if init not in ("zero", "base"):
        raise ValueError(f"unknown init {init!r} for a task model; expected 'zero' or 'base'")
    if init == "base" and task not in CONCAT_TASKS:
        raise ValueError(f"init={init!r} is for the concat task models {CONCAT_TASKS}, not {task!r}")
    start = Path(base) / f"unet-{task}"
    if init == "base" and not (start / "config.json").exists():
        raise FileNotFoundError(f"init='base' needs a {task} UNet to start from; {start} has none (pass base=)")
    return start


def _keep_cross_attention_probs(unet, sink: list) -> None:
    """Cross-attention on the lab's one explicit path (lab.recording.dispatch): output probs @ V, and each
    layer's probabilities ``[batch, heads, queries, tokens]`` appended to ``sink`` inside the autograd graph (for
    the grounding losses); self-attention keeps its processor."""
    unet.set_attn_processor({name: (ProbsAttnProcessor(sink.append) if name.endswith("attn2.processor") else proc)
                             for name, proc in unet.attn_processors.items()})


def _group_masks(object_masks: torch.Tensor) -> torch.Tensor:
    """``[n, MAX_OBJECTS, H, W]`` bool -> ``[n, MAX_OBJECTS + 1, 16, 16]`` float16: each object's mask and the
    background's, area-averaged to the latent grid."""
    out = []
    for i in range(0, len(object_masks), 4096):
        obj = F.adaptive_avg_pool2d(object_masks[i:i + 4096].float(), configs.LATENT_SIZE)
        out.append(torch.cat([obj, (1 - obj.sum(1, keepdim=True)).clamp(min=0)], 1).half())
    return torch.cat(out)


def _grounded_maps(probs: list[torch.Tensor], masks: torch.Tensor, token_group: torch.Tensor):
    """Per layer, each token's head-mean map and its region's mask at that layer's grid (area-averaged):
    ``(a, target)``, both ``[b, tokens, hw]``."""
    for p in probs:
        a = p.float().mean(1).transpose(1, 2)  # [b, tokens, hw]
        m = F.adaptive_avg_pool2d(masks, math.isqrt(a.shape[2])).flatten(2)  # [b, groups, hw]
        yield a, torch.gather(m, 1, token_group.clamp(min=0)[..., None].expand(-1, -1, m.shape[2]))


def grounding_losses(probs: list[torch.Tensor], masks: torch.Tensor,
                     token_group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both TokenCompose terms from one pass over the layers: ``(token, pixel)``, as
    :func:`grounding_loss` and :func:`pixel_grounding_loss` define them."""
    valid = token_group >= 0
    if not bool(valid.any()):
        return masks.new_zeros(()), masks.new_zeros(())
    token, pixel = [], []
    for a, target in _grounded_maps(probs, masks, token_group):
        share = (a * target).sum(-1) / a.sum(-1).clamp(min=1e-8)  # [b, tokens]
        token.append(((1 - share) ** 2)[valid].mean())
        bce = F.binary_cross_entropy(a.clamp(1e-6, 1 - 1e-6), target.clamp(0, 1), reduction="none").mean(-1)
        pixel.append(bce[valid].mean())
    return torch.stack(token).mean(), torch.stack(pixel).mean()


def grounding_loss(probs: list[torch.Tensor], masks: torch.Tensor, token_group: torch.Tensor) -> torch.Tensor:
    """TokenCompose's token loss (Wang et al., CVPR 2024) on the shapes world's masks: for every token that
    names something (an object's size, colour or shape word; the background's words), the share of its
    cross-attention map that falls outside its region, squared, averaged over tokens and layers:
    ``(1 - sum_hw(A_i * M_i) / sum_hw(A_i))^2``.

    ``probs``: per layer ``[batch, heads, h * w, tokens]``; ``masks``: ``[batch, groups, H, W]`` soft region
    masks (objects, then background); ``token_group``: ``[batch, tokens]`` index into ``groups`` or -1."""
    return grounding_losses(probs, masks, token_group)[0]


def pixel_grounding_loss(probs: list[torch.Tensor], masks: torch.Tensor, token_group: torch.Tensor) -> torch.Tensor:
    """TokenCompose's pixel loss: for every token that names something, the binary cross-entropy between
    its cross-attention map (the softmax probability of that token at each query pixel, mean over heads)
    and its region's mask at that layer's resolution (area-averaged, so soft at the edges), averaged over
    pixels, tokens and layers. Where :func:`grounding_loss` is satisfied by a peak anywhere inside the
    region, this term asks the map to cover all of it and to be low outside.

    Arguments as for :func:`grounding_loss`."""
    return grounding_losses(probs, masks, token_group)[1]


def gaussian_init_zero_convs(net, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """Re-initialise a ControlNet's zero convolutions (and its hint embedding's last conv) N(0, std^2):
    the ablation to the seed's zero initialisation."""
    convs = list(net.controlnet_down_blocks) + [net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * std)
            conv.bias.zero_()


def export_pipeline(work: str | Path, dest: str | Path, kinds=world.CONDITION_KINDS,
                    base: str | Path | None = None) -> Path:
    """Write ``dest`` (fp16 safetensors, a diffusers pipeline directory with ``controlnet-KIND`` subfolders)
    from the components trained in ``work``; components ``work`` lacks come from ``base``."""
    import shutil

    from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTokenizer
    work, dest = Path(work), Path(dest)
    base = Path(base) if base is not None else work

    def src(name: str) -> Path:
        return work / name if (work / name).exists() else base / name

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(src("vae")),
        text_encoder=CLIPTextModel.from_pretrained(src("text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(src("tokenizer")),
        unet=UNet2DConditionModel.from_pretrained(src("unet")),
        scheduler=DDIMScheduler.from_pretrained(src("scheduler")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    for task in TASKS:  # the task table's UNets (lab.shapes.tasks), beside the text model's
        if (src(f"unet-{task}") / "config.json").exists():
            UNet2DConditionModel.from_pretrained(src(f"unet-{task}"), dtype=torch.float32).to(torch.float16) \
                .save_pretrained(tmp / f"unet-{task}", safe_serialization=True)
    for task in (*TOKEN_TASKS, "uncond"):  # task models as weights over the text UNet (and their token encoder)
        if (src(f"unet-{task}") / PARTIAL_FILE).exists():
            from safetensors.torch import load_file, save_file
            (tmp / f"unet-{task}").mkdir()
            save_file({k: v.half().contiguous() for k, v in load_file(str(src(f"unet-{task}") / PARTIAL_FILE)).items()},
                      str(tmp / f"unet-{task}" / PARTIAL_FILE))
            if (src(f"unet-{task}") / ADAPTER_FILE).exists():
                shutil.copy(src(f"unet-{task}") / ADAPTER_FILE, tmp / f"unet-{task}" / ADAPTER_FILE)
            if task in TOKEN_TASKS:
                folder = TOKEN_TASKS[task]
                ENCODERS[folder].from_pretrained(src(folder)).to(torch.float16).save_pretrained(tmp / folder)
    from .view_model import DECODER, export_view_model
    if (src("unet-views") / LORA_FILE).exists():  # the view model: LoRA adapter, widened conv_in, camera token
        export_view_model(src("unet-views").parent, tmp)
    if (src(DECODER) / LORA_FILE).exists():  # and its decoder adapter over the VAE
        export_view_model(src(DECODER).parent, tmp, part="decoder")
    if (src("preview_decoder") / "config.json").exists():  # lab.preview.PreviewDecoder, distilled from the VAE
        shutil.copytree(src("preview_decoder"), tmp / "preview_decoder")
    if (src("low_res_scheduler") / "scheduler_config.json").exists():  # the upscaler's (lab.shapes.tasks)
        shutil.copytree(src("low_res_scheduler"), tmp / "low_res_scheduler")
    for kind in kinds:
        net_dir = src(f"controlnet-{kind}")
        if net_dir.exists():
            ControlNetModel.from_pretrained(net_dir, dtype=torch.float32).to(torch.float16).save_pretrained(
                tmp / f"controlnet-{kind}", safe_serialization=True)
    for name in [p.name for p in tmp.iterdir() if p.is_dir()]:  # each model's last training, for the task table
        stage = name.replace("unet-", "task-") if name.startswith("unet-") else name
        log = work / "logs" / f"{stage}.summary.json"
        record = log if log.exists() else base / name / TRAINING_RECORD
        if record.exists():
            shutil.copy(record, tmp / name / TRAINING_RECORD)
    write_preview_map(tmp)
    # transformers loads a model in the dtype its config names; diffusers models load in fp32. Name fp32
    # so that a plain ``StableDiffusionPipeline.from_pretrained(dest)`` gets one dtype throughout
    # (the weights on disk stay fp16; pass ``torch_dtype=torch.float16`` on a GPU).
    cfg_path = tmp / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def write_preview_map(pipeline_dir: Path, n: int = 256) -> float:
    """Fit the latent -> RGB preview map (:mod:`lab.preview`) on shapes scenes and store it beside the
    model as ``lab_preview.json``. Returns its R^2."""
    from diffusers import AutoencoderKL

    from ..preview import FILENAME, fit_preview
    vae = AutoencoderKL.from_pretrained(Path(pipeline_dir) / "vae", torch_dtype=torch.float32)
    d = world.generate(n, seed=11, split="heldout")
    images = torch.from_numpy(d["image"]).permute(0, 3, 1, 2).float() / 255
    pm = fit_preview(vae, images, source="shapes scenes")
    pm.save(Path(pipeline_dir) / FILENAME)
    return pm.r2


def train(stage: str | None, out: str | Path, preset: str = "cpu", device: str | None = None,
          export_to: str | Path | None = None, init: str = "zero", progress: bool = True,
          base: str | Path | None = None, grounding: float | None = None, seconds: float | None = None,
          pixel: float | None = None, two_share: float | None = None, drop: float | None = None,
          probe_every: int | None = None, left_weight: float | None = None) -> list[dict]:
    """Run one stage (``vae``, ``unet``, ``controlnet-KIND``, a task's ``task-NAME``, or one of stage 1's
    studies, :data:`lab.shapes.stage1.STAGES`: ``vq``, ``vq-nogan``, ``ae-KIND-fF``, ``diffusion-SPACE``), several (comma-separated; they share the
    in-memory data and its encoding) or all of them in order. ``base``: a pipeline
    directory to start from (its VAE, text encoder and UNet; the ``unet`` stage then fine-tunes them);
    ``grounding``, ``pixel``: the token and pixel grounding loss weights (default: the preset's);
    ``seconds``: each stage's wall-clock budget (default: the preset's); ``two_share``: the share of
    two-object scenes in the training set (default: the preset's, 0.5 as the world draws); ``drop``: the
    ControlNets' prompt drop rate (default: the preset's, 0.5); ``probe_every``: log the ControlNets' condition
    IoU every that many steps (:meth:`Trainer._condition_probe`; default: the preset's, off); ``left_weight``: the
    view model's weight on pairs with an object that left the frame (:func:`lab.shapes.view_model.train_views`;
    default :data:`lab.shapes.view_model.LEFT_WEIGHT`). The pose and depth
    ControlNets (:data:`lab.shapes.world.OVERLAP_KINDS`) train on a set with the preset's share of overlapping
    objects, the other stages on the world as it draws."""
    from . import stage1
    stages = STAGES if stage in (None, "all") else tuple(stage.split(","))
    for s in stages:
        if s not in STAGES + TASK_STAGES + stage1.STAGES:
            raise KeyError(f"unknown stage {s!r}; expected one of {STAGES + TASK_STAGES + stage1.STAGES}")
    if left_weight is not None and not any(s in _VIEW_STAGES for s in stages):
        raise ValueError("left_weight is the view model's (--task views); these stages take none")
    for s in stages:  # before any stage runs, so a bad init loses no training
        if s == "task-views-decoder":
            if init != "zero":
                raise ValueError(f"init={init!r} is for the ControlNet, concat task and view stages; the view "
                                 f"decoder starts from the VAE of --base (or of --out)")
        elif s.startswith("task-views"):
            from .view_model import check_left_weight, check_views_init
            check_views_init(init, Path(base if base is not None else out), *_VIEW_STAGES[s])
            check_left_weight(left_weight)
        elif s in TASK_STAGES:
            _check_task_init(s.removeprefix("task-"), init, Path(base if base is not None else out))
        elif not s.startswith("controlnet-") and init != "zero":
            raise ValueError(f"init={init!r} is for the ControlNet, concat task and view stages; {s!r} takes none "
                             f"(it starts from --base where one is given)")
    p = PRESETS[preset] if isinstance(preset, str) else preset
    if grounding is not None:
        p = replace(p, grounding=grounding)
    if pixel is not None:
        p = replace(p, pixel=pixel)
    if two_share is not None:
        if not 0.0 <= two_share <= 1.0:
            raise ValueError(f"two_share must be within [0, 1], got {two_share}")
        p = replace(p, two_share=two_share)
    if seconds is not None:
        p = replace(p, vae_seconds=seconds, unet_seconds=seconds, controlnet_seconds=seconds, preview_seconds=seconds)
    if probe_every is not None:
        p = replace(p, probe_every=probe_every)
    trainers: dict[float, Trainer] = {}
    out_rows = []
    for s in stages:
        share = p.overlap_share if s in tuple(f"controlnet-{k}" for k in world.OVERLAP_KINDS) else 0.0
        if share not in trainers:
            trainers[share] = Trainer(out, p, device, progress=progress, base=base, overlap_share=share)
        tr = trainers[share]
        if s == "vae":
            out_rows.append(tr.train_vae())
        elif s == "preview":
            out_rows.append(tr.train_preview())
        elif s == "unet":
            out_rows.append(tr.train_unet())
        elif s == "task-views-decoder":  # the view world's decoder adapter over the VAE (lab.shapes.view_model)
            from .view_model import train_view_decoder
            out_rows.append(train_view_decoder(tr))
        elif s.startswith("task-views"):  # Zero-1-to-3 through a camera (lab.shapes.view_model)
            from .view_model import train_views  # views: the warped layout; -zero123, -coords: the view layout
            layout, coordinates = _VIEW_STAGES[s]
            out_rows.append(train_views(tr, coordinates=coordinates, layout=layout, init=init,
                                        left_weight=left_weight))
        elif s in TASK_STAGES:
            out_rows.append(tr.train_task(s.removeprefix("task-"), init=init))
        elif s in stage1.STAGES:  # stage 1 as the lecture teaches it (lab.shapes.stage1): not part of "all"
            out_rows.append(stage1.train_stage(tr, s, seconds))
        else:
            out_rows.append(tr.train_controlnet(s.split("-", 1)[1], init=init, drop=drop))
    if export_to is not None:
        export_pipeline(out, export_to, base=base)
    return out_rows
