"""Evaluation nodes: the papers' metrics on generated images (CLIP-T, CLIP-I, DINO, SID's subject
alignment / non-subject disentanglement, CLIF's attendance and confusion matrix), mask IoU, and
the DINO loader. The numbers come out as a table (STRING) and are saved as JSON + CSV."""

from __future__ import annotations

import torch

from ..engine.vision import dino as D
from ..engine import host
from ..engine.evaluation import metrics as M
from ..engine.data.concepts import image_batch_to_list, pil_to_tensor
from ..engine.errors import UnconfusedError
from ..engine.preview import grid, overlay_masks
from .common import CATEGORY, CLIP_MODEL, CONCEPT_SET, DINO_MODEL, MODEL_BUNDLE, save_previews

CAT = f"{CATEGORY}/eval"


class UnconfusedDINOLoader:
    NODE_ID = D.NODE_LOADER

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dino_name": (D.list_dino_models() or ["(none found)"],
                          {"tooltip": "A folder in models/dino with a transformers DINO (config.json + "
                                      "model.safetensors), e.g. facebook/dino-vits16 (the papers' ViT-S/16)"}),
            "device": (host.DEVICE_CHOICES, {"default": "auto"}),
        }}

    RETURN_TYPES = (DINO_MODEL,)
    RETURN_NAMES = ("dino_model",)
    FUNCTION = "load"
    CATEGORY = CAT

    def load(self, dino_name, device="auto"):
        model = D.load_dino_by_name("" if dino_name == "(none found)" else dino_name, device=device)
        return {"ui": {"text": [f"{model.name}: DINO, {model.image_size}px"]}, "result": (model,)}


def _region_masks(masks: torch.Tensor, n_images: int, order: list[str], tokens: list[str]):
    """The sampler's attention masks (image-major: image 0's maps in `order`, then image 1's...) ->
    per image, one mask per concept of `tokens` (None for a concept the maps do not cover)."""
    if masks.ndim == 2:
        masks = masks[None]
    per = len(order)
    if per == 0 or masks.shape[0] != n_images * per:
        raise UnconfusedError(f"{masks.shape[0]} region masks for {n_images} images and {per} concept tokens "
                              f"({', '.join(order) or 'none'}); connect the sampler's attention_masks (made with "
                              "debug_attention on) and, if the model knows other tokens too, its model",
                              input="region_masks")
    out = []
    for i in range(n_images):
        block = masks[i * per:(i + 1) * per]
        out.append([block[order.index(t)].float() if t in order else None for t in tokens])
    return out


