"""Small random-weight SAM and open_clip models for the masks tests (built from the libraries' own
modules, so every code path of the real models runs)."""

from __future__ import annotations

import torch

TINY_SAM = dict(embed_dim=32, depth=2, heads=2, global_attn=(1,), img_size=256, patch=16, window=4,
                prompt_dim=32, mlp_dim=64, decoder_depth=1, decoder_heads=2)

TINY_CLIP_NAME = "unconfused-tiny-clip"
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_sam(seed: int = 0):
    from unconfused.engine.vision.sam import SamConfig, build_sam

    torch.manual_seed(seed)
    return build_sam(SamConfig(**TINY_SAM))


def tiny_sam_state_dict(seed: int = 0) -> dict:
    return tiny_sam(seed).state_dict()


def register_tiny_clip() -> str:
    import open_clip
    from open_clip import factory

    factory._MODEL_CONFIGS[TINY_CLIP_NAME] = TINY_CLIP_CFG
    return TINY_CLIP_NAME


def tiny_clip_state_dict(seed: int = 0) -> dict:
    import open_clip

    register_tiny_clip()
    torch.manual_seed(seed)
    return open_clip.create_model(TINY_CLIP_NAME, pretrained=None).state_dict()
