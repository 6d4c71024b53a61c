"""Segment Anything (SAM): loading users' checkpoints, automatic over-segmentation, prompted
segmentation and CLIF's concept cut-out.

- Checkpoints: the official `sam_vit_b/l/h_*.pth` (read with `torch.load(weights_only=True)`) and
  safetensors conversions. The variant is read from the tensors (embedding width, block count),
  never from the file name; any other layout is refused with a message naming the file.
- The model lives on the CPU between calls and is moved to the compute device only while it runs,
  so a loaded SAM never holds GPU memory that ComfyUI needs for other models.
- Regions (automatic and prompted results) are `Region`s: a boolean mask in image pixels, its box,
  a score (SAM's predicted IoU), and later a label with its CLIP score.

segment_anything does the model, the predictor and the automatic mask generator; this module adds
loading, validation, the region list, the small-area filter (the generator's own filter needs
OpenCV) and the concept-picking rule.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .. import host
from ..errors import UnconfusedError

NODE_LOADER = "UnconfusedSAMLoader"
NODE_SEGMENT = "UnconfusedSAMSegment"

# Official variants: (embed dim, depth, heads, global attention blocks).
VARIANTS = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
OFFICIAL_FILES = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth"}
CUTOUT_PROMPT = "a photo of a {}"


# ------------------------------------------------------------------ regions
@dataclass
class Region:
    mask: torch.Tensor  # [H, W] bool, image pixels
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive-exclusive)
    score: float  # SAM's predicted IoU (or stability for automatic mode)
    image_index: int = 0
    label: str | None = None
    label_score: float | None = None  # CLIP probability of the label
    stability: float | None = None

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class Regions:
    """The region list a Segment node outputs: all regions of all images, in image order."""

    regions: list[Region]
    image_sizes: list[tuple[int, int]]  # (H, W) per image
    notes: list[str] = field(default_factory=list)

    def of_image(self, i: int) -> list[Region]:
        return [r for r in self.regions if r.image_index == i]

    def __len__(self) -> int:
        return len(self.regions)

    def describe(self) -> str:
        lines = []
        for i in range(len(self.image_sizes)):
            rs = self.of_image(i)
            parts = [f"{r.label or '?'}({r.label_score:.2f})" if r.label_score is not None
                     else f"{r.area}px/{r.score:.2f}" for r in rs]
            lines.append(f"image {i}: {len(rs)} regions " + " ".join(parts[:12]) + (" ..." if len(parts) > 12 else ""))
        return "\n".join(lines + self.notes)


def box_of(mask: torch.Tensor | np.ndarray) -> tuple[int, int, int, int]:
    m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=bool)
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        return (0, 0, 0, 0)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


# ------------------------------------------------------------------ loading
def _state_dict_from_file(path: Path, *, input: str) -> dict[str, torch.Tensor]:
    try:
        if path.suffix.lower() in (".safetensors", ".sft"):
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # damaged, truncated, not a checkpoint, pickled code
        raise UnconfusedError(f"'{path.name}' could not be read as a SAM checkpoint ({type(e).__name__}: "
                              f"{str(e)[:160]}); the file may be damaged or incomplete - download it again "
                              f"(official: {', '.join(OFFICIAL_FILES.values())})", input=input) from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not sd:
        raise UnconfusedError(f"'{path.name}' holds no tensors; it is not a SAM checkpoint", input=input)
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


@dataclass(frozen=True)
class SamConfig:
    embed_dim: int
    depth: int
    heads: int
    global_attn: tuple[int, ...]
    img_size: int = 1024
    patch: int = 16
    window: int = 14
    prompt_dim: int = 256
    mlp_dim: int = 2048  # mask decoder transformer
    decoder_depth: int = 2
    decoder_heads: int = 8
    variant: str = "custom"


def config_from_state_dict(sd: dict[str, torch.Tensor], *, name: str = "checkpoint",
                           input: str = "sam_name", allow_custom: bool = False) -> SamConfig:
    """Read the architecture from tensor shapes; an official variant unless `allow_custom`."""
    key = "image_encoder.patch_embed.proj.weight"
    need = [key, "image_encoder.pos_embed", "mask_decoder.iou_token.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        hint = ""
        if any(k.startswith(("image_encoder.layers", "image_encoder.stages")) for k in sd):
            hint = " (it looks like MobileSAM/EfficientSAM, which use another image encoder)"
        elif any(k.startswith(("sam2", "memory_attention", "image_encoder.trunk")) for k in sd):
            hint = " (it looks like SAM 2, which is a different model)"
        raise UnconfusedError(f"'{name}' is not an original SAM checkpoint{hint}: tensor {missing[0]} is missing. "
                              f"Use sam_vit_b, sam_vit_l or sam_vit_h ({', '.join(OFFICIAL_FILES.values())})", input=input)
    embed, _, patch, _ = sd[key].shape
    grid = sd["image_encoder.pos_embed"].shape[1]
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
    head_dim = sd["image_encoder.blocks.0.attn.rel_pos_h"].shape[1] if "image_encoder.blocks.0.attn.rel_pos_h" in sd \
        else embed // 12
    global_attn, window = [], 14
    for b in range(depth):
        rp = sd.get(f"image_encoder.blocks.{b}.attn.rel_pos_h")
        if rp is None:
            continue
        if rp.shape[0] == 2 * grid - 1:
            global_attn.append(b)
        else:
            window = (rp.shape[0] + 1) // 2
    prompt_dim = sd["mask_decoder.iou_token.weight"].shape[1]
    mlp = sd.get("mask_decoder.transformer.layers.0.mlp.lin1.weight")
    dec_depth = len({int(m.group(1)) for k in sd if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))})
    variant = "custom"
    for v, (e, d, h, g) in VARIANTS.items():
        if (embed, depth, tuple(global_attn)) == (e, d, g) and grid * patch == 1024 and prompt_dim == 256:
            variant = v
    if variant == "custom" and not allow_custom:
        raise UnconfusedError(f"'{name}' is a SAM of an unknown variant (width {embed}, {depth} blocks, "
                              f"{grid * patch}px input); supported are vit_b (768/12), vit_l (1024/24) and vit_h "
                              f"(1280/32): use one of {', '.join(OFFICIAL_FILES.values())}", input=input)
    heads = VARIANTS[variant][2] if variant != "custom" else max(1, embed // head_dim)
    return SamConfig(embed, depth, heads, tuple(global_attn), grid * patch, patch, window, prompt_dim,
                     mlp.shape[0] if mlp is not None else 2048, dec_depth or 2, 8, variant)


def build_sam(cfg: SamConfig):
    """An empty segment_anything `Sam` of this architecture (weights uninitialised / random)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    emb = cfg.img_size // cfg.patch
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg.depth, embed_dim=cfg.embed_dim, img_size=cfg.img_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=cfg.heads, patch_size=cfg.patch,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=cfg.global_attn, window_size=cfg.window,
            out_chans=cfg.prompt_dim),
        prompt_encoder=PromptEncoder(embed_dim=cfg.prompt_dim, image_embedding_size=(emb, emb),
                                     input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.prompt_dim,
                                          mlp_dim=cfg.mlp_dim, num_heads=cfg.decoder_heads),
            transformer_dim=cfg.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    ).eval()


