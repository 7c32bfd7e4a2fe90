"""Real Stable Diffusion architectures with random weights, built from their published configs.

No checkpoint is needed to exercise every code path real models take: these functions build the
diffusers/transformers modules of SD 1.5, SD 2.1, SDXL and ControlNet-for-SD-1.5 from their configs
(the ``config.json`` files of the public checkpoints, reproduced below), optionally shrunk for CPU
tests: ``width`` divides every channel count (heads keep their count where possible) and
``max_depth`` caps transformer depth, while block types, resolutions, attention layout,
conditioning (cross-attention dims, SDXL's pooled text and time ids), VAE factor and schedulers stay
as in the real models.
"""
from __future__ import annotations

import copy

import torch

SD15 = dict(
    unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
              block_out_channels=(320, 640, 1280, 1280),
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
              cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
             block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
             up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    scheduler=dict(cls="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                   prediction_type="epsilon", clip_sample=False),
)

SD21 = dict(
    unet=dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
              block_out_channels=(320, 640, 1280, 1280),
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
              cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
              norm_num_groups=32),
    vae=dict(SD15["vae"], sample_size=768),
    text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=512),
    scheduler=dict(cls="DDIMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   num_train_timesteps=1000, set_alpha_to_one=False, steps_offset=1, clip_sample=False,
                   prediction_type="v_prediction"),
)

SDXL = dict(
    unet=dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
              block_out_channels=(320, 640, 1280),
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
              cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
              addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32),
    vae=dict(SD15["vae"], sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                max_position_embeddings=77, hidden_act="gelu", projection_dim=1280),
    scheduler=dict(cls="EulerDiscreteScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon"),
)

ARCHITECTURES = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL}


def _narrow(channels, width: int) -> tuple[int, ...]:
    return tuple(max(8, round(c / width / 8) * 8) for c in channels)


def _groups(channels) -> int:
    """The largest GroupNorm group count <= 32 (the published value) that divides every width."""
    return next(g for g in range(32, 0, -1) if all(c % g == 0 for c in channels))


def _shrink_unet(cfg: dict, width: int, max_depth: int | None) -> dict:
    cfg = copy.deepcopy(cfg)
    heads = cfg.get("attention_head_dim")
    cfg["block_out_channels"] = _narrow(cfg["block_out_channels"], width)
    cfg["norm_num_groups"] = _groups(cfg["block_out_channels"])
    if isinstance(heads, (tuple, list)):  # SD 2.x/SDXL: head counts grow with width; keep 5/10/20 where they divide
        cfg["attention_head_dim"] = tuple(h if (c % h == 0) else 1 for h, c in zip(heads, cfg["block_out_channels"]))
    if "transformer_layers_per_block" in cfg and max_depth:
        cfg["transformer_layers_per_block"] = tuple(min(d, max_depth) for d in cfg["transformer_layers_per_block"])
    if cfg.get("addition_embed_type") == "text_time":
        cfg["addition_time_embed_dim"] = cfg["addition_time_embed_dim"] // width
    return cfg


def unet_config(arch: str, width: int = 1, max_depth: int | None = None, cross_attention_dim: int | None = None) -> dict:
    cfg = _shrink_unet(ARCHITECTURES[arch]["unet"], width, max_depth) if width > 1 or max_depth else dict(ARCHITECTURES[arch]["unet"])
    if cross_attention_dim:
        cfg["cross_attention_dim"] = cross_attention_dim
    return cfg


def random_pipeline(arch: str = "sd15", *, width: int = 1, max_depth: int | None = None, layers: int | None = None,
                    tokenizer=None, controlnet: bool = False, seed: int = 0, dtype=torch.float32, device="cpu",
                    init_device=None):
    """A :class:`lab.Pipeline` of architecture ``arch`` (``sd15``, ``sd21``, ``sdxl``) with random weights.

    ``width``: divide channel counts (1 = the real size). ``max_depth``: cap transformer depth.
    ``layers``: cap text-encoder layers. ``tokenizer``: a CLIP tokenizer (default: the shapes model's,
    whose small vocabulary keeps the embedding small). ``controlnet``: add a ``ControlNetModel``
    copied from the UNet (ControlNet for SD 1.5 is exactly that architecture), named ``"controlnet"``.
    ``init_device``: where the weights are drawn (default the CPU; ``"cuda"`` builds full-size SDXL in
    seconds instead of minutes, with other random values than a CPU build of the same seed)."""
    import diffusers
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .loading import bundled_path
    from .pipeline import Pipeline

    spec = ARCHITECTURES[arch]
    tok = tokenizer or CLIPTokenizer.from_pretrained(bundled_path() / "tokenizer")
    torch.manual_seed(seed)

    def text(cfg):
        cfg = dict(cfg)
        if width > 1:  # keep ratios: hidden a multiple of 16 with 16-wide heads, MLP 4x, projection as published
            ratio = cfg["projection_dim"] / cfg["hidden_size"]
            cfg["hidden_size"] = max(32, round(cfg["hidden_size"] / width / 16) * 16)
            cfg["num_attention_heads"] = cfg["hidden_size"] // 16
            cfg["intermediate_size"] = 4 * cfg["hidden_size"]
            cfg["projection_dim"] = int(cfg["hidden_size"] * ratio)
        if layers:
            cfg["num_hidden_layers"] = min(cfg["num_hidden_layers"], layers)
        cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], tok.model_max_length)
        return CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, **cfg)

    te_cfg = text(spec["text"])
    with torch.device(init_device or "cpu"):
        comps = {"tokenizer": tok, "text_encoder": CLIPTextModel(te_cfg).eval()}
        cross = te_cfg.hidden_size
        if "text_2" in spec:
            te2_cfg = text(spec["text_2"])
            comps["tokenizer_2"] = tok
            comps["text_encoder_2"] = CLIPTextModelWithProjection(te2_cfg).eval()
            cross = te_cfg.hidden_size + te2_cfg.hidden_size
        ucfg = unet_config(arch, width, max_depth, cross_attention_dim=cross)
        if arch == "sdxl":
            ucfg["projection_class_embeddings_input_dim"] = (6 * ucfg["addition_time_embed_dim"]
                                                             + te2_cfg.projection_dim)
        comps["unet"] = UNet2DConditionModel(**ucfg).eval()
        vcfg = dict(spec["vae"])
        if width > 1:
            vcfg["block_out_channels"] = _narrow(vcfg["block_out_channels"], width)
            vcfg["norm_num_groups"] = _groups(vcfg["block_out_channels"])
        comps["vae"] = AutoencoderKL(**vcfg).eval()
        nets = {"controlnet": ControlNetModel.from_unet(comps["unet"]).eval()} if controlnet else None
    scfg = dict(spec["scheduler"])
    comps["scheduler"] = getattr(diffusers, scfg.pop("cls")).from_config(scfg)
    pipe = Pipeline(comps, controlnets=nets, name=f"random-{arch}" + (f"/{width}" if width > 1 else ""),
                    device=device, dtype=dtype)
    return pipe


def parameter_counts(pipe) -> dict[str, int]:
    out = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, name, None)
        if m is not None:
            out[name] = sum(p.numel() for p in m.parameters())
    for name, net in pipe.controlnets.items():
        out[f"controlnet[{name}]"] = sum(p.numel() for p in net.parameters())
    return out
