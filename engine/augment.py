"""CLIF's augmentation builder (paper section 4.1, appendix A.1.1): a few photos per concept
become many image-text pairs, streamed into the dataset format of `engine/dataset.py`.

- G-Aug (`global`): a concept's cut-out next to 1..k common concepts from the bank, on a plain
  canvas at random positions and scales - "a photo of <alice> and a policeman".
- R-Aug (`region`): sub-regions of the intact cut-out (over-segmented, e.g. by SAM automatic
  mode), labelled against a vocabulary (e.g. by the CLIP labeller), composed with common
  concepts - "a photo of <alice>'s hair and a straw hat".
- M-Aug (`mix`): two concepts left and right at random scales - "a photo of <alice> and <bob>";
  every pair of concepts appears `mix_per_pair` times.

Every pair is made from (seed, kind, index) alone, so a rerun after Cancel (or a crash, or a
full disk) continues where it stopped and the result equals an uninterrupted run. Elements
are pasted with a binary alpha, and each element's mask is its visible pixels, so a mask
covers exactly the pixels of its element. Nothing accumulates in memory per pair.

The common-concept bank is either generated with the loaded base model (each image cached on
disk under a key of model, prompt and seed, so a rerun makes only the missing ones) or read
from a folder. Bank images are cut out of their plain background (`matte_plain_background`).

Region proposal and labelling are passed in as functions (`RegionProposer`, `Labeller`), so
the engine does not depend on a particular segmenter; the node wires SAM and CLIP in.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
import zlib
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageChops

from . import host
from .common_concepts import BACKGROUND_COLORS, BANK_PROMPT, COMMON_CONCEPTS, REGION_VOCABULARY, label_of, \
    phrase_of
from .concepts import IMAGE_SUFFIXES, ConceptSet, tensor_to_pil
from .dataset import Dataset, DatasetWriter, read_records
from .errors import UnconfusedError
from .files import atomic_save_image, atomic_write_json, safe_name
from .regions import iou

NODE = "UnconfusedAugmentBuilder"
MATTES = ["plain background", "whole image"]
DEFAULT_TEMPLATES = ["a photo of {}", "a picture of {}", "an image of {}", "a photo showing {}",
                     "a cropped photo of {}", "a bright photo of {}", "a rendering of {}", "{}"]
BANK_FORMAT = "unconfused.bank/1"

# (image [H,W,3] float 0..1 with a neutral background, mask [H,W] 0..1) -> region masks [H,W]
RegionProposer = Callable[[torch.Tensor, torch.Tensor], list]
# (crops [h,w,3] float 0..1, vocabulary) -> one (label, score) per crop
Labeller = Callable[[list, list], list]


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


# ------------------------------------------------------------------ the common-concept bank
@dataclass
class BankItem:
    label: str
    phrase: str
    image: Path
    mask: Path | None  # a given mask; None = matte from the plain background
    key: str  # stable identity (goes into the dataset's settings)


class Bank:
    """Common-concept images with their cut-outs. Only the list is held; images are read on
    demand through a small cache, so the bank's size does not matter for memory."""

    def __init__(self, items: list[BankItem], *, kind: str, matte: str = "plain background",
                 cache_dir: Path | None = None, max_side: int = 512, input: str = "bank_folder"):
        if matte not in MATTES:
            raise UnconfusedError(f"unknown matte {matte!r}; use one of {MATTES}", input="bank_matte")
        self.kind = kind
        self.matte = matte
        self.cache_dir = cache_dir
        self.max_side = max_side
        self.input = input
        self.items = list(items)
        self.skipped: list[str] = []
        self._cache: OrderedDict[int, Piece] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        h = hashlib.sha1(f"{self.kind}|{self.matte}|{self.max_side}".encode())
        for it in self.items:
            h.update(f"|{it.label}|{it.key}".encode())
        return h.hexdigest()[:16]

    def _mask_path(self, item: BankItem) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / "mattes" / f"{item.key}.png"

    def _mask(self, item: BankItem, rgb: np.ndarray | None = None) -> np.ndarray | None:
        """The item's cut-out mask (`rgb` is read when needed and not given)."""
        if item.mask is not None:
            with Image.open(item.mask) as m:
                m = m.convert("L")
                size = (rgb.shape[1], rgb.shape[0]) if rgb is not None else _image_size(item.image)
                if m.size != size:
                    m = m.resize(size, Image.Resampling.NEAREST)
                return np.asarray(m) >= 128
        if self.matte == "whole image":
            w, h = _image_size(item.image) if rgb is None else (rgb.shape[1], rgb.shape[0])
            return np.ones((h, w), dtype=bool)
        cached = self._mask_path(item)
        if cached is not None and cached.is_file():
            with Image.open(cached) as m:
                arr = np.asarray(m.convert("L"))
            return None if arr.max() == 0 and arr.shape == (1, 1) else arr >= 128
        fg = matte_plain_background(rgb if rgb is not None else self._read(item))
        if cached is not None:  # remember the result, including "no plain background" (a 1x1 black file)
            atomic_save_image(cached, Image.fromarray((fg * 255).astype(np.uint8)) if fg is not None
                              else Image.new("L", (1, 1), 0), compress_level=1)
        return fg

    def _read(self, item: BankItem) -> np.ndarray:
        try:
            with Image.open(item.image) as im:
                return np.asarray(im.convert("RGB"))
        except Exception as e:  # PIL raises many types for damaged files
            raise UnconfusedError(f"cannot read the bank image {item.image}: {e}",
                                  input=self.input) from e

    def prepare(self) -> None:
        """Cut out every item once (cached on disk when a cache folder is known) and drop those
        without a plain background; refuse a bank with nothing usable."""
        def usable(it: BankItem) -> bool:
            try:
                return self._mask(it) is not None
            except UnconfusedError:
                raise
            except Exception as e:  # PIL raises many types for damaged files
                raise UnconfusedError(f"cannot read the bank image {it.image} or its mask: {e}",
                                      input=self.input) from e

        bar = host.progress(len(self.items), "cutting out common concepts")
        kept = []
        workers = max(1, min(os.cpu_count() or 1, 8))
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="unconfused-matte") as pool:
                # in windows, so Cancel is seen between them and never waits for the whole bank
                for start in range(0, len(self.items), 4 * workers):
                    chunk = self.items[start:start + 4 * workers]
                    for it, ok in zip(chunk, pool.map(host.in_context(usable), chunk)):
                        if ok:
                            kept.append(it)
                        else:
                            self.skipped.append(str(it.image))
                    bar.update(len(chunk))
        finally:
            bar.close()
        if not kept:
            raise UnconfusedError(f"none of the {len(self.items)} common-concept images could be cut out (no plain "
                                  "background found); use images of single things on a plain background, give masks "
                                  "in a masks/ folder, or set bank_matte to 'whole image'",
                                  input=self.input)
        self.items = kept

    def piece(self, i: int) -> Piece:
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
        it = self.items[i]
        rgb = self._read(it)
        mask = self._mask(it, rgb)
        if mask is None:
            raise UnconfusedError(f"the bank image {it.image} changed since the bank was prepared; run again", input=self.input)
        p = Piece(cutout(rgb, mask, self.max_side), it.label, it.phrase, None, f"bank:{it.label}/{it.key}")
        with self._lock:
            self._cache[i] = p
            if len(self._cache) > 64:
                self._cache.popitem(last=False)
        return p

    def describe(self) -> str:
        labels = sorted({it.label for it in self.items})
        s = f"{len(self.items)} common-concept images of {len(labels)} concepts ({self.kind})"
        if self.skipped:
            s += f"; {len(self.skipped)} skipped (no plain background)"
        return s


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def _label_from_stem(stem: str) -> str:
    s = stem.replace("_", " ").replace("-", " ").strip()
    s = s.rstrip("0123456789 ").strip()
    return s or stem
