"""Architectures of the shapes model: real diffusers/transformers classes with small configs.

64x64 RGB images -> AutoencoderKL with f=4 -> 16x16x4 latents (so cross-attention maps are 16x16
and 8x8, not 4x4 blobs) -> UNet2DConditionModel with cross-attention at 16x16, 8x8 and in the
middle block -> ControlNetModel copies of its encoder for scribble, segmentation and edges.
The weight budget (fp16, every bundled model, the task table's included) is 64 MB.
"""
from __future__ import annotations

IMAGE_SIZE = 64
LATENT_SIZE = 16
MAX_TOKENS = 32

VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    norm_num_groups=16,
    sample_size=IMAGE_SIZE,
)

TEXT_ENCODER = dict(
    hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS, projection_dim=128, hidden_act="quick_gelu",
)

UNET = dict(
    sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 96, 128),
    layers_per_block=1,
    cross_attention_dim=128,
    attention_head_dim=4,  # diffusers' legacy name: the number of heads (SD 1.x convention)
    norm_num_groups=16,
)

CONTROLNET = dict(conditioning_embedding_out_channels=(16, 32, 64))  # two /2 steps: 64px -> 16 latent

SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)

TRAIN_SCHEDULER = {k: v for k, v in SCHEDULER.items() if k not in ("set_alpha_to_one", "steps_offset")}