class SamModel:
    """A loaded SAM (the UNCONFUSED_SAM socket value). Weights stay on the CPU between calls."""

    def __init__(self, sam, cfg: SamConfig, *, device: str = "auto", precision: str = "auto", name: str = "sam"):
        self.sam = sam.eval().requires_grad_(False)
        self.cfg = cfg
        self.device_choice = device
        self.precision = precision
        self.name = name
        # automatic-mode settings `propose_regions` uses (R-Aug over-segmentation); SAM's defaults
        self.proposal_settings: dict = {}

    @property
    def variant(self) -> str:
        return self.cfg.variant

    def __repr__(self) -> str:
        return f"SamModel({self.name}, {self.variant})"

    def running(self):
        """SAM on its compute device for one call (see host.running_on)."""
        return host.running_on(self.sam, self.device_choice, self.precision)

    # --- the R-Aug proposer the augmentation builder looks for (engine/vision/regions.py region_tools)
    def propose_regions(self, image: torch.Tensor, mask: torch.Tensor | None = None, **settings) -> list[torch.Tensor]:
        """Automatic over-segmentation of one image [H,W,3]; regions (bool [H,W]) inside `mask` if given."""
        regs = automatic_regions(self, [image], progress=False, **{**self.proposal_settings, **settings})
        out = []
        inside = None if mask is None else (mask.detach().float().cpu() >= 0.5)
        for r in regs.regions:
            m = r.mask if inside is None else (r.mask & inside)
            if m.any():
                out.append(m)
        return out


