"""The pair kinds, declared once: a kind is one `@aug_kind` function that picks a pair's pieces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from .cutout import Piece

if TYPE_CHECKING:
    from .build import AugmentSettings, Builder


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
