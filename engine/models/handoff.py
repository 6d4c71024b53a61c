"""The native hand-off with ComfyUI's own models: what it takes to turn a graph's MODEL/CLIP/VAE
into a trainable bundle, and a trained bundle's concepts back into ComfyUI patches and prompt
embeddings. Pure logic on tensors, names and strings; ComfyUI itself is reached only through
`host` (the nodes in nodes/handoff.py join the two).

- Family and prediction type: read from the names ComfyUI gives its model config class and its
  model-sampling classes (`SD15`, `SD20`, `SDXL`, `EPS`, `V_PREDICTION`, ...), the same in 2024 and
  today. The exact class name counts: SDXL's distillations (SSD-1B, Vega, KOALA) subclass `SDXL`.
- Weights: ComfyUI's checkpoint saver gives them in LDM keys; `shared_tensors` makes them usable
  for training without a second copy (ComfyUI creates them as inference tensors).
- Concepts back: the shared LoRA in kohya naming (engine/models/exports.py), the text encoder's changed
  weights as differences, and each concept token's vectors for an in-memory `embedding:` name the
  prompt rewrite points at (`<alice>` -> `embedding:unconfused.alice`), per text encoder under the
  embedding-file key ComfyUI's tokenizers read (`clip_l`; SDXL: `clip_l` and `clip_g`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import UnconfusedError
from .exports import kohya_lora_state
from .families import FAMILIES as ALL_FAMILIES, family_named
from .loading import hf_text_keys

# ComfyUI's model config class -> our family (only these are built)
FAMILIES = {f.comfy_class: f.name for f in ALL_FAMILIES.values()}  # ComfyUI's config class -> our family
# names for families refused, so the sentence says what the user connected
OTHER_FAMILIES = {
    "SDXLRefiner": "SDXL refiner", "SSD1B": "SSD-1B (an SDXL distillation)",
    "Segmind_Vega": "Segmind Vega (an SDXL distillation)", "KOALA_700M": "KOALA (an SDXL distillation)",
    "KOALA_1B": "KOALA (an SDXL distillation)", "SDXL_instructpix2pix": "SDXL InstructPix2Pix",
    "SD15_instructpix2pix": "SD 1.5 InstructPix2Pix", "SD21UnclipL": "SD 2.1 unCLIP",
    "SD21UnclipH": "SD 2.1 unCLIP", "SD_X4Upscaler": "SD x4 upscaler", "Stable_Zero123": "Stable Zero123",
    "SVD_img2vid": "Stable Video Diffusion (a video model)", "SV3D_u": "SV3D (a video model)",
    "SV3D_p": "SV3D (a video model)", "StableCascade_C": "Stable Cascade", "StableCascade_B": "Stable Cascade",
    "SD3": "SD3", "Flux": "Flux", "FluxSchnell": "Flux", "FluxInpaint": "Flux", "Flux2": "Flux 2",
    "AuraFlow": "AuraFlow", "HunyuanDiT": "Hunyuan-DiT", "HunyuanDiT1": "Hunyuan-DiT", "PixArtAlpha": "PixArt",
    "PixArtSigma": "PixArt", "Lumina2": "Lumina 2", "HiDream": "HiDream", "Chroma": "Chroma",
    "QwenImage": "Qwen-Image", "StableAudio": "Stable Audio (an audio model)",
    "GenmoMochi": "Mochi (a video model)", "LTXV": "LTX-Video (a video model)",
    "HunyuanVideo": "HunyuanVideo (a video model)", "HunyuanVideoI2V": "HunyuanVideo (a video model)",
    "CosmosT2V": "Cosmos (a video model)", "CosmosI2V": "Cosmos (a video model)",
    "WAN21_T2V": "Wan (a video model)", "WAN21_I2V": "Wan (a video model)", "WAN22_T2V": "Wan (a video model)",
}
# ComfyUI model-sampling classes we can train with, most specific first (V_PREDICTION subclasses EPS)
_REFUSED_SAMPLING = ("EDM", "V_PREDICTION_EDM", "V_PREDICTION_CONTINUOUS", "CONST", "X0", "IMG_TO_IMG",
                     "COSMOS_RFLOW", "ModelSamplingFlux", "ModelSamplingDiscreteFlow")
UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"  # the UNet's first conv: dtype and fingerprint
TEXT_ANCHOR = "text_model.final_layer_norm.weight"
EMBEDDING_PREFIX = "unconfused."


def family_of(config_class: str, *, input: str = "model") -> str:
    """Our family for ComfyUI's model config class name, or a sentence naming the family refused."""
    if config_class in FAMILIES:
        return FAMILIES[config_class]
    what = OTHER_FAMILIES.get(config_class, f"'{config_class}'")
    raise UnconfusedError(f"the connected MODEL is a {what} model; Unconfused trains SD 1.x, SD 2.x and "
                          "SDXL base models - load one with a checkpoint loader and connect its MODEL, CLIP and VAE", input=input)