def bank_from_folder(folder: str | os.PathLike, *, matte: str = "plain background", max_side: int = 512, input: str = "bank_folder") -> Bank:
    """A bank read from a folder: either one subfolder per concept (`policeman/001.png`; the
    folder name is the label) or flat files named after the concept (`policeman_01.png`).
    Optional masks: `masks/<stem>.png` beside the images (white = the thing)."""
    root = Path(folder)
    if not root.is_dir():
        raise UnconfusedError(f"{root} is not a folder; give a folder of common-concept images",
                              input=input)
    items = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES or "masks" in path.relative_to(root).parts:
            continue
        rel = path.relative_to(root)
        if path.name.startswith("."):
            continue
        label = rel.parts[0].replace("_", " ") if len(rel.parts) > 1 else _label_from_stem(path.stem)
        label = label_of(label)
        mask = path.parent / "masks" / f"{path.stem}.png"
        st = path.stat()
        key = hashlib.sha1(f"{rel.as_posix()}|{st.st_size}".encode()).hexdigest()[:16]
        items.append(BankItem(label, phrase_of(label), path, mask if mask.is_file() else None, key))
    if not items:
        raise UnconfusedError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); put common-concept "
                              "images there (one subfolder per concept, or files named after the concept), or "
                              "leave bank_folder empty to generate the bank with the model", input=input)
    cache = host.output_dir() / "unconfused" / "banks" / ("folder_" + hashlib.sha1(
        str(root.resolve()).encode()).hexdigest()[:12])
    return Bank(items, kind=f"folder {root.name}", matte=matte, cache_dir=cache, max_side=max_side,
                input=input)


