"""Files that stock ComfyUI loads, written by every trainer through this one module.

- LoRA in kohya form (`lora_unet_...`, `lora_te_...`, `.lora_down/.lora_up/.alpha`) for
  LoraLoader, converted with diffusers' `convert_state_dict_to_kohya`; the text-encoder prefix
  is the family's (`lora_te_` for SD1/SD2, `lora_te1_`/`lora_te2_` for SDXL's two encoders).
- Token embeddings with the family's keys (`clip_l` for SD1, `clip_h` for SD2, `clip_l` +
  `clip_g` for SDXL) for `embedding:<name>` in prompts.
- The text encoder with Hugging Face `text_model.*` keys for CLIPLoader.
Training metadata goes into the safetensors header: base model hash, tokens, rank, steps -
never paths or secrets.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UnconfusedError
from .families import Family, family_named
from ..files import atomic_save_safetensors, safe_name
from .loading import hf_text_keys

_FORBIDDEN_META = ("path", "dir", "key", "secret", "token_env", "url")


def clean_metadata(meta: dict) -> dict[str, str]:
    """Header values as strings; refuses keys that could carry paths or secrets."""
    out = {}
    for k, v in meta.items():
        if any(bad in k.lower() for bad in _FORBIDDEN_META) and k not in ("ss_tokens",):
            raise ValueError(f"metadata key {k!r} could leak a path or secret")
        out[k] = v if isinstance(v, str) else json.dumps(v)
    return out


def peft_state(module: torch.nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(module, adapter_name=adapter)


def _text_encoders(text_encoder, family: Family) -> dict[str, torch.nn.Module]:
    """{kohya prefix: module}: a single module is the family's (first) text encoder."""
    if text_encoder is None:
        return {}
    if isinstance(text_encoder, dict):  # bundle attribute -> module (SDXL: text_encoder, text_encoder_2)
        return {family.lora_prefix(attr): m for attr, m in text_encoder.items() if m is not None}
    return {family.lora_prefix(): text_encoder}


def kohya_lora_state(unet: torch.nn.Module | None, text_encoder=None, alpha: float | None = None, *,
                     family: str = "sd1") -> dict[str, torch.Tensor]:
    """The attached peft LoRA(s) in kohya naming, with `alpha` set to the adapters' lora_alpha.
    `text_encoder`: one module, or {bundle attribute: module} for families with several."""
    from diffusers.utils import convert_state_dict_to_kohya

    fam = family_named(family)
    out: dict[str, torch.Tensor] = {}
    if unet is not None and getattr(unet, "peft_config", None):
        out.update(convert_state_dict_to_kohya({"unet." + k: v for k, v in peft_state(unet).items()}))
    for prefix, te in _text_encoders(text_encoder, fam).items():
        if getattr(te, "peft_config", None):
            state = {"text_encoder." + k: v for k, v in hf_text_keys(peft_state(te)).items()}
            # diffusers names the first text encoder `lora_te1_`; the family says what stock loaders read
            out.update({k.replace("lora_te1_", prefix, 1): v for k, v in convert_state_dict_to_kohya(state).items()})
    out = {k: v.detach().float().contiguous() for k, v in out.items()}
    if alpha is not None:
        for k in out:
            if k.endswith(".alpha"):
                out[k] = torch.tensor(float(alpha))
    return out


def save_lora(path: str | Path, unet, text_encoder=None, *, alpha: float, metadata: dict,
              family: str = "sd1") -> Path:
    state = kohya_lora_state(unet, text_encoder, alpha, family=family)
    if not state:
        raise UnconfusedError("there is no LoRA to save (nothing was trained)", input="lora")
    return atomic_save_safetensors(path, state, clean_metadata(metadata))


def save_embedding(path: str | Path, rows: torch.Tensor | dict[str, torch.Tensor], family: str, *,
                   metadata: dict) -> Path:
    """An embedding file stock ComfyUI reads for `embedding:<file name>`: `rows` [n, D] of the
    family's (first) text encoder, or {key: rows} as `Family.embedding_state` gives."""
    state = rows if isinstance(rows, dict) else {family_named(family).embedding_key(): rows}
    return atomic_save_safetensors(path, {k: v.detach().float().cpu() for k, v in state.items()},
                                   clean_metadata(metadata))


def save_text_encoder(path: str | Path, text_encoder, *, metadata: dict) -> Path:
    """The text encoder with Hugging Face keys (`text_model.*`), for CLIPLoader."""
    from .concept_tokens import ConceptEmbedding

    state = {}
    for k, v in text_encoder.state_dict().items():
        if k.endswith("token_embedding.new_rows"):
            continue
        if k.endswith("token_embedding.base.weight"):  # concept rows appended, as one table
            emb = text_encoder.get_input_embeddings()
            v = emb.weight if isinstance(emb, ConceptEmbedding) else v
            k = k.replace("token_embedding.base.weight", "token_embedding.weight")
        state[k] = v
    state = hf_text_keys(state)
    return atomic_save_safetensors(path, state, clean_metadata(metadata))


def export_name(name: str) -> str:
    return safe_name(name, input="name")