def prediction_of(sampling_classes: list[str], *, input: str = "model") -> str:
    """epsilon or v_prediction from the class names of the MODEL's model sampling (its MRO), so a
    ModelSamplingDiscrete node upstream counts as it does for ComfyUI's samplers."""
    refused = [c for c in sampling_classes if c in _REFUSED_SAMPLING]
    if refused:
        raise UnconfusedError(f"the MODEL samples as {refused[0]}, which the trainers (epsilon / v-prediction) do not support; "
                              "remove the ModelSampling node before this one or choose eps / v_prediction", input=input)
    if "V_PREDICTION" in sampling_classes:
        return "v_prediction"
    if "EPS" in sampling_classes:
        return "epsilon"
    raise UnconfusedError(f"cannot tell the MODEL's prediction type from {sampling_classes[:3]}",
                          input=input)


def shared_tensor(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor usable in autograd with the same values. ComfyUI makes its weights under
    inference mode, and autograd refuses to save inference tensors for backward; copying them
    would double the memory. A normal tensor over the same storage avoids both: the bundle never
    writes its frozen weights (moves and casts make new tensors), so sharing is safe.
    A tensor on a GPU is copied to the CPU, where the bundle keeps its weights between stages."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("shared_tensor must run outside inference mode (host.training_mode())")
    if t.device.type != "cpu":
        return t.to("cpu")  # (a normal tensor: made outside inference mode)
    if not t.is_inference():
        return t
    out = torch.empty(0, dtype=t.dtype)
    out.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return out


def shared_state_dict(sd: dict) -> dict[str, torch.Tensor]:
    return {k: shared_tensor(v) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() \
        and a.storage_offset() == b.storage_offset()


# ---------------------------------------------------------------- concepts back into ComfyUI
def embedding_name(token: str) -> str:
    """The in-memory embedding name a concept token is spelled as for ComfyUI's tokenizer: no
    brackets or spaces (today's ComfyUI cuts an embedding name at '<' or '[')."""
    return EMBEDDING_PREFIX + re.sub(r"[^0-9A-Za-z_.-]+", "_", token.strip("<>")).strip("_")


def concept_embeddings(bundle) -> dict[str, dict[str, torch.Tensor]]:
    """embedding name -> {embedding-file key: the token's vectors [n, D]} (float32, CPU), for every
    added token: one key per text encoder (`clip_l`; SDXL `clip_l` + `clip_g`), as in exported files."""
    spec = family_named(bundle.family)
    return {embedding_name(t): {k: v.float().cpu() for k, v in spec.embedding_state(bundle, t).items()}
            for t in bundle.added_tokens}


def prompt_rewriter(tokens: list[str]):
    """A function that spells each concept token in a prompt as its `embedding:` name, padded with
    spaces so ComfyUI's tokenizer reads it as a word of its own (as our tokenizer reads an added
    token anywhere in the text). Longer tokens first, so `<a-b>` wins over `<a>`."""
    names = {t: embedding_name(t) for t in tokens}
    if not names:
        return lambda text: text
    pattern = re.compile("|".join(re.escape(t) for t in sorted(names, key=len, reverse=True)))
    return lambda text: pattern.sub(lambda m: f" embedding:{names[m.group(0)]} ", text)


def _alpha(module) -> float | None:
    cfg = getattr(module, "peft_config", None) or {}
    return float(cfg["default"].lora_alpha) if "default" in cfg else None


def lora_patch_state(bundle) -> dict[str, torch.Tensor]:
    """The bundle's shared LoRA (UNet, and each text encoder's if it has one) in kohya naming -
    the file format LoraLoader reads (SDXL: `lora_te1_` / `lora_te2_`) - each part with its own
    adapter's alpha."""
    state = {}
    if _alpha(bundle.unet) is not None:
        state.update(kohya_lora_state(bundle.unet, None, _alpha(bundle.unet), family=bundle.family))
    for attr, te in family_named(bundle.family).encoders(bundle).items():
        if te is not None and _alpha(te) is not None:
            state.update(kohya_lora_state(None, {attr: te}, _alpha(te), family=bundle.family))
    return state


def lora_modules(state: dict) -> set[str]:
    """The kohya module names of a LoRA state (`lora_unet_..._to_q`)."""
    return {k.split(".", 1)[0] for k in state}


def text_encoder_deltas(te_state: dict[str, torch.Tensor], comfy_clip_state: dict[str, torch.Tensor],
                        key: str | None = None) -> dict[str, torch.Tensor]:
    """ComfyUI CLIP key -> (our weight - ComfyUI's), for the text-encoder weights a trainer changed
    (CLIF's merged LoRA or full training). Weights that are the same tensor, or equal, give none;
    LoRA layers (sent as LoRA patches) and the token table (concept rows go as embeddings) are left out.
    `key`: which of ComfyUI's text encoders it is when the CLIP has several (SDXL: `clip_l`, `clip_g`)."""
    anchors = [k for k in comfy_clip_state if k.endswith(TEXT_ANCHOR)]
    if len(anchors) > 1:
        anchors = [k for k in anchors if key is not None and k.startswith(key + ".")]
    anchor = anchors[0] if len(anchors) == 1 else None
    if anchor is None:
        return {}
    prefix = anchor[:-len(TEXT_ANCHOR)]
    out = {}
    for k, ours in hf_text_keys(te_state).items():
        if "lora_" in k or "token_embedding" in k:
            continue
        theirs = comfy_clip_state.get(prefix + k.replace(".base_layer.", "."))
        if theirs is None or theirs.shape != ours.shape or same_storage(ours, theirs):
            continue
        if torch.equal(ours.detach().to(theirs.device, theirs.dtype), theirs):
            continue  # equal in the dtype ComfyUI holds it in (e.g. our fp32 copy of its fp16 CLIP)
        delta = ours.detach().float().cpu() - theirs.detach().float().cpu()
        if bool(delta.abs().max() > 0):
            out[prefix + k.replace(".base_layer.", ".")] = delta
    return out


def bundle_text_deltas(bundle, comfy_clip_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`text_encoder_deltas` for each of the bundle's text encoders (SDXL: CLIP-L as ComfyUI's
    `clip_l`, bigG as `clip_g`)."""
    spec = family_named(bundle.family)
    out = {}
    for attr, te in spec.encoders(bundle).items():
        if te is not None:
            out.update(text_encoder_deltas(te.state_dict(), comfy_clip_state, spec.embedding_key(attr)))
    return out


@dataclass
class Handback:
    """What the Apply node gives ComfyUI: LoRA patches (kohya), text-encoder deltas, embeddings."""

    lora: dict[str, torch.Tensor]
    embeddings: dict[str, torch.Tensor]
    rewrite: object  # str -> str

    @property
    def empty(self) -> bool:
        return not self.lora and not self.embeddings


def handback(bundle) -> Handback:
    if not hasattr(bundle, "added_tokens"):
        raise UnconfusedError("connect a model from a trainer of this pack", input="concepts")
    out = Handback(lora_patch_state(bundle), concept_embeddings(bundle), prompt_rewriter(list(bundle.added_tokens)))
    return out


def unet_matches(bundle, comfy_conv_in: torch.Tensor | None) -> bool:
    """Whether the bundle's UNet starts with the MODEL's first conv weights (a cheap sign that the
    concepts were trained on this base model)."""
    if comfy_conv_in is None:
        return True
    ours = bundle.unet.conv_in.weight
    if ours.shape != comfy_conv_in.shape:
        return False
    return bool(torch.allclose(ours.detach().float().cpu(), comfy_conv_in.detach().float().cpu(), atol=1e-3))
