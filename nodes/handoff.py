"""The native hand-off with ComfyUI's own model world: train on the MODEL/CLIP/VAE a graph already
loaded, and give trained concepts back as MODEL/CLIP for any stock sampler (docs/handoff.md)."""

from __future__ import annotations

import torch

from ..engine.models import handoff as H
from ..engine import host
from ..engine.errors import UnconfusedError
from ..engine.models.families import family_named
from ..engine.models.loading import UNET_PREFIX, bundle_from_ldm_state_dict
from .common import CATEGORY, MODEL_BUNDLE

PRECISIONS = ["auto", "fp32", "fp16", "bf16"]


class UnconfusedBundleFromComfy:
    """Builds the trainable model bundle from the MODEL, CLIP and VAE ComfyUI already holds (any
    loader, merge or LoRA upstream), without reading the checkpoint file again."""

    NODE_ID = "UnconfusedBundleFromComfy"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD 1.x, SD 2.x or SDXL MODEL (e.g. Load Checkpoint's); its "
                                               "prediction type (and a ModelSamplingDiscrete patch) is used"}),
                "clip": ("CLIP", {"tooltip": "The CLIP of the same checkpoint"}),
                "vae": ("VAE", {"tooltip": "The VAE of the same checkpoint"}),
            },
            "optional": {
                "precision": (PRECISIONS, {"default": "auto", "tooltip": "dtype of the frozen weights: auto = as "
                              "ComfyUI holds them (shared, no copy); another dtype makes a converted copy"}),
                "name": ("STRING", {"default": "", "tooltip": "A name for the model in infos and exports "
                                    "(empty: the family)"}),
            },
        }

    RETURN_TYPES = (MODEL_BUNDLE, "STRING")
    RETURN_NAMES = ("model", "info")
    FUNCTION = "build"
    CATEGORY = f"{CATEGORY}/models"
    OUTPUT_NODE = True

    def build(self, model, clip, vae, precision: str = "auto", name: str = ""):
        info = host.comfy_model_info(model)
        family = H.family_of(info["family"], input="model")
        prediction = H.prediction_of(info["sampling"], input="model")
        if precision not in PRECISIONS:
            raise UnconfusedError(f"unknown precision {precision!r}; use one of {PRECISIONS}",
                                  input="precision")
        with host.training_mode():  # normal tensors (over ComfyUI's storage): trainers backprop through them
            sd = H.shared_state_dict(host.comfy_checkpoint_state_dict(model, clip, vae))
            held = sd[UNET_PREFIX + "input_blocks.0.0.weight"].dtype
            dtype = held if precision == "auto" else host.default_dtype(torch.device("cpu"), precision)
            label = name.strip() or f"ComfyUI {family_named(family).short_title} model"
            bundle = bundle_from_ldm_state_dict(sd, label, prediction=prediction, dtype=dtype,
                                                source=None)
        bundle.notes = [n for n in bundle.notes if not n.startswith("prediction type set to")]
        bundle.notes.append(f"built from the graph's MODEL/CLIP/VAE ({info['family']}, {prediction})")
        text = bundle.describe()
        return {"ui": {"text": [text]}, "result": (bundle, text)}


class UnconfusedApplyToComfy:
    """Gives a trained bundle's concepts to ComfyUI's MODEL and CLIP: the shared LoRA as model patches
    (as LoraLoader adds a LoRA, with a strength) and the concept tokens in the CLIP, so `<alice>` in an
    ordinary CLIPTextEncode prompt means the trained concept. Nothing is written to disk."""

    NODE_ID = "UnconfusedApplyToComfy"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL the concepts were trained on (e.g. the one given to "
                                               "Bundle from ComfyUI Model)"}),
                "clip": ("CLIP", {"tooltip": "Its CLIP"}),
                "concepts": (MODEL_BUNDLE, {"tooltip": "A trained model from a trainer of this pack (LoRA, CLIF, "
                                                      "mask EM)"}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                             "tooltip": "LoRA strength on the MODEL (as LoraLoader's)"}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                            "tooltip": "Strength of the text-encoder changes (a text-encoder LoRA, "
                                                       "CLIF's trained text encoder); concept tokens are always in"}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "info")
    FUNCTION = "apply"
    CATEGORY = f"{CATEGORY}/models"
    OUTPUT_NODE = True

    def apply(self, model, clip, concepts, strength_model: float, strength_clip: float):
        info = host.comfy_model_info(model)
        family = H.family_of(info["family"], input="model")
        if family != concepts.family:
            raise UnconfusedError(f"the concepts were trained on a {concepts.family.upper()} model but the MODEL is "
                                  f"{family.upper()}; connect the MODEL they were trained on",
                                  input="concepts")
        back = H.handback(concepts)
        deltas = H.bundle_text_deltas(concepts, host.comfy_clip_state_dict(clip))
        if back.empty and not deltas:
            raise UnconfusedError("this model has no trained concepts (no LoRA, no concept tokens); connect the "
                                  "model output of a trainer", input="concepts")
        new_model, new_clip, unknown = host.comfy_apply_concepts(
            model, clip, back.lora, deltas, back.embeddings, back.rewrite, strength_model, strength_clip)
        if unknown:
            raise UnconfusedError(f"ComfyUI has no layer for {len(unknown)} LoRA module(s) (e.g. {unknown[0]}); "
                                  "the MODEL is not the architecture the concepts were trained on",
                                  input="model")
        lines = [f"LoRA: {len(H.lora_modules(back.lora))} modules at strength {strength_model:g}"
                 if back.lora else "LoRA: none",
                 "concept tokens for CLIPTextEncode: " + (", ".join(concepts.added_tokens) or "none")]
        if deltas:
            lines.append(f"text encoder: {len(deltas)} changed weights at strength {strength_clip:g}")
        if not H.unet_matches(concepts, info["conv_in"]):
            lines.append("warning: the MODEL's UNet differs from the one the concepts were trained on; the "
                         "concepts may look different")
        text = "\n".join(lines)
        return {"ui": {"text": [text]}, "result": (new_model, new_clip, text)}


NODE_CLASS_MAPPINGS = {UnconfusedBundleFromComfy.NODE_ID: UnconfusedBundleFromComfy,
                       UnconfusedApplyToComfy.NODE_ID: UnconfusedApplyToComfy}
NODE_DISPLAY_NAME_MAPPINGS = {UnconfusedBundleFromComfy.NODE_ID: "Bundle from ComfyUI Model (Unconfused)",
                              UnconfusedApplyToComfy.NODE_ID: "Apply Concepts to ComfyUI Model (Unconfused)"}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
