"""Stage 1 as the lecture teaches it (issue 20): the VQGAN's losses, the autoencoders of the rate-distortion sweep,
the pixel-vs-latent race, the shipped VQ autoencoder loaded by plain diffusers, and the eval."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lab.loading import BUNDLED
from lab.shapes import stage1, train, world


def test_autoencoders_compress_by_their_factor():
    x = torch.zeros(2, 3, 64, 64)
    for kind in stage1.KINDS:
        for f in stage1.FACTORS:
            ae = stage1.make_autoencoder(kind, f)
            with torch.no_grad():
                z = ae.encode(x).latents if kind == "vq" else ae.encode(x).latent_dist.mean
                assert z.shape == (2, 4, 64 // f, 64 // f)
                dec = ae.decode(z).sample
            assert dec.shape == x.shape
    # f=4 KL is the bundled VAE's architecture
    cfg = json.loads((BUNDLED["shapes"] / "vae" / "config.json").read_text())
    assert tuple(cfg["block_out_channels"]) == stage1.autoencoder_config("kl", 4)["block_out_channels"]
    with pytest.raises(ValueError, match="factor"):
        stage1.autoencoder_config("kl", 16)
    with pytest.raises(ValueError, match="kind"):
        stage1.autoencoder_config("vqgan", 4)


def test_quantize_is_diffusers_lookup_with_vq_vae_losses():
    torch.manual_seed(0)
    vq = stage1.make_autoencoder("vq", 4)
    h = torch.randn(2, 4, 5, 5, requires_grad=True)
    zq, loss, idx = stage1.quantize(vq, h)
    ref, _, (_, _, ref_idx) = vq.quantize(h.detach())
    assert torch.equal(idx, ref_idx.view(-1))
    assert torch.allclose(zq, ref, atol=1e-6)
    # straight-through: d sum(z_q) / d h is one everywhere; the commitment term pulls h toward its code
    zq.sum().backward(retain_graph=True)
    assert torch.allclose(h.grad, torch.ones_like(h))
    h.grad = None
    emb = vq.quantize.embedding.weight
    emb.grad = None
    loss.backward()
    z = h.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    e = emb.detach()[idx]
    n = z.numel()
    want_h = stage1.VQ_BETA * 2 * (z - e) / n
    assert torch.allclose(h.grad.permute(0, 2, 3, 1).reshape(-1, 4), want_h, atol=1e-7)
    want_emb = torch.zeros_like(emb).index_add_(0, idx, 2 * (e - z) / n)
    assert torch.allclose(emb.grad, want_emb, atol=1e-7)


def test_adaptive_weight_balances_gradient_norms():
    w = torch.randn(3, 3, requires_grad=True)
    rec = (w * 2).pow(2).sum()
    gan = (w * 0.5).sum()
    lam = stage1.adaptive_weight(rec, gan, w)
    want = (8 * w.detach()).norm() / (torch.full_like(w, 0.5).norm() + 1e-4) * stage1.DISC_WEIGHT
    assert torch.allclose(lam, want)


def test_patch_discriminator_judges_34_pixel_patches():
    torch.manual_seed(0)
    d = stage1.PatchDiscriminator().eval()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    out = d(x)
    assert out.shape == (1, 1, 14, 14)
    out[0, 0, 7, 7].backward()
    ys, xs = np.nonzero(x.grad[0].abs().sum(0).numpy())
    assert ys.max() - ys.min() + 1 <= 34 and xs.max() - xs.min() + 1 <= 34
    assert ys.max() - ys.min() + 1 >= 30  # and it sees most of that window


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.from_numpy(world.generate(4, seed=0)["image"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert float(stage1.ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    vals = [float(stage1.ssim(x, (x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1))) for s in (0.05, 0.2, 0.5)]
    assert vals[0] > vals[1] > vals[2]


def test_crops_stay_on_the_latent_grid():
    x = torch.arange(2 * 3 * 64 * 64, dtype=torch.float32).view(2, 3, 64, 64)
    c = stage1._crops(x, torch.Generator().manual_seed(0))
    assert c.shape == (2, 3, stage1.CROP, stage1.CROP)
    for i in range(2):
        flat = int(c[i, 0, 0, 0]) - i * 3 * 64 * 64
        assert (flat // 64) % 8 == 0 and (flat % 64) % 8 == 0


def test_dead_codes_restart_at_encoder_outputs():
    vq = stage1.make_autoencoder("vq", 4)
    h = torch.randn(2, 4, 16, 16)
    which = torch.zeros(stage1.CODEBOOK_SIZE, dtype=torch.bool)
    which[:10] = True
    before = vq.quantize.embedding.weight.detach().clone()
    stage1._reset_codes(vq, h, which, torch.Generator().manual_seed(0))
    after = vq.quantize.embedding.weight.detach()
    assert torch.equal(after[10:], before[10:])
    z = h.permute(0, 2, 3, 1).reshape(-1, 4)
    assert float(torch.cdist(after[:10], z).min(1).values.max()) < 0.1


@pytest.mark.slow
def test_every_stage1_stage_trains_and_the_gan_and_whole_scene_paths_run(tmp_path, monkeypatch):
    monkeypatch.setattr(stage1, "DISC_START", 0.0)  # the discriminator from the first step
    monkeypatch.setattr(stage1, "CROP_UNTIL", 0.0)  # whole scenes (the crops run in the sweep's smoke below)
    monkeypatch.setattr(stage1, "RESTART_EVERY", 2)
    rows = train.train("vq", tmp_path / "work", preset="smoke", base=BUNDLED["shapes"], progress=False)
    log = [json.loads(line) for line in (tmp_path / "work" / "logs" / "vqvae.jsonl").read_text().splitlines()]
    assert all("d_loss" in r and r["disc_weight"] > 0 for r in log)
    assert rows[0]["gan"] and rows[0]["steps"] == 3
    monkeypatch.setattr(stage1, "CROP_UNTIL", 1.0)
    rows = train.train(",".join(["vq-nogan", *stage1.SWEEP_STAGES, "diffusion-pixel", "diffusion-latent"]),
                       tmp_path / "work", preset="smoke", base=BUNDLED["shapes"], progress=False)
    assert [r["stage"] for r in rows] == ["vqvae-nogan", *stage1.SWEEP_STAGES, "diffusion-pixel", "diffusion-latent"]
    from diffusers import AutoencoderKL, UNet2DConditionModel, VQModel
    for stage in stage1.SWEEP_STAGES:
        cls = VQModel if "-vq-" in stage else AutoencoderKL
        cls.from_pretrained(tmp_path / "work" / stage)
    assert UNet2DConditionModel.from_pretrained(tmp_path / "work" / "diffusion-pixel").config.in_channels == 3
    with pytest.raises(KeyError, match="unknown stage"):
        train.train("ae-kl-f16", tmp_path / "work", preset="smoke", progress=False)

    # the eval on what was trained: every key, the rows of the sweep, the race's measurements
    from lab.shapes.evaluate_stage1 import run_stage1_eval
    res = run_stage1_eval(n=12, n_samples=2, json_path=tmp_path / "eval.json", work=tmp_path / "work",
                          progress=lambda *a: None)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["vq_psnr_db"] == res["vq_psnr_db"] > 25  # the shipped VQGAN
    assert 0 < saved["vq_codebook_usage"] <= 1
    assert {(r["kind"], r["f"]) for r in saved["rate_distortion"]} == {(k, f) for k in stage1.KINDS for f in stage1.FACTORS}
    assert {r["latent_values"] for r in saved["rate_distortion"]} == {4 * 32 * 32, 4 * 16 * 16, 4 * 8 * 8}
    race = saved["pixel_vs_latent"]
    for key in ("fidelity", "train_step_ms", "sample_seconds", "peak_memory_mb"):
        assert race[f"{key}_pixel"] >= 0 and race[f"{key}_latent"] >= 0, key
    assert race["peak_memory_mb_pixel"] > race["peak_memory_mb_latent"] > 0
    assert set(saved["discriminator"]) >= {"with", "without"}
    arrays = np.load(tmp_path / "eval.npz")
    assert arrays["scenes"].shape[1:] == (64, 64, 3) and arrays["sample/pixel"].shape == (2, 64, 64, 3)
    empty = run_stage1_eval(n=4, n_samples=2, work=tmp_path / "nothing", progress=lambda *a: None)
    assert empty["rate_distortion_missing"] == list(stage1.SWEEP_STAGES)
    assert empty["pixel_vs_latent"] == {"missing": ["diffusion-pixel", "diffusion-latent"]}


def test_shipped_vq_autoencoder_is_plain_diffusers():
    from diffusers import VQModel
    vq = VQModel.from_pretrained(BUNDLED["shapes"], subfolder=stage1.VQ_DIR, torch_dtype=torch.float32).eval()
    d = world.generate(32, seed=1, split="heldout")
    rec = stage1.reconstruct(vq, d["image"])
    assert stage1.psnr(rec, d["image"]).mean() >= 30
    x = torch.from_numpy(d["image"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        ref = stage1._decode_u8(vq(x).sample)  # diffusers' own encode -> quantize -> decode
    assert np.abs(ref.astype(int) - rec.astype(int)).max() <= 1
    record = json.loads((BUNDLED["shapes"] / stage1.VQ_DIR / "lab_training.json").read_text())
    assert record["gan"] and record["kind"] == "vq" and record["seconds"] > 0


def test_sampling_loop_is_diffusers_ddim_with_guidance():
    """stage1.sample with guidance 1 equals diffusers' own DDIM loop on the conditional prediction alone."""
    from diffusers import DDIMScheduler
    torch.manual_seed(0)
    unet = stage1.make_diffusion_unet("latent").eval()
    text = lambda ids: type("O", (), {"last_hidden_state": torch.ones(len(ids), 32, 128) * ids[:, :1].float()})  # noqa: E731
    ids, empty = torch.full((1, 32), 3), torch.zeros((1, 32), dtype=torch.long)

    got = torch.from_numpy(stage1.sample(unet, text, ids, empty, "latent", steps=5, guidance=1.0,
                                         vae=_IdentityDecoder()).astype(np.float32))
    sched = DDIMScheduler(**stage1.LATENT_SCHEDULER, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(5)
    x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    cond = torch.full((1, 32, 128), 3.0)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t, encoder_hidden_states=cond).sample, t, x).prev_sample
    want = ((x[:, :3] / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1) * 255).round()
    assert torch.equal(got, want)


class _IdentityDecoder(torch.nn.Module):
    """A stand-in VAE whose decode keeps the first three latent channels (for comparing sampling loops)."""
    config = type("C", (), {"scaling_factor": 1.0})()

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def decode(self, z):
        return type("D", (), {"sample": z[:, :3]})()


def test_eval_stage1_says_what_a_model_directory_lacks(tmp_path):
    from lab.shapes.evaluate_stage1 import run_stage1_eval
    (tmp_path / "model").mkdir()
    with pytest.raises(FileNotFoundError, match="--stage vq"):
        run_stage1_eval(n=2, model=tmp_path / "model", work=tmp_path / "work", progress=lambda *a: None)
    assert not (tmp_path / "work").exists()  # nothing written
