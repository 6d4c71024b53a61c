"""Mask EM node: concept tokens and their masks learned together from one or a few images."""

from __future__ import annotations

import torch

from ..engine import host, presets
from ..engine.data.concepts import image_batch_to_list, pil_to_tensor
from ..engine.errors import UnconfusedError
from ..engine.settings import node_inputs
from ..trainers import em as E
from .common import CATEGORY, MODEL_BUNDLE, save_previews

CONCEPTS_TIP = ("One line per concept: '<token> class word', e.g.\n<alice> woman\n<rex> dog\n<my-room> living room\n"
                "A concept in only some images: '2: <bob> man' or '1,3: <bob> man' (images counted from 1). "
                "Every token gets its own mask; pixels of no concept are background.")



class UnconfusedTrainMaskEM:
    """Learns concept tokens, one shared UNet LoRA and each concept's mask from images that hold several
    concepts, without hand-drawn masks (EM with cross-attention + DenseCRF; Rahman et al.)."""

    NODE_ID = E.NODE

    @classmethod
    def INPUT_TYPES(cls):
        spec = {
            "required": {
                "model": (MODEL_BUNDLE, {"tooltip": "From Load Checkpoint (Unconfused)"}),
                "images": ("IMAGE", {"tooltip": "One or a few images, each holding several of the concepts (e.g. "
                                                "two people and a room). A batch: images of one size"}),
                "concepts": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "<alice> woman\n<bob> man",
                                        "tooltip": CONCEPTS_TIP}),
                **node_inputs(E.EMSettings, [
                    'name', 'steps', 'tokens_only_steps', 'reestimate_every', 'attention_weight',
                    'init_timesteps', 'reestimate_timesteps', 'threshold_mode', 'threshold', 'crf_at',
                    'resolution', 'rank', 'alpha', 'unet_lr', 'token_lr', 'seed', 'resume']),
            },
            "optional": {
                "ground_truth": ("MASK", {"tooltip": "Only to measure the masks (IoU per round): one mask per "
                                          "concept of each image, image by image in the order of the concept "
                                          "lines. Never used for training"}),
                **node_inputs(E.EMSettings, [
                    'inversion_steps', 'max_concepts_per_step', 'validation_prompts', 'validation_every',
                    'checkpoint_every', 'batch_size', 'precision', 'gradient_checkpointing', 'template',
                    'flip', 'vectors_per_token', 'export', 'device', 'fixed_mask_stage', 'preset', 'aspect']),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }
        return spec

    RETURN_TYPES = (MODEL_BUNDLE, "MASK", "IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("model", "masks", "mask_history", "iou_curve", "info")
    FUNCTION = "train"
    CATEGORY = f"{CATEGORY}/train"
    OUTPUT_NODE = True

    def train(self, model, images, concepts: str, ground_truth=None, validation_prompts: str = "", unique_id=None,
              **kw):
        with host.running_node(unique_id):
            return self._train(model, images, concepts, ground_truth, validation_prompts, **kw)

    def _train(self, model, images, concepts, ground_truth, validation_prompts, **kw):
        with host.training_mode():
            imgs = [host.detach_clone(i) for i in image_batch_to_list(images)]
            gt = None
            if ground_truth is not None:
                if not isinstance(ground_truth, torch.Tensor) or ground_truth.ndim not in (2, 3):
                    raise UnconfusedError("expected a MASK batch [N, H, W]", input="ground_truth")
                gt = list(host.detach_clone(ground_truth.reshape(-1, *ground_truth.shape[-2:])))
        scenes = E.make_scenes(imgs, concepts, gt)
        prompts = [p.strip() for p in (validation_prompts or "").splitlines() if p.strip()]
        preset = kw.pop("preset", presets.CUSTOM)
        settings = presets.from_widgets(E.EMSettings, preset, dict(kw, validation_prompts=prompts))
        from ..trainers.memory_plan import check_fits

        check_fits("em", model, settings)  # on a CUDA GPU: refuse what would not fit
        result = E.train_em(model, scenes, settings)
        masks = result.mask_batch() if len({tuple(m.shape[-2:]) for m in result.masks}) == 1 else \
            torch.cat([torch.nn.functional.interpolate(m[None], size=result.masks[0].shape[-2:], mode="nearest")[0]
                       for m in result.masks])
        history = pil_to_tensor(result.history)[None]
        curve = pil_to_tensor(result.iou_curve if result.iou_curve is not None else result.loss_curve)[None]
        ui = {"images": save_previews([history[0], curve[0]], "unconfused_em"), "text": [result.info()]}
        return {"ui": ui, "result": (result.bundle, masks, history, curve, result.info())}


NODE_CLASS_MAPPINGS = {UnconfusedTrainMaskEM.NODE_ID: UnconfusedTrainMaskEM}
NODE_DISPLAY_NAME_MAPPINGS = {UnconfusedTrainMaskEM.NODE_ID: "Train Mask EM: Tokens + Masks (Unconfused)"}