class UnconfusedEvaluate:
    """Scores generated images against the concepts' reference photos and the prompts, with the
    papers' metrics; saves report.json, metrics.csv and heat maps under output/unconfused/eval."""

    NODE_ID = M.NODE

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The generated images (e.g. the sampler's images; batch several "
                                                "samplers' outputs together for several prompts)"}),
                "prompts": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "a photo of <alice> and <my-dog>",
                                       "tooltip": "The prompt the images were made from: one line for all, or one "
                                                  "line per image"}),
                "concepts": (CONCEPT_SET, {"tooltip": "The concepts with their reference photos (with the SAM cut-out "
                                                      "masks for SID's subject metrics)"}),
                "clip_model": (CLIP_MODEL, {"tooltip": "An open_clip model from Load CLIP Scorer (the papers use "
                                                       "ViT-B/32)"}),
                "convention": (list(M.CONVENTIONS), {"default": "cosine", "tooltip": "CLIP-T as the plain cosine "
                               "(DreamBooth) or CLIPScore = 2.5 x max(cosine, 0) (Custom Diffusion)"}),
                "text_mode": (list(M.TEXT_MODES), {"default": "class", "tooltip": "CLIP-T prompt: concept tokens "
                              "replaced by their class words, or removed"}),
                "name": ("STRING", {"default": "eval", "tooltip": "Report folder output/unconfused/eval/<name>_NNNNN "
                                    "(numbered: earlier reports are kept)"}),
            },
            "optional": {
                "dino_model": (DINO_MODEL, {"tooltip": "Adds the DINO image-alignment score"}),
                "region_masks": ("MASK", {"tooltip": "Where each concept should be: the sampler's attention_masks "
                                          "(debug_attention on) -> the confusion matrix"}),
                "model": (MODEL_BUNDLE, {"tooltip": "The model the sampler used: gives the order of its attention "
                                         "masks (default: the concept set's order)"}),
                "region_threshold": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 0.99, "step": 0.01,
                                               "tooltip": "Mask value that counts as inside a region / segment"}),
                "save": ("BOOLEAN", {"default": True, "tooltip": "Write the report files"}),
            },
        }

    RETURN_TYPES = ("STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("report", "confusion", "attendance")
    FUNCTION = "evaluate"
    CATEGORY = CAT
    OUTPUT_NODE = True

    def evaluate(self, images, prompts, concepts, clip_model, convention="cosine", text_mode="class", name="eval",
                 dino_model=None, region_masks=None, model=None, region_threshold=0.5, save=True):
        imgs = image_batch_to_list(images)
        texts = M.prompts_for(prompts, len(imgs))
        refs = [M.Reference(c.token, c.class_word, c.images, c.masks) for c in concepts.concepts]
        tokens = [r.token for r in refs]
        regions = None
        if region_masks is not None:
            order = list(model.added_tokens) if model is not None else tokens
            regions = _region_masks(region_masks, len(imgs), order, tokens)
        report = M.evaluate(imgs, texts, refs, clip_model, dino=dino_model, region_masks=regions,
                            settings=M.EvalSettings(convention, text_mode, region_threshold))
        table = report.table()
        if save:
            folder = M.report_folder(host.output_dir() / "unconfused" / "eval", name)
            report.write(folder)
            table += f"\nsaved: {folder}"
        pics = report.pictures()
        blank = torch.zeros(1, 64, 64, 3)
        confusion = pil_to_tensor(pics["confusion"])[None] if "confusion" in pics else blank
        attendance = pil_to_tensor(pics["attendance"])[None] if "attendance" in pics else blank
        ui = {"text": [table], "images": save_previews(list(pics.values()), "unconfused_eval") if pics else []}
        return {"ui": ui, "result": (table, confusion, attendance)}


class UnconfusedMaskIoU:
    """IoU between two mask batches (e.g. the mask EM's masks against hand-drawn ones)."""

    NODE_ID = M.NODE_IOU

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "masks_a": ("MASK", {"tooltip": "e.g. the estimated masks"}),
            "masks_b": ("MASK", {"tooltip": "e.g. the ground truth; one mask is compared with every mask of a"}),
            "threshold": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 0.99, "step": 0.01,
                                    "tooltip": "A pixel is inside a mask at or above this value"}),
        }}

    RETURN_TYPES = ("FLOAT", "STRING", "IMAGE")
    RETURN_NAMES = ("mean_iou", "report", "preview")
    FUNCTION = "measure"
    CATEGORY = CAT
    OUTPUT_NODE = True

    def measure(self, masks_a, masks_b, threshold=0.5):
        ious = M.mask_iou(masks_a, masks_b, threshold)
        mean = sum(ious) / len(ious)
        text = "\n".join([f"mean IoU {mean:.4f} over {len(ious)} mask(s)"] +
                         [f"mask {i}: {v:.4f}" for i, v in enumerate(ious)])
        a = masks_a if masks_a.ndim == 3 else masks_a[None]
        b = masks_b if masks_b.ndim == 3 else masks_b[None]
        cells = []
        for i in range(len(ious)):
            x = a[min(i, a.shape[0] - 1)].float()
            y = torch.nn.functional.interpolate(b[min(i, b.shape[0] - 1)].float()[None, None], size=tuple(x.shape),
                                                mode="nearest")[0, 0]
            cells.append(overlay_masks(torch.zeros(*x.shape, 3), [(x >= threshold).float(), (y >= threshold).float()],
                                       alpha=0.7))
        sheet = grid(cells[:16], [f"#{i} IoU {v:.3f} (a blue, b orange)" for i, v in enumerate(ious[:16])],
                     cell=192, columns=4, caption_lines=1)
        preview = pil_to_tensor(sheet)[None]
        return {"ui": {"text": [text], "images": save_previews([sheet], "unconfused_iou")},
                "result": (mean, text, preview)}


NODE_CLASS_MAPPINGS = {
    UnconfusedDINOLoader.NODE_ID: UnconfusedDINOLoader,
    UnconfusedEvaluate.NODE_ID: UnconfusedEvaluate,
    UnconfusedMaskIoU.NODE_ID: UnconfusedMaskIoU,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    UnconfusedDINOLoader.NODE_ID: "Load DINO (Unconfused)",
    UnconfusedEvaluate.NODE_ID: "Evaluate Concepts (Unconfused)",
    UnconfusedMaskIoU.NODE_ID: "Mask IoU (Unconfused)",
}
