"""Tiny, seeded, real diffusers/transformers components (diffusers' ``get_dummy_components`` idea).

The tokenizer is the CLIP tokenizer the repo ships with the shapes model."""
from __future__ import annotations

from pathlib import Path

import torch

TOKENIZER = Path(__file__).resolve().parents[1] / "lab" / "models" / "shapes" / "tokenizer"
PROMPT = "a large red circle and a small blue square on a gray background"


def tokenizer():
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(TOKENIZER)


def text_encoder(hidden=32, projection=False, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    tok = tokenizer()
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=tok.model_max_length, projection_dim=hidden,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def vae(seed=0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32).eval()


def unet(in_channels=4, seed=0, cross_attention_dim=32):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16,
                                in_channels=in_channels, out_channels=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=cross_attention_dim, attention_head_dim=2,
                                norm_num_groups=8).eval()


def scheduler(prediction_type="epsilon"):
    from diffusers import DDIMScheduler
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def tiny_sd_components(prediction_type="epsilon", in_channels=4) -> dict:
    return dict(vae=vae(), unet=unet(in_channels), text_encoder=text_encoder(), tokenizer=tokenizer(),
                scheduler=scheduler(prediction_type))


def tiny_sdxl_components() -> dict:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    torch.manual_seed(0)
    u = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
                             out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                             use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                             transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                             cross_attention_dim=64, norm_num_groups=8).eval()
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    return dict(vae=vae(), unet=u, text_encoder=text_encoder(32), text_encoder_2=text_encoder(32, projection=True, seed=1),
                tokenizer=tokenizer(), tokenizer_2=tokenizer(), scheduler=sched)


def controlnet(u, seed=1, nonzero=True):
    """A ControlNet copied from ``u``; with ``nonzero`` its zero convolutions get random weights so that
    equivalence tests are not trivially satisfied by zero residuals."""
    from diffusers import ControlNetModel
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(u, conditioning_embedding_out_channels=(8, 16)).eval()
    if nonzero:
        with torch.no_grad():
            for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
                conv.weight.normal_(0, 0.1)
                conv.bias.normal_(0, 0.1)
    return net