def model_key(bundle) -> str:
    """Identifies the base model for the bank cache: the checkpoint's hash, or for a model
    without a file a fingerprint of its weights."""
    h = bundle.base_hash
    if h != "unknown":
        return h
    sha = hashlib.sha1(bundle.name.encode())
    for i, p in enumerate(bundle.unet.parameters()):
        sha.update(p.detach().float().cpu().flatten()[:256].numpy().tobytes())
        if i >= 8:
            break
    return "w" + sha.hexdigest()[:11]


@dataclass
class BankSpec:
    phrases: list[str] = field(default_factory=lambda: list(COMMON_CONCEPTS))
    per_concept: int = 4
    seed: int = 0
    steps: int = 25
    cfg: float = 7.5
    size: int = 512
    negative: str = "text, watermark, blurry, cropped, multiple views, busy background"
    scheduler: str = "dpmpp_2m"

    def jobs(self) -> list[tuple[str, str, str, int, str]]:
        """(phrase, label, prompt, seed, cache key) for every bank image."""
        out = []
        for phrase in self.phrases:
            off = zlib.crc32(phrase.encode())
            for j in range(self.per_concept):
                color = BACKGROUND_COLORS[(off + j) % len(BACKGROUND_COLORS)]
                prompt = BANK_PROMPT.format(phrase=phrase, color=color)
                seed = self.seed + j
                key = hashlib.sha1(f"{prompt}|{seed}|{self.steps}|{self.cfg}|{self.size}|{self.negative}|"
                                   f"{self.scheduler}".encode()).hexdigest()[:16]
                out.append((phrase, label_of(phrase), prompt, seed, key))
        return out
def generate_bank(bundle, spec: BankSpec, *, folder: Path | None = None, matte: str = "plain background",
                  max_side: int = 512, device: torch.device | None = None, batch_size: int | None = None) -> Bank:
    """Generate the missing bank images with the base model (one file per image, written as it
    is made, so Cancel keeps what is done) and return the bank. The cache folder is
    `output/unconfused/banks/<model key>/` unless given."""
    from .sampling import generate

    if not spec.phrases:
        raise UnconfusedError("the common-concept list is empty; give at least one (one per line), or use the "
                              "default list", input="common_concepts")
    if spec.size % 8:
        raise UnconfusedError(f"bank_size must be a multiple of 8, got {spec.size}", input="bank_size")
    folder = Path(folder) if folder else host.output_dir() / "unconfused" / "banks" / model_key(bundle)
    jobs = spec.jobs()
    items, missing = [], []
    for phrase, label, prompt, seed, key in jobs:
        path = folder / safe_name(label) / f"{key}.png"
        items.append(BankItem(label, phrase, path, None, key))
        if not path.is_file():
            missing.append((label, prompt, seed, path))
    if missing:
        host.log.info("unconfused: generating %d of %d common-concept images into %s", len(missing), len(jobs), folder)
        dev = device or host.device()
        original = (bundle.device, bundle.dtype)
        dtype = bundle.dtype if dev.type != "cpu" else torch.float32
        if dev.type != "cpu":
            host.free_memory_for_training()
        # a few images per call on a GPU (the same seed gives the same image alone or in a batch);
        # each image is written as soon as its batch is done, so Cancel loses at most one batch
        batch = max(1, int(batch_size or (4 if dev.type == "cuda" else 1)))
        bundle.to(dev, dtype)
        try:
            done = 0
            for start in range(0, len(missing), batch):
                chunk = missing[start:start + batch]
                host.check_cancel()
                imgs = generate(bundle, [m[1] for m in chunk], negative=spec.negative, steps=spec.steps,
                                cfg=spec.cfg, width=spec.size, height=spec.size, seeds=[m[2] for m in chunk],
                                scheduler=spec.scheduler, device=dev,
                                desc=f"common concepts {start + 1}-{start + len(chunk)}/{len(missing)}")
                for (label, _, _, path), img in zip(chunk, imgs):
                    atomic_save_image(path, tensor_to_pil(img))
                done += len(chunk)
                host.send("augment.bank", {"done": done, "total": len(missing), "label": chunk[-1][0]})
        finally:
            bundle.to(*original)
            host.empty_cache()
    atomic_write_json(folder / "bank.json", {"format": BANK_FORMAT, "model": model_key(bundle),
                                             "spec": asdict(spec),
                                             "items": [{"label": it.label, "phrase": it.phrase,
                                                        "image": it.image.relative_to(folder).as_posix()}
                                                       for it in items]})
    return Bank(items, kind=f"generated by {bundle.name}", matte=matte, cache_dir=folder, max_side=max_side, input="model")


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


