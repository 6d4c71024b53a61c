"""R-Aug's parts of each cut-out: proposed (SAM) and labelled (CLIP), cached per concept."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ... import host
from ...files import atomic_save_image, atomic_write_json, safe_name
from ...vision.regions import iou
from .cutout import Piece, cutout


# (image [H,W,3] float 0..1 with a neutral background, mask [H,W] 0..1) -> region masks [H,W]
RegionProposer = Callable[[torch.Tensor, torch.Tensor], list]


# (crops [h,w,3] float 0..1, vocabulary) -> one (label, score) per crop
Labeller = Callable[[list, list], list]


# ------------------------------------------------------------------ regions (R-Aug)
@dataclass
class RegionSet:
    """Labelled sub-regions of one concept's intact cut-outs."""

    token: str
    pieces: list[Piece]
    notes: list[str] = field(default_factory=list)


def _neutral(cut: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """An intact cut-out as (image on neutral gray, mask) tensors."""
    arr = np.asarray(cut).astype(np.float32) / 255.0
    alpha = arr[..., 3:4]
    rgb = arr[..., :3] * alpha + 0.5 * (1 - alpha)
    return torch.from_numpy(np.ascontiguousarray(rgb)), torch.from_numpy(np.ascontiguousarray(alpha[..., 0]))


def find_regions(token: str, cutouts: list[tuple[int, Image.Image]], proposer: RegionProposer, labeller: Labeller,
                 vocabulary: list[str], *, min_regions: int = 3, max_regions: int = 10, min_part: float = 0.02,
                 max_part: float = 0.7, dedupe_iou: float = 0.8) -> RegionSet:
    """Over-segment each intact cut-out, keep parts of `min_part`..`max_part` of the concept
    (largest first, near-duplicates dropped), label them, merge parts of one photo that got the
    same label, and keep at most `max_regions` per concept (the most confident label of each
    word first, so the words vary)."""
    candidates = []  # (score, photo, label, mask, cut)
    for photo, cut in cutouts:
        host.check_cancel()
        rgb, alpha = _neutral(cut)
        inside = alpha.numpy() >= 0.5
        area = inside.sum()
        props = []
        for m in proposer(rgb, alpha) or []:
            mb = (np.asarray(m.detach().float().cpu() if isinstance(m, torch.Tensor) else m, dtype=np.float32)
                  >= 0.5) & inside
            if mb.shape != inside.shape:
                continue
            frac = mb.sum() / max(area, 1)
            if not (min_part <= frac <= max_part):
                continue
            if any(iou(mb, p) > dedupe_iou for p in props):
                continue
            props.append(mb)
        props.sort(key=lambda p: -int(p.sum()))
        props = props[:max_regions * 2]
        if not props:
            continue
        crops = []
        for mb in props:
            ys, xs = np.nonzero(mb)
            box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
            crop = torch.where(torch.from_numpy(mb[box])[..., None], rgb[box], torch.full_like(rgb[box], 0.5))
            crops.append(crop)
        labels = labeller(crops, vocabulary)
        merged: dict[str, tuple[float, np.ndarray]] = {}
        for mb, (label, score) in zip(props, labels):
            if label is None or label not in vocabulary:
                continue
            prev = merged.get(label)
            merged[label] = (max(score, prev[0]), mb | prev[1]) if prev else (float(score), mb)
        for label, (score, mb) in merged.items():
            candidates.append((score, photo, label, mb, cut))
    # most confident first, one of each word before a second of any word
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    chosen_idx: list[int] = []
    seen: dict[str, int] = {}
    for rnd in range(max_regions):
        for k, c in enumerate(candidates):
            if len(chosen_idx) >= max_regions:
                break
            if seen.get(c[2], 0) == rnd and k not in chosen_idx:
                chosen_idx.append(k)
                seen[c[2]] = rnd + 1
    chosen = [candidates[k] for k in chosen_idx]
    notes = []
    if len(chosen) < min_regions:
        notes.append(f"{token}: only {len(chosen)} labelled regions found (wanted at least {min_regions})")
    pieces = []
    for score, photo, label, mb, cut in sorted(chosen, key=lambda c: (c[1], c[2])):
        arr = np.asarray(cut)
        p = cutout(arr[..., :3], mb)
        name = f"{token}'s {label}"
        pieces.append(Piece(p, name, name, token, f"{token}/{photo:03d}#{label}@{score:.3f}"))
    return RegionSet(token, pieces, notes)


def _save_regions(folder: Path, regions: dict[str, RegionSet]) -> None:
    entries = []
    for token, rs in regions.items():
        sub = safe_name(token.strip("<>") or "concept")
        for k, p in enumerate(rs.pieces):
            rel = f"regions/{sub}/{k:02d}.png"
            atomic_save_image(folder / rel, p.image, compress_level=1)
            entries.append({"token": token, "label": p.label, "from": p.origin, "image": rel})
    notes = [n for rs in regions.values() for n in rs.notes]
    atomic_write_json(folder / "regions.json", {"regions": entries, "notes": notes})


def _load_regions(folder: Path) -> dict[str, RegionSet] | None:
    path = folder / "regions.json"
    if not path.is_file():
        return None
    meta = json.loads(path.read_text("utf-8"))
    out: dict[str, RegionSet] = {}
    for e in meta["regions"]:
        with Image.open(folder / e["image"]) as im:
            img = im.convert("RGBA")
        out.setdefault(e["token"], RegionSet(e["token"], [])).pieces.append(
            Piece(img, e["label"], e["label"], e["token"], e["from"]))
    for n in meta.get("notes", []):
        tok = n.split(":", 1)[0]
        out.setdefault(tok, RegionSet(tok, [])).notes.append(n)
    return out