def load_sam(path: str | Path, *, device: str = "auto", precision: str = "auto",
             input: str = "sam_name", allow_custom: bool | None = None) -> SamModel:
    """Load a SAM checkpoint. Only vit_b/l/h unless `allow_custom` (or UNCONFUSED_SAM_ALLOW_CUSTOM=1, for
    tests and experiments with other sizes of the same architecture)."""
    path = Path(path)
    if allow_custom is None:
        allow_custom = os.environ.get("UNCONFUSED_SAM_ALLOW_CUSTOM") == "1"
    sd = _state_dict_from_file(path, input=input)
    cfg = config_from_state_dict(sd, name=path.name, input=input, allow_custom=allow_custom)
    sam = build_sam(cfg)
    try:
        sam.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UnconfusedError(f"'{path.name}' looks like SAM {cfg.variant} but its tensors do not fit "
                              f"({str(e).splitlines()[1][:160] if len(str(e).splitlines()) > 1 else e}); the file "
                              "is damaged or a modified SAM - use an official checkpoint", input=input) from None
    host.device(device)  # validates the choice now, not at first use
    return SamModel(sam, cfg, device=device, precision=precision, name=path.name)


def load_sam_by_name(name: str, *, device: str = "auto", precision: str = "auto",
                     input: str = "sam_name") -> SamModel:
    path = host.find_model("sams", name, input=input,
                           what=f"SAM checkpoint (e.g. {OFFICIAL_FILES['vit_b']})")
    return load_sam(path, device=device, precision=precision, input=input)


# ------------------------------------------------------------------ running
def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray((image.detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8))


def _generator(model: SamModel, points_per_side: int, pred_iou_thresh: float, stability_thresh: float,
               box_nms_thresh: float, points_per_batch: int = 64):
    from segment_anything import SamAutomaticMaskGenerator

    return SamAutomaticMaskGenerator(model.sam, points_per_side=points_per_side, points_per_batch=points_per_batch,
                                     pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_thresh,
                                     box_nms_thresh=box_nms_thresh, output_mode="binary_mask")


def automatic_regions(model: SamModel, images: Sequence[torch.Tensor], *, points_per_side: int = 32,
                      pred_iou_thresh: float = 0.88, stability_thresh: float = 0.95, min_area: float = 0.0,
                      box_nms_thresh: float = 0.7, max_regions: int = 0, progress: bool = True) -> Regions:
    """SAM's automatic mask generator on each image. `min_area` drops regions smaller than this
    fraction of the image (< 1) or this many pixels (>= 1). Regions are sorted largest first."""
    gen = _generator(model, points_per_side, pred_iou_thresh, stability_thresh, box_nms_thresh)
    regions, sizes = [], []
    bar = host.progress(len(images), "SAM automatic") if progress else None
    try:
        with model.running():
            for i, img in enumerate(images):
                h, w = img.shape[:2]
                sizes.append((h, w))
                limit = min_area * h * w if min_area < 1 else min_area
                found = []
                for rec in gen.generate(_to_uint8(img)):
                    m = torch.from_numpy(np.asarray(rec["segmentation"], dtype=bool))
                    if m.sum() < max(limit, 1):
                        continue
                    found.append(Region(m, box_of(m), float(rec["predicted_iou"]), i,
                                        stability=float(rec["stability_score"])))
                found.sort(key=lambda r: -r.area)
                regions += found[:max_regions] if max_regions > 0 else found
                if bar is not None:
                    bar.update(1)
                else:
                    host.check_cancel()
    finally:
        if bar is not None:
            bar.close()
    return Regions(regions, sizes)


def parse_points(text: str, *, input: str = "points") -> list[tuple[float, float, int]]:
    """'x,y' (foreground) or 'x,y,0' (background) per line or separated by ';'. Pixels, or 0..1 fractions."""
    out = []
    for part in re.split(r"[;\n]+", text or ""):
        part = part.strip()
        if not part:
            continue
        nums = [p for p in re.split(r"[,\s]+", part) if p]
        try:
            vals = [float(v) for v in nums]
        except ValueError:
            vals = []
        if len(vals) not in (2, 3) or (len(vals) == 3 and vals[2] not in (0, 1)):
            raise UnconfusedError(f"cannot read point '{part}': write x,y (or x,y,0 for a background point), one "
                                  "per line", input=input)
        out.append((vals[0], vals[1], int(vals[2]) if len(vals) == 3 else 1))
    return out