# ------------------------------------------------------------------ composition
def join_phrases(phrases: Sequence[str]) -> str:
    phrases = list(phrases)
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _place(pieces: list[Piece], canvas: int, rng: np.random.Generator, scale: tuple[float, float],
           flip: bool) -> list[tuple[Piece, Image.Image, tuple[int, int], bool]]:
    """Give each piece its own column (left to right in the given order), a random height of
    `scale` x the canvas (limited by the column width) and a random position in its column."""
    n = len(pieces)
    col = canvas / n
    out = []
    for k, p in enumerate(pieces):
        im = p.image
        flipped = bool(flip and rng.random() < 0.5)
        if flipped:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        target_h = rng.uniform(*scale) * canvas
        s = min(target_h / im.height, col / im.width)
        size = (max(4, min(int(col), round(im.width * s))), max(4, min(canvas, round(im.height * s))))
        im = _resize_binary(im, size)
        x0 = round(k * col)
        x = x0 + int(rng.integers(0, max(1, int(col) - im.width + 1)))
        y = int(rng.integers(0, max(1, canvas - im.height + 1)))
        out.append((p, im, (x, y), flipped))
    return out


def compose(pieces: list[Piece], canvas: int, rng: np.random.Generator, *, scale: tuple[float, float],
            flip: bool = True) -> tuple[Image.Image, list[Image.Image], dict]:
    """Paste pieces on a plain canvas; returns the image, one visible-pixel mask per piece (a
    later piece hides an earlier one where they meet) and the layout for provenance."""
    bg = tuple(int(v) for v in rng.integers(40, 256, size=3))
    image = Image.new("RGB", (canvas, canvas), bg)
    placed = _place(pieces, canvas, rng, scale, flip)
    alphas = []
    for p, im, (x, y), _ in placed:
        a = im.getchannel("A")
        image.paste(im.convert("RGB"), (x, y), a)
        full = Image.new("L", (canvas, canvas), 0)
        full.paste(a, (x, y))
        alphas.append(full)
    masks: list[Image.Image] = [None] * len(alphas)  # type: ignore[list-item]
    cover = Image.new("L", (canvas, canvas), 0)
    for k in range(len(alphas) - 1, -1, -1):
        masks[k] = ImageChops.subtract(alphas[k], cover)
        cover = ImageChops.lighter(cover, alphas[k])
    layout = {"background": list(bg), "elements": [
        {"label": p.label, "from": p.origin, "box": [x, y, x + im.width, y + im.height], "flip": f}
        for p, im, (x, y), f in placed]}
    return image, masks, layout


