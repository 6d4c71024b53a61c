"""The augmented dataset on disk: what the CLIF augmentation builder writes and the CLIF and
LoRA trainers read. Streamed - memory never grows with the number of pairs - and resumable.

Layout (`unconfused-dataset/1`):

    <folder>/
      manifest.json    written at the start (complete: false) and rewritten at the end
                       (complete: true): format, seed, settings, concepts, counts per kind
      records.jsonl    one JSON object per pair, appended as pairs are made:
                       {"id": "mix_000012", "kind": "global|region|mix|photo",
                        "image": "images/mix_000012.png", "caption": "a photo of <a> and <b>",
                        "tokens": ["<a>", "<b>"],            concept tokens present
                        "masks": {"<a>": "masks/mix_000012_0.png", "policeman": "masks/..."},
                        "source": {...}}                     provenance (which photos, positions, seed)
      images/, masks/  PNG files, each written to a temp name and renamed

A record line is appended only after its image and masks are on disk, so every line in
records.jsonl is usable; a cut-off run leaves at most a partial last line, which is dropped
on resume. Records are generated from (seed, index) alone, so a resumed run writes exactly
what an uninterrupted one would have.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from .concepts import pil_to_mask, pil_to_tensor
from ..errors import UnconfusedError
from ..files import atomic_save_image, atomic_write_json

FORMAT = "unconfused-dataset/1"
PHOTO = "photo"  # a record made from a concept's own photo; the other kinds are augment.py's


def record_kinds() -> list[str]:
    """Every kind a record may have: a concept's photo, or a registered augmentation kind."""
    from .augment.kinds import KINDS  # (augment builds on this module; its registry is read when asked)

    return [PHOTO, *KINDS]


@dataclass
class Record:
    id: str
    kind: str
    image: str
    caption: str
    tokens: list[str]
    masks: dict[str, str] = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, ensure_ascii=False)


class DatasetWriter:
    """Appends pairs to a dataset folder; `resume=True` continues a cut-off run."""

    def __init__(self, folder: str | Path, *, seed: int, settings: dict, concepts: list[dict],
                 resume: bool = True):
        self.folder = Path(folder)
        self.manifest = {"format": FORMAT, "complete": False, "seed": seed, "settings": settings,
                         "concepts": concepts, "counts": {}}
        old = self.folder / "manifest.json"
        self.records: list[Record] = []
        if old.is_file() and resume:
            prev = json.loads(old.read_text(encoding="utf-8"))
            same = {k: prev.get(k) for k in ("seed", "settings", "concepts")} == \
                {k: self.manifest[k] for k in ("seed", "settings", "concepts")}
            if not same:
                raise UnconfusedError(f"{self.folder.name} holds a dataset made with other settings; choose another "
                                      "name or set resume to 'restart'", input="name")
            self.records = list(read_records(self.folder, repair=True))
        elif old.is_file() or (self.folder / "records.jsonl").exists():
            for name in ("manifest.json", "records.jsonl"):
                (self.folder / name).unlink(missing_ok=True)
        (self.folder / "images").mkdir(parents=True, exist_ok=True)
        (self.folder / "masks").mkdir(parents=True, exist_ok=True)
        self._write_manifest()
        self._jsonl = open(self.folder / "records.jsonl", "a", encoding="utf-8")

    def __len__(self) -> int:
        return len(self.records)

    def count(self, kind: str) -> int:
        return sum(r.kind == kind for r in self.records)

    def add(self, kind: str, index: int, image: Image.Image, caption: str, tokens: list[str],
            masks: dict[str, Image.Image], source: dict | None = None) -> Record:
        if kind not in record_kinds():
            raise ValueError(f"unknown kind {kind}")
        rid = f"{kind}_{index:06d}"
        rec = Record(rid, kind, f"images/{rid}.png", caption, list(tokens), {}, dict(source or {}))
        try:
            atomic_save_image(self.folder / rec.image, image.convert("RGB"), compress_level=1)
            for j, (label, mask) in enumerate(masks.items()):
                rel = f"masks/{rid}_{j}.png"
                atomic_save_image(self.folder / rel, mask.convert("L"), compress_level=1)
                rec.masks[label] = rel
            self._jsonl.write(rec.to_json() + "\n")
            self._jsonl.flush()
        except OSError as e:  # a full disk: what is written stays usable and the run resumes later
            raise UnconfusedError(f"could not write to {self.folder} ({e.strerror or e}); free some space and run "
                                  "again - the dataset resumes where it stopped", input="name") from e
        self.records.append(rec)
        return rec

    def close(self, complete: bool) -> Path:
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())
        self._jsonl.close()
        self.manifest["complete"] = complete
        self._write_manifest()
        return self.folder

    def _write_manifest(self) -> None:
        counts: dict[str, int] = {}
        for r in self.records:
            counts[r.kind] = counts.get(r.kind, 0) + 1
        self.manifest["counts"] = counts
        atomic_write_json(self.folder / "manifest.json", self.manifest)


