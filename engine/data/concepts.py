"""Concepts and concept sets: what the user wants the model to learn, as data.

A concept is an identifier token (`<alice>`), a class word ("woman"), reference images and,
optionally, one mask and one caption per image. Images keep their own sizes (reference
photos rarely match), as float32 tensors [H, W, 3] in 0..1; masks are [H, W] in 0..1.

On disk a concept set is a folder (docs/guide.md, "Concept set folder"):

    concept_set.json            {"format": "unconfused.concept_set", "version": 1, "concepts": [...]}
    <folder>/<stem>.png         reference images
    <folder>/<stem>.txt         caption sidecar (kohya convention), optional
    <folder>/masks/<stem>.png   8-bit mask, optional

Each stage reads and writes this form, so work can be shared and resumed.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import UnconfusedError
from ..files import atomic_save_image, atomic_write_json, atomic_write_text, safe_name
from ..models.clip_tokenizer import in_vocabulary

FORMAT = "unconfused.concept_set"
VERSION = 1
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}  # a GIF: its first frame
_TOKEN_RE = re.compile(r"^\S+$")


@dataclass
class Concept:
    token: str
    class_word: str
    images: list[torch.Tensor]
    masks: list[torch.Tensor] | None = None
    captions: list[str] | None = None
    names: list[str] = field(default_factory=list)  # file stems, kept for sidecars and provenance

    def __post_init__(self) -> None:
        if not self.names:
            self.names = [f"{i:03d}" for i in range(len(self.images))]

    @property
    def folder_name(self) -> str:
        return safe_name(self.token.strip("<>") or "concept", input="token")

    @property
    def embedding_name(self) -> str:
        """The name stock ComfyUI uses in prompts: `embedding:<name>`."""
        return self.folder_name

    def with_captions(self, captions: list[str]) -> "Concept":
        if len(captions) != len(self.images):
            raise UnconfusedError(f"{len(captions)} captions for {len(self.images)} images of {self.token}",
                                  input="captions")
        return replace(self, captions=list(captions))

    def with_masks(self, masks: list[torch.Tensor]) -> "Concept":
        return replace(self, masks=list(masks))


@dataclass
class ConceptSet:
    concepts: list[Concept]
    source: Path | None = None  # the folder it was read from or last saved to

    @property
    def tokens(self) -> list[str]:
        return [c.token for c in self.concepts]

    def __len__(self) -> int:
        return len(self.concepts)

    def get(self, token: str) -> Concept:
        for c in self.concepts:
            if c.token == token:
                return c
        raise UnconfusedError(f"no concept {token!r} in this set; it has {self.tokens}", input="token")


# ------------------------------------------------------------------ conversions
def image_batch_to_list(images: torch.Tensor, *, input: str = "images") -> list[torch.Tensor]:
    """Split a ComfyUI IMAGE batch [B, H, W, C] into RGB images [H, W, 3]."""
    if not isinstance(images, torch.Tensor):
        raise UnconfusedError(f"expected an IMAGE batch, got {type(images).__name__}", input=input)
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise UnconfusedError(f"expected an IMAGE batch [B, H, W, 3], got shape {tuple(images.shape)}", input=input)
    if images.shape[0] == 0:
        raise UnconfusedError("the image batch is empty; connect at least one reference photo", input=input)
    out = []
    for img in images:
        img = img.detach().float().cpu()
        if img.shape[-1] == 1:  # grayscale
            img = img.expand(-1, -1, 3)
        elif img.shape[-1] == 4:  # RGBA: the alpha is not part of the photo
            img = img[..., :3]
        out.append(img.clamp(0, 1).contiguous())
    return out


def mask_batch_to_list(masks: torch.Tensor, images: list[torch.Tensor], *,
                       input: str = "masks") -> list[torch.Tensor]:
    """Split a MASK batch and check it matches the images one to one, pixel for pixel."""
    if not isinstance(masks, torch.Tensor):
        raise UnconfusedError(f"expected a MASK batch, got {type(masks).__name__}", input=input)
    if masks.ndim == 2:
        masks = masks.unsqueeze(0)
    if masks.ndim != 3:
        raise UnconfusedError(f"expected a MASK batch [B, H, W], got shape {tuple(masks.shape)}",
                              input=input)
    if masks.shape[0] != len(images):
        raise UnconfusedError(f"{masks.shape[0]} masks for {len(images)} images; give one mask per image", input=input)
    out = []
    for i, (m, img) in enumerate(zip(masks, images)):
        if tuple(m.shape) != tuple(img.shape[:2]):
            raise UnconfusedError(f"mask {i} is {m.shape[1]}x{m.shape[0]} but image {i} is "
                                  f"{img.shape[1]}x{img.shape[0]}; masks must have their image's size", input=input)
        out.append(m.detach().float().cpu().clamp(0, 1).contiguous())
    return out


def tensor_to_pil(img: torch.Tensor) -> Image.Image:
    arr = (img.detach().float().cpu().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB")


def _wide_gray(img: Image.Image) -> torch.Tensor | None:
    """16-bit (and 32-bit integer) grayscale scaled to 0..1 by its bit depth; PIL's convert()
    would clip it to 255 (a full-range 16-bit PNG became pure white)."""
    if img.mode not in ("I;16", "I;16B", "I;16L", "I"):
        return None
    arr = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) <= 65535 else float(2**32 - 1)
    return torch.from_numpy((arr / top).clip(0, 1).astype(np.float32))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    img = ImageOps.exif_transpose(img)
    gray = _wide_gray(img)
    if gray is not None:
        return gray[..., None].expand(*gray.shape, 3).contiguous()
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)


def pil_to_mask(img: Image.Image) -> torch.Tensor:
    gray = _wide_gray(img)
    return gray if gray is not None else torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32) / 255.0)


def to_batch(images: list[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Stack images into one IMAGE batch, resizing to `size` (h, w) or the first image's size."""
    h, w = size or tuple(images[0].shape[:2])
    out = []
    for img in images:
        if tuple(img.shape[:2]) != (h, w):
            img = torch.nn.functional.interpolate(img.permute(2, 0, 1)[None], size=(h, w), mode="bilinear",
                                                  antialias=True, align_corners=False)[0].permute(1, 2, 0)
        out.append(img.clamp(0, 1))
    return torch.stack(out)


