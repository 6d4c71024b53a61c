"""A small random-weight SD-style model built from configs in code.

Used by the tests, the jobs' and `demo --ckpt`'s defaults where no model is named (the demo's
built-in run uses the trained toy world instead: engine/evaluation/toyworld.py). Same structure as SD 1.x - UNet with cross
attention, KL VAE with 8x downsampling, CLIP text encoder with the real CLIP vocabulary -
only narrower and shallower. Its pictures are noise: it proves the plumbing, not the art.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..files import atomic_write_json
from .loading import ModelBundle, bundle_from_parts, load_diffusers_folder

DEMO_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32, attention_head_dim=4,
    norm_num_groups=8,
)
DEMO_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 16, 16], layers_per_block=1,
    latent_channels=4, norm_num_groups=4, sample_size=64, scaling_factor=0.18215,
)
DEMO_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                 projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def build_demo_model(seed: int = 0, prediction_type: str = "epsilon") -> ModelBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return bundle_from_parts(UNet2DConditionModel(**DEMO_UNET), AutoencoderKL(**DEMO_VAE),
                             CLIPTextModel(CLIPTextConfig(**DEMO_TEXT)), family="sd1",
                             prediction_type=prediction_type, name="unconfused-demo")


def write_demo_diffusers_folder(folder: str | Path, seed: int = 0) -> Path:
    """Save the demo model as a diffusers folder (what models/diffusers/<name> holds)."""
    from diffusers import DDPMScheduler

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    bundle = build_demo_model(seed)
    folder.mkdir(parents=True, exist_ok=True)
    bundle.unet.save_pretrained(folder / "unet")
    bundle.vae.save_pretrained(folder / "vae")
    bundle.text_encoder.save_pretrained(folder / "text_encoder")
    DDPMScheduler(**bundle.scheduler_config).save_pretrained(folder / "scheduler")
    # written last: a folder without it is an interrupted write and is not listed
    atomic_write_json(folder / "model_index.json", {"_class_name": "StableDiffusionPipeline",
                                                     "_unconfused_demo": True})
    return folder


def load_demo_model(folder: str | Path) -> ModelBundle:
    return load_diffusers_folder(write_demo_diffusers_folder(folder))


# A tiny open_clip (image + text towers) whose text width matches the demo text encoder, so the
# CLIF stage and the metrics run on the demo model. Made discriminative the cheap way (no class
# or position bias, a stronger patch filter, CLIP's trained logit scale): a random ViT otherwise
# gives nearly one feature for every picture.
DEMO_CLIP_NAME = "unconfused-demo-clip"
DEMO_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_demo_clip(folder: str | Path, seed: int = 0) -> Path:
    """`<folder>/unconfused-demo-clip.safetensors` + its open_clip config (`.json` beside it,
    which the CLIP loaders read for architectures open_clip does not list)."""
    import math

    import open_clip
    from open_clip import factory

    from ..files import atomic_save_safetensors

    path = Path(folder) / f"{DEMO_CLIP_NAME}.safetensors"
    if path.is_file() and path.with_suffix(".json").is_file():
        return path
    factory._MODEL_CONFIGS[DEMO_CLIP_NAME] = DEMO_CLIP_CFG
    torch.manual_seed(seed)
    model = open_clip.create_model(DEMO_CLIP_NAME, pretrained=None)
    with torch.no_grad():
        v = model.visual
        v.class_embedding.zero_()
        v.positional_embedding.mul_(0.1)
        v.conv1.weight.mul_(4)
        model.logit_scale.fill_(math.log(100))
    atomic_write_json(path.with_suffix(".json"), DEMO_CLIP_CFG)
    atomic_save_safetensors(path, {k: v.contiguous() for k, v in model.state_dict().items()})
    return path
