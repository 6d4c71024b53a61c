"""Aspect-ratio buckets for training (as kohya's and OneTrainer's trainers do).

A photo is not centre-cropped to a square: it trains at the bucket (a width x height of about
the target area, both multiples of `step`) whose aspect ratio is nearest its own, resized to
cover the bucket and centre-cropped by what little is left over. Its mask follows it through
the same resize and crop, so mask and photo stay pixel-aligned.

Pure tensor functions (no model, no ComfyUI): the trainers group examples by bucket and draw
each batch from one bucket.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bucket_sizes(resolution: int = 512, step: int = 64, max_ratio: float = 2.0, min_side: int | None = None,
                 max_side: int | None = None) -> list[tuple[int, int]]:
    """Every (width, height), both multiples of `step`, with width x height <= resolution**2 and as
    large as the step allows, aspect ratio at most `max_ratio` either way; sorted by aspect ratio
    (tall to wide). The square resolution x resolution is always one of them."""
    if resolution < step or resolution % step:
        raise ValueError(f"resolution {resolution} must be a multiple of the step {step}")
    if max_ratio < 1:
        raise ValueError("max_ratio must be at least 1")
    area = resolution * resolution
    min_side = min_side or step
    max_side = max_side or (int(resolution * math.sqrt(max_ratio)) // step * step)
    out = set()
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, area // w // step * step)
        if h < min_side or max(w / h, h / w) > max_ratio + 1e-9:
            continue
        out.add((w, h))
        out.add((h, w))
    return sorted(out, key=lambda wh: (wh[0] / wh[1], wh[0]))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the photo's (in log ratio, so 2:1 and 1:2 are
    equally far from 1:1); of equally near ones, the largest."""
    if not buckets:
        raise ValueError("no buckets")
    if width < 1 or height < 1:
        raise ValueError(f"an image of {width}x{height} has no aspect ratio")
    target = math.log(width / height)
    return min(buckets, key=lambda wh: (round(abs(math.log(wh[0] / wh[1]) - target), 9), -wh[0] * wh[1]))


def fit_to_bucket(image: torch.Tensor, mask: torch.Tensor | None, bucket: tuple[int, int]
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """image [H,W,3] (and mask [H,W]) -> [bh,bw,3] (and [bh,bw]): scaled to cover the bucket,
    then centre-cropped; the mask takes exactly the same resize and crop."""
    bw, bh = bucket
    h, w = image.shape[:2]
    if mask is not None and tuple(mask.shape[-2:]) != (h, w):
        raise ValueError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but its image is {w}x{h}")
    scale = max(bw / w, bh / h)
    nh, nw = max(bh, round(h * scale)), max(bw, round(w * scale))
    top, left = (nh - bh) // 2, (nw - bw) // 2

    def fit(t: torch.Tensor) -> torch.Tensor:  # [C,H,W]
        t = F.interpolate(t[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
        return t[:, top:top + bh, left:left + bw]

    img = fit(image.permute(2, 0, 1)).permute(1, 2, 0).clamp(0, 1)
    return img, (fit(mask[None])[0].clamp(0, 1) if mask is not None else None)


def assign_buckets(sizes: list[tuple[int, int]], resolution: int = 512, step: int = 64,
                   max_ratio: float = 2.0) -> tuple[list[tuple[int, int]], dict[tuple[int, int], list[int]]]:
    """For photos of (width, height): each photo's bucket, and bucket -> indices of its photos."""
    buckets = bucket_sizes(resolution, step, max_ratio)
    chosen = [nearest_bucket(w, h, buckets) for w, h in sizes]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(chosen):
        groups.setdefault(b, []).append(i)
    return chosen, groups


def unfit_from_bucket(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `fit_to_bucket` for a mask [bh,bw] (at the bucket's size): back onto the
    original [height,width] photo; what the crop cut off is 0."""
    bh, bw = mask.shape[-2:]
    scale = max(bw / width, bh / height)
    nh, nw = max(bh, round(height * scale)), max(bw, round(width * scale))
    canvas = torch.zeros(nh, nw)
    top, left = (nh - bh) // 2, (nw - bw) // 2
    canvas[top:top + bh, left:left + bw] = mask.float().cpu()
    return F.interpolate(canvas[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