# ------------------------------------------------------------------ validation
def validate_token(token: str, *, input: str = "token") -> str:
    token = token.strip()
    if not token:
        raise UnconfusedError("the token is empty; give a new word such as <alice>", input=input)
    if not _TOKEN_RE.match(token):
        raise UnconfusedError(f"the token {token!r} contains spaces; use one word such as <alice>",
                              input=input)
    if in_vocabulary(token):
        raise UnconfusedError(f"{token!r} is already a word the text encoder knows, so training it would change "
                              f"that word everywhere; use a new word such as <{token.strip('<>')}-1>", input=input)
    if token.startswith("embedding:"):
        raise UnconfusedError("give the token without the 'embedding:' prefix", input=input)
    if len(token) > MAX_TOKEN_CHARS:  # it names the embedding file: refused before anything is written
        raise UnconfusedError(f"the token is {len(token)} characters long; use at most {MAX_TOKEN_CHARS} "
                              "(a short new word such as <alice>)", input=input)
    return token


MAX_TOKEN_CHARS = 64


def make_concept(token: str, class_word: str, images: torch.Tensor, masks: torch.Tensor | None = None,
                 captions: list[str] | None = None) -> Concept:
    """Build and validate one concept from ComfyUI-style inputs."""
    token = validate_token(token)
    class_word = class_word.strip()
    if not class_word:
        raise UnconfusedError("the class word is empty; say what the concept is (woman, dog, teapot)", input="class_word")
    image_list = image_batch_to_list(images)
    mask_list = mask_batch_to_list(masks, image_list) if masks is not None else None
    concept = Concept(token=token, class_word=class_word, images=image_list, masks=mask_list)
    if captions:
        concept = concept.with_captions(captions)
    return concept
def make_concept_set(concepts: list[Concept]) -> ConceptSet:
    concepts = [c for c in concepts if c is not None]
    if not concepts:
        raise UnconfusedError("no concepts are connected; connect at least one Concept node",
                              input="concept_1")
    seen: dict[str, int] = {}
    folders: dict[str, str] = {}
    for i, c in enumerate(concepts, start=1):
        if not isinstance(c, Concept):
            raise UnconfusedError(f"input concept_{i} is a {type(c).__name__}, not a concept",
                                  input=f"concept_{i}")
        if c.token in seen:
            raise UnconfusedError(f"token {c.token!r} is used by concept_{seen[c.token]} and concept_{i}; "
                                  "every concept needs its own token", input=f"concept_{i}")
        if c.folder_name in folders:
            raise UnconfusedError(f"tokens {folders[c.folder_name]!r} and {c.token!r} give the same file name "
                                  f"'{c.folder_name}'; make them differ in letters",
                                  input=f"concept_{i}")
        seen[c.token] = i
        folders[c.folder_name] = c.token
    return ConceptSet(concepts=list(concepts))


