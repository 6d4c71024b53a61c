"""Concept cut-outs: a concept's photo and mask as a piece on a plain or whole-image matte."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..concepts import ConceptSet
from ...errors import UnconfusedError


NODE = "UnconfusedAugmentBuilder"


MATTES = ["plain background", "whole image"]


# ------------------------------------------------------------------ pieces (cut-outs)
@dataclass
class Piece:
    """One element to paste: an RGBA image cropped to its mask (alpha 0 or 255)."""

    image: Image.Image
    label: str  # the mask key in the record: a token, "<alice>'s hair", "policeman"
    phrase: str  # how the caption names it
    token: str | None  # the concept token, when the piece belongs to a concept
    origin: str  # provenance: "<alice>/003", "<alice>/003#hair", "bank:policeman/1a2b..."


def _binary(mask: np.ndarray) -> np.ndarray:
    return (mask >= 0.5) if mask.dtype != np.uint8 else (mask >= 128)


def cutout(image: np.ndarray, mask: np.ndarray, max_side: int | None = None) -> Image.Image | None:
    """An RGBA crop of `image` (uint8 HxWx3) to the box of `mask` (bool HxW), alpha = mask,
    downscaled so its longer side is at most `max_side`. None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    rgba = np.dstack([image[y0:y1, x0:x1], np.where(mask[y0:y1, x0:x1], 255, 0).astype(np.uint8)])
    im = Image.fromarray(np.ascontiguousarray(rgba), "RGBA")
    if max_side and max(im.size) > max_side:
        s = max_side / max(im.size)
        im = _resize_binary(im, (max(1, round(im.width * s)), max(1, round(im.height * s))))
    return im


def _resize_binary(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize an RGBA cut-out without colour bleeding from its transparent part (premultiplied
    alpha), then make the alpha binary again (>= 128 kept)."""
    out = im.convert("RGBa").resize(size, Image.Resampling.LANCZOS).convert("RGBA")
    out.putalpha(out.getchannel("A").point(lambda v: 255 if v >= 128 else 0))
    return out


def _uint8(img: torch.Tensor) -> np.ndarray:
    return (img.detach().float().cpu().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)


def concept_cutouts(concept_set: ConceptSet, *, min_area: float, max_side: int,
                    input: str = "concept_set") -> dict[str, list[tuple[int, Image.Image]]]:
    """token -> [(photo index, RGBA cut-out)] for every photo whose mask covers at least
    `min_area` of it. A concept with no masks, or none large enough, is refused with the fix."""
    out: dict[str, list[tuple[int, Image.Image]]] = {}
    for c in concept_set.concepts:
        if c.masks is None:
            raise UnconfusedError(f"concept {c.token} has no masks, so it cannot be cut out of its photos; put the "
                                  "Concept Cut-out SAM+CLIP node (Unconfused/masks) after its Concept node, or give "
                                  "masks on the Concept node", input=input)
        found = []
        for i, (img, m) in enumerate(zip(c.images, c.masks)):
            mb = m.detach().float().cpu().numpy() >= 0.5
            if mb.mean() < min_area:
                continue
            piece = cutout(_uint8(img), mb, max_side)
            if piece is not None:
                found.append((i, piece))
        if not found:
            best = max(float((m >= 0.5).float().mean()) for m in c.masks)
            raise UnconfusedError(f"no mask of {c.token} covers at least {min_area:.0%} of its photo (the largest "
                                  f"covers {best:.1%}): there is no usable cut-out. Check this concept's masks (the "
                                  "Concept Cut-out SAM+CLIP node's preview), give masks, or lower min_area", input=input)
        out[c.token] = found
    return out


def cutout_notes(concept_set: ConceptSet, cutouts: dict[str, list]) -> list[str]:
    notes = []
    for c in concept_set.concepts:
        n = len(cutouts.get(c.token, []))
        if n < len(c.images):
            notes.append(f"{c.token}: {len(c.images) - n} of {len(c.images)} photos have no usable cut-out (mask under "
                         "min_area) and are not used")
    return notes


# ------------------------------------------------------------------ plain-background matte
def _background_basis(ys: np.ndarray, xs: np.ndarray, h: int, w: int) -> np.ndarray:
    y = ys / max(h - 1, 1) * 2 - 1
    x = xs / max(w - 1, 1) * 2 - 1
    return np.stack([np.ones_like(x), x, y, x * y, x * x, y * y], axis=-1)


def matte_plain_background(image: np.ndarray, *, border: float = 0.04, tolerance: int = 28
                           ) -> np.ndarray | None:
    """The foreground of an image of one thing on a plain background (what the bank prompts ask
    for). The background is a smooth colour field (a quadratic in x and y per channel, so studio
    gradients and vignettes count as plain) fitted to the image border, robustly: border pixels
    of a thing that touches the edge are left out of the fit. Foreground = pixels that differ
    from that field, cleaned (opening, small components dropped, holes filled). None when the
    image has no plain background (under 60% of the border fits, or the foreground is under 2%
    or over 90% of the image)."""
    from scipy import ndimage

    h, w = image.shape[:2]
    b = max(1, round(min(h, w) * border))
    ring = np.zeros((h, w), bool)
    ring[:b] = ring[-b:] = True
    ring[:, :b] = ring[:, -b:] = True
    ys, xs = np.nonzero(ring)
    img = image.astype(np.float32)
    vals = img[ys, xs]
    basis = _background_basis(ys.astype(np.float32), xs.astype(np.float32), h, w)
    # start from the median colour (robust to a thing touching the edge), then refine the field
    use = np.abs(vals - np.median(vals, axis=0)).max(axis=1) <= 3 * tolerance
    coef = None
    for _ in range(4):
        if use.mean() < 0.6:
            return None  # the border itself is not plain
        coef = np.linalg.lstsq(basis[use], vals[use], rcond=None)[0]
        resid = np.abs(basis @ coef - vals).max(axis=1)
        new = resid <= tolerance
        if (new == use).all():
            break
        use = new
    if use.mean() < 0.6:
        return None
    tol = max(tolerance, float(np.percentile(resid[use], 95)) + 8)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    field = _background_basis(yy, xx, h, w) @ coef
    fg = np.abs(img - field).max(axis=2) > tol
    fg = ndimage.binary_opening(fg, iterations=1)
    labels, n = ndimage.label(fg)
    if n == 0:
        return None
    sizes = ndimage.sum(fg, labels, index=np.arange(1, n + 1))
    keep = np.flatnonzero(sizes >= 0.1 * sizes.max()) + 1
    fg = ndimage.binary_fill_holes(np.isin(labels, keep))
    frac = float(fg.mean())
    if frac < 0.02 or frac > 0.9:
        return None
    return fg
