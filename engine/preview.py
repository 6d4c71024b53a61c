"""Preview pictures: image grids with captions and coloured mask overlays (PIL only)."""

from __future__ import annotations

import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .data.concepts import tensor_to_pil

# Distinct colours for concepts / regions (tab10).
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def overlay_masks(image: torch.Tensor, masks: list[torch.Tensor], alpha: float = 0.45) -> Image.Image:
    """The image with each mask tinted in its own colour. image [H,W,3], masks [H,W] in 0..1."""
    base = image.detach().float().cpu().numpy().copy()
    for i, m in enumerate(masks):
        m = m.detach().float().cpu()
        if tuple(m.shape) != tuple(base.shape[:2]):
            m = torch.nn.functional.interpolate(m[None, None], size=base.shape[:2], mode="bilinear")[0, 0]
        w = (m.numpy() * alpha)[..., None]
        color = np.array(PALETTE[i % len(PALETTE)], dtype=np.float32) / 255.0
        base = base * (1 - w) + color * w
    return tensor_to_pil(torch.from_numpy(base))


def wrap(text: str, chars: int) -> list[str]:
    """Lines of at most `chars` characters, broken between words only: a concept token such as
    `<my-dog>` is never split (a word longer than a line gets a line of its own, cut at its end)."""
    lines = textwrap.wrap(text, chars, break_long_words=False, break_on_hyphens=False)
    return [line if len(line) <= chars else line[:chars - 1] + "…" for line in lines]


def _legend(draw, x: int, y: int, items: list[tuple[str, tuple]], width: int, line_h: int, lines: int, font):
    """Colour swatches with their labels, wrapped between items (never inside one)."""
    cx, row = x, 0
    for text, colour in items:
        text = text if len(text) * 6 <= width - 16 else text[:max(1, (width - 16) // 6 - 1)] + "…"
        w = 12 + 6 * len(text) + 10
        if cx > x and cx + w > x + width:
            cx, row = x, row + 1
        if row >= lines:
            return
        draw.rectangle([cx, y + row * line_h + 1, cx + 8, y + row * line_h + 9], fill=tuple(colour))
        draw.text((cx + 12, y + row * line_h), text, fill=(235, 235, 235), font=font)
        cx += w


def grid(images: list[Image.Image], captions: list | None = None, *, cell: int = 256, columns: int = 4,
         caption_lines: int = 4, marks: list[bool] | None = None) -> Image.Image:
    """Images fitted into square cells with up to `caption_lines` wrapped caption lines under each
    (a caption is text, or a legend: a list of (label, (r, g, b)) drawn as colour swatches);
    `marks[i]` draws a red frame (e.g. a flagged caption)."""
    if not images:
        raise ValueError("nothing to show")
    font = ImageFont.load_default()
    line_h = 12
    text_h = (caption_lines * line_h + 6) if captions else 0
    cols = min(columns, len(images))
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    chars = max(8, cell // 6)
    for i, img in enumerate(images):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        thumb = img.convert("RGB").copy()
        thumb.thumbnail((cell, cell))
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        if marks and marks[i]:
            draw.rectangle([x + 1, y + 1, x + cell - 2, y + cell + text_h - 2], outline=(230, 40, 40), width=3)
        if captions and isinstance(captions[i], list):
            _legend(draw, x + 4, y + cell + 3, captions[i], cell - 8, line_h, caption_lines, font)
        elif captions:
            lines = wrap(captions[i] or "", chars)[:caption_lines]
            for j, line in enumerate(lines):
                draw.text((x + 4, y + cell + 3 + j * line_h), line, fill=(235, 235, 235), font=font)
    return sheet


def line_chart(values: list[float], title: str = "loss", *, width: int = 512, height: int = 256,
               smooth: int = 0) -> Image.Image:
    """A plain line chart (raw values in grey, a moving average in colour) - the loss curve."""
    img = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((8, 4), title, fill=(235, 235, 235), font=font)
    vals = [float(v) for v in values if v == v]
    if len(vals) < 2:
        draw.text((8, height // 2), "not enough points yet", fill=(160, 160, 160), font=font)
        return img
    smooth = smooth or max(1, len(vals) // 20)
    avg = np.convolve(vals, np.ones(smooth) / smooth, mode="valid").tolist()
    lo, hi = min(vals), max(vals)
    hi = hi if hi > lo else lo + 1e-8
    left, top, right, bottom = 48, 20, width - 8, height - 20

    def xy(i: int, v: float, n: int) -> tuple[float, float]:
        return left + (right - left) * i / max(n - 1, 1), bottom - (bottom - top) * (v - lo) / (hi - lo)

    draw.rectangle([left, top, right, bottom], outline=(90, 90, 90))
    draw.line([xy(i, v, len(vals)) for i, v in enumerate(vals)], fill=(110, 110, 110), width=1)
    off = (len(vals) - len(avg)) / 2
    draw.line([xy(i + off, v, len(vals)) for i, v in enumerate(avg)], fill=PALETTE[1], width=2)
    draw.text((4, top), f"{hi:.3g}", fill=(200, 200, 200), font=font)
    draw.text((4, bottom - 10), f"{lo:.3g}", fill=(200, 200, 200), font=font)
    draw.text((left, bottom + 4), f"step 1 .. {len(vals)}", fill=(200, 200, 200), font=font)
    return img


def heatmap(values: torch.Tensor, rows: list[str], columns: list[str], *, title: str = "", counts=None,
            cell: int = 72) -> Image.Image:
    """A matrix as coloured cells (0 = dark, 1 = bright; NaN = grey "-"), each with its value
    (and its count, when given), row and column labels."""
    font = ImageFont.load_default()
    v = values.detach().float().cpu()
    left = 12 + 7 * max((len(r) for r in rows), default=4)
    top = 40
    width, height = left + cell * len(columns) + 12, top + cell * len(rows) + 12
    img = Image.new("RGB", (max(width, 8 + 6 * len(title)), height), (24, 24, 24))
    draw = ImageDraw.Draw(img)
    draw.text((8, 4), title, fill=(235, 235, 235), font=font)
    for j, c in enumerate(columns):
        draw.text((left + j * cell + 4, top - 14), c[: cell // 6], fill=(220, 220, 220), font=font)
    for i, r in enumerate(rows):
        draw.text((6, top + i * cell + cell // 2 - 6), r, fill=(220, 220, 220), font=font)
        for j in range(len(columns)):
            x, y = left + j * cell, top + i * cell
            val = float(v[i, j])
            if val != val:
                draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=(70, 70, 70))
                draw.text((x + cell // 2 - 3, y + cell // 2 - 6), "-", fill=(200, 200, 200), font=font)
                continue
            t = min(max(val, 0.0), 1.0)
            color = tuple(int(a + (b - a) * t) for a, b in zip((20, 30, 70), (250, 200, 60)))
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=color)
            ink = (0, 0, 0) if t > 0.55 else (240, 240, 240)
            draw.text((x + 6, y + cell // 2 - 10), f"{val:.2f}", fill=ink, font=font)
            if counts is not None:
                draw.text((x + 6, y + cell // 2 + 4), f"n={int(counts[i, j])}", fill=ink, font=font)
    return img