def read_records(folder: Path, *, repair: bool = False) -> Iterator[Record]:
    """The records of a dataset; a partial last line (a cut-off write) is skipped, and with
    `repair` cut from the file so appending continues cleanly."""
    path = Path(folder) / "records.jsonl"
    if not path.is_file():
        return
    raw = path.read_bytes()
    good_end = 0
    out = []
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            out.append(Record(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            break
        good_end += len(line)
    if repair and good_end != len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    yield from out


class Dataset:
    """A dataset folder opened for reading (a ComfyUI socket value: UNCONFUSED_DATASET)."""
    def __init__(self, folder: str | Path, *, input: str = "dataset"):
        self.folder = Path(folder)
        manifest = self.folder / "manifest.json"
        if not manifest.is_file():
            raise UnconfusedError(f"{self.folder} is not an Unconfused dataset (no manifest.json); build one with "
                                  "the augmentation builder", input=input)
        self.manifest = json.loads(manifest.read_text(encoding="utf-8"))
        if self.manifest.get("format") != FORMAT:
            raise UnconfusedError(f"{self.folder.name} has format {self.manifest.get('format')!r}, expected {FORMAT}", input=input)
        self.records = list(read_records(self.folder))
        if not self.records:
            raise UnconfusedError(f"the dataset {self.folder.name} has no pairs", input=input)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def concepts(self) -> list[dict]:
        return list(self.manifest.get("concepts", []))

    def __len__(self) -> int:
        return len(self.records)

    def of_kind(self, *kinds: str) -> list[Record]:
        return [r for r in self.records if not kinds or r.kind in kinds]

    def image(self, rec: Record) -> torch.Tensor:
        with Image.open(self.folder / rec.image) as im:
            return pil_to_tensor(im.convert("RGB"))

    def mask(self, rec: Record, label: str) -> torch.Tensor:
        with Image.open(self.folder / rec.masks[label]) as im:
            return pil_to_mask(im)

    def union_mask(self, rec: Record) -> torch.Tensor | None:
        """The union of the concept masks in a pair (what the masked loss uses)."""
        masks = [self.mask(rec, t) for t in rec.tokens if t in rec.masks]
        if not masks:
            return None
        return torch.stack(masks).amax(0)

    def examples(self, kinds: tuple[str, ...] = ("mix",)):
        """Training examples for the LoRA trainer (CLIF stage 2 trains on photos + Mix pairs)."""
        from .training_examples import Example

        for rec in self.of_kind(*kinds):
            yield Example(self.image(rec), rec.caption, self.union_mask(rec), list(rec.tokens))

    def describe(self) -> str:
        counts = ", ".join(f"{k}: {v}" for k, v in self.manifest.get("counts", {}).items())
        state = "complete" if self.complete else "INCOMPLETE (run the builder again to finish it)"
        return f"{self.folder.name}: {len(self)} pairs ({counts}), {state}"
