"""DenseCRF mask refinement (pydensecrf), with CutLER's settings as defaults.

Several labels compete in one CRF: label 0 is the background (implied), labels 1..L are the given
masks. The unary follows CutLER (maskcut/crf.py): logits [1 - m, m] -> softmax, generalised to many
labels as logits [1 - max_i m_i, m_1, ..., m_L] * unary_scale (1.0 = CutLER: soft, so edges can move).

Masks at another resolution than the image (16x16 / 64x64 attention maps) are upsampled bilinearly
first (`work_at="image"`), or the image is downsampled to the masks (`work_at="mask"`, what the
mask-EM trainer uses on latent-resolution masks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import host
from ..errors import UnconfusedError

NODE = "UnconfusedCRFRefine"


@dataclass
class CRFSettings:
    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 7.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0
    unary_scale: float = 1.0  # logit scale of the unary; 1 = CutLER
    output: str = "binary"  # binary (argmax, as CutLER) | soft (the CRF's marginal probability)

    def validate(self) -> "CRFSettings":
        if self.iterations < 1:
            raise UnconfusedError("iterations must be at least 1", input="iterations")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if getattr(self, name) <= 0:
                raise UnconfusedError(f"{name} must be above 0", input=name)
        for name in ("gaussian_compat", "bilateral_compat"):
            if getattr(self, name) < 0:
                raise UnconfusedError(f"{name} must be 0 or more", input=name)
        if self.unary_scale <= 0:
            raise UnconfusedError("unary_scale must be above 0", input="unary_scale")
        if self.output not in ("binary", "soft"):
            raise UnconfusedError("output is 'binary' or 'soft'", input="output")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def _image_uint8(image: torch.Tensor, *, input: str) -> np.ndarray:
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        raise UnconfusedError(f"expected one image [H, W, C], got {getattr(image, 'shape', type(image).__name__)}", input=input)
    c = image.shape[-1]
    if c == 1:
        image = image.expand(-1, -1, 3)
    elif c == 4:
        image = image[..., :3]
    elif c != 3:
        raise UnconfusedError(f"the image has {c} channels; give an RGB image (grayscale and RGBA are converted)", input=input)
    arr = (image.detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return np.ascontiguousarray(arr)


def check_masks(masks: torch.Tensor, *, input: str = "masks", index: int | None = None) -> None:
    """An all-zero or all-one mask gives the CRF nothing to refine: say so instead of returning it."""
    where = f" (image {index})" if index is not None else ""
    for k, m in enumerate(masks):
        lbl = f"mask {k + 1}{where}"
        if not torch.isfinite(m).all():
            raise UnconfusedError(f"{lbl} has NaN or infinite values", input=input)
        if float(m.max()) <= 1e-6:
            raise UnconfusedError(f"{lbl} is all zero (empty): there is no object to refine; check the mask "
                                  "source or drop this label", input=input)
        if float(m.min()) >= 1 - 1e-6:
            raise UnconfusedError(f"{lbl} is all one (covers the whole image): there is no edge to refine; "
                                  "give a mask with background", input=input)


def refine(image: torch.Tensor, masks: torch.Tensor, settings: CRFSettings | None = None, *, work_at: str = "image", image_input: str = "image", mask_input: str = "masks",
           on_degenerate: str = "error") -> torch.Tensor:
    """Refine L masks of one image together. image [H,W,3] float 0..1 (1/4 channels converted);
    masks [L,h,w] (or [h,w]) soft or binary in 0..1 at any resolution. Returns [L,H,W] at the image's
    size (`work_at="image"`) or [L,h,w] at the masks' size (`work_at="mask"`).

    on_degenerate: "error" (all-zero / all-one masks raise) or "keep" (they are returned unchanged;
    the trainer's choice for maps that are still flat)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    s = (settings or CRFSettings()).validate()
    if not isinstance(masks, torch.Tensor):
        raise UnconfusedError(f"expected masks as a tensor, got {type(masks).__name__}", input=mask_input)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or masks.shape[0] == 0:
        raise UnconfusedError(f"expected masks [labels, H, W], got shape {tuple(masks.shape)}",
                              input=mask_input)
    masks = masks.detach().float().cpu()
    if on_degenerate == "keep":
        flat = [(float(m.max()) <= 1e-6 or float(m.min()) >= 1 - 1e-6) for m in masks]
        if any(flat):
            ok = [k for k, f in enumerate(flat) if not f]
            size = tuple(masks.shape[1:]) if work_at == "mask" else tuple(image.shape[:2])
            out = F.interpolate(masks[None], size=size, mode="bilinear", align_corners=False)[0].clamp(0, 1)
            if ok:
                out[ok] = refine(image, masks[ok], s, work_at=work_at, image_input=image_input,
                                 mask_input=mask_input)
            return out
    else:
        check_masks(masks, input=mask_input)
    masks = masks.clamp(0, 1)
    img = image
    if work_at == "mask":
        h, w = masks.shape[1:]
        if tuple(image.shape[:2]) != (h, w):
            img = F.interpolate(image.detach().float().cpu().permute(2, 0, 1)[None], size=(h, w), mode="bilinear",
                                antialias=True, align_corners=False)[0].permute(1, 2, 0)
    elif work_at == "image":
        h, w = image.shape[:2]
        if tuple(masks.shape[1:]) != (h, w):
            masks = F.interpolate(masks[None], size=(h, w), mode="bilinear", align_corners=False)[0].clamp(0, 1)
    else:
        raise UnconfusedError("work_at is 'image' or 'mask'", input="work_at")
    rgb = _image_uint8(img, input=image_input)
    bg = 1 - masks.max(dim=0).values
    logits = torch.cat([bg[None], masks], dim=0) * s.unary_scale
    probs = logits.softmax(dim=0).numpy().astype(np.float32)
    n = probs.shape[0]
    d = dcrf.DenseCRF2D(w, h, n)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=s.gaussian_sxy, compat=s.gaussian_compat)
    d.addPairwiseBilateral(sxy=s.bilateral_sxy, srgb=s.bilateral_srgb, rgbim=rgb, compat=s.bilateral_compat)
    q = np.array(d.inference(s.iterations), dtype=np.float32).reshape(n, h, w)
    if s.output == "soft":
        return torch.from_numpy(q[1:].copy())
    label = q.argmax(axis=0)
    return torch.from_numpy(np.stack([(label == k).astype(np.float32) for k in range(1, n)]))


