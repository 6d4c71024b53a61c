"""Placing pieces on a canvas and writing their caption (G-Aug, R-Aug, M-Aug)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageChops

from .cutout import Piece, _resize_binary


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
