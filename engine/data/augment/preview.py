"""Preview pictures of a dataset's pairs and of each concept's regions."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..concepts import tensor_to_pil
from ..augmented_dataset import Dataset
from ...errors import UnconfusedError


# ------------------------------------------------------------------ reading back
def preview(dataset: Dataset, *, count: int = 12, kinds: Sequence[str] = (), seed: int = 0, masks: bool = True,
            cell: int = 256, columns: int = 4) -> Image.Image:
    """A grid of `count` pairs (spread over the dataset, chosen by `seed`), masks tinted, captions
    under each."""
    from ..concepts import pil_to_mask, pil_to_tensor
    from ...preview import grid, overlay_masks

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
    from ...preview import grid

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