def parse_boxes(text: str, *, input: str = "boxes") -> list[tuple[float, ...]]:
    """'x0,y0,x1,y1' per line. Pixels, or 0..1 fractions."""
    out = []
    for part in re.split(r"[;\n]+", text or ""):
        part = part.strip()
        if not part:
            continue
        try:
            vals = [float(v) for v in re.split(r"[,\s]+", part) if v]
        except ValueError:
            vals = []
        if len(vals) != 4 or vals[2] <= vals[0] or vals[3] <= vals[1]:
            raise UnconfusedError(f"cannot read box '{part}': write x0,y0,x1,y1 with x1 > x0 and y1 > y0, one per "
                                  "line", input=input)
        out.append(tuple(vals))
    return out


def _scale(vals, w, h):
    """Fractions (all values <= 1) to pixels."""
    if all(0 <= v <= 1 for v in vals):
        return [v * (w if k % 2 == 0 else h) for k, v in enumerate(vals)]
    return list(vals)


def prompted_regions(model: SamModel, images: Sequence[torch.Tensor], points: list[tuple[float, float, int]],
                     boxes: list[tuple[float, ...]], *, multimask: bool = True,
                     progress: bool = True) -> Regions:
    """One region per box (the points help every box), or one from the points alone. The same prompts
    are used for every image; pixel prompts outside an image are an error."""
    from segment_anything import SamPredictor

    if not points and not boxes:
        raise UnconfusedError("prompted mode needs points or boxes: write e.g. '256,200' into points or "
                              "'100,80,400,460' into boxes", input="points")
    predictor = SamPredictor(model.sam)
    regions, sizes = [], []
    bar = host.progress(len(images), "SAM prompted") if progress else None
    try:
        with model.running():
            for i, img in enumerate(images):
                h, w = img.shape[:2]
                sizes.append((h, w))
                pts = [(*_scale(p[:2], w, h), p[2]) for p in points]
                bxs = [_scale(b, w, h) for b in boxes]
                for x, y, _ in pts:
                    if not (0 <= x <= w and 0 <= y <= h):
                        raise UnconfusedError(f"point ({x:g}, {y:g}) is outside image {i} ({w}x{h})",
                                              input="points")
                for b in bxs:
                    if b[0] >= w or b[1] >= h or b[2] <= 0 or b[3] <= 0:
                        raise UnconfusedError(f"box {tuple(round(v) for v in b)} is outside image {i} ({w}x{h})", input="boxes")
                predictor.set_image(_to_uint8(img))
                pc = np.array([p[:2] for p in pts], dtype=np.float32) if pts else None
                pl = np.array([p[2] for p in pts], dtype=np.int64) if pts else None
                for b in (bxs or [None]):
                    masks, scores, _ = predictor.predict(point_coords=pc, point_labels=pl,
                                                         box=None if b is None else np.array(b, dtype=np.float32),
                                                         multimask_output=multimask)
                    k = int(np.argmax(scores))
                    m = torch.from_numpy(np.asarray(masks[k], dtype=bool))
                    regions.append(Region(m, box_of(m), float(scores[k]), i))
                predictor.reset_image()
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return Regions(regions, sizes)


# ------------------------------------------------------------------ concept cut-out (CLIF)
# (crops [h,w,3] float 0..1, texts) -> scores [len(crops), len(texts)] (probabilities or similarities)
Scorer = Callable[[list, list], torch.Tensor]


def region_crop(image: torch.Tensor, mask: torch.Tensor, fill: float = 0.5) -> torch.Tensor:
    """The region's box of the image, pixels outside the region set to gray (what CLIP looks at)."""
    x0, y0, x1, y1 = box_of(mask)
    img = image[y0:y1, x0:x1]
    m = mask[y0:y1, x0:x1].to(torch.bool)[..., None]
    return torch.where(m, img, torch.full_like(img, fill))


@dataclass
class CutoutChoice:
    image_index: int
    chosen: list[int]  # indices into `candidates`
    candidates: list[Region]  # regions kept after the area rule, each with label_score = its concept score
    dropped_small: int
    mask: torch.Tensor  # [H, W] float, the union of the chosen regions


