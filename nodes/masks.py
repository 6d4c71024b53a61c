"""Mask nodes: SAM loader and segmenter (automatic / prompted / concept cut-out), a concept cut-out
for whole concepts, the open_clip scorer loader and region labeller, and DenseCRF refinement."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine.vision import clip_zero_shot as CL
from ..engine.data import concepts as C
from ..engine.vision import crf as CRF
from ..engine import host
from ..engine.vision import sam as S
from ..engine.data.augment.word_lists import REGION_VOCABULARY, parse_list
from ..engine.errors import UnconfusedError
from ..engine.preview import grid, overlay_masks
from ..engine.vision.regions import label_regions
from .common import CATEGORY, CLIP_MODEL, CONCEPT, REGIONS, SAM_MODEL, float_input, int_input, with_preview

CAT = f"{CATEGORY}/masks"
MODES = ["automatic", "prompted", "concept cut-out"]
MAX_LABELS = 4
_C = CRF.CRFSettings()



def _none_list(kind: str) -> list[str]:
    return host.list_models(kind) or ["(none found)"]


def _tensor_preview(pil) -> torch.Tensor:
    return C.pil_to_tensor(pil)[None]


def regions_preview(images: list[torch.Tensor], regions: S.Regions, *, title: str = "") -> object:
    cells, caps = [], []
    for i, img in enumerate(images):
        rs = regions.of_image(i)
        cells.append(overlay_masks(img, [r.mask.float() for r in rs]))
        labels = [f"{r.label}:{r.label_score:.2f}" if r.label is not None and r.label_score is not None
                  else f"{r.area / max(img.shape[0] * img.shape[1], 1):.0%}" for r in rs]
        caps.append(f"{title}#{i}: {len(rs)} regions " + " ".join(labels[:8]))
    return grid(cells, caps, cell=256, columns=min(4, len(cells)), caption_lines=3)


def cutout_preview(images: list[torch.Tensor], choices: list[S.CutoutChoice], class_word: str) -> object:
    """One cell per kept segment: the photo with the segment tinted, its concept score, the choice marked."""
    cells, caps, marks = [], [], []
    for ch in choices:
        img = images[ch.image_index]
        if not ch.candidates:
            cells.append(C.tensor_to_pil(img))
            caps.append(f"#{ch.image_index}: no segment >= min_fraction ({ch.dropped_small} small dropped)")
            marks.append(False)
        for k, r in enumerate(ch.candidates):
            chosen = k in ch.chosen
            cells.append(overlay_masks(img, [r.mask.float()], alpha=0.55))
            caps.append(f"#{ch.image_index}.{k} '{class_word}' {r.label_score:.3f}" + (" CHOSEN" if chosen else "")
                        + (f" ({ch.dropped_small} small dropped)" if k == 0 else ""))
            marks.append(chosen)
    return grid(cells, caps, cell=192, columns=6, caption_lines=2, marks=marks)


# ------------------------------------------------------------------ SAM
class UnconfusedSAMLoader:
    NODE_ID = S.NODE_LOADER

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sam_name": (_none_list("sams"), {"tooltip": "A SAM checkpoint in models/sams (sam_vit_b_01ec64.pth, "
                                                         "sam_vit_l, sam_vit_h or a .safetensors conversion)"}),
            "device": (host.DEVICE_CHOICES, {"default": "auto"}),
            "precision": (["auto", "fp32", "fp16", "bf16"], {"default": "auto", "tooltip": "auto: half precision "
                                                           "(autocast) on a GPU, fp32 on the CPU"}),
        }}

    RETURN_TYPES = (SAM_MODEL,)
    RETURN_NAMES = ("sam_model",)
    FUNCTION = "load"
    CATEGORY = CAT

    def load(self, sam_name, device="auto", precision="auto"):
        name = "" if sam_name == "(none found)" else sam_name
        model = S.load_sam_by_name(name, device=device, precision=precision)
        return {"ui": {"text": [f"{model.name}: SAM {model.variant}"]}, "result": (model,)}


class UnconfusedSAMSegment:
    """SAM on an IMAGE batch: automatic over-segmentation, prompted (points/boxes) or concept cut-out."""

    NODE_ID = S.NODE_SEGMENT

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "sam_model": (SAM_MODEL,),
                "images": ("IMAGE",),
                "mode": (MODES, {"default": "automatic", "tooltip": "automatic: over-segment into regions; "
                                 "prompted: the object at the points/boxes; concept cut-out: the segment CLIP "
                                 "calls 'a photo of a <class word>' (needs clip_model)"}),
                "points_per_side": int_input(32, 1, 128, "automatic/cut-out: grid of point prompts per image side"),
                "pred_iou_thresh": float_input(0.88, 0.0, 1.0, 0.01, "keep masks SAM rates at least this good"),
                "stability_thresh": float_input(0.95, 0.0, 1.0, 0.01, "keep masks stable under threshold changes"),
                "min_region_area": float_input(0.0, 0.0, 1e6, 0.001, "drop regions smaller than this fraction of the "
                                          "image (< 1) or this many pixels (>= 1)"),
                "max_regions": int_input(0, 0, 1000, "automatic: keep the largest N regions per image (0 = all)"),
            },
            "optional": {
                "points": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "", "tooltip": "prompted: x,y per line (pixels "
                                      "or 0..1 fractions); x,y,0 marks a background point"}),
                "boxes": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "", "tooltip": "prompted: x0,y0,x1,y1 per line"}),
                "clip_model": (CLIP_MODEL, {"tooltip": "concept cut-out: scores the segments"}),
                "class_word": ("STRING", {"default": "dog", "tooltip": "concept cut-out: what the concept is"}),
                "min_fraction": float_input(0.10, 0.0, 1.0, 0.01, "concept cut-out: drop segments under this part of "
                                       "the image (CLIF: 10%)"),
                "keep": int_input(1, 1, 16, "concept cut-out: keep this many best-scoring segments"),
            },
        }

    RETURN_TYPES = ("MASK", REGIONS, "IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("masks", "regions", "preview", "region_masks", "info")
    FUNCTION = "segment"
    CATEGORY = CAT

    def segment(self, sam_model, images, mode="automatic", points_per_side=32, pred_iou_thresh=0.88,
                stability_thresh=0.95, min_region_area=0.0, max_regions=0, points="", boxes="", clip_model=None,
                class_word="dog", min_fraction=0.10, keep=1):
        imgs = C.image_batch_to_list(images)
        auto = dict(points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh,
                    stability_thresh=stability_thresh, min_area=min_region_area)
        if mode == "automatic":
            regions = S.automatic_regions(sam_model, imgs, max_regions=max_regions, **auto)
            preview = regions_preview(imgs, regions)
        elif mode == "prompted":
            regions = S.prompted_regions(sam_model, imgs, S.parse_points(points),
                                         S.parse_boxes(boxes))
            preview = regions_preview(imgs, regions)
        elif mode == "concept cut-out":
            if clip_model is None:
                raise UnconfusedError("concept cut-out needs clip_model: connect the CLIP Scorer Loader "
                                      "(Unconfused/masks)", input="clip_model")
            choices, regions = S.concept_cutout(sam_model, imgs, class_word, clip_model, min_fraction=min_fraction,
                                                keep=keep, **auto)
            preview = cutout_preview(imgs, choices, class_word)
            cut_info = S.describe_cutout(choices, class_word)
        else:
            raise UnconfusedError(f"unknown mode '{mode}'; use one of {MODES}", input="mode")
        masks = S.regions_to_masks(regions)
        h, w = imgs[0].shape[:2]
        region_masks = torch.stack([r.mask.float() for r in regions.regions]) if len(regions) else torch.zeros(1, h, w)
        info = cut_info if mode == "concept cut-out" else regions.describe()
        return with_preview((masks, regions, _tensor_preview(preview), region_masks, info), [preview], "sam")


class UnconfusedConceptCutout:
    """CLIF's first step for a whole concept: SAM + CLIP pick the concept in every reference photo and the
    concept gets those masks (photos keep their own sizes)."""

    NODE_ID = "UnconfusedConceptCutout"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "concept": (CONCEPT,),
            "sam_model": (SAM_MODEL,),
            "clip_model": (CLIP_MODEL,),
            "points_per_side": int_input(32, 1, 128, "grid of point prompts per image side"),
            "pred_iou_thresh": float_input(0.88, 0.0, 1.0, 0.01, "keep masks SAM rates at least this good"),
            "stability_thresh": float_input(0.95, 0.0, 1.0, 0.01, "keep masks stable under threshold changes"),
            "min_fraction": float_input(0.10, 0.0, 1.0, 0.01, "drop segments under this part of the photo (CLIF: 10%)"),
            "keep": int_input(1, 1, 16, "keep this many best-scoring segments per photo"),
        }}

    RETURN_TYPES = (CONCEPT, "IMAGE", "STRING")
    RETURN_NAMES = ("concept", "preview", "info")
    FUNCTION = "cut"
    CATEGORY = CAT

    def cut(self, concept, sam_model, clip_model, points_per_side=32, pred_iou_thresh=0.88, stability_thresh=0.95,
            min_fraction=0.10, keep=1):
        choices, regions = S.concept_cutout(sam_model, concept.images, concept.class_word, clip_model,
                                            min_fraction=min_fraction, keep=keep,
                                            points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh,
                                            stability_thresh=stability_thresh)
        out = concept.with_masks([ch.mask for ch in choices])
        preview = cutout_preview(concept.images, choices, concept.class_word)
        info = S.describe_cutout(choices, concept.class_word)
        return with_preview((out, _tensor_preview(preview), info), [preview], "cutout")


# ------------------------------------------------------------------ CLIP
class UnconfusedCLIPScorerLoader:
    NODE_ID = CL.NODE_LOADER

    @classmethod
    def INPUT_TYPES(cls):
        try:
            import open_clip

            names = ["auto"] + sorted(open_clip.list_models())
        except ImportError:
            names = ["auto"]
        return {"required": {
            "clip_name": (_none_list(CL.KIND), {"tooltip": "A full open_clip checkpoint (image + text towers) in "
                                                           "models/clip_vision"}),
            "model_name": (names, {"default": "auto", "tooltip": "open_clip architecture; auto reads it from the "
                                                                "tensors"}),
            "pretrained_tag": (["auto", "openai", "laion2b_s34b_b79k", "laion2b_s32b_b82k", "laion400m_e32",
                                "datacomp_xl_s13b_b90k"], {"default": "auto", "tooltip": "Where the weights come "
                               "from: openai weights need QuickGELU; auto = openai if the file name says so"}),
            "device": (host.DEVICE_CHOICES, {"default": "auto"}),
            "precision": (["auto", "fp32", "fp16", "bf16"], {"default": "auto"}),
        }}

    RETURN_TYPES = (CLIP_MODEL,)
    RETURN_NAMES = ("clip_model",)
    FUNCTION = "load"
    CATEGORY = CAT

    def load(self, clip_name, model_name="auto", pretrained_tag="auto", device="auto", precision="auto"):
        name = "" if clip_name == "(none found)" else clip_name
        model = CL.load_clip_by_name(name, model_name=model_name, pretrained_tag=pretrained_tag, device=device,
                                     precision=precision)
        return {"ui": {"text": [f"{model.name}: open_clip {model.model_name}"]}, "result": (model,)}


class UnconfusedCLIPRegionLabeller:
    NODE_ID = CL.NODE_LABEL

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_model": (CLIP_MODEL,),
            "images": ("IMAGE",),
            "regions": (REGIONS,),
            "vocabulary": ("STRING", {"multiline": True, "dynamicPrompts": False, "default": "hair, hat, necklace, jacket, shoes, face",
                                      "tooltip": "Words to label regions with, comma- or line-separated"}),
            "use_default_vocabulary": ("BOOLEAN", {"default": False, "tooltip": "Add the built-in parts vocabulary "
                                                   f"({len(REGION_VOCABULARY)} words)"}),
        }}

    RETURN_TYPES = (REGIONS, "IMAGE", "STRING")
    RETURN_NAMES = ("regions", "preview", "labels")
    FUNCTION = "label"
    CATEGORY = CAT

    def label(self, clip_model, images, regions, vocabulary="", use_default_vocabulary=False):
        words = parse_list(vocabulary) + (list(REGION_VOCABULARY) if use_default_vocabulary else [])
        imgs = C.image_batch_to_list(images)
        out = label_regions(clip_model, imgs, regions, words)
        preview = regions_preview(imgs, out)
        text = "\n".join(f"image {r.image_index} region {k}: {r.label} ({r.label_score:.3f})"
                         for k, r in enumerate(out.regions))
        return with_preview((out, _tensor_preview(preview), text), [preview], "labels")


# ------------------------------------------------------------------ DenseCRF
def _masks_for(masks: torch.Tensor, n: int, *, input: str) -> torch.Tensor:
    if not isinstance(masks, torch.Tensor):
        raise UnconfusedError(f"expected a MASK, got {type(masks).__name__}", input=input)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim == 4 and masks.shape[-1] in (1, 3):  # an IMAGE plugged in as a mask
        masks = masks[..., 0]
    if masks.ndim != 3:
        raise UnconfusedError(f"expected a MASK batch [B, H, W], got shape {tuple(masks.shape)}", input=input)
    if masks.shape[0] == 1 and n > 1:
        masks = masks.expand(n, -1, -1)
    if masks.shape[0] != n:
        raise UnconfusedError(f"{masks.shape[0]} masks for {n} images; give one mask per image (or one for all)", input=input)
    return masks.detach().float().cpu()


class UnconfusedCRFRefine:
    """DenseCRF: sharpen soft/low-resolution masks to the image's edges. Several masks compete as labels."""

    NODE_ID = CRF.NODE

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE",),
                "mask_1": ("MASK", {"tooltip": "Soft or binary mask of label 1 (any resolution; upsampled)"}),
                "iterations": int_input(_C.iterations, 1, 100, "mean-field iterations (CutLER: 10)"),
                "gaussian_sxy": float_input(_C.gaussian_sxy, 0.1, 200.0, 0.1, "smoothness kernel width, px (CutLER: 3)"),
                "gaussian_compat": float_input(_C.gaussian_compat, 0.0, 100.0, 0.1, "smoothness weight (CutLER: 7)"),
                "bilateral_sxy": float_input(_C.bilateral_sxy, 0.1, 500.0, 0.1, "appearance kernel width, px (CutLER: 50)"),
                "bilateral_srgb": float_input(_C.bilateral_srgb, 0.1, 255.0, 0.1, "appearance colour tolerance (CutLER: 5)"),
                "bilateral_compat": float_input(_C.bilateral_compat, 0.0, 100.0, 0.1, "appearance weight (CutLER: 10)"),
                "unary_scale": float_input(_C.unary_scale, 0.1, 50.0, 0.1, "trust in the input masks (1 = CutLER's soft "
                                      "unary; higher = edges move less)"),
                "output": (["binary", "soft"], {"default": "binary", "tooltip": "binary: each pixel's winning label "
                                                                             "(CutLER); soft: CRF probabilities"}),
                "work_at": (["image", "mask"], {"default": "image", "tooltip": "image: masks upsampled to the image; "
                                                "mask: image downsampled to the masks (fast, latent-size)"}),
            },
            "optional": {f"mask_{k}": ("MASK", {"tooltip": f"label {k}, competing with the others"})
                         for k in range(2, MAX_LABELS + 1)},
        }

    RETURN_TYPES = ("MASK",) * MAX_LABELS + ("IMAGE",)
    RETURN_NAMES = tuple(f"refined_{k}" for k in range(1, MAX_LABELS + 1)) + ("preview",)
    FUNCTION = "refine"
    CATEGORY = CAT

    def refine(self, images, mask_1, iterations=10, gaussian_sxy=3.0, gaussian_compat=7.0, bilateral_sxy=50.0,
               bilateral_srgb=5.0, bilateral_compat=10.0, unary_scale=1.0, output="binary", work_at="image", **more):
        settings = CRF.CRFSettings(iterations, gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb,
                                   bilateral_compat, unary_scale, output).validate()
        if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[-1] not in (1, 3, 4):
            raise UnconfusedError(f"the image has {images.shape[-1]} channels; connect an RGB IMAGE",
                                  input="images")
        imgs = C.image_batch_to_list(images)
        given = [("mask_1", mask_1)] + [(f"mask_{k}", more[f"mask_{k}"]) for k in range(2, MAX_LABELS + 1)
                                        if more.get(f"mask_{k}") is not None]
        label_masks = [_masks_for(m, len(imgs), input=name) for name, m in given]
        shapes = {tuple(m.shape[1:]) for m in label_masks}
        if len(shapes) > 1:
            label_masks = [F.interpolate(m[None], size=label_masks[0].shape[1:], mode="bilinear")[0] for m in label_masks]
        for (name, _), lm in zip(given, label_masks):  # name the input of a flat mask
            for i, m in enumerate(lm):
                CRF.check_masks(m[None], input=name, index=i if len(imgs) > 1 else None)
        per_image = [torch.stack([lm[i] for lm in label_masks]) for i in range(len(imgs))]
        refined = CRF.refine_batch(imgs, per_image, settings, work_at=work_at, image_input="images",
                                   mask_input="mask_1")
        h, w = refined[0].shape[1:]
        outs = []
        for k in range(MAX_LABELS):
            if k < len(given):
                outs.append(torch.stack([r[k] for r in refined]))
            else:
                outs.append(torch.zeros(len(imgs), h, w))
        cells = [overlay_masks(img, list(r)) for img, r in zip(imgs, refined)]
        before = [overlay_masks(img, [m for m in pm]) for img, pm in zip(imgs, per_image)]
        preview = grid([c for pair in zip(before, cells) for c in pair],
                       [t for i in range(len(imgs)) for t in (f"#{i} before", f"#{i} refined")], cell=256,
                       columns=min(4, 2 * len(imgs)), caption_lines=1)
        return with_preview((*outs, _tensor_preview(preview)), [preview], "crf")


_NODES = [UnconfusedSAMLoader, UnconfusedSAMSegment, UnconfusedConceptCutout, UnconfusedCLIPScorerLoader,
          UnconfusedCLIPRegionLabeller, UnconfusedCRFRefine]
NODE_CLASS_MAPPINGS = {n.NODE_ID: n for n in _NODES}
NODE_DISPLAY_NAME_MAPPINGS = {
    "UnconfusedSAMLoader": "SAM Loader (Unconfused)",
    "UnconfusedSAMSegment": "SAM Segment (Unconfused)",
    "UnconfusedConceptCutout": "Concept Cut-out SAM+CLIP (Unconfused)",
    "UnconfusedCLIPScorerLoader": "CLIP Scorer Loader (Unconfused)",
    "UnconfusedCLIPRegionLabeller": "CLIP Region Labeller (Unconfused)",
    "UnconfusedCRFRefine": "DenseCRF Refine (Unconfused)",
}
