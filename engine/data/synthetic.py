"""Built-in stand-in photos with exact masks (a red disc or a blue square on a textured background):
the smoke job, the memory plan's probe step, the tests and the benchmarks use them; nothing is read
from disk."""

from __future__ import annotations

import torch


def synthetic_photos(kind: int, n: int = 3, size: int = 96, seed: int = 0) -> list[torch.Tensor]:
    """Built-in stand-in photos: a coloured shape on a textured background."""
    return synthetic_concept(kind, n, size, seed)[0]


def synthetic_concept(kind: int, n: int = 3, size: int = 96, seed: int = 0
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Built-in stand-in photos and their exact masks: a red disc (even kinds) or a blue square
    (odd kinds) at a random place on a textured background."""
    g = torch.Generator().manual_seed(seed + kind)
    images, masks = [], []
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    colour = torch.tensor([[0.85, 0.2, 0.15], [0.15, 0.35, 0.9]][kind % 2])
    for i in range(n):
        img = 0.4 + 0.2 * torch.rand(size, size, 3, generator=g)
        cx, cy = (torch.rand(2, generator=g) - 0.5) * 0.6
        shape = ((xx - cx) ** 2 + (yy - cy) ** 2 < 0.25) if kind % 2 == 0 else \
            ((xx - cx).abs() < 0.4) & ((yy - cy).abs() < 0.4)
        img[shape] = colour
        images.append(img)
        masks.append(shape.float())
    return images, masks