# ------------------------------------------------------------------ settings and the build
@dataclass
class AugmentSettings:
    seed: int = 0
    canvas: int = 512
    global_pairs: int = 4000
    region_pairs: int = 1000
    mix_per_pair: int = 4
    min_common: int = 1  # common concepts next to the concept in a G-Aug pair
    max_common: int = 2
    region_common: int = 1  # at most this many common concepts in an R-Aug pair
    regions_per_pair: int = 2  # at most this many regions of the concept in an R-Aug pair
    min_scale: float = 0.45  # element height as a fraction of the canvas
    max_scale: float = 0.9
    min_area: float = 0.02  # a usable cut-out covers at least this fraction of its photo
    min_regions: int = 3
    max_regions: int = 10
    region_min_part: float = 0.02  # a region is this fraction of the concept ...
    region_max_part: float = 0.7  # ... up to this
    with_class_word: bool = False  # "<alice> woman" instead of "<alice>" in captions
    flip: bool = True
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    vocabulary: list[str] = field(default_factory=lambda: list(REGION_VOCABULARY))

    def counts(self, n_concepts: int) -> dict[str, int]:
        """Pairs of each registered kind for a set of `n_concepts` concepts."""
        return {k.name: k.count(self, n_concepts) for k in KINDS.values()}

    def needs_bank(self, n_concepts: int) -> bool:
        """Whether the build draws common concepts from the bank."""
        counts = self.counts(n_concepts)
        return any(counts[k.name] > 0 and k.uses_bank(self) for k in KINDS.values())

    def needs_regions(self, n_concepts: int) -> bool:
        """Whether the build needs labelled regions of the concepts (a proposer and a labeller)."""
        counts = self.counts(n_concepts)
        return any(counts[k.name] > 0 and k.uses_regions for k in KINDS.values())

    def check(self, n_concepts: int) -> None:
        def bad(msg, inp):
            raise UnconfusedError(msg, input=inp)

        for name in ("global_pairs", "region_pairs", "mix_per_pair", "min_common", "max_common", "region_common"):
            if getattr(self, name) < 0:
                bad(f"{name} must be 0 or more", name)
        if self.canvas < 64 or self.canvas % 8:
            bad(f"canvas must be a multiple of 8 and at least 64, got {self.canvas}", "canvas")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            bad(f"need 0 < min_scale <= max_scale <= 1, got {self.min_scale}..{self.max_scale}", "min_scale")
        if self.min_common > self.max_common:
            bad(f"min_common ({self.min_common}) is above max_common ({self.max_common})", "min_common")
        if self.regions_per_pair < 1:
            bad("regions_per_pair must be at least 1", "regions_per_pair")
        if not 1 <= self.min_regions <= self.max_regions:
            bad(f"need 1 <= min_regions <= max_regions, got {self.min_regions}..{self.max_regions}", "min_regions")
        if not self.templates:
            bad("no caption templates; give at least one, e.g. 'a photo of {}'", "templates")
        for t in self.templates:
            if t.count("{}") != 1:
                bad(f"the caption template {t!r} must contain '{{}}' exactly once (where the names go)", "templates")
        if self.global_pairs + self.region_pairs + self.mix_per_pair == 0:
            bad("all counts are 0; set global_pairs, region_pairs or mix_per_pair", "global_pairs")
        if self.mix_per_pair > 0 and n_concepts < 2:
            bad(f"Mix pairs need at least two concepts and the set has {n_concepts}; add a concept or set "
                "mix_per_pair to 0", "mix_per_pair")
        if self.region_pairs > 0 and not self.vocabulary:
            bad("the region vocabulary is empty, so regions cannot be labelled; turn on the default vocabulary, add "
                "words, or set region_pairs to 0", "vocabulary")


@dataclass
class BuildResult:
    folder: Path
    counts: dict[str, int]
    made: int  # pairs made by this run (the rest were there from an earlier run)
    notes: list[str]

    def info(self) -> str:
        counts = ", ".join(f"{k}: {v}" for k, v in self.counts.items())
        lines = [f"{self.folder.name}: {sum(self.counts.values())} pairs ({counts}), {self.made} made by this run"]
        return "\n".join(lines + self.notes)


class Builder:
    """Makes any pair from (kind, index). Holds only the concepts' cut-outs and regions."""

    def __init__(self, concept_set: ConceptSet, bank: Bank | None, settings: AugmentSettings,
                 regions: dict[str, RegionSet] | None = None, *, cutouts=None):
        self.s = settings
        self.bank = bank
        self.concepts = list(concept_set.concepts)
        self.cutouts = cutouts or concept_cutouts(concept_set, min_area=settings.min_area, max_side=settings.canvas)
        self.regions = {t: r for t, r in (regions or {}).items() if r.pieces}
        self.region_tokens = [c.token for c in self.concepts if c.token in self.regions]
        n = len(self.concepts)
        self.pairs = list(itertools.combinations(range(n), 2))

    def _rng(self, kind: str, index: int) -> np.random.Generator:
        return np.random.default_rng([int(self.s.seed) & 0xFFFFFFFF, KINDS[kind].id, int(index)])

    def _concept_piece(self, ci: int, rng) -> Piece:
        c = self.concepts[ci]
        photo, im = self.cutouts[c.token][int(rng.integers(len(self.cutouts[c.token])))]
        phrase = f"{c.token} {c.class_word}" if self.s.with_class_word else c.token
        return Piece(im, c.token, phrase, c.token, f"{c.token}/{photo:03d}")

    def _bank_pieces(self, k: int, rng) -> list[Piece]:
        if k <= 0:
            return []
        idx = rng.choice(len(self.bank), size=min(k, len(self.bank)), replace=False)
        return [self.bank.piece(int(i)) for i in idx]

    def make(self, kind: str, index: int) -> tuple[Image.Image, str, list[str], dict[str, Image.Image], dict]:
        rng = self._rng(kind, index)
        s = self.s
        pieces = KINDS[kind].pieces(self, index, rng)
        image, masks, layout = compose(pieces, s.canvas, rng, scale=(s.min_scale, s.max_scale), flip=s.flip)
        template = s.templates[int(rng.integers(len(s.templates)))]
        caption = template.replace("{}", join_phrases([p.phrase for p in pieces]), 1)
        tokens = []
        for p in pieces:
            if p.token and p.token not in tokens:
                tokens.append(p.token)
        named: dict[str, Image.Image] = {}
        for p, m in zip(pieces, masks):
            label, n = p.label, 2
            while label in named:
                label, n = f"{p.label} ({n})", n + 1
            named[label] = m
        source = {"seed": s.seed, "index": index, "template": template, **layout}
        return image, caption, tokens, named, source


