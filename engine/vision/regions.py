"""Regions as data between the masks stage and CLIF's R-Aug: the overlap of two masks (IoU), CLIP's
label for each SAM region, and the proposer/labeller pair the augmentation builder takes."""

from __future__ import annotations

import numpy as np
import torch

from . import clip_zero_shot as CL
from . import sam as S
from ..errors import UnconfusedError


def iou(a, b, threshold: float = 0.5) -> float:
    """Intersection over union of two masks of one size (tensors or arrays, binarised at `threshold`);
    two empty masks agree (1.0)."""
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).float() > threshold
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).float() > threshold
    union = float((a | b).sum())
    return float((a & b).sum()) / union if union else 1.0


def label_regions(clip_model: CL.ClipScorer, images: list[torch.Tensor], regions: S.Regions, vocabulary: list[str]) -> S.Regions:
    """Each region gets the vocabulary word CLIP scores highest for its crop (CLIF R-Aug step 1)."""
    vocab = CL.clean_vocabulary(vocabulary)
    if len(regions.image_sizes) != len(images):
        raise UnconfusedError(f"the regions were made from {len(regions.image_sizes)} images but {len(images)} are "
                              "connected; connect the images the Segment node saw", input="images")
    for i, img in enumerate(images):
        if tuple(img.shape[:2]) != tuple(regions.image_sizes[i]):
            raise UnconfusedError(f"image {i} is {img.shape[1]}x{img.shape[0]} but its regions are "
                                  f"{regions.image_sizes[i][1]}x{regions.image_sizes[i][0]}", input="images")
    crops = [S.region_crop(images[r.image_index], r.mask) for r in regions.regions]
    labels = clip_model.label_regions(crops, vocab) if crops else []
    out = [S.Region(r.mask, r.box, r.score, r.image_index, label=w, label_score=p, stability=r.stability)
           for r, (w, p) in zip(regions.regions, labels)]
    return S.Regions(out, list(regions.image_sizes), list(regions.notes))
def region_tools(sam_model, clip_model, **sam_settings):
    """R-Aug's region proposer (SAM automatic mode: the model's `propose_regions`) and labeller (CLIP
    zero-shot: the model's `label_regions`), as the plain functions `engine.data.augment` takes:
    proposer(image [H,W,3], mask [H,W]) -> masks; labeller(crops, words) -> [(word, score)].
    engine.vision.sam.SamModel and engine.vision.clip_zero_shot.ClipScorer have both; any object with them will do."""
    propose = getattr(sam_model, "propose_regions", None)
    label = getattr(clip_model, "label_regions", None)
    if not callable(propose) or not callable(label):
        what = "automatic region proposal (SAM)" if not callable(propose) else "region labelling (CLIP)"
        raise UnconfusedError(f"this model has no {what} for R-Aug; connect the SAM Loader and CLIP Scorer Loader "
                              "(Unconfused/masks), or set region_pairs to 0",
                              input="sam_model" if not callable(propose) else "clip_model")

    def proposer(rgb, mask):
        return propose(rgb, mask, **sam_settings)

    def labeller(crops, vocabulary):
        out = label(crops, vocabulary)
        return [(o[0], float(o[1])) if isinstance(o, (tuple, list)) else (o, 1.0) for o in out]

    return proposer, labeller
