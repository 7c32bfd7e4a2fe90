"""``python -m lab eval stage1``: the stage-1 studies of :mod:`lab.shapes.stage1`, scored by the world's oracle.

On ``n`` held-out scenes (the same for every autoencoder):

* ``vq_psnr_db``, ``vq_ssim``, ``vq_fidelity`` (the oracle reads the caption in the reconstruction: every object's
  size, colour and shape, nothing extra, and the background), ``vq_codebook_usage`` (the share of the
  :data:`~lab.shapes.stage1.CODEBOOK_SIZE` codes that some position of these scenes uses; ``vq_dead_codes`` the
  others), ``vq_perplexity`` (exp of the code distribution's entropy): the shipped VQGAN (``vqvae/``);
  ``kl_*``: the bundled KL autoencoder (``vae/``) on the same scenes;
* ``discriminator``: the shipped VQGAN against its twin trained without the patch discriminator (same budget,
  same data), with ``edge_sharpness`` (mean gradient magnitude of the reconstruction over that of the scene, on
  the scene's edge pixels: 1 is as sharp as drawn);
* ``rate_distortion``: one row per sweep autoencoder (``ae-KIND-fF`` of the training directory ``work``):
  ``{kind, f, latent_shape, latent_values, bits (VQ: positions x log2 |Z|), psnr_db, ssim, fidelity,
  train_seconds, steps}``;
* ``pixel_vs_latent``: the race's two UNets (``diffusion-pixel``, ``diffusion-latent``): ``fidelity_*`` on
  ``n_samples`` held-out one-object captions (DDIM 50 steps, guidance 5; ``colour_*``/``shape_*``: the oracle's
  colour and colour-shape checks alone), ``train_step_ms_*`` (one optimiser step at the training batch, median),
  ``sample_seconds_*`` (one image, 50 steps with guidance; latent: the VAE decode included),
  ``peak_memory_mb_*`` (the first training step's peak above the loaded model: activations, gradients and
  the optimiser's state; CUDA's allocator, or on CPU the resident-set high-water mark of a fresh process), ``parameters_*``, ``train_steps_*``.

Models missing from ``work`` (it holds what ``python -m lab train shapes --stage ...`` trained) are reported as
missing rather than guessed. ``images_path`` (default beside the JSON) gets the reconstructions and samples that
notebook 09 shows, as a compressed ``.npz``.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import torch

from . import stage1, world
from .evaluator import evaluate
from .tasks import TRAINING_RECORD

SHOW = 6  # scenes whose reconstructions are kept for the notebook
SHOW_SAMPLES = 8


def _fidelity(images, captions) -> float:
    return float(np.mean([bool(r["all_ok"] and r["background_ok"])
                          for r in (evaluate(im, c) for im, c in zip(images, captions))]))


def _edge_sharpness(rec: np.ndarray, ref: np.ndarray) -> float:
    def grad(a):
        a = a.astype(np.float32).mean(-1)
        return np.abs(np.diff(a, axis=1))[:, :, :-1] + np.abs(np.diff(a, axis=2))[:, :-1, :]
    g_ref, g_rec = grad(ref), grad(rec)
    edge = g_ref > 30
    return float(g_rec[edge].mean() / max(g_ref[edge].mean(), 1e-6))


def autoencoder_scores(model, images, captions) -> tuple[dict, np.ndarray]:
    rec = stage1.reconstruct(model, images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.from_numpy(rec).permute(0, 3, 1, 2).float() / 127.5 - 1
    return {"psnr_db": float(stage1.psnr(rec, images).mean()), "ssim": float(stage1.ssim(y, x)),
            "fidelity": _fidelity(rec, captions), "edge_sharpness": _edge_sharpness(rec, images)}, rec


def codebook_scores(vq, images) -> dict:
    idx = stage1.code_indices(vq, images).ravel()
    counts = np.bincount(idx, minlength=vq.config.num_vq_embeddings)
    p = counts[counts > 0] / counts.sum()
    used = int((counts > 0).sum())
    return {"codebook_usage": used / len(counts), "dead_codes": len(counts) - used,
            "perplexity": float(np.exp(-(p * np.log(p)).sum())), "codebook_size": len(counts)}


def _summary(work: Path, name: str) -> dict:
    f = work / "logs" / f"{name}.summary.json"
    return json.loads(f.read_text()) if f.exists() else {}


def _load_ae(path: Path):
    from diffusers import AutoencoderKL, VQModel
    cls = VQModel if json.loads((path / "config.json").read_text())["_class_name"] == "VQModel" else AutoencoderKL
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def _peak_train_step_mb(space: str, batch: int, device: str) -> float | None:
    """Peak memory (MB) of the first training step of the race's ``space`` UNet above the loaded model (on CPU run
    it in a fresh process: the resident set's high-water mark, reset through ``/proc/self/clear_refs``)."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    unet = stage1.make_diffusion_unet(space).to(device).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    s, c = unet.config.sample_size, unet.config.in_channels
    x, cond = torch.randn(batch, c, s, s, device=device), torch.randn(batch, 32, unet.config.cross_attention_dim,
                                                                     device=device)
    t = torch.randint(0, 1000, (batch,), device=device)

    def step():
        loss = F.mse_loss(unet(x, t, encoder_hidden_states=cond).sample, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # the first step: activations, gradients and the optimiser's state, above the loaded model
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    status = Path("/proc/self/status")
    if not status.exists():
        return None

    def field(name):
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith(name)) / 1024
    base = field("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from the current resident set
    step()
    return field("VmHWM:") - base


def race_scores(work: Path, base: Path, n_samples: int, device: str, progress=print) -> dict:
    import torch.nn.functional as F
    models = stage1.load_race_models(work, base, device)
    out: dict = {}
    missing = [s for s in stage1.DIFFUSION_SPACES if s not in models]
    if missing:
        return {"missing": [f"diffusion-{s}" for s in missing]}
    tok = models["tokenizer"]
    exs = [world.make_example(2, i, split="heldout", n_objects=1) for i in range(n_samples)]
    captions = [e["caption"] for e in exs]
    ids = tok(captions, padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=32, return_tensors="pt").input_ids
    samples = {}
    for space in stage1.DIFFUSION_SPACES:
        unet = models[space]
        t0 = time.time()
        imgs = np.concatenate([stage1.sample(unet, models["text_encoder"], ids[a:a + 50], empty, space,
                                             vae=models["vae"], seed=a) for a in range(0, n_samples, 50)])
        samples[space] = imgs
        scores = [evaluate(im, c) for im, c in zip(imgs, captions)]
        out[f"fidelity_{space}"] = float(np.mean([r["all_ok"] and r["background_ok"] for r in scores]))
        out[f"colour_{space}"] = float(np.mean([r["colour_ok"] for r in scores]))
        out[f"shape_{space}"] = float(np.mean([r["shape_ok"] for r in scores]))
        summ = _summary(work, f"diffusion-{space}")
        out[f"parameters_{space}"] = sum(p.numel() for p in unet.parameters())
        out[f"train_steps_{space}"] = summ.get("steps")
        out[f"train_seconds_{space}"] = summ.get("seconds")
        progress(f"[stage1 eval] {space}: fidelity {out[f'fidelity_{space}']:.3f} ({time.time() - t0:.0f} s)")

        # one training step at the training batch (random inputs of the right shapes: the step's cost does not
        # depend on the values)
        unet.train()
        opt = torch.optim.AdamW(unet.parameters(), lr=0.0)
        s, c = unet.config.sample_size, unet.config.in_channels
        b = stage1.DIFFUSION_BATCH
        x, t = torch.randn(b, c, s, s, device=device), torch.randint(0, 1000, (b,), device=device)
        cond = torch.randn(b, 32, unet.config.cross_attention_dim, device=device)

        def train_step():
            F.mse_loss(unet(x, t, encoder_hidden_states=cond).sample, x).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out[f"train_step_ms_{space}"] = 1000 * stage1.timed(train_step, repeats=5)
        unet.eval()
        out[f"sample_seconds_{space}"] = stage1.timed(lambda: stage1.sample(
            unet, models["text_encoder"], ids[:1], empty, space, vae=models["vae"]), repeats=3, warmup=1)
        if device.startswith("cuda"):
            out[f"peak_memory_mb_{space}"] = _peak_train_step_mb(space, b, device)
        else:
            with mp.get_context("spawn").Pool(1) as pool:
                out[f"peak_memory_mb_{space}"] = pool.apply(_peak_train_step_mb, (space, b, device))
    vae = models["vae"]
    images = torch.from_numpy(np.stack([e["image"] for e in exs[:b]])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        out["vae_encode_ms_per_image"] = 1000 * stage1.timed(lambda: vae.encode(images.to(device)), repeats=3) / b
    out["speedup_train_step"] = out["train_step_ms_pixel"] / out["train_step_ms_latent"]
    out["speedup_sample"] = out["sample_seconds_pixel"] / out["sample_seconds_latent"]
    out["n_samples"] = n_samples
    out["_samples"] = {"captions": captions[:SHOW_SAMPLES],
                       **{s: samples[s][:SHOW_SAMPLES] for s in stage1.DIFFUSION_SPACES}}
    return out


def run_stage1_eval(*, n: int = 500, n_samples: int = 100, json_path=None, work="runs/stage1/work",
                    model: str = "shapes", images_path=None, device: str | None = None, progress=print) -> dict:
    from ..loading import resolve_path
    t_start = time.time()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base, work = Path(resolve_path(model)), Path(work)
    d = world.generate(n, seed=1, split="heldout")
    images, captions = d["image"], d["caption"]
    res: dict = {"n": n, "work": str(work), "model": str(model)}
    shown = {"scenes": images[:SHOW], "captions": np.array(captions[:SHOW])}

    if not (base / stage1.VQ_DIR / "config.json").exists():
        raise FileNotFoundError(f"{base / stage1.VQ_DIR} holds no VQ autoencoder (python -m lab train shapes "
                                f"--stage vq, then copy it there)")
    vq = _load_ae(base / stage1.VQ_DIR).to(device)
    scores, rec = autoencoder_scores(vq, images, captions)
    res.update({f"vq_{k}": v for k, v in scores.items()})
    res.update({f"vq_{k}": v for k, v in codebook_scores(vq, images).items()})
    res["vq_training"] = json.loads((base / stage1.VQ_DIR / TRAINING_RECORD).read_text()) \
        if (base / stage1.VQ_DIR / TRAINING_RECORD).exists() else None
    shown["vq-f4 (VQGAN, shipped)"] = rec[:SHOW]
    kl = _load_ae(base / "vae").to(device)
    scores, rec = autoencoder_scores(kl, images, captions)
    res.update({f"kl_{k}": v for k, v in scores.items()})
    shown["kl-f4 (bundled VAE)"] = rec[:SHOW]
    progress(f"[stage1 eval] vq {res['vq_psnr_db']:.2f} dB, usage {res['vq_codebook_usage']:.3f}; "
             f"kl {res['kl_psnr_db']:.2f} dB")

    nogan = work / f"{stage1.VQ_DIR}-nogan"
    if (nogan / "config.json").exists():
        twin = _load_ae(nogan).to(device)
        scores, rec = autoencoder_scores(twin, images, captions)
        res["discriminator"] = {
            "with": {k: res[f"vq_{k}"] for k in ("psnr_db", "ssim", "fidelity", "edge_sharpness", "codebook_usage")},
            "without": {**scores, "codebook_usage": codebook_scores(twin, images)["codebook_usage"]},
            "train_seconds": _summary(nogan.parent, nogan.name).get("seconds")}
        shown["vq-f4 without discriminator"] = rec[:SHOW]
    else:
        res["discriminator"] = {"missing": str(nogan)}

    rows, missing = [], []
    for stage in stage1.SWEEP_STAGES:
        path = work / stage
        if not (path / "config.json").exists():
            missing.append(stage)
            continue
        _, kind, f = stage.split("-")
        f = int(f[1:])
        ae = _load_ae(path).to(device)
        scores, rec = autoencoder_scores(ae, images, captions)
        h = 64 // f
        c = ae.config.vq_embed_dim if kind == "vq" else ae.config.latent_channels
        summ = _summary(work, stage)
        row = {"kind": kind, "f": f, "latent_shape": [c, h, h], "latent_values": c * h * h,
               "bits": h * h * math.log2(ae.config.num_vq_embeddings) if kind == "vq" else None,
               **{k: scores[k] for k in ("psnr_db", "ssim", "fidelity", "edge_sharpness")},
               "train_seconds": summ.get("seconds"), "steps": summ.get("steps")}
        if kind == "vq":
            row["codebook_usage"] = codebook_scores(ae, images)["codebook_usage"]
        rows.append(row)
        shown[f"{kind}-f{f}"] = rec[:SHOW]
        progress(f"[stage1 eval] {stage}: {row['psnr_db']:.2f} dB, fidelity {row['fidelity']:.3f}")
    res["rate_distortion"] = rows
    if missing:
        res["rate_distortion_missing"] = missing

    race = race_scores(work, base, n_samples, device, progress)
    samples = race.pop("_samples", None)
    res["pixel_vs_latent"] = race
    res["device"] = device
    res["threads"] = torch.get_num_threads()
    res["eval_seconds"] = round(time.time() - t_start, 1)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(res, indent=2))
        images_path = images_path or Path(json_path).with_suffix(".npz")
    if images_path:
        arrays = {f"rec/{k}": v for k, v in shown.items() if k not in ("scenes", "captions")}
        arrays.update(scenes=shown["scenes"], captions=shown["captions"])
        if samples is not None:
            arrays.update({f"sample/{s}": samples[s] for s in stage1.DIFFUSION_SPACES},
                          sample_captions=np.array(samples["captions"]))
        np.savez_compressed(images_path, **arrays)
    return res