def pick_concept_segments(regions: list[Region], scores: Sequence[float], image_size: tuple[int, int], *,
                          min_fraction: float = 0.10, keep: int = 1, merge_within: float = 0.0) -> tuple[list[int], int]:
    """CLIF's rule: drop segments under `min_fraction` of the image, keep the `keep` best-scoring of the rest
    (and any other within `merge_within` of the best score). Returns (kept indices, number dropped as small)."""
    h, w = image_size
    big = [k for k, r in enumerate(regions) if r.area >= min_fraction * h * w]
    dropped = len(regions) - len(big)
    if not big:
        return [], dropped
    order = sorted(big, key=lambda k: -float(scores[k]))
    best = float(scores[order[0]])
    chosen = order[:max(1, keep)]
    if merge_within > 0:
        chosen += [k for k in order[len(chosen):] if best - float(scores[k]) <= merge_within]
    return sorted(chosen), dropped
def concept_cutout(model: SamModel | None, images: Sequence[torch.Tensor], class_word: str, scorer: Scorer, *,
                   regions: Regions | None = None, min_fraction: float = 0.10, keep: int = 1,
                   merge_within: float = 0.0, prompt: str = CUTOUT_PROMPT, negatives: Sequence[str] = (), **auto_settings) -> tuple[list[CutoutChoice], Regions]:
    """For each photo: SAM automatic segments (or the given `regions`), drop those under `min_fraction` of
    the image, let the scorer pick the segment that is "a photo of a <class word>".

    The scorer sees each kept segment's crop and the texts [prompt(class_word), *negatives]; a segment's
    concept score is its softmax probability of the first text over those texts (with no negatives, over
    the segments: which segment looks most like the class)."""
    if not (class_word or "").strip():
        raise UnconfusedError("the class word is empty; write what the concept is (dog, teapot, woman)",
                              input="class_word")
    if regions is None:
        if model is None:
            raise UnconfusedError("concept cut-out needs the SAM model", input="sam_model")
        regions = automatic_regions(model, images, **auto_settings)
    texts = [prompt.format(class_word.strip())] + [prompt.format(n) for n in negatives]
    choices, out_regions, notes = [], [], list(regions.notes)
    for i, img in enumerate(images):
        host.check_cancel()
        h, w = img.shape[:2]
        regs = regions.of_image(i)
        big = [r for r in regs if r.area >= min_fraction * h * w]
        scores: list[float] = []
        if big:
            sims = torch.as_tensor(scorer([region_crop(img, r.mask) for r in big], texts), dtype=torch.float32)
            sims = sims.reshape(len(big), len(texts))
            if len(texts) > 1:
                probs = sims.softmax(dim=1)[:, 0]
            else:
                probs = sims[:, 0].softmax(dim=0) if sims.min() < 0 or sims.max() > 1 else sims[:, 0]
            scores = [float(p) for p in probs]
        chosen, _ = pick_concept_segments(big, scores, (h, w), min_fraction=0.0, keep=keep,
                                          merge_within=merge_within)
        cands = []
        for k, r in enumerate(big):
            cands.append(Region(r.mask, r.box, r.score, i, label=class_word if k in chosen else None,
                                label_score=scores[k], stability=r.stability))
        mask = torch.zeros(h, w)
        for k in chosen:
            mask = torch.maximum(mask, big[k].mask.float())
        if not chosen:
            notes.append(f"image {i}: no segment covers {min_fraction:.0%} of the photo; its mask is empty - "
                         "lower min_fraction or crop the photo")
        choices.append(CutoutChoice(i, chosen, cands, len(regs) - len(big), mask))
        out_regions += [cands[k] for k in chosen]
    return choices, Regions(out_regions, [tuple(im.shape[:2]) for im in images], notes)


def describe_cutout(choices: list[CutoutChoice], class_word: str) -> str:
    """Every kept segment's concept score and which one was chosen, per photo (the node's `info`)."""
    lines = []
    for ch in choices:
        h, w = ch.mask.shape
        parts = [f"{k}:{r.label_score:.3f} ({r.area / (h * w):.0%}){' CHOSEN' if k in ch.chosen else ''}"
                 for k, r in enumerate(ch.candidates)]
        lines.append(f"image {ch.image_index}: '{CUTOUT_PROMPT.format(class_word)}' " + ", ".join(parts or ["no segment"])
                     + f"; {ch.dropped_small} small segment(s) dropped")
    return "\n".join(lines)


def regions_to_masks(regions: Regions) -> torch.Tensor:
    """Per image, the union of its regions as a MASK batch [B, H, W] (all images must share a size)."""
    sizes = regions.image_sizes
    h, w = sizes[0]
    out = torch.zeros(len(sizes), h, w)
    for r in regions.regions:
        out[r.image_index] = torch.maximum(out[r.image_index], r.mask.float())
    return out
