"""What every node module shares: socket type names, preview saving, error pass-through.

Nodes only translate between ComfyUI types and the engine; nothing here computes.
"""

from __future__ import annotations

import uuid

import torch

from ..engine import host
from ..engine.concepts import tensor_to_pil
from ..engine.files import atomic_save_image

# Custom socket types (strings ComfyUI matches between outputs and inputs).
MODEL_BUNDLE = "UNCONFUSED_MODEL"
CONCEPT = "UNCONFUSED_CONCEPT"
CONCEPT_SET = "UNCONFUSED_CONCEPT_SET"
REGIONS = "UNCONFUSED_REGIONS"
DATASET = "UNCONFUSED_DATASET"
SAM_MODEL = "UNCONFUSED_SAM"
CLIP_MODEL = "UNCONFUSED_CLIP"

CATEGORY = "Unconfused"


def save_previews(images, prefix: str = "unconfused") -> list[dict]:
    """Save images (PIL, or IMAGE tensors [H,W,3]/[B,H,W,3]) into ComfyUI's temp folder and
    return the `ui.images` entries that make ComfyUI show them on the node."""
    if isinstance(images, torch.Tensor):
        images = list(images) if images.ndim == 4 else [images]
    out = []
    folder = host.temp_dir()
    for img in images:
        pil = tensor_to_pil(img) if isinstance(img, torch.Tensor) else img
        name = f"{prefix}_{uuid.uuid4().hex[:10]}.png"
        atomic_save_image(folder / name, pil, compress_level=1)
        out.append({"filename": name, "subfolder": "", "type": "temp"})
    return out


def with_preview(result: tuple, images, prefix: str = "unconfused") -> dict:
    """A node return value carrying both outputs and preview images."""
    return {"ui": {"images": save_previews(images, prefix)}, "result": result}