# ------------------------------------------------------------------ the pair kinds, declared once
@dataclass(frozen=True)
class AugKind:
    """One kind of augmented pair. Adding a kind is one `@aug_kind` function that picks a pair's pieces
    (plus the setting that counts its pairs): the settings' counts, the build, the dataset's record
    kinds, the CLIF trainer's `kinds` and the nodes' kind lists come from this registry."""

    name: str
    id: int  # part of each pair's random stream: never renumber a kind
    paper: str  # the paper's name for it
    what: str
    count: Callable[["AugmentSettings", int], int]  # (settings, number of concepts) -> pairs
    uses_bank: Callable[["AugmentSettings"], bool]
    uses_regions: bool
    pieces: Callable[["Builder", int, np.random.Generator], list[Piece]]


KINDS: dict[str, AugKind] = {}


def aug_kind(name: str, id: int, paper: str, what: str, *, count, uses_bank=lambda s: False,
             uses_regions: bool = False):
    def register(fn):
        if any(k.id == id for k in KINDS.values()):
            raise ValueError(f"augmentation kind id {id} is taken")
        KINDS[name] = AugKind(name, id, paper, what, count, uses_bank, uses_regions, fn)
        return fn

    return register


@aug_kind("global", 1, "G-Aug", "a concept's cut-out next to common concepts from the bank",
          count=lambda s, n: s.global_pairs, uses_bank=lambda s: True)
def _global_pieces(b: "Builder", index: int, rng) -> list[Piece]:
    s = b.s
    pieces = [b._concept_piece(index % len(b.concepts), rng)]
    pieces += b._bank_pieces(int(rng.integers(s.min_common, s.max_common + 1)), rng)
    return [pieces[int(i)] for i in rng.permutation(len(pieces))]


@aug_kind("region", 2, "R-Aug", "labelled regions of a concept's cut-out, with common concepts",
          count=lambda s, n: s.region_pairs, uses_bank=lambda s: s.region_common > 0, uses_regions=True)
def _region_pieces(b: "Builder", index: int, rng) -> list[Piece]:
    s = b.s
    rs = b.regions[b.region_tokens[index % len(b.region_tokens)]]
    by_label: dict[str, list[Piece]] = {}
    for p in rs.pieces:  # one piece per word in a pair: never "<a>'s hat and <a>'s hat"
        by_label.setdefault(p.label, []).append(p)
    labels = list(by_label)
    k = int(rng.integers(1, min(s.regions_per_pair, len(labels)) + 1))
    pieces = []
    for i in rng.choice(len(labels), size=k, replace=False):
        options = by_label[labels[int(i)]]
        pieces.append(options[int(rng.integers(len(options)))])
    pieces += b._bank_pieces(int(rng.integers(0, s.region_common + 1)), rng)
    return [pieces[int(i)] for i in rng.permutation(len(pieces))]


