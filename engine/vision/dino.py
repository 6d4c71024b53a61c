"""DINO image features for the DINO image-alignment score (DreamBooth's ViT-S/16 convention).

Read offline with transformers from a model folder the user puts into `models/dino/<name>/`
(config.json + model.safetensors, e.g. the files of facebook/dino-vits16, or a DINOv2 such as
facebook/dinov2-small). The feature is the class token of the last layer (DINOv2: after its
final norm), unit-normalised. Images are resized (shorter side 256/224 of the model's size),
centre-cropped and normalised with ImageNet's statistics, as DINO's evaluation does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import host
from ..errors import UnconfusedError

KIND = "dino"
NODE_LOADER = "UnconfusedDINOLoader"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HINT = "a transformers DINO folder (config.json + model.safetensors, e.g. facebook/dino-vits16) into"


def list_dino_models() -> list[str]:
    return host.list_model_dirs(KIND, "config.json")


class DinoModel:
    def __init__(self, model, name: str, image_size: int, device: str = "auto"):
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.image_size = int(image_size)
        self.device_choice = device
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"DinoModel({self.name})"

    def running(self):
        return host.running_on(self.model, self.device_choice, half=False)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        x = image.detach().float().cpu().permute(2, 0, 1)[None]
        h, w = x.shape[-2:]
        short = round(self.image_size * 256 / 224)
        scale = short / min(h, w)
        x = F.interpolate(x, size=(max(short, round(h * scale)), max(short, round(w * scale))), mode="bicubic",
                          antialias=True, align_corners=False).clamp(0, 1)[0]
        top, left = (x.shape[1] - self.image_size) // 2, (x.shape[2] - self.image_size) // 2
        x = x[:, top:top + self.image_size, left:left + self.image_size]
        return (x - self.mean) / self.std

    def image_features(self, images: Sequence[torch.Tensor], batch: int = 32) -> torch.Tensor:
        if not images:
            return torch.zeros(0, int(self.model.config.hidden_size))
        out = []
        with self.running() as dev:
            for i in range(0, len(images), batch):
                host.check_cancel()
                x = torch.stack([self.preprocess(im) for im in images[i:i + batch]]).to(dev)
                hidden = self.model(pixel_values=x).last_hidden_state[:, 0]
                out.append(F.normalize(hidden.float(), dim=-1).cpu())
        return torch.cat(out)


def load_dino(folder: str | Path, *, device: str = "auto", input: str = "dino_name") -> DinoModel:
    from transformers import AutoConfig, AutoModel

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UnconfusedError(f"{folder} has no config.json: put {HINT} models/{KIND}/", input=input)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise UnconfusedError(f"{folder.name}/config.json could not be read ({type(e).__name__}: {str(e)[:160]})", input=input) from None
    if config.model_type not in ("vit", "dinov2", "dinov3_vit"):
        raise UnconfusedError(f"{folder.name} is a '{config.model_type}' model, not DINO (a ViT / DINOv2); put "
                              f"{HINT} models/{KIND}/", input=input)
    try:
        kwargs = {"add_pooling_layer": False} if config.model_type == "vit" else {}
        model = AutoModel.from_pretrained(folder, local_files_only=True, **kwargs)
    except Exception as e:
        raise UnconfusedError(f"{folder.name} could not be loaded ({type(e).__name__}: {str(e)[:200]}); the weights "
                              "may be missing or damaged", input=input) from None
    host.device(device)
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    return DinoModel(model, folder.name, size, device=device)


def load_dino_by_name(name: str, **kw) -> DinoModel:
    path = host.find_model(KIND, name, input=kw.get("input", "dino_name"),
                           what="DINO model folder (config.json + model.safetensors, e.g. facebook/dino-vits16)")
    return load_dino(path, **kw)