# ------------------------------------------------------------------ disk form
def save_concept_set(cs: ConceptSet, folder: str | Path) -> Path:
    """Write the set as a folder; the manifest is written last, so a folder without
    `concept_set.json` is an interrupted save and is never read as complete."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for c in cs.concepts:
        sub = folder / c.folder_name
        for i, (img, name) in enumerate(zip(c.images, c.names)):
            atomic_save_image(sub / f"{name}.png", tensor_to_pil(img))
            if c.masks is not None:
                atomic_save_image(sub / "masks" / f"{name}.png", tensor_to_pil(c.masks[i]))
            if c.captions is not None:
                atomic_write_text(sub / f"{name}.txt", c.captions[i].strip() + "\n")
        entries.append({"token": c.token, "class_word": c.class_word, "folder": c.folder_name,
                        "images": [f"{n}.png" for n in c.names], "masks": c.masks is not None,
                        "captions": c.captions is not None})
    atomic_write_json(folder / "concept_set.json", {"format": FORMAT, "version": VERSION, "concepts": entries})
    return folder


def _read_image(path: Path, what: str) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return img
    except Exception as e:  # PIL raises many types for damaged files
        raise UnconfusedError(f"cannot read {what} {path}: {e}", input="folder") from e


def load_concept_set(folder: str | Path) -> ConceptSet:
    folder = Path(folder)
    manifest = folder / "concept_set.json"
    if not manifest.is_file():
        raise UnconfusedError(f"{folder} has no concept_set.json; save a concept set there first "
                              "(an interrupted save leaves no manifest)", input="folder")
    try:
        meta = json.loads(manifest.read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise UnconfusedError(f"{manifest} is not valid JSON ({e})", input="folder") from e
    if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
        raise UnconfusedError(f"{manifest} is not a concept set this version can read "
                              f"(format {meta.get('format')!r}, version {meta.get('version')})",
                              input="folder")
    concepts = []
    for k, entry in enumerate(meta["concepts"] if isinstance(meta.get("concepts"), list) else [None]):
        wrong = [key for key, kind in (("folder", str), ("token", str), ("class_word", str), ("images", list))
                 if not isinstance(entry, dict) or not isinstance(entry.get(key), kind)]
        if wrong:  # a hand-edited manifest: a sentence, not a KeyError
            raise UnconfusedError(f"concept {k} of {manifest} lacks {', '.join(wrong)} (or has the wrong type); "
                                  "fix the file or save the concept set again", input="folder")
        sub = folder / safe_name(entry["folder"], input="folder")
        names = [Path(n).stem for n in entry["images"]]
        images = [pil_to_tensor(_read_image(sub / n, "image")) for n in entry["images"]]
        masks = None
        if entry.get("masks"):
            masks = [pil_to_mask(_read_image(sub / "masks" / f"{n}.png", "mask")) for n in names]
        captions = None
        if entry.get("captions") or all((sub / f"{n}.txt").is_file() for n in names):
            captions = [read_caption(sub / f"{n}.txt") for n in names]
        concepts.append(Concept(token=entry["token"], class_word=entry["class_word"], images=images,
                                masks=masks, captions=captions, names=names))
    return ConceptSet(concepts=concepts, source=folder)


def read_caption(path: Path) -> str:
    try:
        return path.read_text("utf-8").strip()
    except FileNotFoundError:
        return ""


def load_images_from_folder(folder: str | Path, *, input: str = "folder"
                            ) -> tuple[list[torch.Tensor], list[str], list[str] | None]:
    """Images of a plain folder (sorted by name) with their kohya caption sidecars if all exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UnconfusedError(f"{folder} is not a folder", input=input)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise UnconfusedError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})",
                              input=input)
    images = [pil_to_tensor(_read_image(p, "image")) for p in paths]
    caps = [p.with_suffix(".txt") for p in paths]
    captions = [read_caption(c) for c in caps] if all(c.is_file() for c in caps) else None
    return images, [p.stem for p in paths], captions
def concept_from_folder(folder: str | Path, token: str, class_word: str, *, input: str | None = None
                        ) -> Concept:
    """A concept from a plain folder of photos (with kohya .txt sidecars if every photo has one).
    `input` names the one input all three came from (a CLI's --concept); by default each its own."""
    token = validate_token(token, input=input or "token")
    if not (class_word or "").strip():
        raise UnconfusedError("the class word is empty; give the kind of thing, e.g. dog or woman",
                              input=input or "class_word")
    images, names, captions = load_images_from_folder(folder, input=input or "folder")
    return Concept(token=token, class_word=class_word.strip(), images=images, captions=captions, names=names)
def parse_concept_spec(text: str, *, input: str = "concepts") -> tuple[Path, str, str]:
    """`FOLDER:TOKEN:CLASS` (the command line's and job files' short form) -> (folder, token, class word).
    The last two colons split, so a Windows drive letter (C:/photos) stays in the folder."""
    parts = str(text).rsplit(":", 2)
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise UnconfusedError(f"'{text}' is not FOLDER:TOKEN:CLASS, e.g. photos/alice:<alice>:woman",
                              input=input)
    return Path(parts[0].strip()), parts[1].strip(), parts[2].strip()


def new_run_folder(base: Path, prefix: str) -> Path:
    """A fresh folder under `base` for one run's files."""
    path = base / f"{safe_name(prefix)}_{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def copy_tree_atomic(src: Path, dst: Path) -> Path:
    """Copy a folder so that `dst` appears complete or not at all."""
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.partial")
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst
