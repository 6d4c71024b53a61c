"""Training examples from a concept set (or an augmented dataset): images, captions, masks,
prepared at the training resolution and, optionally, cached as VAE latents."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .concepts import ConceptSet
from .errors import UnconfusedError

DEFAULT_TEMPLATE = "a photo of {token} {class_word}"


@dataclass
class Example:
    image: torch.Tensor  # [H, W, 3] in 0..1
    caption: str
    mask: torch.Tensor | None  # [H, W] in 0..1: the union of the concepts in the image
    tokens: list[str]


def examples_from_concept_set(cs: ConceptSet, captions: str = "auto", template: str = DEFAULT_TEMPLATE, *,
                              node: str | None = None) -> list[Example]:
    """One example per reference photo. captions: 'auto' uses the concept's own captions
    (e.g. SID) where present and the template elsewhere; 'template' always the template."""
    out = []
    for c in cs.concepts:
        for i, img in enumerate(c.images):
            cap = c.captions[i] if (captions == "auto" and c.captions) else template.format(
                token=c.token, class_word=c.class_word)
            if c.token not in cap:
                raise UnconfusedError(f"caption {i} of {c.token} does not contain the token: {cap!r}; fix the "
                                      "caption or use template captions", node=node, input="captions")
            out.append(Example(img, cap, c.masks[i] if c.masks is not None else None, [c.token]))
    if not out:
        raise UnconfusedError("the concept set has no images", node=node, input="concept_set")
    return out


def crop_geometry(h: int, w: int, resolution: int) -> tuple[int, int, int, int]:
    """(original height, original width, crop top, crop left) of `fit_square` on an h x w image, the
    crop in pixels of the resized image: SDXL's size/crop conditioning (engine/families.py)."""
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    return h, w, (nh - resolution) // 2, (nw - resolution) // 2


def fit_square(t: torch.Tensor, resolution: int, mode: str = "bilinear") -> torch.Tensor:
    """[C,H,W] -> [C,R,R]: shorter side to R, then centre crop (what the trainers see)."""
    c, h, w = t.shape
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    kw = {"antialias": True, "align_corners": False} if mode == "bilinear" else {}
    t = F.interpolate(t[None].float(), size=(nh, nw), mode=mode, **kw)[0]
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return t[:, top:top + resolution, left:left + resolution]


@dataclass
class PreparedData:
    """Everything the loop draws batches from; latents cached when a VAE was given."""

    pixels: torch.Tensor | None  # [N,3,R,R] in -1..1 (when not cached)
    latents: torch.Tensor | None  # [N,4,r,r] (cached), [N] flipped copies in latents_flipped
    latents_flipped: torch.Tensor | None
    masks: torch.Tensor | None  # [N,1,R,R] pixel masks (1 where no mask was given)
    has_mask: torch.Tensor  # [N] bool
    captions: list[str]
    sizes: torch.Tensor | None = None  # [N, 4] original h, w, crop top, left (crop_geometry)

    def __len__(self) -> int:
        return len(self.captions)


def prepare(examples: list[Example], resolution: int, *, vae=None, flip: bool = True, device="cpu",
            dtype=torch.float32, progress=None) -> PreparedData:
    pixels = torch.stack([fit_square(e.image.permute(2, 0, 1), resolution) * 2 - 1 for e in examples])
    has_mask = torch.tensor([e.mask is not None for e in examples])
    masks = None
    if bool(has_mask.any()):
        masks = torch.stack([fit_square((e.mask if e.mask is not None else torch.ones(e.image.shape[:2]))[None],
                                        resolution) for e in examples]).clamp(0, 1)
    captions = [e.caption for e in examples]
    sizes = torch.tensor([crop_geometry(*e.image.shape[:2], resolution) for e in examples])
    if vae is None:
        return PreparedData(pixels, None, None, masks, has_mask, captions, sizes)
    latents, flipped = [], []
    sf = vae.config.scaling_factor
    with torch.no_grad():
        for i in range(len(examples)):
            px = pixels[i:i + 1].to(device, vae.dtype)  # (fp32 for an fp16 run: ModelBundle.to)
            # the posterior mean, not a sample: cached latents are then exactly reproducible
            latents.append((vae.encode(px).latent_dist.mean * sf).float().cpu())
            if flip:
                flipped.append((vae.encode(px.flip(-1)).latent_dist.mean * sf).float().cpu())
            if progress is not None:
                progress.update()
    return PreparedData(None, torch.cat(latents), torch.cat(flipped) if flip else None, masks, has_mask, captions,
                        sizes)
