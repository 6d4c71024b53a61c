"""Mask EM node: concept tokens and their masks learned together from one or a few images."""

from __future__ import annotations

import torch

from ..engine import host, presets
from ..engine.concepts import image_batch_to_list, pil_to_tensor
from ..engine.errors import UnconfusedError
from ..trainers import em as E
from ..trainers import lora as T
from .common import CATEGORY, MODEL_BUNDLE, save_previews

_D = E.EMSettings()
CONCEPTS_TIP = ("One line per concept: '<token> class word', e.g.\n<alice> woman\n<rex> dog\n<my-room> living room\n"
                "A concept in only some images: '2: <bob> man' or '1,3: <bob> man' (images counted from 1). "
                "Every token gets its own mask; pixels of no concept are background.")


def _int(default, lo, hi, tip, step=1):
    return ("INT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tip})


def _float(default, lo, hi, step, tip):
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "round": False, "tooltip": tip})


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
                "name": ("STRING", {"default": _D.name, "tooltip": "Run name: the run folder under "
                                    "output/unconfused/runs and the exported file names. Same name + same "
                                    "settings = resume"}),
                "steps": _int(_D.steps, 1, 100000, "Optimizer steps in all (paper: about 400)"),
                "tokens_only_steps": _int(_D.tokens_only_steps, 0, 100000, "Phase 1: only the token rows train "
                                          "(after any warm-up); then token rows + LoRA"),
                "reestimate_every": _int(_D.reestimate_every, 0, 100000, "Re-estimate the masks from the current "
                                         "tokens every K steps (0 = never: the masks of the first estimate stay)"),
                "attention_weight": _float(_D.attention_weight, 0.0, 10.0, 1e-3, "Weight of the cross-attention "
                                           "loss (each token's map vs its mask; Break-a-Scene 1e-2)"),
                "init_timesteps": _int(_D.init_timesteps, 1, 1000, "Random timesteps the first masks average "
                                       "the attention over (paper: 50)"),
                "reestimate_timesteps": _int(_D.reestimate_timesteps, 1, 1000, "Timesteps of each later "
                                             "re-estimation"),
                "threshold_mode": (E.THRESHOLDS, {"default": _D.threshold_mode, "tooltip": "otsu: a threshold "
                                   "per map from its histogram; fixed: the threshold below"}),
                "threshold": _float(_D.threshold, 0.01, 0.99, 0.01, "Fixed threshold on each map divided by its "
                                    "maximum (0.35-0.55 usual)"),
                "crf_at": (E.CRF_AT, {"default": _D.crf_at, "tooltip": "DenseCRF refinement at image size (sharper "
                           "edges: IoU 0.97 vs 0.91 in benchmarks/crf_quality; ~3 s per image per round on a "
                           "CPU), at latent size (fast), or off"}),
                "resolution": _int(_D.resolution, 64, 2048, "Training size: the images train at about this x "
                                   "this pixels, at their own aspect ratio (see aspect); 512 for SD1, 768 for SD2-v",
                                   step=64),
                "rank": _int(_D.rank, 1, 256, "LoRA rank"),
                "alpha": _float(_D.alpha, 0.1, 512, 0.1, "LoRA alpha (scale = alpha / rank)"),
                "unet_lr": _float(_D.unet_lr, 0.0, 0.1, 1e-5, "Learning rate of the UNet LoRA (phase 2)"),
                "token_lr": _float(_D.token_lr, 0.0, 0.1, 1e-5, "Learning rate of the token rows"),
                "seed": _int(_D.seed, 0, 2**31 - 1, "Seeds sampling, noise, timesteps and the mask estimates"),
                "resume": (T.RESUME, {"default": _D.resume, "tooltip": "auto: continue from the run's last "
                                      "checkpoint when the settings match; restart: start over"}),
            },
            "optional": {
                "ground_truth": ("MASK", {"tooltip": "Only to measure the masks (IoU per round): one mask per "
                                          "concept of each image, image by image in the order of the concept "
                                          "lines. Never used for training"}),
                "inversion_steps": _int(_D.inversion_steps, 0, 100000, "Unmasked textual-inversion warm-up of "
                                        "the tokens before the first masks (0 = start from the class words)"),
                "max_concepts_per_step": _int(_D.max_concepts_per_step, 0, 16, "Union sampling: at most this "
                                              "many concepts per training prompt (0 = up to all)"),
                "validation_prompts": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "", "tooltip": "One prompt per "
                                                  "line, using the tokens"}),
                "validation_every": _int(_D.validation_every, 0, 100000, "Validation images every N steps "
                                         "(0 = only at the end)"),
                "checkpoint_every": _int(_D.checkpoint_every, 0, 100000, "Save a resumable checkpoint every N "
                                         "steps (0 = only on Cancel or at the end)"),
                "batch_size": _int(_D.batch_size, 1, 64, "Images per step"),
                "precision": (T.PRECISIONS, {"default": _D.precision}),
                "gradient_checkpointing": ("BOOLEAN", {"default": _D.gradient_checkpointing}),
                "template": ("STRING", {"default": _D.template, "tooltip": "Training prompt; {token} = the sampled "
                                        "tokens joined by 'and'"}),
                "flip": ("BOOLEAN", {"default": _D.flip, "tooltip": "Random horizontal flips of image and masks "
                                     "together"}),
                "vectors_per_token": _int(_D.vectors_per_token, 1, 16, "Embedding vectors per concept token"),
                "export": ("BOOLEAN", {"default": _D.export, "tooltip": "Write the LoRA to models/loras and the "
                                       "tokens to models/embeddings"}),
                "device": (host.DEVICE_CHOICES, {"default": _D.device}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }
        spec["optional"]["fixed_mask_stage"] = ("BOOLEAN", {
            "default": _D.fixed_mask_stage, "tooltip": "Phase 2 (token rows + LoRA) trains on the last masks of "
            "phase 1, fixed: the paper's final stage ('tokens and model jointly, keeping the mask fixed')"})
        # last, so saved workflows keep their widgets in order
        spec["optional"]["preset"] = (
            presets.choices("em"), {"default": presets.CUSTOM, "tooltip": presets.PRESET_TOOLTIP +
                ". paper = Rahman et al. with Break-a-Scene's losses and phases"})
        spec["optional"]["aspect"] = (T.ASPECTS, {
            "default": _D.aspect, "tooltip": "buckets: each photo trains at the size of about resolution x "
            "resolution pixels nearest its own shape (e.g. 640x384 for a 3:2 photo at 512), its masks at that shape; "
            "square: a centre crop of resolution x resolution (as before buckets; square photos: the same)"})
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
            imgs = [host.detach_clone(i) for i in image_batch_to_list(images, node=self.NODE_ID)]
            gt = None
            if ground_truth is not None:
                if not isinstance(ground_truth, torch.Tensor) or ground_truth.ndim not in (2, 3):
                    raise UnconfusedError("expected a MASK batch [N, H, W]", node=self.NODE_ID, input="ground_truth")
                gt = list(host.detach_clone(ground_truth.reshape(-1, *ground_truth.shape[-2:])))
        scenes = E.make_scenes(imgs, concepts, gt, node=self.NODE_ID)
        prompts = [p.strip() for p in (validation_prompts or "").splitlines() if p.strip()]
        preset = kw.pop("preset", presets.CUSTOM)
        settings = presets.from_widgets(E.EMSettings, preset, dict(kw, validation_prompts=prompts),
                                        node=self.NODE_ID)
        from ..trainers.memory_plan import check_fits

        check_fits("em", model, settings, node=self.NODE_ID)  # on a CUDA GPU: refuse what would not fit
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