def refine_batch(images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], settings: CRFSettings | None = None,
                 *, work_at: str = "image", image_input: str = "image", mask_input: str = "masks",
                 on_degenerate: str = "error", progress: bool = True) -> list[torch.Tensor]:
    """`refine` image by image (masks[i] is [L,h,w] for images[i]), with progress and cancel."""
    if len(images) != len(masks):
        raise UnconfusedError(f"{len(masks)} mask sets for {len(images)} images; give one mask (per label) for every "
                              "image, or a single mask for all", input=mask_input)
    out = []
    bar = host.progress(len(images), "DenseCRF") if progress else None
    try:
        for i, (img, m) in enumerate(zip(images, masks)):
            try:
                out.append(refine(img, m, settings, work_at=work_at, image_input=image_input,
                                  mask_input=mask_input, on_degenerate=on_degenerate))
            except UnconfusedError as e:
                if len(images) > 1:
                    msg = str(e).split("': ", 1)[-1] if e.node and e.input else str(e)
                    raise UnconfusedError(f"image {i}: {msg}", node=e.node, input=e.input) from None
                raise
            if bar is not None:
                bar.update(1)
            else:
                host.check_cancel()
    finally:
        if bar is not None:
            bar.close()
    return out


def refine_latent_masks(image: torch.Tensor, masks: torch.Tensor, settings: CRFSettings | None = None,
                        **kw) -> torch.Tensor:
    """The mask-EM trainer's call: masks [L,h,w] at latent resolution, refined at that resolution against
    the image downsampled to it; flat maps are passed through."""
    kw.setdefault("on_degenerate", "keep")
    return refine(image, masks, settings, work_at="mask", **kw)
