"""The builder: settings, the pairs of every kind, streamed into the dataset, resumable."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ... import host
from .word_lists import REGION_VOCABULARY
from ..concepts import ConceptSet
from ..augmented_dataset import DatasetWriter, read_records
from ...errors import UnconfusedError
from ...files import atomic_write_json
from .cutout import Piece, _uint8, concept_cutouts, cutout_notes
from .bank import Bank
from .parts import Labeller, RegionProposer, RegionSet, _load_regions, _save_regions, find_regions
from .compose import compose, join_phrases
from .kinds import KINDS


DEFAULT_TEMPLATES = ["a photo of {}", "a picture of {}", "an image of {}", "a photo showing {}",
                     "a cropped photo of {}", "a bright photo of {}", "a rendering of {}", "{}"]


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


def records_digest(folder: str | os.PathLike) -> str:
    """A digest of a dataset's records and every file they name (tests, benchmarks)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for r in read_records(folder):
        h.update(r.to_json().encode())
        for rel in [r.image, *r.masks.values()]:
            h.update((folder / rel).read_bytes())
    return h.hexdigest()