@aug_kind("mix", 3, "M-Aug", "two concepts side by side; every pair of concepts `mix_per_pair` times",
          count=lambda s, n: n * (n - 1) // 2 * s.mix_per_pair)
def _mix_pieces(b: "Builder", index: int, rng) -> list[Piece]:
    per = max(1, b.s.mix_per_pair)
    i, j = b.pairs[(index // per) % len(b.pairs)]
    if index % 2:  # each pair is shown both ways round
        i, j = j, i
    return [b._concept_piece(i, rng), b._concept_piece(j, rng)]


def concept_manifest(concept_set: ConceptSet) -> list[dict]:
    """What the dataset was made from, with a fingerprint of the photos and masks (a resume with
    other photos is refused)."""
    out = []
    for c in concept_set.concepts:
        h = hashlib.sha1()
        for i, img in enumerate(c.images):
            h.update(_uint8(img).tobytes())
            if c.masks is not None:
                h.update((c.masks[i].detach().cpu().numpy() >= 0.5).tobytes())
        out.append({"token": c.token, "class_word": c.class_word, "photos": len(c.images),
                    "fingerprint": h.hexdigest()[:16]})
    return out


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


GROWABLE = ("global_pairs", "region_pairs")


def _accept_larger_counts(folder: Path, seed: int, settings: dict, concepts: list[dict]) -> str | None:
    """Let a dataset grow: when an existing dataset differs only by larger G-Aug / R-Aug counts
    (pair i of a kind does not depend on the count), its manifest takes the new counts, so the
    run adds the missing pairs instead of refusing. Returns what grew, or None."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return None
    try:
        prev = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError:
        return None
    old = prev.get("settings") or {}
    if prev.get("seed") != seed or prev.get("concepts") != concepts or set(old) != set(settings):
        return None
    if any(old[k] != settings[k] for k in settings if k not in GROWABLE):
        return None
    if any(settings[k] < old[k] for k in GROWABLE) or all(settings[k] == old[k] for k in GROWABLE):
        return None
    grown = ", ".join(f"{k} {old[k]} -> {settings[k]}" for k in GROWABLE if settings[k] != old[k])
    prev["settings"] = settings
    prev["complete"] = False
    atomic_write_json(path, prev)
    return grown
def build_dataset(concept_set: ConceptSet, folder: str | os.PathLike, settings: AugmentSettings, *,
                  bank: Bank | None = None, proposer: RegionProposer | None = None,
                  labeller: Labeller | None = None, resume: bool = True, extra_settings: dict | None = None,
                  workers: int | None = None) -> BuildResult:
    """Write (or finish) the augmented dataset in `folder`. On Cancel or an error the manifest
    says `complete: false` and a rerun with the same inputs continues."""
    folder = Path(folder)
    n = len(concept_set.concepts)
    settings.check(n)
    counts = settings.counts(n)
    needs_bank, needs_regions = settings.needs_bank(n), settings.needs_regions(n)
    if needs_bank and bank is None:
        raise UnconfusedError("G-Aug needs common concepts: connect the model (the bank is generated with it) or "
                              "give bank_folder", input="model")
    if needs_regions and (proposer is None or labeller is None):
        raise UnconfusedError("R-Aug needs a region proposer and a labeller: connect sam_model and clip_model, or "
                              "set region_pairs to 0", input="sam_model" if proposer is None else
                              "clip_model")
    cutouts = concept_cutouts(concept_set, min_area=settings.min_area, max_side=settings.canvas)
    if needs_bank:
        bank.max_side = settings.canvas
        bank.prepare()
    recorded = asdict(settings)
    recorded["bank"] = bank.fingerprint() if (bank is not None and needs_bank) else None
    recorded.update(extra_settings or {})
    concepts_meta = concept_manifest(concept_set)
    grown = _accept_larger_counts(folder, settings.seed, recorded, concepts_meta) if resume else None
    writer = DatasetWriter(folder, seed=settings.seed, settings=recorded, concepts=concepts_meta,
                           resume=resume)
    notes: list[str] = cutout_notes(concept_set, cutouts)
    if grown:
        notes.append(f"grown: {grown}")
    complete = False
    try:
        regions = None
        if needs_regions:
            regions = _load_regions(folder) if len(writer) else None
            if regions is None:
                regions = {}
                for c in concept_set.concepts:
                    regions[c.token] = find_regions(
                        c.token, cutouts[c.token], proposer, labeller, settings.vocabulary,
                        min_regions=settings.min_regions, max_regions=settings.max_regions,
                        min_part=settings.region_min_part, max_part=settings.region_max_part)
                _save_regions(folder, regions)
            notes += [x for rs in regions.values() for x in rs.notes]
            if not any(rs.pieces for rs in regions.values()):
                raise UnconfusedError("no labelled regions were found in any concept, so there is nothing for R-Aug; "
                                      "check the masks, add vocabulary words, or set region_pairs to 0",
                                      input="region_pairs")
        builder = Builder(concept_set, bank if needs_bank else None, settings, regions, cutouts=cutouts)
        done = {r.id for r in writer.records}
        todo = [(k, i) for k in KINDS for i in range(counts[k]) if f"{k}_{i:06d}" not in done]
        total = sum(counts.values())
        made = 0
        bar = host.progress(total, "augmenting")
        # Pairs are composed by a few threads ahead of the writer (PIL releases the GIL while it
        # resizes and encodes) and written strictly in order, so the files and the resume point are
        # the same as one thread's; at most `2 x workers` pairs are in memory.
        workers = max(1, min(int(workers or os.cpu_count() or 1), 8))
        pool = ThreadPoolExecutor(workers, thread_name_prefix="unconfused-augment") if workers > 1 else None
        window: deque = deque()
        jobs = iter(todo)

        def submit() -> None:
            job = next(jobs, None)
            if job is not None:
                window.append((job, pool.submit(host.in_context(builder.make), *job) if pool else None))

        try:
            bar.set(total - len(todo))
            for _ in range(2 * workers):
                submit()
            while window:
                (kind, i), fut = window.popleft()
                host.check_cancel()
                image, caption, tokens, masks, source = fut.result() if fut else builder.make(kind, i)
                submit()
                writer.add(kind, i, image, caption, tokens, masks, source)
                made += 1
                bar.update()
        finally:
            for _, fut in window:
                if fut:
                    fut.cancel()
            if pool:
                pool.shutdown(wait=True)
            bar.close()
        complete = True
    finally:
        try:
            writer.close(complete=complete)
        except Exception:  # e.g. the disk is full: keep the first error; the manifest already says incomplete
            if complete:
                raise
    if bank is not None and bank.skipped:
        notes.append(f"{len(bank.skipped)} common-concept images had no plain background and were not used")
    if len(writer) != sum(counts.values()):
        notes.append(f"note: the folder holds {len(writer)} pairs, more than asked for; choose a new name to start "
                     "a clean dataset")
    return BuildResult(folder, dict(writer.manifest["counts"]), made, notes)


# ------------------------------------------------------------------ reading back
def preview(dataset: Dataset, *, count: int = 12, kinds: Sequence[str] = (), seed: int = 0, masks: bool = True,
            cell: int = 256, columns: int = 4) -> Image.Image:
    """A grid of `count` pairs (spread over the dataset, chosen by `seed`), masks tinted, captions
    under each."""
    from .concepts import pil_to_mask, pil_to_tensor
    from .preview import grid, overlay_masks

    recs = dataset.of_kind(*kinds) if kinds else list(dataset.records)
    if not recs:
        raise UnconfusedError(f"the dataset has no pairs of kind {', '.join(kinds)}", input="kind")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(recs), size=min(count, len(recs)), replace=False).tolist())
    cells, captions = [], []
    for i in pick:
        r = recs[i]
        with Image.open(dataset.folder / r.image) as im:
            img = pil_to_tensor(im)
        if masks and r.masks:
            ms = []
            for rel in r.masks.values():
                with Image.open(dataset.folder / rel) as m:
                    ms.append(pil_to_mask(m))
            cells.append(overlay_masks(img, ms))
        else:
            cells.append(tensor_to_pil(img))
        captions.append(f"[{r.kind}] {r.caption}")
    return grid(cells, captions, cell=cell, columns=columns, caption_lines=3)


def regions_preview(folder: str | os.PathLike, *, cell: int = 160, columns: int = 6) -> Image.Image | None:
    """The R-Aug regions a dataset was made from, each with its label and provenance (so wrong
    CLIP labels are easy to spot); None when the dataset has no regions."""
    from .preview import grid

    folder = Path(folder)
    path = folder / "regions.json"
    if not path.is_file():
        return None
    entries = json.loads(path.read_text("utf-8")).get("regions", [])
    if not entries:
        return None
    cells, captions = [], []
    for e in entries:
        with Image.open(folder / e["image"]) as im:
            rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (128, 128, 128))
        canvas.paste(rgba, (0, 0), rgba.getchannel("A"))
        s = cell / max(canvas.size)  # small parts are shown enlarged
        cells.append(canvas.resize((max(1, round(canvas.width * s)), max(1, round(canvas.height * s))),
                                   Image.Resampling.NEAREST if s > 1 else Image.Resampling.LANCZOS))
        score = e["from"].rsplit("@", 1)[-1] if "@" in e["from"] else ""
        captions.append(f"{e['label']} ({score})" if score else e["label"])
    return grid(cells, captions, cell=cell, columns=columns, caption_lines=2)


def records_digest(folder: str | os.PathLike) -> str:
    """A digest of a dataset's records and every file they name (tests, benchmarks)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for r in read_records(folder):
        h.update(r.to_json().encode())
        for rel in [r.image, *r.masks.values()]:
            h.update((folder / rel).read_bytes())
    return h.hexdigest()
