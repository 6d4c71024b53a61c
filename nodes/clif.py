"""CLIF text-encoder node: contrastive fine-tuning that separates the concept tokens (paper 4.2)."""

from __future__ import annotations

from ..engine import host, presets
from ..engine.clip_tower import list_towers
from ..engine.concepts import pil_to_tensor
from ..engine.errors import UnconfusedError
from ..trainers import clif as T
from .common import CATEGORY, CLIP_MODEL, CONCEPT_SET, DATASET, MODEL_BUNDLE, save_previews

_D = T.ClifSettings()


def _int(default, lo, hi, tip, step=1):
    return ("INT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tip})


def _float(default, lo, hi, step, tip):
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "round": False, "tooltip": tip})


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
                "name": ("STRING", {"default": _D.name, "tooltip": "Run name: the run folder under "
                                    "output/unconfused/runs and the exported file names. Same name + same settings "
                                    "= resume"}),
                "train": (T.TRAIN_MODES, {"default": _D.train, "tooltip": "tokens: only the new token rows (the "
                          "public CLIF code); tokens+lora: rows + a text-encoder LoRA; tokens+full: rows + every "
                          "text-encoder weight (the paper's wording)"}),
                "steps": _int(_D.steps, 1, 1000000, "Optimizer steps"),
                "batch_size": _int(_D.batch_size, 1, 4096, "Pairs per step and process; the contrastive batch "
                                   "(the negatives) is batch_size x processes"),
                "learning_rate": _float(_D.learning_rate, 0.0, 0.1, 1e-5, "Text-encoder LoRA / weights"),
                "token_lr": _float(_D.token_lr, 0.0, 0.1, 1e-5, "Concept token rows"),
                "seed": _int(_D.seed, 0, 2**31 - 1, "Seeds the order of the pairs"),
                "resume": (T.RESUME, {"default": _D.resume, "tooltip": "auto: continue from the run's last "
                                      "checkpoint when the settings match; restart: start over"}),
            },
            "optional": {
                "clip_model": (CLIP_MODEL, {"tooltip": "A CLIP Scorer Loader's model to use as the image tower "
                                                       "instead of the image_tower file"}),
                "concept_set": (CONCEPT_SET, {"tooltip": "Only needed when the dataset's manifest lacks a "
                                                         "token's class word"}),
                "rank": _int(_D.rank, 1, 256, "Text-encoder LoRA rank"),
                "alpha": _float(_D.alpha, 0.1, 512, 0.1, "LoRA alpha (scale = alpha / rank)"),
                "vectors_per_token": _int(_D.vectors_per_token, 1, 16, "Embedding vectors per concept token, "
                                          "each initialised from the class word"),
                "kinds": ("STRING", {"default": _D.kinds, "tooltip": "Which pairs to train on (comma separated: "
                                     "global, region, mix, photo)"}),
                "holdout": _float(_D.holdout, 0.0, 0.5, 0.01, "Share of pairs held out for the retrieval "
                                  "metric"),
                "gradient_accumulation": _int(_D.gradient_accumulation, 1, 64, "Batches per optimizer step (each "
                                              "batch is its own contrastive batch)"),
                "lr_scheduler": (T.LR_SCHEDULERS, {"default": _D.lr_scheduler}),
                "warmup_steps": _int(_D.warmup_steps, 0, 100000, "Learning-rate warm-up steps"),
                "optimizer": (T.OPTIMIZERS, {"default": _D.optimizer, "tooltip": "adamw8bit needs bitsandbytes "
                              "and a CUDA GPU"}),
                "precision": (T.PRECISIONS, {"default": _D.precision, "tooltip": "Frozen weights: auto = bf16/fp16 "
                              "on a GPU, fp32 on the CPU; trained weights stay fp32; fp16 adds a gradient scaler"}),
                "checkpoint_every": _int(_D.checkpoint_every, 0, 1000000, "Save a resumable checkpoint every N "
                                         "steps (0 = only on Cancel or at the end)"),
                "eval_every": _int(_D.eval_every, 0, 1000000, "Held-out metrics every N steps (0 = before and "
                                   "after only)"),
                "cache_features": ("BOOLEAN", {"default": _D.cache_features, "tooltip": "Encode every image once "
                                               "and train on the cached features (on disk, by content)"}),
                "export": ("BOOLEAN", {"default": _D.export, "tooltip": "Write embeddings, the text encoder and "
                                       "the text-encoder LoRA into the model folders"}),
                "device": (host.DEVICE_CHOICES, {"default": _D.device}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }
        # last, so saved workflows keep their widgets in order
        spec["optional"]["preset"] = (
            presets.choices("clif"), {"default": presets.CUSTOM, "tooltip": presets.PRESET_TOOLTIP +
                ". paper = CLIF stage 1 at the paper's scale"})
        return spec

    RETURN_TYPES = (MODEL_BUNDLE, "IMAGE", "STRING")
    RETURN_NAMES = ("model", "loss_curve", "info")
    FUNCTION = "train"
    CATEGORY = f"{CATEGORY}/train"
    OUTPUT_NODE = True

    def train(self, model, dataset, image_tower: str = "", clip_model=None, concept_set=None, unique_id=None, **kw):
        with host.running_node(unique_id):
            if model is None or not hasattr(model, "text_encoder"):
                raise UnconfusedError("connect a model (Load Checkpoint (Unconfused))", node=self.NODE_ID,
                                      input="model")
            settings = presets.from_widgets(T.ClifSettings, kw.pop("preset", presets.CUSTOM), kw,
                                            node=self.NODE_ID)
            from ..trainers.memory_plan import check_fits

            check_fits("clif", model, settings, node=self.NODE_ID)  # on a CUDA GPU: refuse what would not fit
            tower = T.resolve_tower(image_tower, clip_model, node=self.NODE_ID)
            class_words = {c.token: c.class_word for c in concept_set.concepts} if concept_set is not None else {}
            result = T.train_clif(model, dataset, tower, settings, class_words=class_words)
            curve = pil_to_tensor(result.loss_curve)[None]
            ui = {"images": save_previews([curve[0]], "unconfused_clif"), "text": [result.info()]}
            return {"ui": ui, "result": (result.bundle, curve, result.info())}


NODE_CLASS_MAPPINGS = {UnconfusedTrainCLIF.NODE_ID: UnconfusedTrainCLIF}
NODE_DISPLAY_NAME_MAPPINGS = {UnconfusedTrainCLIF.NODE_ID: "Train CLIF Text Encoder (Unconfused)"}
