"""Training nodes: the LoRA trainer (concept tokens + one shared UNet LoRA)."""

from __future__ import annotations

from ..engine import host, presets
from ..engine.concepts import pil_to_tensor
from ..engine.errors import UnconfusedError
from ..trainers import lora as T
from .common import CATEGORY, CONCEPT_SET, DATASET, MODEL_BUNDLE, save_previews

_D = T.LoraSettings()


def _int(default, lo, hi, tip, step=1):
    return ("INT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tip})


def _float(default, lo, hi, step, tip):
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "round": False, "tooltip": tip})


class UnconfusedTrainLoRA:
    """Trains the concept tokens and one UNet LoRA shared by all concepts (CLIF stage 2, DreamBooth-LoRA
    with SID captions, or the mask-EM method's training), then exports files stock ComfyUI loads."""

    NODE_ID = T.NODE

    @classmethod
    def INPUT_TYPES(cls):
        spec = {
            "required": {
                "model": (MODEL_BUNDLE, {"tooltip": "From Load Checkpoint (Unconfused), or the CLIF text-encoder "
                                                    "trainer"}),
                "concept_set": (CONCEPT_SET, {"tooltip": "The concepts: photos, tokens, class words, optional "
                                                         "masks and captions"}),
                "name": ("STRING", {"default": _D.name, "tooltip": "Run name: the run folder under "
                                    "output/unconfused/runs and the exported file names. Same name + same "
                                    "settings = resume"}),
                "steps": _int(_D.steps, 1, 100000, "Optimizer steps"),
                "resolution": _int(_D.resolution, 64, 2048, "Training size: photos train at about this x this "
                                   "pixels, at their own aspect ratio (see aspect); 512 for SD1, 768 for SD2-v",
                                   step=64),
                "rank": _int(_D.rank, 1, 256, "LoRA rank"),
                "alpha": _float(_D.alpha, 0.1, 512, 0.1, "LoRA alpha (scale = alpha / rank)"),
                "unet_lr": _float(_D.unet_lr, 0.0, 0.1, 1e-5, "Learning rate of the UNet LoRA"),
                "token_lr": _float(_D.token_lr, 0.0, 0.1, 1e-5, "Learning rate of the concept token rows"),
                "masked_loss": ("BOOLEAN", {"default": _D.masked_loss, "tooltip": "Use the concepts' masks: "
                                            "the loss only counts inside them"}),
                "seed": _int(_D.seed, 0, 2**31 - 1, "Seeds data order, noise and timesteps"),
                "resume": (T.RESUME, {"default": _D.resume, "tooltip": "auto: continue from the run's last "
                                      "checkpoint when the settings match; restart: start over"}),
            },
            "optional": {
                "dataset": (DATASET, {"tooltip": "CLIF's augmented dataset: its Mix pairs (two concepts side "
                                                 "by side) are trained on together with the photos"}),
                "validation_prompts": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "", "tooltip": "One prompt per "
                                                  "line, using the tokens, e.g. <alice> hugging <my-dog>"}),
                "validation_every": _int(_D.validation_every, 0, 100000, "Validation images every N steps "
                                         "(0 = only at the end)"),
                "checkpoint_every": _int(_D.checkpoint_every, 0, 100000, "Save a resumable checkpoint every N "
                                         "steps (0 = only on Cancel or at the end)"),
                "batch_size": _int(_D.batch_size, 1, 64, "Images per step"),
                "gradient_accumulation": _int(_D.gradient_accumulation, 1, 64, "Batches per optimizer step"),
                "precision": (T.PRECISIONS, {"default": _D.precision, "tooltip": "Frozen weights: auto = bf16/fp16 "
                              "on a GPU, fp32 on the CPU; trained weights stay fp32; fp16 adds a gradient scaler"}),
                "gradient_checkpointing": ("BOOLEAN", {"default": _D.gradient_checkpointing,
                                                       "tooltip": "Less GPU memory, ~30% slower"}),
                "optimizer": (T.OPTIMIZERS, {"default": _D.optimizer}),
                "lr_scheduler": (T.LR_SCHEDULERS, {"default": _D.lr_scheduler}),
                "warmup_steps": _int(_D.warmup_steps, 0, 100000, "Learning-rate warm-up steps"),
                "prior_preservation": ("BOOLEAN", {"default": _D.prior_preservation, "tooltip": "Also train on "
                                                   "class images made by the base model (cached)"}),
                "class_images": _int(_D.class_images, 1, 1000, "Class images per class word"),
                "prior_weight": _float(_D.prior_weight, 0.0, 10.0, 0.05, "Weight of the prior loss"),
                "min_snr_gamma": _float(_D.min_snr_gamma, 0.0, 20.0, 0.5, "Min-SNR weighting (0 = off, 5 usual)"),
                "noise_offset": _float(_D.noise_offset, 0.0, 1.0, 0.01, "Noise offset (0 = off)"),
                "mask_normalize": (T.L.MASK_NORMALIZE, {"default": _D.mask_normalize, "tooltip": "mask_area: "
                                   "every concept weighs the same; image_area: small concepts weigh less"}),
                "captions": (T.CAPTIONS, {"default": _D.captions, "tooltip": "auto: the concepts' own (e.g. SID) "
                             "captions where present, else the template"}),
                "template": ("STRING", {"default": _D.template}),
                "target_modules": ("STRING", {"default": _D.target_modules, "tooltip": "UNet modules that get "
                                              "LoRA (comma separated)"}),
                "dropout": _float(_D.dropout, 0.0, 0.9, 0.01, "LoRA dropout"),
                "vectors_per_token": _int(_D.vectors_per_token, 1, 16, "Embedding vectors per concept token"),
                "text_encoder_lora": ("BOOLEAN", {"default": _D.text_encoder_lora, "tooltip": "Also a LoRA on the "
                                                  "text encoder (leave off after CLIF)"}),
                "text_encoder_lr": _float(_D.text_encoder_lr, 0.0, 0.1, 1e-6, "Text-encoder LoRA learning rate"),
                "cache_latents": ("BOOLEAN", {"default": _D.cache_latents, "tooltip": "Encode the photos once"}),
                "flip": ("BOOLEAN", {"default": _D.flip, "tooltip": "Random horizontal flips"}),
                "export": ("BOOLEAN", {"default": _D.export, "tooltip": "Write the LoRA to models/loras and the "
                                       "tokens to models/embeddings"}),
                "device": (host.DEVICE_CHOICES, {"default": _D.device}),
            },
            # which node of the graph runs: live messages carry it so the browser finds the node
            "hidden": {"unique_id": "UNIQUE_ID"},
        }
        # last, so saved workflows keep their widgets in order
        spec["optional"]["preset"] = (
            presets.choices("lora"), {"default": presets.CUSTOM, "tooltip": presets.PRESET_TOOLTIP +
                ". paper = CLIF stage 2; paper-sid = the SID paper's DreamBooth"})
        spec["optional"]["aspect"] = (T.ASPECTS, {
            "default": _D.aspect, "tooltip": "buckets: each photo trains at the size of about resolution x "
            "resolution pixels nearest its own shape (e.g. 640x384 for a 3:2 photo at 512), its mask with it; "
            "square: a centre crop of resolution x resolution (as before buckets; square photos: the same)"})
        return spec

    RETURN_TYPES = (MODEL_BUNDLE, "IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("model", "validation", "loss_curve", "info")
    FUNCTION = "train"
    CATEGORY = f"{CATEGORY}/train"
    OUTPUT_NODE = True

    def train(self, model, concept_set, dataset=None, validation_prompts: str = "", unique_id=None, **kw):
        with host.running_node(unique_id):
            return self._train(model, concept_set, dataset, validation_prompts, **kw)

    def _train(self, model, concept_set, dataset, validation_prompts: str, **kw):
        prompts = [p.strip() for p in (validation_prompts or "").splitlines() if p.strip()]
        preset = kw.pop("preset", presets.CUSTOM)
        settings = presets.from_widgets(T.LoraSettings, preset, dict(kw, validation_prompts=prompts),
                                        node=self.NODE_ID)
        from ..trainers.memory_plan import check_fits

        check_fits("lora", model, settings, node=self.NODE_ID)  # on a CUDA GPU: refuse what would run out of memory
        if dataset is not None:  # CLIF stage 2: the concept photos plus the dataset's Mix pairs
            from ..engine.training_data import examples_from_concept_set

            data = examples_from_concept_set(concept_set, settings.captions, settings.template, node=self.NODE_ID)
            data += list(dataset.examples(("mix",)))
        else:
            data = concept_set
        result = T.train_lora(model, data, settings,
                              class_words={c.token: c.class_word for c in concept_set.concepts})
        curve = pil_to_tensor(result.loss_curve)[None]
        validation = result.validation if result.validation is not None else curve
        previews = list(result.validation) if result.validation is not None else []
        ui = {"images": save_previews(previews + [curve[0]], "unconfused_lora"), "text": [result.info()]}
        return {"ui": ui, "result": (result.bundle, validation, curve, result.info())}


NODE_CLASS_MAPPINGS = {UnconfusedTrainLoRA.NODE_ID: UnconfusedTrainLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {UnconfusedTrainLoRA.NODE_ID: "Train LoRA + Tokens (Unconfused)"}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "UnconfusedError"]
