"""Architecture configs of the model families we load, shipped in code (nothing from a hub).

These are the configs of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1
(-base), written as the dicts diffusers and transformers take.
"""

from __future__ import annotations

SD_UNET_COMMON = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
)

UNET = {
    "sd1": dict(SD_UNET_COMMON, cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False),
    "sd2": dict(SD_UNET_COMMON, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                use_linear_projection=True),
}

VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

TEXT_ENCODER = {
    # OpenAI CLIP ViT-L/14 text tower.
    "sd1": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1),
    # OpenCLIP ViT-H/14 text tower, cut at the penultimate layer as SD 2.x uses it (23 of 24).
    "sd2": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                projection_dim=512, bos_token_id=0, eos_token_id=2, pad_token_id=1),
}

# Tokenizer padding: SD1 pads with <|endoftext|>, SD2 with "!" (id 0), as ComfyUI does.
TOKENIZER_PAD = {"sd1": "<|endoftext|>", "sd2": "!"}

SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    timestep_spacing="leading",
)

FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x"}
