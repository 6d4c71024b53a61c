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

SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    timestep_spacing="leading",
)


# ---------------------------------------------------------------- SDXL
# stabilityai/stable-diffusion-xl-base-1.0: a 3-level UNet (no attention at the top level, 10
# transformer blocks per attention at the bottom), text width 2048 = CLIP-L (768) + OpenCLIP-bigG
# (1280), and added conditioning: the pooled bigG embedding + 6 size/crop numbers.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280], layers_per_block=2, transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32, act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True,
    freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5,
)
SDXL_VAE = dict(VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
# CLIP ViT-L/14 (the SD 1.x tower, read at its penultimate layer) and OpenCLIP ViT-bigG/14 with its
# text projection (penultimate hidden states for the UNet, projected pooled output for the added
# conditioning). eos_token_id is the real one: the pooled output is taken at the first end token,
# not at the highest id (concept tokens have higher ids).
SDXL_TEXT_ENCODER = dict(TEXT_ENCODER["sd1"], eos_token_id=49407)
SDXL_TEXT_ENCODER_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                           projection_dim=1280, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)

# A tiny SDXL-shaped model (the same block layout, text_time added conditioning, two encoders with
# a projection) for fast tests and the SDXL example: narrow and shallow, random weights.
TINY_SDXL_UNET = dict(
    SDXL_UNET, sample_size=16, block_out_channels=[32, 64, 64], transformer_layers_per_block=[1, 1, 2],
    attention_head_dim=[2, 4, 4], cross_attention_dim=96, addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 64, norm_num_groups=32,
)
TINY_SDXL_VAE = dict(VAE, block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4,
                     sample_size=64, scaling_factor=0.13025, force_upcast=True)
TINY_SDXL_TEXT_ENCODER = dict(SDXL_TEXT_ENCODER, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, projection_dim=32)
TINY_SDXL_TEXT_ENCODER_2 = dict(SDXL_TEXT_ENCODER_2, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                num_attention_heads=4, projection_dim=64)

# The SDXL variants the loader knows, by (UNet base channels, text width) as read from a file.
SDXL_VARIANTS = {
    (320, 2048): dict(unet=SDXL_UNET, vae=SDXL_VAE, te=SDXL_TEXT_ENCODER, te2=SDXL_TEXT_ENCODER_2),
    (32, 96): dict(unet=TINY_SDXL_UNET, vae=TINY_SDXL_VAE, te=TINY_SDXL_TEXT_ENCODER, te2=TINY_SDXL_TEXT_ENCODER_2),
}
# SDXL's first tokenizer pads with <|endoftext|>, the second (bigG's) with "!" (id 0), as
# diffusers' tokenizer_2 and ComfyUI's SDXLClipGTokenizer do.
