"""CLIF text-encoder node: contrastive fine-tuning that separates the concept tokens (paper 4.2)."""

from __future__ import annotations

from ..engine import host, presets
from ..engine.vision.clip_image_tower import list_towers
from ..engine.data.concepts import pil_to_tensor
from ..engine.errors import UnconfusedError
from ..engine.settings import node_inputs
from ..trainers import clif as T
from .common import CATEGORY, CLIP_MODEL, CONCEPT_SET, DATASET, MODEL_BUNDLE, save_previews




class UnconfusedTrainCLIF:
    """Fine-tunes the text encoder contrastively on CLIF's augmented pairs so each concept token carries
    its own visual features, not its neighbours'. The model that comes out flows into Train LoRA + Tokens
    and the sampler; the exports load in stock ComfyUI."""

    NODE_ID = T.NODE

    @classmethod
    def INPUT_TYPES(cls):
        towers = list_towers() or [""]
        spec = {
            "required": {
                "model": (MODEL_BUNDLE, {"tooltip": "From Load Checkpoint (Unconfused)"}),
                "dataset": (DATASET, {"tooltip": "CLIF's augmented pairs (CLIF Augmentation Builder or Load "
                                                 "Augmented Dataset)"}),
                "image_tower": (towers, {"tooltip": "The CLIP the text encoder comes from, as an open_clip "
                                         "checkpoint (image + text towers) in models/clip_vision: OpenAI ViT-L/14 "
                                         "for SD 1.x, OpenCLIP ViT-H/14 for SD 2.x. Frozen. Ignored when clip_model "
                                         "is connected"}),
                **node_inputs(T.ClifSettings, [
                    'name', 'train', 'steps', 'batch_size', 'learning_rate', 'token_lr', 'seed', 'resume']),
            },
            "optional": {
                "clip_model": (CLIP_MODEL, {"tooltip": "A CLIP Scorer Loader's model to use as the image tower "
                                                       "instead of the image_tower file"}),
                "concept_set": (CONCEPT_SET, {"tooltip": "Only needed when the dataset's manifest lacks a "
                                                         "token's class word"}),
                **node_inputs(T.ClifSettings, [
                    'rank', 'alpha', 'vectors_per_token', 'kinds', 'holdout', 'gradient_accumulation',
                    'lr_scheduler', 'warmup_steps', 'optimizer', 'precision', 'checkpoint_every',
                    'eval_every', 'cache_features', 'export', 'device', 'preset']),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }
        return spec

    RETURN_TYPES = (MODEL_BUNDLE, "IMAGE", "STRING")
    RETURN_NAMES = ("model", "loss_curve", "info")
    FUNCTION = "train"
    CATEGORY = f"{CATEGORY}/train"
    OUTPUT_NODE = True

    def train(self, model, dataset, image_tower: str = "", clip_model=None, concept_set=None, unique_id=None, **kw):
        with host.running_node(unique_id):
            if model is None or not hasattr(model, "text_encoder"):
                raise UnconfusedError("connect a model (Load Checkpoint (Unconfused))",
                                      input="model")
            settings = presets.from_widgets(T.ClifSettings, kw.pop("preset", presets.CUSTOM), kw)
            from ..trainers.memory_plan import check_fits

            check_fits("clif", model, settings)  # on a CUDA GPU: refuse what would not fit
            tower = T.resolve_tower(image_tower, clip_model)
            class_words = {c.token: c.class_word for c in concept_set.concepts} if concept_set is not None else {}
            result = T.train_clif(model, dataset, tower, settings, class_words=class_words)
            curve = pil_to_tensor(result.loss_curve)[None]
            ui = {"images": save_previews([curve[0]], "unconfused_clif"), "text": [result.info()]}
            return {"ui": ui, "result": (result.bundle, curve, result.info())}


NODE_CLASS_MAPPINGS = {UnconfusedTrainCLIF.NODE_ID: UnconfusedTrainCLIF}
NODE_DISPLAY_NAME_MAPPINGS = {UnconfusedTrainCLIF.NODE_ID: "Train CLIF Text Encoder (Unconfused)"}
