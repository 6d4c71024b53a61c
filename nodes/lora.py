"""Training nodes: the LoRA trainer (concept tokens + one shared UNet LoRA)."""

from __future__ import annotations

from ..engine import host, presets
from ..engine.data.concepts import pil_to_tensor
from ..engine.errors import UnconfusedError
from ..engine.settings import node_inputs
from ..trainers import lora as T
from .common import CATEGORY, CONCEPT_SET, DATASET, MODEL_BUNDLE, save_previews




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
                **node_inputs(T.LoraSettings, [
                    'name', 'steps', 'resolution', 'rank', 'alpha', 'unet_lr', 'token_lr', 'masked_loss',
                    'seed', 'resume']),
            },
            "optional": {
                "dataset": (DATASET, {"tooltip": "CLIF's augmented dataset: its Mix pairs (two concepts side "
                                                 "by side) are trained on together with the photos"}),
                **node_inputs(T.LoraSettings, [
                    'validation_prompts', 'validation_every', 'checkpoint_every', 'batch_size',
                    'gradient_accumulation', 'precision', 'gradient_checkpointing', 'optimizer',
                    'lr_scheduler', 'warmup_steps', 'prior_preservation', 'class_images', 'prior_weight',
                    'min_snr_gamma', 'noise_offset', 'mask_normalize', 'captions', 'template',
                    'target_modules', 'dropout', 'vectors_per_token', 'text_encoder_lora', 'text_encoder_lr',
                    'cache_latents', 'flip', 'export', 'device', 'preset', 'aspect']),
            },
            # which node of the graph runs: live messages carry it so the browser finds the node
            "hidden": {"unique_id": "UNIQUE_ID"},
        }
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
        settings = presets.from_widgets(T.LoraSettings, preset, dict(kw, validation_prompts=prompts))
        from ..trainers.memory_plan import check_fits

        check_fits("lora", model, settings)  # on a CUDA GPU: refuse what would run out of memory
        if dataset is not None:  # CLIF stage 2: the concept photos plus the dataset's Mix pairs
            from ..engine.data.training_examples import examples_from_concept_set

            data = examples_from_concept_set(concept_set, settings.captions, settings.template)
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
