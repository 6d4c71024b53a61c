"""Training examples from a concept set (or an augmented dataset): images, captions, masks,
prepared at the training size - each photo at its aspect-ratio bucket (engine/data/buckets.py), or a
square centre crop - and, optionally, cached as VAE latents."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .buckets import bucket_sizes, fit_to_bucket, nearest_bucket
from .concepts import ConceptSet
from ..errors import UnconfusedError

DEFAULT_TEMPLATE = "a photo of {token} {class_word}"


@dataclass
class Example:
    image: torch.Tensor  # [H, W, 3] in 0..1
    caption: str
    mask: torch.Tensor | None  # [H, W] in 0..1: the union of the concepts in the image
    tokens: list[str]
def examples_from_concept_set(cs: ConceptSet, captions: str = "auto", template: str = DEFAULT_TEMPLATE) -> list[Example]:
    """One example per reference photo. captions: 'auto' uses the concept's own captions
    (e.g. SID) where present and the template elsewhere; 'template' always the template."""
    out = []
    for c in cs.concepts:
        for i, img in enumerate(c.images):
            cap = c.captions[i] if (captions == "auto" and c.captions) else template.format(
                token=c.token, class_word=c.class_word)
            if c.token not in cap:
                raise UnconfusedError(f"caption {i} of {c.token} does not contain the token: {cap!r}; fix the "
                                      "caption or use template captions", input="captions")
            out.append(Example(img, cap, c.masks[i] if c.masks is not None else None, [c.token]))
    if not out:
        raise UnconfusedError("the concept set has no images", input="concept_set")
    return out


def crop_geometry(h: int, w: int, bucket: tuple[int, int]) -> tuple[int, int, int, int]:
    """(original height, original width, crop top, crop left) of `fit_to_bucket` fitting an h x w image
    to a (width, height) bucket, the crop in pixels of the resized image: SDXL's size/crop conditioning
    (engine/models/families.py), as diffusers' and kohya's SDXL trainers send it."""
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    nh, nw = max(bh, round(h * scale)), max(bw, round(w * scale))
    return h, w, (nh - bh) // 2, (nw - bw) // 2


def fit_square(t: torch.Tensor, resolution: int, mode: str = "bilinear") -> torch.Tensor:
    """[C,H,W] -> [C,R,R]: shorter side to R, then centre crop (what the trainers see)."""
    c, h, w = t.shape
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    kw = {"antialias": True, "align_corners": False} if mode == "bilinear" else {}
    t = F.interpolate(t[None].float(), size=(nh, nw), mode=mode, **kw)[0]
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return t[:, top:top + resolution, left:left + resolution]


ASPECTS = ["buckets", "square"]  # buckets: each photo at the bucket nearest its shape; square: centre crop


def training_sizes(examples: list[Example], resolution: int, aspect: str = "buckets") -> list[tuple[int, int]]:
    """Each example's training (width, height): its aspect-ratio bucket of area resolution**2
    (engine/data/buckets.py), or resolution x resolution for `square` - the same for square photos."""
    if aspect == "square":
        return [(resolution, resolution)] * len(examples)
    buckets = bucket_sizes(resolution)
    return [nearest_bucket(e.image.shape[1], e.image.shape[0], buckets) for e in examples]


@dataclass
class PreparedData:
    """Everything the loop draws batches from, one entry per example at its own bucket's size;
    latents cached when a VAE was given. A batch draws from one bucket (`groups`), so its
    latents stack."""

    pixels: list[torch.Tensor] | None  # [3,H,W] in -1..1 (when not cached)
    latents: list[torch.Tensor] | None  # [4,H/8,W/8] (cached), flipped copies in latents_flipped
    latents_flipped: list[torch.Tensor] | None
    masks: list[torch.Tensor] | None  # [1,H,W] pixel masks (1 where no mask was given)
    has_mask: torch.Tensor  # [N] bool
    captions: list[str]
    sizes: list[tuple[int, int]]  # (width, height) each example trains at
    geometry: torch.Tensor | None = None  # [N, 4] original h, w, crop top, left (SDXL's size conditioning)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def groups(self) -> dict[tuple[int, int], list[int]]:
        """bucket (width, height) -> indices of its examples, buckets in first-seen order."""
        out: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(self.sizes):
            out.setdefault(size, []).append(i)
        return out

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held (the memory plan counts them)."""
        return [t for ts in (self.pixels, self.latents, self.latents_flipped, self.masks) if ts for t in ts]


def prepare(examples: list[Example], resolution: int, *, vae=None, flip: bool = True, device="cpu",
            dtype=torch.float32, progress=None, aspect: str = "buckets") -> PreparedData:
    sizes = training_sizes(examples, resolution, aspect)
    pixels, masks = [], []
    for e, size in zip(examples, sizes):
        mask = e.mask if e.mask is not None else torch.ones(e.image.shape[:2])
        if tuple(mask.shape[-2:]) != tuple(e.image.shape[:2]):  # a mask made at another size covers the photo
            mask = F.interpolate(mask.float().reshape(1, 1, *mask.shape[-2:]), size=tuple(e.image.shape[:2]),
                                 mode="bilinear", align_corners=False)[0, 0]
        img, m = fit_to_bucket(e.image, mask, size)  # the mask takes the photo's resize and crop
        pixels.append(img.permute(2, 0, 1) * 2 - 1)
        masks.append(m[None])
    has_mask = torch.tensor([e.mask is not None for e in examples])
    masks = masks if bool(has_mask.any()) else None
    captions = [e.caption for e in examples]
    geometry = torch.tensor([crop_geometry(*e.image.shape[:2], size) for e, size in zip(examples, sizes)])
    if vae is None:
        return PreparedData(pixels, None, None, masks, has_mask, captions, sizes, geometry)
    latents, flipped = [], []
    sf = vae.config.scaling_factor
    with torch.no_grad():
        for px in pixels:
            px = px[None].to(device, vae.dtype)  # (fp32 for an fp16 run: ModelBundle.to)
            # the posterior mean, not a sample: cached latents are then exactly reproducible
            latents.append((vae.encode(px).latent_dist.mean * sf)[0].float().cpu())
            if flip:
                flipped.append((vae.encode(px.flip(-1)).latent_dist.mean * sf)[0].float().cpu())
            if progress is not None:
                progress.update()
    return PreparedData(None, latents, flipped if flip else None, masks, has_mask, captions, sizes, geometry)
