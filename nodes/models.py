"""Model loading node: a user's SD 1.x / 2.x / SDXL checkpoint -> the Unconfused model bundle."""

from __future__ import annotations

from ..engine import host
from ..engine.errors import UnconfusedError
from ..engine.models.loading import PREDICTION_CHOICES, load_model
from .common import CATEGORY, MODEL_BUNDLE

DIFFUSERS_PREFIX = "diffusers/"
NO_FILE = "(no checkpoint found - put one in models/checkpoints)"


def checkpoint_choices() -> list[str]:
    names = host.list_models("checkpoints")
    names += [DIFFUSERS_PREFIX + d for d in host.list_model_dirs("diffusers", "model_index.json")]
    return names or [NO_FILE]


class UnconfusedLoadCheckpoint:
    """Loads a Stable Diffusion 1.x, 2.x or SDXL (base and its fine-tunes) checkpoint for Unconfused's trainers
    and sampler."""

    NODE_ID = "UnconfusedLoadCheckpoint"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ckpt_name": (checkpoint_choices(), {"tooltip": "A file of models/checkpoints, or a diffusers "
                                                                "folder of models/diffusers"}),
                "prediction": (PREDICTION_CHOICES, {"default": "auto", "tooltip": "auto reads it from the file "
                                                    "(as ComfyUI does); set it for v-prediction SD1 or SDXL "
                                                    "models whose file does not say so"}),
                "precision": (["auto", "fp32", "fp16", "bf16"], {"default": "auto", "tooltip": "dtype of the "
                              "frozen weights: auto = fp16/bf16 on a GPU, fp32 on the CPU"}),
            }
        }

    RETURN_TYPES = (MODEL_BUNDLE, "STRING")
    RETURN_NAMES = ("model", "info")
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/models"
    OUTPUT_NODE = True

    def load(self, ckpt_name: str, prediction: str, precision: str):
        if ckpt_name == NO_FILE:
            ckpt_name = ""
        if ckpt_name.startswith(DIFFUSERS_PREFIX):
            path = host.find_model("diffusers", ckpt_name[len(DIFFUSERS_PREFIX):], input="ckpt_name",
                                   what="diffusers model folder")
        else:
            path = host.find_model("checkpoints", ckpt_name, input="ckpt_name",
                                   what="Stable Diffusion 1.x/2.x/SDXL checkpoint (e.g. sd_xl_base_1.0.safetensors)")
        dtype = host.default_dtype(host.device("auto"), precision)
        with host.training_mode():  # normal tensors, not inference tensors: trainers backprop through them
            bundle = load_model(path, prediction=prediction, dtype=dtype)
        info = bundle.describe()
        return {"ui": {"text": [info]}, "result": (bundle, info)}


NODE_CLASS_MAPPINGS = {UnconfusedLoadCheckpoint.NODE_ID: UnconfusedLoadCheckpoint}
NODE_DISPLAY_NAME_MAPPINGS = {UnconfusedLoadCheckpoint.NODE_ID: "Load Checkpoint (Unconfused)"}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "UnconfusedError"]
